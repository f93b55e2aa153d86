"""Typed values from parsed YAML: a dataclass tree built from mappings, each value coerced to its
field's type (dataclasses, unions, lists, literals, scalars). Unknown keys and wrong types raise
ConfigError, one line naming the file and the dotted key (`data.train[1].take`)."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Literal

import yaml


class ConfigError(ValueError):
    """A config problem, reported to the user as one line."""
    same_on_every_process = True  # every process reads the same file: printed once


class _WrongType(ConfigError):
    """A value of the wrong type altogether at `key` (a union there reports its own, wider, message)."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


def build(cls, raw, prefix: str, path: Path):
    """Build dataclass `cls` from a mapping, rejecting unknown keys and coercing to each field's type."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise _WrongType(f"{path}: {prefix.rstrip('.')}: must be a mapping, got {type(raw).__name__}", prefix.rstrip("."))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{path}: unknown key {prefix}{unknown[0]} (known: {', '.join(fields)})")
    values = {}
    for name, value in raw.items():
        key, hint = prefix + name, hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = build(hint, value, key + ".", path)
        else:
            values[name] = _coerce(value, hint, key, path)
    return cls(**values)


def _coerce(value, hint, key: str, path: Path):
    """Return `value` as type `hint`, or raise ConfigError naming the key."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):  # a mapping inside a list (a data source)
        return build(hint, value, key + ".", path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        # The option shaped like the value (a list, a mapping, a scalar) is tried first, so that its error,
        # the one that names the real problem (an unknown key inside, a value out of a list), is reported.
        options.sort(key=lambda option: _shape(option) != _shape(value))
        errors = []
        for option in options:
            try:
                return _coerce(value, option, key, path)
            except ConfigError as e:
                errors.append(e)
        specific = [e for e in errors if not (isinstance(e, _WrongType) and e.key == key)]
        if specific:
            raise specific[0]
        raise _WrongType(f"{path}: {key}: expected {_kind(hint)}, got {value!r}", key)
    if origin is list:  # a single value stands for a one-item list
        return [_coerce(v, args[0], f"{key}[{i}]", path) for i, v in enumerate(value if isinstance(value, list) else [value])]
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {key}: must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if hint is bool and isinstance(value, bool):
        return value
    if hint is dict and isinstance(value, dict):  # passed on as it is (model.init_kwargs, data.chat_template_kwargs)
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and not isinstance(value, bool):
        try:  # PyYAML reads `5e-7` (no dot) as a string; a float field still means a float
            return float(value)
        except (TypeError, ValueError):
            pass
    if hint is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise _WrongType(f"{path}: {key}: expected {_kind(hint)}, got {value!r}", key)


def _shape(hint_or_value) -> str:
    """'list', 'mapping' or 'scalar', for a type hint or a value."""
    if isinstance(hint_or_value, list) or typing.get_origin(hint_or_value) is list:
        return "list"
    return "mapping" if isinstance(hint_or_value, dict) or dataclasses.is_dataclass(hint_or_value) else "scalar"


def _kind(hint) -> str:
    """A type hint in words, for --help and errors: 'str or list of (str or {path, split, ...})'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return " | ".join(map(str, args))
    if origin is list:
        inner = _kind(args[0])
        return f"list of ({inner})" if " " in inner else f"list of {inner}"
    if origin in (typing.Union, types.UnionType):
        if len(args) == 2 and typing.get_args(args[1]) == (args[0],):  # Union[X, list[X]]
            return f"{_kind(args[0])}; one or a list"
        return " or ".join(_kind(a) for a in args)
    if hint is type(None):
        return "null"
    if hint is dict:
        return "mapping"
    if dataclasses.is_dataclass(hint):
        return "{" + ", ".join(f.name for f in dataclasses.fields(hint)) + "}"
    return getattr(hint, "__name__", str(hint))


def describe(cls, prefix: str = "") -> str:
    """Every config key with its type and default, one per line (for --help)."""
    lines = []
    for f, hint in zip(dataclasses.fields(cls), typing.get_type_hints(cls).values()):
        if dataclasses.is_dataclass(hint):
            lines.append(describe(hint, f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"{prefix}{f.name}  ({_kind(hint)}, default {default!r})")
    return "\n".join(lines)


def apply_overrides(raw: dict, overrides, path) -> None:
    """Set each `section.key=value` override (the value read as YAML) in the raw mapping, in place."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"{path}: override {item!r} must look like section.key=value")
        *parents, name = key.split(".")
        node = raw
        for depth, part in enumerate(parents):  # model.lora.r=16 reaches into nested mappings
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ConfigError(f"{path}: {'.'.join(parents[:depth + 1])}: must be a mapping")
            node = node[part]
        node[name] = yaml.safe_load(value) if value else ""
