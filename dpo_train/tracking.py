"""Experiment trackers (`train.report_to`): Accelerate's, given the run's project and name, and the
run's config as flat key-value pairs. Files of the trackers that keep them locally go under
{output_dir}/tracking (TensorBoard's event files, wandb's offline runs)."""

from __future__ import annotations

import os
from pathlib import Path


def trackers(report_to) -> list[str]:
    """`train.report_to` as a list of Accelerate tracker names ("none" is no tracker)."""
    names = report_to if isinstance(report_to, list) else [report_to]
    return [name for name in names if name != "none"]


def init_kwargs(names: list[str], run_name: str | None, tracking_dir: Path) -> dict:
    """Per-tracker arguments: the run's name for wandb and mlflow (the trackers that take one and
    that run here, offline), and wandb's local files under `tracking_dir` unless WANDB_DIR says
    otherwise. The project is init_trackers' own argument: wandb's and comet_ml's project, mlflow's
    experiment, TensorBoard's subfolder."""
    kwargs = {}
    if "wandb" in names:
        kwargs["wandb"] = {"name": run_name} if run_name else {}
        if not os.environ.get("WANDB_DIR"):
            tracking_dir.mkdir(parents=True, exist_ok=True)
            kwargs["wandb"]["dir"] = str(tracking_dir)
    if "mlflow" in names and run_name:
        kwargs["mlflow"] = {"run_name": run_name}
    return kwargs


def flat(tree: dict) -> dict:
    """{'train': {'seed': 1}} -> {'train.seed': 1}: what trackers accept as hyperparameters, so
    None becomes "null" and a list (a data mixture, the tracker list) its text."""
    def value(v):
        return "null" if v is None else v if isinstance(v, (bool, int, float, str)) else str(v)
    return {f"{section}.{k}": value(v) for section, values in tree.items() for k, v in values.items()}


def start(accelerator, config) -> None:
    """Start the configured trackers (main process only logs), with the run's config."""
    t = config.train
    names = trackers(t.report_to)
    if names:
        accelerator.init_trackers(t.project, config=flat(config.to_dict()),
                                  init_kwargs=init_kwargs(names, t.run_name, Path(t.output_dir) / "tracking"))
