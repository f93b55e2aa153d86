"""Watching a run: NaN/inf handling, TensorBoard logging, the model card."""

import math

import pytest
import torch

import dpo_train.trainer as trainer
from dpo_train.checkpoint import is_complete
from dpo_train.health import NonFiniteError
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
