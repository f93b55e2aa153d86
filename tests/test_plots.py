import json
import sys

import pytest
from typer.testing import CliRunner

from dpo_train.cli import app
from dpo_train.plots import PANELS, PlotError, make_figure, read_metrics, series

RECORDS = [{"step": 0, "loss": 0.6931, "rewards/margins": 0.0, "rewards/accuracies": 0.0, "lr": 1e-5},
           {"step": 1, "loss": 0.61, "rewards/margins": 0.2, "rewards/accuracies": 0.75, "lr": 1e-5},
           {"step": 2, "eval/loss": 0.65, "eval/rewards/margins": 0.1, "eval/rewards/accuracies": 0.5},
           {"step": 2, "loss": 0.52, "rewards/margins": 0.4, "rewards/accuracies": 1.0, "lr": 1e-5}]


def write_run(path, records=RECORDS, tail=""):
    path.mkdir(exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def test_series_splits_train_and_eval_records_by_key():
    assert series(RECORDS, "loss") == {"train": ([0, 1, 2], [0.6931, 0.61, 0.52]), "eval": ([2], [0.65])}
    assert series(RECORDS, "rewards/accuracies") == {"train": ([0, 1, 2], [0.0, 0.75, 1.0]), "eval": ([2], [0.5])}
    assert series(RECORDS[:2], "rewards/margins") == {"train": ([0, 1], [0.0, 0.2])}  # no eval yet


def test_figure_draws_every_record_in_its_panel():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure = make_figure(plt, [(title, series(RECORDS, key)) for key, title in PANELS])
    loss_axis, margin_axis, accuracy_axis = figure.axes
    train, eval_ = margin_axis.get_lines()
    assert train.get_xydata().tolist() == [[0, 0.0], [1, 0.2], [2, 0.4]]
    assert eval_.get_xydata().tolist() == [[2, 0.1]]
    assert [axis.get_title() for axis in figure.axes] == [title for _, title in PANELS]
    plt.close(figure)


def test_plot_command_writes_a_png(tmp_path):
    run = write_run(tmp_path / "run", tail='{"step": 3, "lo')  # a record being written right now
    result = CliRunner().invoke(app, ["plot", str(run)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"wrote {run / 'metrics.png'} (3 train and 1 eval records)"
    from matplotlib.image import imread
    assert imread(run / "metrics.png").shape[:2] == (400, 1500)  # figsize (15, 4) inches at 100 dpi


def test_unreadable_or_missing_metrics_are_one_line_errors(tmp_path):
    result = CliRunner().invoke(app, ["plot", str(tmp_path / "nope")])
    assert result.exit_code == 2 and result.stderr.strip() == (
        f"error: {tmp_path / 'nope'}: not found; give the train.output_dir of a run")
    run = write_run(tmp_path / "run", tail="garbage\n" + json.dumps(RECORDS[0]) + "\n")
    with pytest.raises(PlotError, match="line 5: not a JSON record"):
        read_metrics(run / "metrics.jsonl")
    run = write_run(tmp_path / "run", tail='{"loss": 0.5}\n')
    with pytest.raises(PlotError, match="line 5: not a metrics record"):
        read_metrics(run / "metrics.jsonl")


def test_missing_matplotlib_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    result = CliRunner().invoke(app, ["plot", str(write_run(tmp_path / "run"))])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: plotting needs matplotlib: pip install matplotlib"
