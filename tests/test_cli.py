import subprocess
import sys

import pytest
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
    assert result.exit_code == 2 and "train.max_steps: expected int or null, got 'zero'" in result.output


@pytest.mark.parametrize("command", [[], ["train"]])
def test_training_is_the_default_command(tmp_path, monkeypatch, command):
    calls = []
    monkeypatch.setattr("dpo_train.trainer.train", lambda cfg, **kwargs: calls.append((cfg, kwargs)))
    path = tmp_path / "c.yaml"
    path.write_text("model: {name_or_path: x}\ndata: {train: t.jsonl}\ntrain: {output_dir: o}\n")
    result = CliRunner().invoke(app, [*command, "--config", str(path), "train.max_steps=7", "--resume", "auto",
                                      "--force-resume"])
    assert result.exit_code == 0, result.output
    [(cfg, kwargs)] = calls
    assert cfg.train.max_steps == 7 and kwargs == {"resume": "auto", "force_resume": True}


def test_a_mistyped_command_is_named(tmp_path):
    result = CliRunner().invoke(app, ["chek-data", "--config", "c.yaml"])
    assert result.exit_code == 2 and "No such command 'chek-data'" in result.output


@pytest.mark.parametrize("text, expected", [("model: {name_or_path: [unclosed\n", "not valid YAML"),
                                            ("- a list\n", "the top level must be a mapping")])
def test_a_config_that_is_not_yaml_or_not_a_mapping(tmp_path, text, expected):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    for command in ([], ["check-data"]):
        result = CliRunner().invoke(app, [*command, "--config", str(path)])
        assert result.exit_code == 2
        [line] = result.stderr.strip().splitlines()
        assert line.startswith(f"error: {path}: {expected}")
