"""Preference sets: one source or a mixture, checked, normalised and tokenized (in parallel, cached)
into pairs with drop and truncation counts.

Rows come from `sources.py` (loading, column maps, `take`) and `rows.py` (checks, the internal
form); each row is tokenized by `tokenization.py`. A tokenized pair keeps its three parts apart
(`prompt_ids`, `chosen_ids`, `rejected_ids`); `collate.py` joins them into model rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from functools import partial
from pathlib import Path

import datasets
from datasets import Features, List, Value

from . import images
from .data_stats import DataStats
from .rows import FIELDS, DataError, check_rows
from .sources import load_rows, parts, rename, take
from .templates import resolve
from .tokenization import encode, tokenize_pair  # noqa: F401 (tokenize_pair: a one-row entry point, kept here too)

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
