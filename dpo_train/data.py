"""Preference pairs: chat templates, tokenization with -100 prompt labels, truncation, collation.

Rows come from `rows.py` (loading and checks). A tokenized pair keeps its three parts apart
(`prompt_ids`, `chosen_ids`, `rejected_ids`); `collate` joins them into model rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .rows import FIELDS, DataError, check_rows, load_rows, with_implicit_prompts

IGNORE_INDEX = -100  # label of every token the loss skips: prompt and padding


def render(row: dict, tokenizer) -> tuple[str, str, str, bool]:
    """Return (prompt_text, chosen_text, rejected_text, templated). Chat models get their chat
    template: a string prompt becomes a user turn, a string completion an assistant turn."""
    prompt, chosen, rejected = (row[k] for k in FIELDS)
    conversation = next((k for k in FIELDS if isinstance(row[k], list)), None)
    if tokenizer.chat_template is None:
        if conversation:
            raise DataError(f"field {conversation!r} is a conversation (a list of messages), which needs a "
                            "tokenizer with a chat template, and this model's tokenizer has none")
        return prompt, chosen, rejected, False
    as_turns = lambda v, role: v if isinstance(v, list) else [{"role": role, "content": v}]
    prompt_msgs = as_turns(prompt, "user")
    prompt_text = tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
    completions = []
    for key, completion in (("chosen", chosen), ("rejected", rejected)):
        full = tokenizer.apply_chat_template(prompt_msgs + as_turns(completion, "assistant"), tokenize=False)
        if not full.startswith(prompt_text):
            raise DataError(f"field {key!r}: the chat template renders the prompt differently once a reply follows it")
        completions.append(full[len(prompt_text):])
    return prompt_text, completions[0], completions[1], True


def tokenize_pair(row: dict, tokenizer, max_length: int, max_prompt_length: int) -> dict:
    """Tokenize one row into prompt and completion ids, each completion ending with EOS.

    Truncation: the prompt is cut from the left to `max_prompt_length` (its end, next to the
    answer, matters most); then completions are cut from the right so prompt + completion fits
    `max_length`. A pair with an empty completion (nothing but EOS) or identical completions gets a
    `drop_reason`. `*_full_length` are the token counts before truncation.
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
    full_lengths = {"prompt_full_length": len(prompt_ids), "chosen_full_length": len(completions[0]),
                    "rejected_full_length": len(completions[1])}
    prompt_truncated = len(prompt_ids) > max_prompt_length
    if prompt_truncated:
        prompt_ids = prompt_ids[-max_prompt_length:]
    room = max_length - len(prompt_ids)
    completion_truncated = any(len(ids) > room for ids in completions)
    chosen_ids, rejected_ids = (ids[:room] for ids in completions)
    empty = any(not [i for i in ids if i != eos] for ids in (chosen_ids, rejected_ids))  # nothing but EOS
    drop_reason = ("empty completion" if empty else
                   "chosen == rejected" if completions[0] == completions[1] else
                   "chosen == rejected after truncation" if chosen_ids == rejected_ids else "")
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids,
            "prompt_truncated": prompt_truncated, "completion_truncated": completion_truncated,
            "drop_reason": drop_reason, **full_lengths}


@dataclass
class DataStats:
    rows: int
    kept: int
    prompt_truncated: int
    completion_truncated: int
    dropped: dict[str, int]
    implicit_prompts: bool = False  # prompts were cut from the shared prefix of chosen and rejected
    full_lengths: dict[str, list[int]] = field(default_factory=dict)  # kept pairs' token counts before truncation

    def __str__(self) -> str:
        dropped = ", ".join(f"{n} ({why})" for why, n in self.dropped.items()) or "0"
        implicit = "; prompts taken from the shared prefix of chosen and rejected" if self.implicit_prompts else ""
        return (f"{self.kept}/{self.rows} pairs kept; dropped {dropped}; truncated prompts "
                f"{self.prompt_truncated}, truncated completions {self.completion_truncated}{implicit}")


def build_dataset(source: str, split: str, tokenizer, max_length: int, max_prompt_length: int):
    """Load, check and tokenize a preference set. Returns (tokenized dataset, raw rows, DataStats);
    the raw rows are the kept ones, with a `prompt` column even when it was implicit."""
    rows = load_rows(source, split)
    if len(rows) == 0:
        raise DataError(f"{source}: the dataset is empty")
    check_rows(rows, source)
    implicit = "prompt" not in rows.column_names
    if implicit:
        rows = with_implicit_prompts(rows, source)

    def tokenize(row, index):
        try:
            return tokenize_pair(row, tokenizer, max_length, max_prompt_length)
        except DataError as e:
            raise DataError(f"{source}: row {index} (0-based): {e}") from None

    tokenized = rows.map(tokenize, with_indices=True, remove_columns=rows.column_names,
                         desc=f"Tokenizing {Path(source).name}")
    reasons = tokenized["drop_reason"]
    dropped = {why: reasons.count(why) for why in sorted(set(reasons) - {""})}
    keep = [i for i, why in enumerate(reasons) if not why]
    kept = tokenized.select(keep)
    stats = DataStats(len(rows), len(keep), sum(tokenized["prompt_truncated"]),
                      sum(tokenized["completion_truncated"]), dropped, implicit,
                      {part: list(kept[f"{part}_full_length"]) for part in FIELDS})
    if not keep:
        raise DataError(f"{source}: no usable pairs remain ({stats})")
    return kept.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]), rows.select(keep), stats


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


def collate_packed(pairs: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """B pairs -> one padding-free row where each pair's prompt appears once: [P1 C1 R1 P2 C2 R2 ...].

    A block attention mask lets every token see only its own pair, causally, and keeps the rejected
    completion from seeing the chosen one; position ids restart at each pair and both completions
    continue from the prompt's end, so each completion sees exactly what it would see alone.

    Returns input_ids, position_ids: (1, L); attention_mask: (1, 1, L, L) bool; and per completion
    token (K of them): predict_positions (K,) the position whose logits predict it, targets (K,) the
    token, owners (K,) its row in the 2B chosen-then-rejected order; num_rows: () = 2B; num_tokens.
    """
    num_pairs = len(pairs)
    input_ids, position_ids, segment, is_rejected, is_chosen = [], [], [], [], []
    predict_positions, targets, owners = [], [], []
    for i, pair in enumerate(pairs):
        prompt, chosen, rejected = pair["prompt_ids"], pair["chosen_ids"], pair["rejected_ids"]
        start, p = len(input_ids), len(prompt)
        input_ids += prompt + chosen + rejected
        position_ids += list(range(p)) + list(range(p, p + len(chosen))) + list(range(p, p + len(rejected)))
        segment += [i] * (p + len(chosen) + len(rejected))
        is_chosen += [False] * p + [True] * len(chosen) + [False] * len(rejected)
        is_rejected += [False] * (p + len(chosen)) + [True] * len(rejected)
        last_prompt = start + p - 1
        for side, completion, offset, owner in ((0, chosen, p, i), (1, rejected, p + len(chosen), num_pairs + i)):
            first = start + offset
            # token j is predicted by the token before it; the first one by the prompt's last token
            predict_positions += [last_prompt] + list(range(first, first + len(completion) - 1))
            targets += completion
            owners += [owner] * len(completion)
    segment, is_chosen, is_rejected = map(torch.tensor, (segment, is_chosen, is_rejected))
    length = len(input_ids)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same_pair = segment[:, None] == segment[None, :]
    rejected_sees_chosen = is_rejected[:, None] & is_chosen[None, :]
    batch = {
        "input_ids": torch.tensor([input_ids]), "position_ids": torch.tensor([position_ids]),
        "attention_mask": (causal & same_pair & ~rejected_sees_chosen)[None, None],
        "predict_positions": torch.tensor(predict_positions), "targets": torch.tensor(targets),
        "owners": torch.tensor(owners), "num_rows": torch.tensor(2 * num_pairs),
        "num_tokens": torch.tensor(length),
    }
    for key in ("reference_chosen_logps", "reference_rejected_logps"):
        if key in pairs[0]:
            batch[key] = torch.tensor([p[key] for p in pairs])
    return batch
