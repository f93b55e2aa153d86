"""Raw preference rows: loading them from files, directories or the hub, and checking them.

A row has `prompt`, `chosen` and `rejected`, each a non-empty string or a non-empty list of
`{role, content}` messages. Without a `prompt` field (Anthropic-HH style), the prompt is the
prefix that `chosen` and `rejected` share.

Every problem a user can fix raises `DataError`: one line naming the file, the row (0-based,
counting data rows; blank lines in a .jsonl are not rows) or, for unreadable text, the line
(1-based, as an editor shows it), and the field.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

FIELDS = ("prompt", "chosen", "rejected")
FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# Suffixes that mark a source as a file (never a hub id) even when it does not exist.
DATA_SUFFIXES = {*FILE_TYPES, ".csv", ".tsv", ".txt", ".arrow", ".gz", ".zip", ".xlsx"}


class DataError(ValueError):
    """A data problem, reported to the user as one line naming the source, row and field."""


def load_rows(source: str, split: str) -> datasets.Dataset:
    """Load a local .jsonl/.json/.parquet file, a local dataset directory, or a hub dataset id."""
    path = Path(source)
    if path.is_file() and path.suffix not in FILE_TYPES:
        raise DataError(f"{source}: unknown file type {path.suffix or '(no suffix)'!r}; "
                        f"use {', '.join(FILE_TYPES)}, a dataset directory or a hub dataset id")
    if not path.exists() and (path.suffix in DATA_SUFFIXES or source.startswith(("/", ".", "~"))):
        raise DataError(f"{source}: file not found")
    try:
        if not path.is_file():
            return datasets.load_dataset(source, split=split)  # a local dataset directory or a hub id
        rows = datasets.load_dataset(FILE_TYPES[path.suffix], data_files=str(path), split="train")
    except Exception as e:  # datasets raises many types; the user needs one line, not a traceback
        problem = file_problem(path) if path.is_file() else None
        where = "cannot load dataset" if path.exists() else "no such local file or directory, and no hub dataset"
        detail = str(e).strip().splitlines()[0] if str(e).strip() else "no details"
        raise DataError(f"{source}: {problem or f'{where} ({type(e).__name__}: {detail})'}") from None
    # A JSON field holding more than one type of value loads as opaque JSON values (and datasets
    # decodes a string like "4" in such a column as the number 4): find the culprit in the file.
    if not all(regular(rows.data.schema.field(k).type) for k in FIELDS if k in rows.column_names):
        problem = file_problem(path) or "a field mixes strings and conversations; use one form per field"
        raise DataError(f"{source}: {problem}")
    return rows


def regular(column_type: pa.DataType) -> bool:
    """Strings, or lists of {role, content} structs: the two forms a field may take."""
    if pa.types.is_list(column_type) or pa.types.is_large_list(column_type):
        return pa.types.is_struct(column_type.value_type)
    return pa.types.is_string(column_type) or pa.types.is_large_string(column_type) or pa.types.is_null(column_type)


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


def value_problem(value) -> str | None:
    """What is wrong with one `prompt`/`chosen`/`rejected` value, or None if it is usable."""
    if value is None:
        return "is null or missing"
    if isinstance(value, str):
        return None if value.strip() else "is an empty string"
    if isinstance(value, list):
        if not value:
            return "is an empty list of messages"
        for j, message in enumerate(value):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                return f"message {j} must be {{\"role\": string, \"content\": string}}, got {message!r:.60}"
            if not message["content"].strip():
                return f"message {j} has empty content"
        return None
    return f"must be a string or a list of {{role, content}} messages, got {type(value).__name__} {value!r:.40}"


def first_problem(rows: datasets.Dataset, key: str) -> tuple[int, str] | None:
    """(row, problem) for the first bad value of column `key`, or None. String columns (the
    usual case) are checked with vectorised Arrow kernels; conversations one row at a time."""
    column = rows.with_format("arrow")[key]
    if pa.types.is_null(column.type):
        return 0, "is null or missing"
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return next(((i, why) for i, why in enumerate(map(value_problem, rows[key])) if why), None)
    try:
        column.validate(full=True)  # datasets loads JSON strings without checking their UTF-8
    except pa.ArrowInvalid:
        as_bytes = column.cast(pa.binary()).to_pylist()
        return next(i for i, b in enumerate(as_bytes) if b is not None and not is_utf8(b)), "is not valid UTF-8 text"
    null = pc.index(pc.is_null(column), True).as_py()  # -1 when there is none
    blank = pc.index(pc.fill_null(pc.equal(pc.utf8_trim_whitespace(column), ""), False), True).as_py()
    return min(((i, why) for i, why in ((null, "is null or missing"), (blank, "is an empty string")) if i >= 0),
               default=None)


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def check_rows(rows: datasets.Dataset, source: str) -> None:
    """Every row needs `chosen` and `rejected`, and `prompt` unless the set has no prompt field,
    as non-empty strings or non-empty lists of {role, content} messages. Raises DataError naming
    the earliest bad row and its field."""
    columns = rows.column_names
    for key in FIELDS:
        near = difflib.get_close_matches(key, [c for c in columns if c not in FIELDS], n=1, cutoff=0.7)
        # A missing prompt means "implicit", unless a near-miss spelling shows it was meant to be there.
        if key not in columns and (key != "prompt" or near):
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise DataError(f"{source}: missing field {key!r} ({hint}columns: {', '.join(columns)})")
    problems = [(*found, key) for key in FIELDS if key in columns and (found := first_problem(rows, key))]
    if problems:
        row, why, key = min(problems, key=lambda problem: problem[0])  # ties: the first field in FIELDS order
        raise DataError(f"{source}: row {row} (0-based): field {key!r} {why}")


def split_shared_prefix(chosen, rejected) -> tuple:
    """(prompt, chosen, rejected) for a row without a prompt: the prompt is the longest shared prefix.

    Conversations split between messages, and each completion keeps at least its last message.
    Text splits before the last whitespace of the shared prefix, so no word is cut in two and
    each completion starts with its separator (" Sure", as a tokenizer expects to see it).
    """
    if isinstance(chosen, list) and isinstance(rejected, list):
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            raise DataError("no 'prompt' field, and 'chosen' and 'rejected' share no leading messages to use as one")
        return chosen[:n], chosen[n:], rejected[n:]
    if isinstance(chosen, str) and isinstance(rejected, str):
        shared = os.path.commonprefix([chosen, rejected])
        last_space = re.search(r"\s+\S*$", shared)  # the last whitespace run, then any partial word
        cut = last_space.start() if last_space else 0
        if cut == 0:
            raise DataError("no 'prompt' field, and 'chosen' and 'rejected' share no leading text to use as one")
        return chosen[:cut], chosen[cut:], rejected[cut:]
    raise DataError("no 'prompt' field, and 'chosen' and 'rejected' are not both strings or both conversations")


def with_implicit_prompts(rows: datasets.Dataset, source: str) -> datasets.Dataset:
    """Add a `prompt` column cut from the shared prefix of `chosen` and `rejected`."""
    def split(row, index):
        try:
            prompt, chosen, rejected = split_shared_prefix(row["chosen"], row["rejected"])
        except DataError as e:
            raise DataError(f"{source}: row {index} (0-based): {e}") from None
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    return rows.map(split, with_indices=True, desc=f"Extracting prompts from {Path(source).name}")
