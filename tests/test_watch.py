"""Watching a run: NaN/inf handling, TensorBoard logging, the model card."""

import math

import pytest
import torch

import dpo_train.trainer as trainer
from dpo_train import health
from dpo_train.checkpoint import is_complete
from dpo_train.health import DivergenceError, NonFiniteError
from test_trainer import read_metrics, tiny_config

RUN = ["train.max_steps=6", "train.save_every=2", "train.eval_max_new_tokens=0", "data.eval=null"]


def poison_step(monkeypatch, bad_step: int, value: float = math.nan):
    """Make the loss of optimizer step `bad_step` (both micro-batches) non-finite."""
    real, calls = trainer.training_step, []

    def step(*args):
        loss, sums = real(*args)
        calls.append(None)
        if (len(calls) - 1) // 2 == bad_step:  # 2 micro-batches per optimizer step
            loss = loss * value
        return loss, sums

    monkeypatch.setattr(trainer, "training_step", step)


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, tiny_model_dir, tiny_data,
                                                                            monkeypatch):
    poison_step(monkeypatch, 3)
    with pytest.raises(NonFiniteError, match=r"step 3: .*NaN or infinite.*step-2"):
        trainer.train(tiny_config(tmp_path, tiny_model_dir, tiny_data, *RUN))
    assert is_complete(tmp_path / "run" / "checkpoints" / "step-2")
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [0, 1, 2]


def test_nonfinite_steps_can_be_skipped_and_counted(tmp_path, tiny_model_dir, tiny_data, monkeypatch):
    poison_step(monkeypatch, 3, value=math.inf)
    trainer.train(tiny_config(tmp_path, tiny_model_dir, tiny_data, *RUN, "train.on_nonfinite=skip"))
    records = read_metrics(tmp_path / "run")
    assert [r["skipped_steps"] for r in records] == [0, 0, 0, 1, 1, 1]
    from safetensors.torch import load_file
    weights = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_tensorboard_logging_and_model_card(tmp_path, tiny_model_dir, tiny_data):
    trainer.train(tiny_config(tmp_path, tiny_model_dir, tiny_data, "train.max_steps=3", "train.report_to=tensorboard",
                              "train.eval_max_new_tokens=0"))
    events = list((tmp_path / "run" / "tracking").rglob("events.out.tfevents.*"))
    logged = b"".join(e.read_bytes() for e in events)
    assert b"rewards/margins" in logged and b"eval/loss" in logged and b"train.seed" in logged  # scalars, hparams
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    assert "3 optimizer steps with the `sigmoid` loss" in card and "48/48 pairs kept" in card and "| loss |" in card
    assert "beta: 0.1" in card  # the resolved config
    assert "## Warnings" not in card  # a healthy run raises none


def test_divergence_is_said_once_per_kind():
    """Worked by hand: the first loss 0.7 makes 7 the spike line; the first norm 0.5 makes 5 a gradient spike
    and 5e-9 a collapse, counted only after a spike."""
    state, said = health.fresh(), {}
    for step, loss, norm in [(0, 0.7, 0.5), (1, 0.6, 0.0), (2, 6.9, 0.4), (3, 7.5, 6.0), (4, 9.0, 3.0), (5, 8.0, 0.0),
                             (6, 8.0, 0.0)]:
        said[step] = health.check(state, step, loss, norm)
    assert [step for step, warnings in said.items() if warnings] == [3, 5]  # a zero norm at step 1 came before any spike
    assert said[3] == ["step 3: the loss 7.5 is more than 10 times its first value 0.7: training is diverging "
                       "(a lower train.learning_rate may help)"]
    assert said[5] == ["step 5: the gradient norm fell to 0 after a spike (its first value 0.5): the weights saturated "
                       "and stopped learning; the model is likely broken"]
    assert state["warnings"] == said[3] + said[5] and (state["loss_spike"], state["grad_spike"]) == (3, 3)
    assert health.check(health.fresh(), 0, 0.01, 1.0) == [] and health.check({**health.fresh(), "first_loss": 0.01,
                                                                              "first_grad_norm": 1.0}, 1, 0.9, 1.0) == []


def test_a_diverging_run_says_so_in_the_log_and_the_model_card(tmp_path, tiny_model_dir, tiny_data, capsys):
    """learning_rate 10 on the tiny model: the loss is 69 at step 1 (first 0.693); the run warns, goes on (a
    warning, not a stop) and its model card lists the warning."""
    trainer.train(tiny_config(tmp_path, tiny_model_dir, tiny_data, *RUN, "train.learning_rate=10",
                              "train.max_steps=3", "train.on_nonfinite=skip"))
    out = capsys.readouterr().out
    [warning] = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert warning.startswith("warning: step 1: the loss ") and "more than 10 times its first value 0.6931" in warning
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    assert f"## Warnings\n\n- {warning.removeprefix('warning: ')}" in card


def test_on_divergence_stop_stops_naming_the_last_good_checkpoint(tmp_path, tiny_model_dir, tiny_data):
    with pytest.raises(DivergenceError, match=r"^step 1: the loss .* stopped \(train.on_divergence: stop\)\. Last "
                                              r"good checkpoint: none"):
        trainer.train(tiny_config(tmp_path, tiny_model_dir, tiny_data, *RUN, "train.learning_rate=10",
                                  "train.on_divergence=stop"))
