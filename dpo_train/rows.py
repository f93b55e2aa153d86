"""Preference rows: checking their fields, and normalising each row's shape into the one internal
form that everything downstream sees.

A row has `chosen` and `rejected`, and usually `prompt`: each a non-empty string or a non-empty list
of `{role, content}` messages. The shapes the hub's preference sets come in, normalised here:

- prompt, chosen, rejected as strings, or as conversations (the completions the assistant's turns);
- no `prompt` (Anthropic-HH, trl-lib/ultrafeedback_binarized): the prefix chosen and rejected share;
- a `prompt` plus chosen and rejected as whole conversations that repeat the prompt's turns
  (HuggingFaceH4/ultrafeedback_binarized): the turns they share are the prompt, and the given
  `prompt` must agree with them.

The internal form: `prompt`, `chosen`, `rejected` as lists of {role, content} turns, and `text`:
whether all three came as strings (each is then one turn holding the text as it was given).

Every problem a user can fix raises `DataError`: one line naming the file, the row (0-based,
counting data rows; blank lines in a .jsonl are not rows) and the field.
"""

from __future__ import annotations

import difflib
import os
import re

import datasets
import pyarrow as pa
import pyarrow.compute as pc

FIELDS = ("prompt", "chosen", "rejected")
CHECK_BATCH = 1000  # rows of conversations turned into Python objects at a time, to check them


class DataError(ValueError):
    """A data problem, reported to the user as one line naming the source, row and field."""


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
                    and isinstance(message.get("content"), (str, list))):
                return f"message {j} must be {{\"role\": string, \"content\": string}}, got {message!r:.60}"
            if isinstance(message["content"], list):  # a multimodal message: text and image parts (TRL's form)
                if problem := parts_problem(message["content"]):
                    return f"message {j} {problem}"
            elif not message["content"].strip():
                return f"message {j} has empty content"
        return None
    return f"must be a string or a list of {{role, content}} messages, got {type(value).__name__} {value!r:.40}"


def parts_problem(parts: list) -> str | None:
    """What is wrong with a message's content given as parts ({type: text, text} or {type: image}), or None."""
    if not parts:
        return "has an empty list of content parts"
    for k, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and not (isinstance(part.get("text"), str) and part["text"].strip()):
            return f"part {k} is a text part without text"
        if kind not in ("text", "image"):
            return f"part {k} must be {{\"type\": \"text\", \"text\": string}} or {{\"type\": \"image\"}}, got {part!r:.60}"
    return None


def first_problem(rows: datasets.Dataset, key: str) -> tuple[int, str] | None:
    """(row, problem) for the first bad value of column `key`, or None. String columns (the
    usual case) are checked with vectorised Arrow kernels; conversations one row at a time. Both
    go a piece at a time, so that no copy of a whole column is ever held in memory."""
    column = rows.with_format("arrow")[key]
    if pa.types.is_null(column.type):
        return 0, "is null or missing"
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        for start, batch in enumerate(rows.select_columns([key]).iter(batch_size=CHECK_BATCH)):
            found = next(((i, why) for i, why in enumerate(map(value_problem, batch[key])) if why), None)
            if found:
                return start * CHECK_BATCH + found[0], found[1]
        return None
    try:
        column.validate(full=True)  # datasets loads JSON strings without checking their UTF-8
    except pa.ArrowInvalid:
        as_bytes = column.cast(pa.binary()).to_pylist()
        return next(i for i, b in enumerate(as_bytes) if b is not None and not is_utf8(b)), "is not valid UTF-8 text"
    null = pc.index(pc.is_null(column), True).as_py()  # -1 when there is none
    blank, offset = -1, 0
    for chunk in column.chunks:  # a trimmed copy of the whole column would cost its size in memory
        found = pc.index(pc.fill_null(pc.equal(pc.utf8_trim_whitespace(chunk), ""), False), True).as_py()
        if found >= 0:
            blank = offset + found
            break
        offset += len(chunk)
    return min(((i, why) for i, why in ((null, "is null or missing"), (blank, "is an empty string")) if i >= 0),
               default=None)


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def check_rows(rows: datasets.Dataset, source: str, columns: dict[str, str] | None = None) -> None:
    """Every row needs `chosen` and `rejected`, and `prompt` unless the set has no prompt field,
    as non-empty strings or non-empty lists of {role, content} messages. Raises DataError naming
    the earliest bad row and its field (and the column it came from, when `columns` renamed it)."""
    names = rows.column_names
    for key in FIELDS:
        near = difflib.get_close_matches(key, [c for c in names if c not in FIELDS], n=1, cutoff=0.7)
        # A missing prompt means "implicit", unless a near-miss spelling shows it was meant to be there.
        if key not in names and (key != "prompt" or near):
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise DataError(f"{source}: missing field {key!r} ({hint}columns: {', '.join(names)}; "
                            "data.columns maps other names)")
    problems = [(*found, key) for key in FIELDS if key in names and (found := first_problem(rows, key))]
    if problems:
        row, why, key = min(problems, key=lambda problem: problem[0])  # ties: the first field in FIELDS order
        column = f" (column {columns[key]!r})" if columns and key in columns else ""
        raise DataError(f"{source}: row {row} (0-based): field {key!r}{column} {why}")


def normalise(prompt, chosen, rejected) -> dict:
    """One checked row in the internal form: {prompt, chosen, rejected: lists of {role, content}
    turns, text: bool}. `prompt` None means the row has none. Raises DataError (without the row)."""
    if prompt is None:
        prompt, chosen, rejected = split_shared_prefix(chosen, rejected)
    elif isinstance(chosen, list) and isinstance(rejected, list) and (repeats(chosen) or repeats(rejected)):
        prompt, chosen, rejected = split_repeated_prompt(prompt, chosen, rejected)
    return {"prompt": turns(prompt, "user"), "chosen": turns(chosen, "assistant"),
            "rejected": turns(rejected, "assistant"), "text": all(isinstance(v, str) for v in (prompt, chosen, rejected))}


def turns(value, role: str) -> list[dict]:
    """A string as one turn of `role`; a conversation as its turns, {role, content} only and in
    that order, so that rows from any source share one schema."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return [{"role": message["role"], "content": flat(message["content"])} for message in value]


def flat(content):
    """A message's content: its text, also when given as text parts; parts that hold an image stay parts
    ({type, text}: images.py renders them)."""
    if isinstance(content, str):
        return content
    parts = [{"type": part["type"], "text": part.get("text")} for part in content]
    return parts if any(part["type"] != "text" for part in parts) else "".join(part["text"] for part in parts)


def as_given(value: list[dict], text: bool):
    """An internal field as the source gave it: the text for a text row, else the turns."""
    return value[0]["content"] if text else value


def repeats(completion: list[dict]) -> bool:
    """A completion that opens with a turn other than the assistant's repeats the prompt's turns."""
    return completion[0]["role"] != "assistant"


def shared_turns(chosen: list[dict], rejected: list[dict]) -> int:
    """How many leading messages both share, leaving each at least its last one."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return n


def split_shared_prefix(chosen, rejected) -> tuple:
    """(prompt, chosen, rejected) for a row without a prompt: the prompt is the longest shared prefix.

    Conversations split between messages, and each completion keeps at least its last message.
    Text splits before the last whitespace of the shared prefix, so no word is cut in two and
    each completion starts with its separator (" Sure", as a tokenizer expects to see it).
    """
    if isinstance(chosen, list) and isinstance(rejected, list):
        n = shared_turns(chosen, rejected)
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


def split_repeated_prompt(prompt, chosen: list[dict], rejected: list[dict]) -> tuple:
    """(prompt, chosen, rejected) for whole conversations that repeat the prompt's turns (the H4
    ultrafeedback shape): the turns both share are the prompt, the rest are the completions. A
    string `prompt` must be the first user turn they share; a conversation, their first turns."""
    if not (repeats(chosen) and repeats(rejected)):
        whole, alone = ("chosen", "rejected") if repeats(chosen) else ("rejected", "chosen")
        raise DataError(f"field {whole!r} repeats the prompt's turns and {alone!r} does not; "
                        "give both as whole conversations, or both as the assistant's turns only")
    n = shared_turns(chosen, rejected)
    if n == 0:
        raise DataError(f"fields 'chosen' and 'rejected' repeat different prompt turns (message 0: "
                        f"{difference(chosen[0]['content'], rejected[0]['content'])})")
    shared = chosen[:n]
    if isinstance(prompt, str):
        user = next((m["content"] for m in shared if m["role"] == "user"), None)
        if user is None:
            raise DataError("field 'prompt' is given, but the turns 'chosen' and 'rejected' share hold no user turn")
        if user.strip() != prompt.strip():
            raise DataError(f"field 'prompt' differs from the user turn that 'chosen' and 'rejected' repeat "
                            f"({difference(prompt, user)})")
    else:
        for j, message in enumerate(prompt):
            theirs = shared[j] if j < n else None
            if theirs is None or (theirs["role"], theirs["content"].strip()) != (message["role"], message["content"].strip()):
                got = "nothing" if theirs is None else f"a {theirs['role']} turn: {difference(message['content'], theirs['content'])}"
                raise DataError(f"field 'prompt' message {j} ({message['role']}) differs from the turn 'chosen' and "
                                f"'rejected' repeat there ({got})")
    return shared, chosen[n:], rejected[n:]


def difference(given: str, other: str, context: int = 20) -> str:
    """Where two texts first differ, with a little of each around that point."""
    at = len(os.path.commonprefix([given, other]))
    start = max(0, at - context)
    clip = lambda text: ("..." if start else "") + text[start:at + context] + ("..." if len(text) > at + context else "")
    return f"first difference at character {at}: {clip(given)!r} vs {clip(other)!r}"
