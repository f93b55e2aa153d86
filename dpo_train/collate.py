"""Collation: B tokenized pairs (prompt_ids, chosen_ids, rejected_ids, from data.py) into the model rows of
one layout (train.layout): `packed` (one padding-free row, each prompt once), `rows` (one left-padded row per
pair, the prompt once) or `padded` (2B right-padded rows, the prompt twice)."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # label of every token the loss skips: prompt and padding
REFERENCE_COLUMNS = ("reference_chosen_logps", "reference_rejected_logps")  # precomputed, per pair


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

    Returns input_ids, attention_mask, labels: (2B, T); token_copies: (2B, T) the attention mask (each
    token's count in these rows, as the other layouts give it for router.py); num_tokens: () the pairs' own tokens
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
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "token_copies": attention_mask,
            "num_tokens": torch.tensor(num_tokens), **completion_lengths(pairs), **precomputed_reference(pairs)}


def collate_packed(pairs: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """B pairs -> one padding-free row of B spans [prompt | chosen | rejected]: each prompt is encoded
    once for both answers, and there is no padding at all. The attention (attention.pair_attention)
    keeps each answer to its prompt and itself; position ids let both answers continue from the
    prompt's end, so each sees exactly what it would see alone.

    Returns input_ids, position_ids: (1, N) with N the pairs' own tokens; pair_spans: (B, 4) each
    span's start and its prompt, chosen and rejected lengths; logits_to_keep: (K,) the positions that
    predict the K completion tokens, in the order of targets (K,) and owners (K,) (each token's row
    in the 2B chosen-then-rejected order); num_rows: () = 2B; num_tokens: () = N; token_copies: (1, N)
    how many of the 2B padded rows of `collate` hold each token (2 for a prompt's, 1 for an answer's);
    chosen_lengths, rejected_lengths: (B,) completion token counts. pad_token_id is unused (nothing is padded).
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
        "token_copies": torch.tensor([sum(([2] * s[1] + [1] * (s[2] + s[3]) for s in spans), [])]),
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
    2B chosen-then-rejected order; num_rows: () = 2B; num_tokens: () the pairs' own tokens; token_copies:
    (B, T) each token's count in the 2B padded rows of `collate` (prompt 2, answers 1, padding 0);
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
    token_copies = torch.zeros((num_pairs, width), dtype=torch.long)
    attention_mask = torch.eye(width, dtype=torch.bool).repeat(num_pairs, 1, 1, 1)  # (B, 1, T, T)
    predict_index, targets, owners = [], [], []
    for i, pair in enumerate(pairs):
        prompt, chosen, rejected = pair["prompt_ids"], pair["chosen_ids"], pair["rejected_ids"]
        p, c, r, pad = len(prompt), len(chosen), len(rejected), width - lengths[i]
        input_ids[i, pad:] = torch.tensor(prompt + chosen + rejected)
        position_ids[i, pad:] = torch.tensor(list(range(p + c)) + list(range(p, p + r)))
        token_copies[i, pad:pad + p], token_copies[i, pad + p:] = 2, 1
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
        "num_tokens": torch.tensor(sum(lengths)), "token_copies": token_copies, **completion_lengths(pairs),
        **precomputed_reference(pairs),
    }


COLLATES = {"packed": collate_packed, "rows": collate_rows, "padded": collate}  # train.layout -> collate function
