import subprocess
import sys

from typer.testing import CliRunner

from dpo_train.cli import app


def test_help_documents_config_and_overrides():
    out = subprocess.run([sys.executable, "-m", "dpo_train", "--help"], capture_output=True, text=True, check=True)
    assert "--config" in out.stdout and "KEY=VALUE" in out.stdout and "train.max_steps" in out.stdout


def test_config_errors_are_one_line_and_exit_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: {name_or_path: x}\ndata: {train: t.jsonl}\ntrain: {output_dir: o}\nloss: {beta: -1}\n")
    result = CliRunner().invoke(app, ["--config", str(path)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: {path}: loss.beta: must be > 0, got -1.0"]


def test_overrides_reach_the_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {name_or_path: x}\ndata: {train: t.jsonl}\ntrain: {output_dir: o}\n")
    result = CliRunner().invoke(app, ["--config", str(path), "train.max_steps=zero"])
    assert result.exit_code == 2 and "train.max_steps: expected int, got 'zero'" in result.output
