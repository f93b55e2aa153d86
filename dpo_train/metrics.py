"""Metric bookkeeping: per-batch reward statistics, and the metrics.jsonl log."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def pair_metrics(losses, chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps) -> dict:
    """Batch sums (not means), so that micro-batches and processes add up exactly.

    All inputs (B,). `count` carries B; divide the sums by it to report means.
    """
    return {
        "loss": losses.detach().sum(),
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
        "logps/chosen": policy_chosen_logps.detach().sum(),
        "logps/rejected": policy_rejected_logps.detach().sum(),
        "count": torch.tensor(float(losses.shape[0]), device=losses.device),
    }


def add(total: dict | None, new: dict) -> dict:
    return dict(new) if total is None else {k: total[k] + new[k] for k in total}


def means(sums: dict, prefix: str = "") -> dict[str, float]:
    """Turn summed metrics into per-pair means (floats), keys prefixed (e.g. 'eval/')."""
    count = sums["count"].item()
    return {prefix + k: v.item() / count for k, v in sums.items() if k != "count"}


class MetricsLog:
    """Appends one JSON object per line (main process only; a step's record is flushed as soon as
    it is written) and hands numeric values to Accelerate's trackers (TensorBoard, ...), if any."""

    def __init__(self, path: Path, accelerator):
        self.path, self.accelerator = path, accelerator

    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def truncate(self, size: int) -> None:
        """Forget every record written after the log was `size` bytes long (resume)."""
        with self.path.open("a") as f:
            f.truncate(size)

    def write(self, step: int, values: dict) -> None:
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")
        self.accelerator.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)
