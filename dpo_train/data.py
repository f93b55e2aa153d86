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
REFERENCE_COLUMNS = ("reference_chosen_logps", "reference_rejected_logps")  # precomputed, per pair


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


def completion_lengths(pairs: list[dict]) -> dict[str, torch.Tensor]:
    """Token counts of the chosen and rejected completions, (B,) each: length-normalised losses
    and the SFT term divide by them."""
    return {f"{side}_lengths": torch.tensor([len(p[f"{side}_ids"]) for p in pairs]) for side in ("chosen", "rejected")}


def precomputed_reference(pairs: list[dict]) -> dict[str, torch.Tensor]:
    """The pairs' precomputed reference log-probs as (B,) tensors, when the dataset carries them."""
    return {key: torch.tensor([p[key] for p in pairs]) for key in REFERENCE_COLUMNS if key in pairs[0]}


def collate(pairs: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """B pairs -> one batch of 2B right-padded rows, all chosen first, then all rejected,
    so one forward pass scores both sides.

    Returns input_ids, attention_mask, labels: (2B, T); num_tokens: () the pairs' own tokens
    (prompt + chosen + rejected, counted once), the work a user needs done; chosen_lengths,
    rejected_lengths: (B,) completion token counts.
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
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "num_tokens": torch.tensor(num_tokens), **completion_lengths(pairs), **precomputed_reference(pairs)}


def collate_packed(pairs: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """B pairs -> one padding-free row of B spans [prompt | chosen | rejected]: each prompt is encoded
    once for both answers, and there is no padding at all. The attention (attention.pair_attention)
    keeps each answer to its prompt and itself; position ids let both answers continue from the
    prompt's end, so each sees exactly what it would see alone.

    Returns input_ids, position_ids: (1, N) with N the pairs' own tokens; pair_spans: (B, 4) each
    span's start and its prompt, chosen and rejected lengths; logits_to_keep: (K,) the positions that
    predict the K completion tokens, in the order of targets (K,) and owners (K,) (each token's row
    in the 2B chosen-then-rejected order); num_rows: () = 2B; num_tokens: () = N; chosen_lengths,
    rejected_lengths: (B,) completion token counts. pad_token_id is unused (nothing is padded).
    """
    input_ids, position_ids, spans, predict, targets, owners = [], [], [], [], [], []
    for i, pair in enumerate(pairs):
        prompt, chosen, rejected = pair["prompt_ids"], pair["chosen_ids"], pair["rejected_ids"]
        start, p, c, r = len(input_ids), len(prompt), len(chosen), len(rejected)
        input_ids += prompt + chosen + rejected
        position_ids += list(range(p + c)) + list(range(p, p + r))
        spans.append((start, p, c, r))
        for completion, first, owner in ((chosen, start + p, i), (rejected, start + p + c, len(pairs) + i)):
            # token j is predicted by the position before it; the first one by the prompt's last token
            predict += [start + p - 1] + list(range(first, first + len(completion) - 1))
            targets += completion
            owners += [owner] * len(completion)
    return {
        "input_ids": torch.tensor([input_ids]), "position_ids": torch.tensor([position_ids]),
        "pair_spans": torch.tensor(spans), "logits_to_keep": torch.tensor(predict), "targets": torch.tensor(targets),
        "owners": torch.tensor(owners), "num_rows": torch.tensor(2 * len(pairs)), "num_tokens": torch.tensor(len(input_ids)),
        **completion_lengths(pairs), **precomputed_reference(pairs),
    }


def collate_rows(pairs: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """B pairs -> B rows [prompt | chosen | rejected]: each prompt is encoded once for both answers.
    The layout for models whose attention the padding-free one cannot stand in for.

    A per-row attention mask is causal and keeps the rejected completion from seeing the chosen
    one; position ids let both completions continue from the prompt's end, so each sees exactly
    what it would see alone. Rows are left-padded to a common length T (pads attend only to
    themselves and are never scored), which lines all completions up at the rows' ends: the LM
    head then runs only over the last K' positions, those that predict completion tokens.

    Returns input_ids, position_ids: (B, T); attention_mask: (B, 1, T, T) bool; logits_to_keep:
    (K',) the positions the head runs over; and for the K completion tokens: predict_index (K,)
    the row of the (B*K', V) logits that predicts each, targets (K,), owners (K,) its row in the
    2B chosen-then-rejected order; num_rows: () = 2B; num_tokens: () the pairs' own tokens;
    chosen_lengths, rejected_lengths: (B,) completion token counts.
    """
    num_pairs = len(pairs)
    lengths = [len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs]
    width = max(lengths)
    # the earliest predicting position is the last prompt token of the pair with the longest completions
    first_kept = min(width - len(p["chosen_ids"]) - len(p["rejected_ids"]) - 1 for p in pairs)
    kept = width - first_kept
    input_ids = torch.full((num_pairs, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((num_pairs, width), dtype=torch.long)
    attention_mask = torch.eye(width, dtype=torch.bool).repeat(num_pairs, 1, 1, 1)  # (B, 1, T, T)
    predict_index, targets, owners = [], [], []
    for i, pair in enumerate(pairs):
        prompt, chosen, rejected = pair["prompt_ids"], pair["chosen_ids"], pair["rejected_ids"]
        p, c, r, pad = len(prompt), len(chosen), len(rejected), width - lengths[i]
        input_ids[i, pad:] = torch.tensor(prompt + chosen + rejected)
        position_ids[i, pad:] = torch.tensor(list(range(p + c)) + list(range(p, p + r)))
        causal = torch.ones(lengths[i], lengths[i], dtype=torch.bool).tril()
        causal[p + c:, p:p + c] = False  # the rejected answer never sees the chosen one
        attention_mask[i, 0, pad:, pad:] = causal
        last_prompt = pad + p - 1
        for completion, start, owner in ((chosen, pad + p, i), (rejected, pad + p + c, num_pairs + i)):
            # token j is predicted by the position before it; the first one by the prompt's last token
            positions = [last_prompt] + list(range(start, start + len(completion) - 1))
            predict_index += [i * kept + position - first_kept for position in positions]
            targets += completion
            owners += [owner] * len(completion)
    return {
        "input_ids": input_ids, "position_ids": position_ids, "attention_mask": attention_mask,
        "logits_to_keep": torch.arange(first_kept, width), "predict_index": torch.tensor(predict_index),
        "targets": torch.tensor(targets), "owners": torch.tensor(owners), "num_rows": torch.tensor(2 * num_pairs),
        "num_tokens": torch.tensor(sum(lengths)), **completion_lengths(pairs), **precomputed_reference(pairs),
    }


COLLATES = {"packed": collate_packed, "rows": collate_rows, "padded": collate}  # train.layout -> collate function
