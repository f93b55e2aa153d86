"""Draw the docs' charts from the measured tables in docs/charts/*.csv (each the table of the page that shows
the chart; tests/test_docs.py checks that they agree), into docs/img/*.png:

    python scripts/docs_charts.py     # needs matplotlib (the plot extra)

- engine-memory.png: peak RSS per process under each engine, 2 CPU processes (docs/distributed.md).
- bench-vs-trl.png: tokens/s and peak memory as multiples of TRL's DPOTrainer (docs/performance.md).
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"


def read(name: str) -> list[dict]:
    with (DOCS / "charts" / name).open() as f:
        return list(csv.DictReader(f))


def engine_memory() -> None:
    rows = read("engine-memory.csv")
    models = (("smollm2_135m_mb", "SmolLM2-135M-Instruct"), ("qwen2_283m_mb", "283M Qwen2-shaped"))
    figure, axis = plt.subplots(figsize=(8, 3.6))
    width = 0.38
    for i, (column, label) in enumerate(models):
        xs = [j + (i - 0.5) * width for j in range(len(rows))]
        bars = axis.bar(xs, [int(r[column]) / 1000 for r in rows], width, label=label)
        axis.bar_label(bars, [f"{int(r[column]) / 1000:.1f}" for r in rows], fontsize=8, padding=2)
    axis.set_xticks(range(len(rows)), [f"{r['engine']}\n(reference: {r['reference_held']})" for r in rows])
    axis.set_ylabel("peak RSS per process, GB")
    axis.set_title("Peak RSS per process, 2 CPU processes, fp32, 3 quickstart steps (docs/distributed.md)", fontsize=10)
    axis.set_ylim(0, 10.5)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(loc="upper left", fontsize=8)
    save(figure, "engine-memory.png")


def bench_vs_trl() -> None:
    rows = read("bench-vs-trl.csv")
    figure, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for axis, (what, title) in zip(axes, (("tokens", "tokens/s × TRL (higher is better)"),
                                          ("memory", "peak memory × TRL (lower is better)"))):
        width = 0.38
        for i, (lengths, label) in enumerate((("equal", "equal lengths"), ("spread", "lengths spread ±50 %"))):
            xs = [j + (i - 0.5) * width for j in range(len(rows))]
            values = [float(r[f"{what}_x_trl_{lengths}"]) for r in rows]
            bars = axis.bar(xs, values, width, label=label)
            axis.bar_label(bars, [f"{v:.2f}" for v in values], fontsize=8, padding=2)
        axis.axhline(1.0, color="black", linewidth=0.8)  # TRL itself
        axis.set_xticks(range(len(rows)), [r["shape"] for r in rows])
        axis.set_title(title, fontsize=10)
        axis.set_ylim(0, 4.2 if what == "tokens" else 1.2)
        axis.grid(axis="y", alpha=0.3)
    axes[0].legend(loc="upper right", fontsize=8)
    figure.suptitle("dpo-train against TRL 1.16's DPOTrainer, SmolLM2-135M, 2-core CPU, fp32 (docs/performance.md)",
                    fontsize=10)
    save(figure, "bench-vs-trl.png")


def save(figure, name: str) -> None:
    figure.tight_layout()
    out = DOCS / "img" / name
    figure.savefig(out, dpi=100)
    plt.close(figure)
    print(f"wrote {out.relative_to(DOCS.parent)} ({out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    engine_memory()
    bench_vs_trl()
