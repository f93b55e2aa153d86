"""`dpo-train plot RUN_DIR`: loss, reward margin and reward accuracy over optimizer steps, train
and eval, from the run's metrics.jsonl, as one PNG. matplotlib is optional (`pip install matplotlib`)."""

from __future__ import annotations

import json
from pathlib import Path

# (metrics key, panel title); eval records carry the same keys prefixed "eval/"
PANELS = (("loss", "DPO loss"), ("rewards/margins", "reward margin (chosen - rejected)"),
          ("rewards/accuracies", "reward accuracy (chosen > rejected)"))


class PlotError(RuntimeError):
    """A run that cannot be plotted, explained in one line."""


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl. A last line cut short (a run being written) is skipped."""
    if not path.is_file():
        raise PlotError(f"{path}: not found; give the train.output_dir of a run")
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise PlotError(f"{path}: line {number}: not a JSON record") from None
        if not isinstance(record, dict) or "step" not in record:
            raise PlotError(f"{path}: line {number}: not a metrics record (an object with a \"step\")")
        records.append(record)
    return records


def series(records: list[dict], key: str) -> dict[str, tuple[list[int], list[float]]]:
    """{"train": (steps, values), "eval": (steps, values)} for one metric; a side with no
    records is left out."""
    found = {}
    for side, name in (("train", key), ("eval", "eval/" + key)):
        points = [(r["step"], r[name]) for r in records if name in r]
        if points:
            found[side] = ([step for step, _ in points], [value for _, value in points])
    return found


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> tuple[Path, str]:
    """Write the PNG (default RUN_DIR/metrics.png); return its path and a one-line summary."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError("plotting needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl" if run_dir.is_dir() else run_dir)
    panels = [(title, series(records, key)) for key, title in PANELS]
    if not any(lines for _, lines in panels):
        raise PlotError(f"{run_dir}: metrics.jsonl holds no loss, reward margin or accuracy records yet")
    figure = make_figure(plt, panels)
    out = Path(out) if out else (run_dir if run_dir.is_dir() else run_dir.parent) / "metrics.png"
    figure.savefig(out, dpi=100)
    plt.close(figure)
    train_records, eval_records = (sum(key in r for r in records) for key in ("loss", "eval/loss"))
    return out, f"{train_records} train and {eval_records} eval records"


def make_figure(plt, panels):
    """One panel per metric, side by side, train as a line and eval as marked points."""
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for axis, (title, lines) in zip(axes[0], panels):
        for side, (steps, values) in lines.items():
            style = {"marker": "o"} if side == "eval" else {}
            axis.plot(steps, values, label=side, **style)
        axis.set_title(title)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
        if lines:
            axis.legend()
    figure.tight_layout()
    return figure
