"""Preference pairs: loading, chat templates, tokenization with -100 prompt labels, collation.

A row is either strings (`prompt`, `chosen`, `rejected`) or conversations (lists of
`{role, content}` messages). A tokenized pair keeps its three parts apart
(`prompt_ids`, `chosen_ids`, `rejected_ids`); `collate` joins them into model rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets
import torch

IGNORE_INDEX = -100  # label of every token the loss skips: prompt and padding
FIELDS = ("prompt", "chosen", "rejected")
FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """A data problem, reported to the user as one line naming the source, row and field."""


def load_rows(source: str, split: str) -> datasets.Dataset:
    """Load a local .jsonl/.json/.parquet file, a local dataset directory, or a hub dataset id."""
    path = Path(source)
    try:
        if path.suffix in FILE_TYPES:
            if not path.is_file():
                raise DataError(f"{source}: file not found")
            return datasets.load_dataset(FILE_TYPES[path.suffix], data_files=str(path), split="train")
        return datasets.load_dataset(source, split=split)  # a local dataset directory or a hub id
    except DataError:
        raise
    except Exception as e:  # datasets raises many types; the user needs one line, not a traceback
        raise DataError(f"{source}: cannot load dataset ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def render(row: dict, tokenizer) -> tuple[str, str, str, bool]:
    """Return (prompt_text, chosen_text, rejected_text, templated). Chat models get their chat
    template: a string prompt becomes a user turn, a string completion an assistant turn."""
    prompt, chosen, rejected = (row[k] for k in FIELDS)
    conversational = any(isinstance(v, list) for v in (prompt, chosen, rejected))
    if tokenizer.chat_template is None:
        if conversational:
            raise DataError("conversational rows need a tokenizer with a chat template, and this one has none")
        return prompt, chosen, rejected, False
    as_turns = lambda v, role: v if isinstance(v, list) else [{"role": role, "content": v}]
    prompt_msgs = as_turns(prompt, "user")
    prompt_text = tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
    completions = []
    for completion in (chosen, rejected):
        full = tokenizer.apply_chat_template(prompt_msgs + as_turns(completion, "assistant"), tokenize=False)
        if not full.startswith(prompt_text):
            raise DataError("the chat template renders the prompt differently once a reply follows it")
        completions.append(full[len(prompt_text):])
    return prompt_text, completions[0], completions[1], True


def tokenize_pair(row: dict, tokenizer, max_length: int, max_prompt_length: int) -> dict:
    """Tokenize one row into prompt and completion ids, each completion ending with EOS.

    Truncation: the prompt is cut from the left to `max_prompt_length` (its end, next to the
    answer, matters most); then completions are cut from the right so prompt + completion fits
    `max_length`. A pair with an empty completion (nothing but EOS) or identical completions gets a
    `drop_reason`.
    """
    prompt_text, chosen_text, rejected_text, templated = render(row, tokenizer)
    eos = tokenizer.eos_token_id
    # A chat template already holds BOS and turn markers; raw text gets the tokenizer's specials.
    prompt_ids = tokenizer(prompt_text, add_special_tokens=not templated)["input_ids"]
    completions = []
    for text in (chosen_text, rejected_text):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if eos in ids:  # end at the template's end-of-turn, dropping the newline some templates add
            ids = ids[: len(ids) - ids[::-1].index(eos)]
        elif text:
            ids = ids + [eos]
        completions.append(ids)
    prompt_truncated = len(prompt_ids) > max_prompt_length
    if prompt_truncated:
        prompt_ids = prompt_ids[-max_prompt_length:]
    room = max_length - len(prompt_ids)
    completion_truncated = any(len(ids) > room for ids in completions)
    chosen_ids, rejected_ids = (ids[:room] for ids in completions)
    empty = any(not [i for i in ids if i != eos] for ids in (chosen_ids, rejected_ids))  # nothing but EOS
    return {
        "prompt_ids": prompt_ids,
        "chosen_ids": chosen_ids,
        "rejected_ids": rejected_ids,
        "prompt_truncated": prompt_truncated,
        "completion_truncated": completion_truncated,
        "drop_reason": "empty completion" if empty else "chosen == rejected" if chosen_ids == rejected_ids else "",
    }


@dataclass
class DataStats:
    rows: int
    kept: int
    prompt_truncated: int
    completion_truncated: int
    dropped: dict[str, int]

    def __str__(self) -> str:
        dropped = ", ".join(f"{n} ({why})" for why, n in self.dropped.items()) or "0"
        return (f"{self.kept}/{self.rows} pairs kept; dropped {dropped}; truncated prompts "
                f"{self.prompt_truncated}, truncated completions {self.completion_truncated}")


def check_rows(rows: datasets.Dataset, source: str) -> None:
    """Every row needs `prompt`, `chosen` and `rejected` as strings or lists of messages."""
    missing = [k for k in FIELDS if k not in rows.column_names]
    if missing:
        raise DataError(f"{source}: missing field {missing[0]!r} (columns: {', '.join(rows.column_names)})")
    for i, row in enumerate(rows.select_columns(list(FIELDS))):
        for k in FIELDS:
            if not isinstance(row[k], (str, list)):
                raise DataError(f"{source}: row {i}: field {k!r} must be a string or a list of messages, "
                                f"got {type(row[k]).__name__}")


def build_dataset(source: str, split: str, tokenizer, max_length: int, max_prompt_length: int):
    """Load, check and tokenize a preference set. Returns (tokenized dataset, raw rows, DataStats)."""
    rows = load_rows(source, split)
    if len(rows) == 0:
        raise DataError(f"{source}: the dataset is empty")
    check_rows(rows, source)
    try:
        tokenized = rows.map(tokenize_pair, fn_kwargs=dict(tokenizer=tokenizer, max_length=max_length,
                             max_prompt_length=max_prompt_length), remove_columns=rows.column_names,
                             desc=f"Tokenizing {Path(source).name}")
    except DataError as e:
        raise DataError(f"{source}: {e}") from None
    reasons = tokenized["drop_reason"]
    dropped = {why: reasons.count(why) for why in sorted(set(reasons) - {""})}
    keep = [i for i, why in enumerate(reasons) if not why]
    stats = DataStats(len(rows), len(keep), sum(tokenized["prompt_truncated"]),
                      sum(tokenized["completion_truncated"]), dropped)
    if not keep:
        raise DataError(f"{source}: no usable pairs remain ({stats})")
    columns = ["prompt_ids", "chosen_ids", "rejected_ids"]
    return tokenized.select(keep).select_columns(columns), rows.select(keep), stats


def collate(pairs: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """B pairs -> one batch of 2B right-padded rows, all chosen first, then all rejected,
    so one forward pass scores both sides.

    Returns input_ids, attention_mask, labels: (2B, T); num_tokens: () the pairs' own tokens
    (prompt + chosen + rejected, counted once), the work a user needs done.
    """
    rows = [(p["prompt_ids"], p[side]) for side in ("chosen_ids", "rejected_ids") for p in pairs]
    width = max(len(prompt) + len(completion) for prompt, completion in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, completion) in enumerate(rows):
        n = len(prompt) + len(completion)
        input_ids[i, :n] = torch.tensor(prompt + completion)
        labels[i, len(prompt):n] = torch.tensor(completion)
        attention_mask[i, :n] = 1
    num_tokens = sum(len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
             "num_tokens": torch.tensor(num_tokens)}
    for key in ("reference_chosen_logps", "reference_rejected_logps"):  # present when precomputed: (B,)
        if key in pairs[0]:
            batch[key] = torch.tensor([p[key] for p in pairs])
    return batch
