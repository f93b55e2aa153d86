"""Preference sets: one source or a mixture, checked, normalised and tokenized (in parallel, cached)
into pairs with drop and truncation counts; and collation of pairs into model rows.

Rows come from `sources.py` (loading, column maps, `take`) and `rows.py` (checks, the internal
form); each row is tokenized by `tokenization.py`. A tokenized pair keeps its three parts apart
(`prompt_ids`, `chosen_ids`, `rejected_ids`); `collate` joins them into model rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from functools import partial
from pathlib import Path

import datasets
import torch
from datasets import Features, List, Value

from . import images
from .data_stats import DataStats
from .rows import FIELDS, DataError, check_rows
from .sources import load_rows, parts, rename, take
from .templates import resolve
from .tokenization import encode, tokenize_pair  # noqa: F401 (tokenize_pair: a one-row entry point, kept here too)

IGNORE_INDEX = -100  # label of every token the loss skips: prompt and padding
REFERENCE_COLUMNS = ("reference_chosen_logps", "reference_rejected_logps")  # precomputed, per pair
MAX_PROCESSES = 8  # the default data.num_proc: the machine's cores, at most this many
ROWS_PER_PROCESS = 1000  # ... and at most one per this many rows, since starting a process costs a second or two
IDS = List(Value("int32"))
FEATURES = Features({"prompt_ids": IDS, "chosen_ids": IDS, "rejected_ids": IDS, "prompt_truncated": Value("bool"),
                     "completion_truncated": Value("bool"), "drop_reason": Value("string"), "rendered_apart": Value("bool"),
                     **{f"{part}_full_length": Value("int32") for part in FIELDS},
                     "prompt": List({"role": Value("string"), "content": Value("string")}), "text": Value("bool")})


def processes(num_proc: int | None, rows: int) -> int:
    """Tokenizing processes: `num_proc`, or by default the cores (at most MAX_PROCESSES, and one per
    ROWS_PER_PROCESS rows); never more than the rows."""
    if num_proc is None:
        num_proc = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
                       MAX_PROCESSES, rows // ROWS_PER_PROCESS)
    return max(1, min(num_proc, rows))


def settings(data, seed: int) -> dict:
    """build_dataset's keyword arguments from the config's `data` section (and train.seed), as plain values."""
    return {"max_length": data.max_length, "max_prompt_length": data.max_prompt_length,
            "chat_template": data.chat_template, "system_prompt": data.system_prompt,
            "columns": dataclasses.asdict(data.columns), "num_proc": data.num_proc, "seed": seed,
            "template_kwargs": data.chat_template_kwargs, "trl_tokenization": data.trl_tokenization}


def with_rows(spec, stats: DataStats | None):
    """A mixture's sources with the rows each gave recorded (`rows`), for the run's config.yaml, where
    the resume check compares them; a single source (a string) stays as it is."""
    if not isinstance(spec, list) or stats is None:
        return spec
    return [dataclasses.replace(source, rows=given["rows"]) for source, given in zip(spec, stats.sources)]


def train_and_eval_sets(data, tokenizer, seed: int, vision=None) -> tuple:
    """The config's `data` section built: (train set, eval set, eval rows, {split: DataStats}), the
    eval entries None without data.eval. A mixture's rows per source are recorded in `data` (with_rows).
    `vision` (vision.Vision, the model's processor) tokenizes rows with images."""
    build = partial(build_dataset, tokenizer=tokenizer, vision=vision, **settings(data, seed))
    train_set, _, train_stats = build(data.train, data.train_split, key="data.train")
    eval_set, eval_rows, eval_stats = (build(data.eval, data.eval_split, key="data.eval") if data.eval
                                       else (None, None, None))
    data.train, data.eval = with_rows(data.train, train_stats), with_rows(data.eval, eval_stats)
    return train_set, eval_set, eval_rows, {"train": train_stats, **({"eval": eval_stats} if eval_stats else {})}


def fingerprint(pairs) -> str:
    """sha256 of tokenized pairs' token ids in order: a resume compares it with the checkpoint's, so a
    data file whose content changed since (or that tokenizes otherwise) does not pass unseen."""
    digest, table = hashlib.sha256(), pairs.with_format("arrow")[:]  # the rows as selected, in order
    for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
        ids = table.column(column).combine_chunks()
        digest.update(ids.value_lengths().to_numpy(zero_copy_only=False).tobytes())
        digest.update(ids.flatten().to_numpy(zero_copy_only=False).tobytes())
    if "image_digest" in pairs.column_names:  # the images' bytes, which the token ids do not show
        digest.update(",".join(table.column("image_digest").to_pylist()).encode())
    return digest.hexdigest()


def build_dataset(spec, split: str, tokenizer, max_length: int, max_prompt_length: int, *, chat_template: str = "auto",
                  system_prompt: str | None = None, columns: dict | None = None, num_proc: int | None = None,
                  seed: int = 0, key: str | None = None, template_kwargs: dict | None = None,
                  trl_tokenization: bool = False, vision=None):
    """Load, check, normalise and tokenize a preference set: one source (a path or hub id), or a
    mixture (a list of sources; see sources.parts), each source on its own, then concatenated in
    order. `key` names the config key in messages (data.train). Returns (tokenized dataset, kept
    rows, DataStats); the kept rows hold each pair's prompt in the internal form (`prompt` turns,
    `text`) and, when a source has one, its `answer`. `template_kwargs` reach the chat template (with
    a row's `tools`); `trl_tokenization` tokenizes templated pairs as TRL does (tokenization.encode). Rows
    with images (images.py) need `vision`, the model's processor; their pairs keep images.FEATURES too."""
    template = resolve(chat_template, tokenizer)
    if template is None and system_prompt:
        raise DataError("data.system_prompt: a system turn needs a chat template, and the tokenizer has none "
                        "(set data.chat_template)")
    pieces, sources = [], []
    for index, part in enumerate(parts(spec, split, columns, key)):
        rows = load_rows(part.path, part.split)
        rows = rename(rows, part.columns, part.path) if part.columns else rows
        if len(rows) == 0:
            raise DataError(f"{part.path}: the dataset is empty")
        check_rows(rows, part.path, part.columns)
        available, implicit = len(rows), "prompt" not in rows.column_names
        rows, row_numbers = take(rows, part, seed, index)
        pieces.append(tokenize_rows(rows, row_numbers, part.path, tokenizer, template, system_prompt, max_length,
                                    max_prompt_length, processes(num_proc, len(rows)), template_kwargs,
                                    trl_tokenization, vision))
        sources.append({"path": part.path, "split": part.split, "available": available, "rows": len(rows),
                        "implicit": implicit})
    if any("answer" in piece.column_names for piece in pieces):  # every source then has one, null where it had none
        pieces = [p if "answer" in p.column_names else p.add_column("answer", [None] * len(p), feature=Value("string"))
                  for p in pieces]
    if any("images" in piece.column_names for piece in pieces):  # text sources in a mixture with image sources
        pieces = [p if "images" in p.column_names else images.without_images(p) for p in pieces]
    tokenized = datasets.concatenate_datasets(pieces) if len(pieces) > 1 else pieces[0]
    reasons = tokenized["drop_reason"]
    start = 0
    for source, piece in zip(sources, pieces):
        source["kept"] = reasons[start:start + len(piece)].count("")
        start += len(piece)
    dropped = {why: reasons.count(why) for why in sorted(set(reasons) - {""})}
    keep = [i for i, why in enumerate(reasons) if not why]
    kept = tokenized.select(keep)
    implicit = [source.pop("implicit") for source in sources]
    stats = DataStats(len(tokenized), len(keep), sum(tokenized["prompt_truncated"]),
                      sum(tokenized["completion_truncated"]), dropped, any(implicit),
                      {part: list(kept[f"{part}_full_length"]) for part in FIELDS}, sources, sum(kept["rendered_apart"]))
    if not keep:
        raise DataError(f"{spec if isinstance(spec, str) else key or 'data'}: no usable pairs remain ({stats})")
    rows = kept.select_columns(["prompt", "text", *(["answer"] if "answer" in kept.column_names else [])])
    pair_columns = ["prompt_ids", "chosen_ids", "rejected_ids", *(images.FEATURES if "images" in kept.column_names else [])]
    return kept.select_columns(pair_columns), rows, stats


def tokenize_rows(rows, row_numbers, source: str, tokenizer, template, system_prompt, max_length, max_prompt_length,
                  num_proc: int, template_kwargs: dict | None = None, trl_tokenization: bool = False,
                  vision=None) -> datasets.Dataset:
    """One source's rows -> FEATURES (+ answer, + images.FEATURES for a source with images), in `num_proc`
    processes. A bad row raises DataError naming the source and the row's number in it (`row_numbers`:
    after `take`, which rows were taken)."""
    answer, image_column = "answer" in rows.column_names, images.column(rows)
    rows = images.by_reference(rows, image_column) if image_column else rows
    base = Path(source).parent if Path(source).is_file() else Path(source)  # where relative image paths start

    def prepare(row, index):
        try:
            if image_column:
                pair, ids = images.encode(row, image_column, base, vision, tokenizer, max_length, max_prompt_length,
                                          template, system_prompt, template_kwargs, trl_tokenization)
            else:
                pair, ids = encode(row, tokenizer, max_length, max_prompt_length, template, system_prompt,
                                   template_kwargs, trl_tokenization)
        except DataError as e:
            raise DataError(f"{source}: row {index if row_numbers is None else row_numbers[index]} (0-based): {e}") from None
        return {**ids, "prompt": pair["prompt"], "text": pair["text"],
                **({"answer": None if row["answer"] is None else str(row["answer"])} if answer else {})}

    features = Features({**FEATURES, **({"answer": Value("string")} if answer else {}),
                         **(images.FEATURES if image_column else {})})
    return rows.map(prepare, with_indices=True, remove_columns=rows.column_names, features=features,
                    num_proc=num_proc if num_proc > 1 else None, desc=f"Tokenizing {Path(source).name}")


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
    how many of the 2B padded rows of data.collate hold each token (2 for a prompt's, 1 for an answer's);
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
    (B, T) each token's count in the 2B padded rows of data.collate (prompt 2, answers 1, padding 0);
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
