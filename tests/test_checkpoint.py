import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from accelerate import Accelerator

from dpo_train.checkpoint import (MARKER, CheckpointError, StopSignals, complete_checkpoints, config_differences,
                                  find_resume_point, is_complete)
from dpo_train.trainer import train
from test_trainer import final_weights, read_metrics, tiny_config

# 48 pairs, 4 per batch, 2 batches per step: 6 optimizer steps per epoch. N=4 falls mid-epoch and
# 2N=8 crosses into the second epoch.
N = 4
RUN = ["train.max_steps=8", "train.save_every=2", "train.eval_every=2", "train.eval_max_new_tokens=0"]


MEASUREMENTS = {"tokens/s", "memory/peak_mb"}  # of the machine, not of the training math


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in MEASUREMENTS} for r in records]


def run_killed_after_checkpoint(config_path, output_dir, step, extra=()):
    """Train in a child process that SIGKILLs itself right after checkpoint `step` is saved."""
    code = f"""
import os, signal
import dpo_train.trainer as trainer
from dpo_train.config import load_config
save = trainer.save_checkpoint
def save_then_die(accelerator, root, step, *args, **kwargs):
    path = save(accelerator, root, step, *args, **kwargs)
    if step == {step}:
        os.kill(os.getpid(), signal.SIGKILL)
    return path
trainer.save_checkpoint = save_then_die
trainer.train(load_config({str(config_path)!r}, {RUN + list(extra) + [f"train.output_dir={output_dir}"]!r}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]


@pytest.mark.parametrize("extra", [[], ["model.lora.r=4"]], ids=["full", "lora"])
def test_resume_after_sigkill_is_bitwise_exact(tmp_path, tiny_model_dir, tiny_data, extra):
    full = tiny_config(tmp_path, tiny_model_dir, tiny_data, *RUN, *extra, f"train.output_dir={tmp_path / 'full'}")
    train(full)

    killed = tmp_path / "killed"
    run_killed_after_checkpoint(tmp_path / "tiny.yaml", killed, N, extra)
    assert not (killed / "final").exists()
    assert [p.name for p in complete_checkpoints(killed / "checkpoints")] == ["step-2", "step-4"]
    resumed = tiny_config(tmp_path, tiny_model_dir, tiny_data, *RUN, *extra, f"train.output_dir={killed}")
    train(resumed, resume="auto")

    expected, got = final_weights(tmp_path / "full"), final_weights(killed)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    full_records, resumed_records = read_metrics(tmp_path / "full"), read_metrics(killed)
    assert without_timing(full_records) == without_timing(resumed_records)  # same steps, same numbers
    train_steps = [r["step"] for r in resumed_records if "loss" in r]
    assert train_steps == list(range(8))  # nothing duplicated, nothing missing


def test_incomplete_or_damaged_checkpoints_are_skipped(tmp_path, tiny_model_dir, tiny_data):
    config = tiny_config(tmp_path, tiny_model_dir, tiny_data, *RUN, "train.max_steps=6", "train.keep_last=3")
    train(config)
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in complete_checkpoints(root)] == ["step-2", "step-4"]
    (root / "step-4" / MARKER).unlink()  # a save that never finished
    with pytest.warns(UserWarning, match="step-4"):
        assert find_resume_point(tmp_path / "run", "auto") == root / "step-2"
    weights = root / "step-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a truncated file
    assert not is_complete(root / "step-2")
    with pytest.warns(UserWarning):
        assert find_resume_point(tmp_path / "run", "auto") is None
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        find_resume_point(tmp_path / "run", str(root / "step-2"))


def test_keep_last_prunes_old_checkpoints(tmp_path, tiny_model_dir, tiny_data):
    train(tiny_config(tmp_path, tiny_model_dir, tiny_data, *RUN, "train.save_every=1", "train.keep_last=2"))
    assert [p.name for p in complete_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-6", "step-7"]


def test_resume_refuses_a_config_that_changes_the_math(tmp_path, tiny_model_dir, tiny_data):
    train(tiny_config(tmp_path, tiny_model_dir, tiny_data, *RUN, "train.max_steps=3"))
    changed = tiny_config(tmp_path, tiny_model_dir, tiny_data, *RUN, "train.max_steps=3", "loss.beta=0.5",
                          "train.seed=1", "train.eval_every=1")  # eval_every does not change the math
    with pytest.raises(CheckpointError, match=r"loss\.beta, train\.seed.*--force-resume"):
        train(changed, resume="auto")
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train(changed)  # a fresh start would mix two runs in one directory
    train(changed, resume="auto", force_resume=True)
    assert config_differences({"train": {"eval_every": 1, "output_dir": "a"}}, {"train": {"eval_every": 5,
                                                                                          "output_dir": "b"}}) == []


def test_resume_auto_without_checkpoints_starts_fresh(tmp_path, tiny_model_dir, tiny_data, capsys):
    train(tiny_config(tmp_path, tiny_model_dir, tiny_data, *RUN, "train.max_steps=2"), resume="auto")
    assert "starting fresh" in capsys.readouterr().out


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, tiny_model_dir, tiny_data, monkeypatch):
    real_save_state, calls = Accelerator.save_state, []

    def disk_full_on_second_save(self, output_dir, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save_state(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", disk_full_on_second_save)
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint is untouched"):
        train(tiny_config(tmp_path, tiny_model_dir, tiny_data, *RUN))
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step-2"] and is_complete(root / "step-2")


def test_a_second_sigint_aborts_at_once():
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_sigterm_saves_a_checkpoint_and_exits_75_then_resumes(tmp_path, tiny_model_dir, tiny_data):
    tiny_config(tmp_path, tiny_model_dir, tiny_data)  # writes tiny.yaml
    args = [sys.executable, "-m", "dpo_train", "--config", str(tmp_path / "tiny.yaml"), "train.max_steps=100000",
            "data.eval=null"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.stat().st_size > 0) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr[-2000:]
    [checkpoint] = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert f"stopped by SIGTERM; saved {checkpoint}" in stderr
    step = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
    # a shorter run than planned changes the LR schedule, hence --force-resume
    resumed = subprocess.run(args[:-2] + [f"train.max_steps={step + 2}", "data.eval=null", "--resume", "auto",
                                          "--force-resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == list(range(step + 2))
