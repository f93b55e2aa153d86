"""Metric bookkeeping: per-batch reward statistics, and the metrics.jsonl log."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .engines import on_any_process
from .run_dir import OutputError, cause

PROC_STATUS, PROC_CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def pair_metrics(losses, chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps,
                 aux_loss=None) -> dict:
    """Batch sums (not means), so that micro-batches and processes add up exactly.

    All inputs (B,), but `aux_loss`: the batch's MoE router loss, () or None (then not logged), summed as
    B times itself like a per-pair value. `count` carries B; divide the sums by it to report means.
    """
    aux = {} if aux_loss is None else {"aux_loss": aux_loss.detach() * losses.shape[0]}
    return {**aux,
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


def reset_peak_memory() -> None:
    """Start measuring peak memory from now: the accelerator's allocator peak, or on a CPU (Linux)
    the process's peak resident set size (VmHWM), reset by writing 5 to /proc/self/clear_refs."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    elif PROC_CLEAR_REFS.exists():
        try:
            PROC_CLEAR_REFS.write_text("5")
        except OSError:  # not allowed here: the peak then counts from the process's start
            pass


def peak_memory_mb() -> float:
    """This process's peak memory since reset_peak_memory, in MiB: allocated CUDA memory on a GPU;
    peak RSS on a CPU (0 where /proc is missing)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    if not PROC_STATUS.exists():
        return 0.0
    return int(re.search(r"VmHWM:\s+(\d+) kB", PROC_STATUS.read_text()).group(1)) / 1024


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
        """Append a record; when that fails (a full disk) every process raises OutputError, the log as it was."""
        error = None
        if self.accelerator.is_main_process:
            size = self.size()
            try:
                with self.path.open("a") as f:
                    f.write(json.dumps({"step": step, **values}) + "\n")
            except OSError as e:
                error = cause(e, self.path)
                self.truncate(size)  # no partial record is left
        if on_any_process(self.accelerator, error is not None):
            raise OutputError(f"cannot write {self.path}: {error or 'see the main process'}; the checkpoints are "
                              "intact: continue with --resume auto once this is fixed")
        self.accelerator.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)


def write_record(accelerator, log: MetricsLog, position: dict, window: dict, elapsed: float, grad_norm, lr: float) -> dict:
    """Reduce a logging window's sums over processes and write its training record for position['step']."""
    totals = accelerator.reduce(window, reduction="sum")
    peak = accelerator.reduce(torch.tensor(peak_memory_mb(), device=accelerator.device), reduction="max")
    record = {**means({k: v for k, v in totals.items() if k != "tokens"}), "grad_norm": grad_norm, "lr": lr,
              "tokens/s": totals["tokens"].item() / elapsed, "skipped_steps": position["skipped"],
              "memory/peak_mb": round(peak.item())}
    log.write(position["step"], record)
    return record
