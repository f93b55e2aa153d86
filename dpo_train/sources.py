"""Where preference rows come from: files, dataset directories and hub ids, split slices, column
maps, and the sources of a mixture with the rows each gives (`take`, drawn under the seed).

Problems raise `DataError`: one line that starts with the source, then the row (0-based, counting
data rows) or, for unreadable text, the line (1-based, as an editor shows it), and the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .rows import FIELDS, DataError, value_problem

FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# Suffixes that mark a source as a file (never a hub id) even when it does not exist.
DATA_SUFFIXES = {*FILE_TYPES, ".csv", ".tsv", ".txt", ".arrow", ".gz", ".zip", ".xlsx"}
SPLIT = re.compile(r"([\w.-]+)(\[[^\]]*\])?")  # a split name and an optional slice: train[:10%]


@dataclass
class Part:
    """One source, resolved: what to load and how many rows it gives."""
    path: str
    split: str
    columns: dict[str, str]  # field -> the column it comes from, for renamed fields only
    take: int | float | None = None  # rows (an int) or a fraction (a float); None: all
    rows: int | None = None  # the rows a saved config says this source gave; None: unchecked
    key: str | None = None  # the config key that names it in a mixture (data.train[1]), for messages


def parts(spec, split: str, columns: dict | None = None, key: str | None = None) -> list[Part]:
    """The sources of `spec`: a path or hub id, or a list of those and {path, split, columns, take,
    rows} mappings (config Source objects). A source's own split and columns win over the defaults."""
    renamed = {k: v for k, v in (columns or {}).items() if v}
    if isinstance(spec, str):
        return [Part(spec, split, renamed)]
    found = []
    for i, item in enumerate(spec):
        item = dataclasses.asdict(item) if dataclasses.is_dataclass(item) else ({"path": item} if isinstance(item, str)
                                                                                else dict(item))
        own = {k: v for k, v in (item.get("columns") or {}).items() if v}
        found.append(Part(item["path"], item.get("split") or split, {**renamed, **own}, item.get("take"),
                          item.get("rows"), f"{key or 'data'}[{i}]"))
    return found


def is_hub_id(source: str) -> bool:
    """An OWNER/NAME or NAME that is not a local path: what the hub's `datasets` metadata may list."""
    path = Path(source)
    return not (path.exists() or path.suffix in DATA_SUFFIXES or source.startswith(("/", ".", "~"))) and \
        bool(re.fullmatch(r"(?:[\w.-]+/)?[\w.-]+", source))


def load_rows(source: str, split: str) -> datasets.Dataset:
    """Load a local .jsonl/.json/.parquet file, a dataset directory (data files, or save_to_disk's
    output), or a hub dataset id. `split` may carry a slice (`train[:1000]`, `test[:10%]`); a file is
    one split, so for a file only its slice counts."""
    path = Path(source)
    if path.is_file() and path.suffix not in FILE_TYPES:
        raise DataError(f"{source}: unknown file type {path.suffix or '(no suffix)'!r}; "
                        f"use {', '.join(FILE_TYPES)}, a dataset directory or a hub dataset id")
    if not path.exists() and (path.suffix in DATA_SUFFIXES or source.startswith(("/", ".", "~"))):
        raise DataError(f"{source}: file not found")
    match = SPLIT.fullmatch(split)
    if not match:
        raise DataError(f"{source}: split {split!r} is not a split name with an optional slice, like train[:10%]")
    try:
        if path.is_file():
            rows = datasets.load_dataset(FILE_TYPES[path.suffix], data_files=str(path),
                                         split="train" + (match[2] or ""))
        elif (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            rows = from_disk(path, match[1], match[2])
        else:
            rows = datasets.load_dataset(source, split=split)  # a directory of data files, or a hub id
    except DataError:
        raise
    except Exception as e:  # datasets raises many types; the user needs one line, not a traceback
        problem = file_problem(path) if path.is_file() else None
        where = "cannot load dataset" if path.exists() else "no such local file or directory, and no hub dataset"
        detail = str(e).strip().splitlines()[0] if str(e).strip() else "no details"
        raise DataError(f"{source}: {problem or f'{where} ({type(e).__name__}: {detail})'}") from None
    # A JSON field holding more than one type of value loads as opaque JSON values (and datasets
    # decodes a string like "4" in such a column as the number 4): find the culprit in the file.
    if not all(regular(rows.data.schema.field(k).type) for k in FIELDS if k in rows.column_names):
        problem = (file_problem(path) if path.is_file() else None) or \
            "a field mixes strings and conversations; use one form per field"
        raise DataError(f"{source}: {problem}")
    return rows


def from_disk(path: Path, name: str, piece: str | None) -> datasets.Dataset:
    """A `save_to_disk` folder: one dataset, or a dict of splits (`name` picks one); `piece` slices it."""
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if name not in loaded:
            raise DataError(f"{path}: no split {name!r} (splits: {', '.join(loaded)})")
        loaded = loaded[name]
    if not piece:
        return loaded
    [span] = datasets.ReadInstruction.from_spec(f"{name}{piece}").to_absolute({name: len(loaded)})
    return loaded.select(range(span.from_, span.to))


def regular(column_type: pa.DataType) -> bool:
    """Strings, or lists of {role, content} structs: the two forms a field may take."""
    if pa.types.is_list(column_type) or pa.types.is_large_list(column_type):
        return pa.types.is_struct(column_type.value_type)
    return pa.types.is_string(column_type) or pa.types.is_large_string(column_type) or pa.types.is_null(column_type)


def rename(rows: datasets.Dataset, columns: dict[str, str], source: str) -> datasets.Dataset:
    """Give the fields their own names (data.columns: {prompt: question, ...}); a column that already
    has a field's name but is not the one mapped to it is dropped."""
    for field, column in columns.items():
        if column not in rows.column_names:
            near = difflib.get_close_matches(column, rows.column_names, n=1, cutoff=0.6)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise DataError(f"{source}: data.columns.{field}: no column {column!r} ({hint}columns: "
                            f"{', '.join(rows.column_names)})")
    clash = [f for f, c in columns.items() if f in rows.column_names and f != c and f not in columns.values()]
    rows = rows.remove_columns(clash) if clash else rows
    return rows.rename_columns({c: f for f, c in columns.items() if c != f})


def take(rows: datasets.Dataset, part: Part, seed: int, index: int) -> tuple[datasets.Dataset, list[int] | None]:
    """The rows a source gives to its mixture: all of them, or `take` of them drawn without
    replacement under (seed, the source's index), kept in file order. Returns the rows and their
    row numbers in the source (None: all rows, in order). A source that no longer gives the
    `rows` its saved config records is an error: its data changed."""
    label = f"{part.path}: {part.key}" if part.key else part.path
    available = len(rows)
    wanted = available if part.take is None else (
        part.take if isinstance(part.take, int) else max(1, round(part.take * available)))
    if wanted > available:
        raise DataError(f"{label}.take: {wanted} rows asked for, but the source has {available}")
    if part.rows is not None and part.rows != wanted:
        raise DataError(f"{label}.rows: the config records {part.rows} rows from this source, and it now gives "
                        f"{wanted}: the data changed (set rows: null to accept it)")
    if wanted == available:
        return rows, None
    picked = np.sort(np.random.default_rng([seed, index]).choice(available, size=wanted, replace=False)).tolist()
    return rows.select(picked), picked


def file_problem(path: Path) -> str | None:
    """Why a local file does not load, or holds bad values, found by reading it directly."""
    if FILE_TYPES[path.suffix] == "json":
        return json_problem(path)
    try:
        return "the dataset is empty" if pq.read_metadata(path).num_rows == 0 else None
    except (OSError, pa.ArrowException) as e:
        return f"not a Parquet file ({str(e).splitlines()[0]})"


def json_problem(path: Path) -> str | None:
    """The first thing wrong in a JSON Lines file (or a JSON array of objects): bytes that are not
    UTF-8, text that is not JSON, a row that is not an object, a bad field value, or a field that
    is a string in one row and a conversation in another. Reads in Python, so it only runs after
    the fast path found a problem it cannot place."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        return f"line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); re-save it as UTF-8"
    records = []  # (where, value): the 1-based line of a JSON Lines row, or the 0-based index in an array
    if text.lstrip().startswith("["):
        try:
            records = [(f"row {i} (0-based)", item) for i, item in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            return f"line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})"
    else:
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append((f"line {number}", json.loads(line)))
                except json.JSONDecodeError as e:
                    return f"line {number}: not valid JSON ({e.msg} at column {e.colno})"
    if not records:
        return "the dataset is empty"
    for where, record in records:
        if not isinstance(record, dict):
            return f"{where}: expected a JSON object with {', '.join(FIELDS)}, got {type(record).__name__}"
    keys = [k for k in FIELDS if any(k in record for _, record in records)]
    first_kind = {}
    for row, (_, record) in enumerate(records):
        for key in keys:
            value = record.get(key)
            problem = value_problem(value)
            kind = "a conversation" if isinstance(value, list) else "a string"
            seen = first_kind.setdefault(key, (kind, row))
            if not problem and kind != seen[0]:
                problem = f"is {kind}, but in row {seen[1]} it is {seen[0]}; use one form per field"
            if problem:
                return f"row {row} (0-based): field {key!r} {problem}"
    return None
