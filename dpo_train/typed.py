"""Typed values from parsed YAML: a dataclass tree built from mappings, each value coerced to its
field's type (dataclasses, unions, lists, literals, scalars). Unknown keys and wrong types raise
ConfigError, one line naming the file and the dotted key (`data.train[1].take`)."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Literal

import yaml


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader refusing a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        first = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True) if key_node.tag != "tag:yaml.org,2002:merge" else None
            if isinstance(key, (str, int, float, bool)) and key in first:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r} (first given at line "
                                                        f"{first[key] + 1}); give each key once", key_node.start_mark)
            first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def read_yaml(path: Path):
    """The parsed YAML of `path`; ConfigError (one line, with the line and column) when it is not valid."""
    try:
        return yaml.load(path.read_text(), Loader=UniqueKeyLoader)
    except yaml.MarkedYAMLError as e:  # the problem's place, and the place of what it broke off, when known
        def at(mark):
            return f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        context = f" ({e.context}{at(e.context_mark)})" if e.context and e.context_mark else ""
        raise ConfigError(f"{path}: not valid YAML{at(e.problem_mark)}: {e.problem}{context}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None


def numbers(tree, prefix: str = ""):
    """(dotted key, value) of every float in a dataclass tree, list items included (`loss.weights[1]`)."""
    if dataclasses.is_dataclass(tree):
        for f in dataclasses.fields(tree):
            yield from numbers(getattr(tree, f.name), f"{prefix}{f.name}.")
    elif isinstance(tree, list):
        for i, item in enumerate(tree):
            yield from numbers(item, f"{prefix.rstrip('.')}[{i}].")
    elif isinstance(tree, float):
        yield prefix.rstrip("."), tree


class ConfigError(ValueError):
    """A config problem, reported to the user as one line."""
    same_on_every_process = True  # every process reads the same file: printed once


def checker(where: str):
    """check(ok, key, why, value): raise ConfigError, one line naming `where` and the key, unless ok."""
    def check(ok: bool, key: str, why: str, value) -> None:
        if not ok:
            raise ConfigError(f"{where}{key}: {why}, got {value!r}")
    return check


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
        close = difflib.get_close_matches(unknown[0], fields, n=1)
        hint = f"did you mean {prefix}{close[0]}? " if close else ""
        raise ConfigError(f"{path}: unknown key {prefix}{unknown[0]} ({hint}known: {', '.join(fields)})")
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


def setting(default, help: str):
    """A config field and its help text, which `dpo-train --help` and docs/configuration.md show. A list
    or mapping default is copied for each instance; an empty-string default marks a key the config must set."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class Group:
    """The keys of one dataclass of the tree: its dotted prefix, its docstring, (key, type, default, help) rows."""
    prefix: str
    doc: str
    rows: list[tuple[str, str, str, str]]


def groups(cls, prefix: str = "", seen: set | None = None) -> list[Group]:
    """Every key under `cls`, one Group per dataclass in declaration order: its own keys, then its nested
    sections (`model.lora.`) and the mapping items of its lists (`data.train[i].`, each item class once)."""
    seen = set() if seen is None else seen
    rows, children = [], []
    for f, hint in zip(dataclasses.fields(cls), typing.get_type_hints(cls).values()):
        if dataclasses.is_dataclass(hint):
            children.append((hint, f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((prefix + f.name, _kind(hint), "required" if default == "" else _yaml(default),
                     f.metadata.get("help", "")))
        for item in _item_classes(hint):
            if item not in seen:
                seen.add(item)
                children.append((item, f"{prefix}{f.name}[i]."))
    doc = cls.__doc__ or ""
    doc = "" if doc.startswith(cls.__name__ + "(") else inspect.cleandoc(doc)  # dataclass's own: no docstring
    found = [Group(prefix.rstrip("."), doc, rows)]
    for child, child_prefix in children:
        found += groups(child, child_prefix, seen)
    return found


def _item_classes(hint) -> list:
    """The dataclasses a field holds inside lists or unions (data.train's Source), not the field's own type."""
    found = []
    for arg in typing.get_args(hint):
        found += [arg] if dataclasses.is_dataclass(arg) else _item_classes(arg)
    return found


def _yaml(value) -> str:
    """A default as one writes it in YAML: null, false, 1.0e-06, [all-linear]."""
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def describe(cls) -> str:
    """Every config key with its type, default and help text, for --help (docs/configuration.md says the same)."""
    lines = []
    for group in groups(cls):
        for key, kind, default, help in group.rows:
            lines.append(f"{key}  ({kind}, {'required' if default == 'required' else 'default ' + default})")
            lines += ["    " + line for line in textwrap.wrap(help, 96, break_on_hyphens=False, break_long_words=False)]
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
