"""Precomputed reference log-probs: one no-grad pass over a dataset, cached on disk.

The cache key hashes the reference weights, the tokenized pairs (which carry the data and the
tokenization settings) and the log-prob settings, so a rerun or a resume reuses the file and any
change to those recomputes it. With the log-probs in hand, training holds one model, not two.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .collate import REFERENCE_COLUMNS
from .engines import whole_tensors
from .logps import concatenated_forward
from .progress import bar


def weights_digest(reference: torch.nn.Module) -> str:
    """Hash of the whole reference weights: the same on every process, also when each holds a shard."""
    digest = hashlib.sha256()
    for name, tensor in whole_tensors(reference):
        digest.update(name.encode())
        digest.update(tensor.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_key(weights: str, dataset, settings: str) -> str:
    """Hash of the reference weights' digest, the tokenized pairs (their images' bytes too) and the log-prob settings."""
    digest = hashlib.sha256((weights + settings).encode())
    for column in ("prompt_ids", "chosen_ids", "rejected_ids", *(["image_digest"] if "image_digest" in dataset.column_names
                                                                 else [])):
        digest.update(repr(dataset[column]).encode())
    return digest.hexdigest()[:20]


@torch.no_grad()
def compute(accelerator, reference, dataset, collate_fn, batch_size: int) -> torch.Tensor:
    """(N, 2) chosen and rejected log-probs of every pair, in dataset order, on every process."""
    loader = accelerator.prepare(DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn))
    chunks = []
    for batch in bar(loader, "reference log-probs", show=accelerator.is_main_process):
        chosen, rejected = concatenated_forward(reference, batch)
        # gather_for_metrics returns the batches of all processes in dataset order, minus the padding
        chunks.append(accelerator.gather_for_metrics(torch.stack([chosen, rejected], dim=1)))
    return torch.cat(chunks).float().cpu()


def attach(accelerator, reference, datasets: list, collate_fn, batch_size: int, cache_dir: Path, log=print) -> list:
    """Return `datasets` (None entries stay None) with reference log-prob columns, each computed
    once or read from the cache. The weights, the costly part of the key, are hashed once."""
    weights = weights_digest(reference)
    return [None if dataset is None else _attach_one(accelerator, reference, weights, dataset, collate_fn,
                                                    batch_size, cache_dir, log) for dataset in datasets]


def _attach_one(accelerator, reference, weights: str, dataset, collate_fn, batch_size: int, cache_dir: Path, log):
    path = cache_dir / "reference_logps" / f"{cache_key(weights, dataset, 'sum-over-completion-v1')}.pt"
    if path.is_file():
        logps = torch.load(path)
        log(f"Reference log-probs for {len(dataset)} pairs read from {path}")
    else:
        logps = compute(accelerator, reference, dataset, collate_fn, batch_size)
        if accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(logps, tmp)
            tmp.rename(path)  # appears whole or not at all
        log(f"Reference log-probs for {len(dataset)} pairs computed and cached in {path}")
    accelerator.wait_for_everyone()
    for i, column in enumerate(REFERENCE_COLUMNS):
        dataset = dataset.add_column(column, logps[:, i].tolist())
    return dataset
