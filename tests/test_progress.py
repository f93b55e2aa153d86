"""Every phase that can take more than a few seconds shows progress: a bar while it runs, a line
with its result when it ends. (Under a launcher only the main process draws them:
tests/test_engines.py counts each bar's first frame in a 2-process run.)"""

import re

from typer.testing import CliRunner

from dpo_train.cli import app
from dpo_train.trainer import train
from test_trainer import tiny_config


def test_a_run_shows_each_phase(tmp_path, tiny_model_dir, tiny_data, capfd, monkeypatch):
    monkeypatch.setenv("DPO_TRAIN_CACHE", str(tmp_path / "cache"))
    train(tiny_config(tmp_path, tiny_model_dir, tiny_data, "train.max_steps=4", "train.eval_every=2",
                      "train.save_every=2", "model.precompute_reference=true"))
    out, err = capfd.readouterr()
    for bar in ("reference log-probs:", "train:", "eval at step 2:", "final evaluation: policy:",
                "final evaluation, greedy generation: policy:"):
        assert f"{bar}   0%" in err, bar  # each bar's first frame, on stderr
    assert re.search(r"^eval at step 2: loss \d\.\d{4}, reward accuracy \d\.\d{3}, reward margin -?\d\.\d{3}$", out,
                     re.MULTILINE)  # the mid-run evaluation's result, as one line
    assert f"Saved checkpoint {tmp_path / 'run' / 'checkpoints' / 'step-2'}" in out
    assert "Held-out evaluation on 16 pairs" in out


def test_eval_shows_scoring_and_generation(tiny_model_dir, tiny_data):
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--ref", str(tiny_model_dir),
                                      "--data", tiny_data[1], "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    for bar in ("scoring: reference:", "scoring: model:", "greedy generation: reference:", "greedy generation: model:"):
        assert f"{bar}   0%" in result.stderr, bar
