import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from conftest import TORCH_THREADS
from dpo_train.checkpoint import (MARKER, CheckpointError, complete_checkpoints, config_differences, damage,
                                  find_resume_point, is_complete)
from dpo_train.cli import app
from dpo_train.health import NonFiniteError
from dpo_train.signals import StopSignals
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
    root, warnings = tmp_path / "run" / "checkpoints", []
    assert [p.name for p in complete_checkpoints(root)] == ["step-2", "step-4"]
    (root / "step-4" / MARKER).unlink()  # a save that never finished
    assert find_resume_point(tmp_path / "run", "auto", warnings.append) == root / "step-2"
    assert warnings == [f"warning: skipping checkpoint {root / 'step-4'}: no {MARKER}: its save did not finish"]
    weights = root / "step-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a truncated file
    assert not is_complete(root / "step-2")
    assert find_resume_point(tmp_path / "run", "auto", warnings.append) is None
    assert warnings[-1].endswith("step-2: model.safetensors is missing or not the size it was saved with")
    with pytest.raises(CheckpointError, match="step-2: not a usable checkpoint: model.safetensors is missing"):
        find_resume_point(tmp_path / "run", str(root / "step-2"))


def flip(path, offset: int, data: bytes) -> None:
    """Overwrite `len(data)` bytes of `path` at `offset` in place: same size, other content."""
    with open(path, "r+b") as f:
        f.seek(offset)
        before = f.read(len(data))
        assert before != data
        f.seek(offset)
        f.write(data)


# Same-size damage the sizes in the manifest cannot see: (file, offset, bytes written there)
DAMAGE = {"weights-one-byte": ("model.safetensors", -1000, None), "weights-64KiB-of-zeros": ("model.safetensors", 20000,
          bytes(65536)), "weights-4KiB-of-0xFF": ("model.safetensors", 8192, b"\xff" * 4096),
          "safetensors-header": ("model.safetensors", 20, None), "optimizer": ("optimizer.bin", 5000, None),
          "trainer-state": ("trainer_state.json", 10, None)}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model_dir, tiny_data):
    """An uninterrupted 8-step run with checkpoints at steps 2, 4 and 6."""
    root = tmp_path_factory.mktemp("full")
    train(tiny_config(root, tiny_model_dir, tiny_data, *RUN, "train.keep_last=3"))
    return root


def damaged_copy(tmp_path, full_run, damaged: str):
    """A copy of `full_run` without final/, one file of its newest checkpoint (step-6) damaged as DAMAGE says."""
    run = tmp_path / "run"
    shutil.copytree(full_run / "run", run)
    shutil.rmtree(run / "final")
    name, offset, data = DAMAGE[damaged]
    target = run / "checkpoints" / "step-6" / name
    offset = offset % target.stat().st_size
    flip(target, offset, data or bytes([target.read_bytes()[offset] ^ 0x01]))
    return run, target


@pytest.mark.parametrize("damaged", DAMAGE)
def test_same_size_damage_is_found_and_skipped(tmp_path, full_run, tiny_model_dir, tiny_data, damaged):
    """A real byte change in one file of the newest checkpoint, sizes unchanged: --resume auto warns once, naming
    it, and takes the checkpoint before it; --resume to it is refused in one line (exit 2)."""
    run, target = damaged_copy(tmp_path, full_run, damaged)
    name = target.name
    assert is_complete(target.parent)  # every size is as recorded: only the checksum sees it
    warnings = []
    assert find_resume_point(run, "auto", warnings.append) == run / "checkpoints" / "step-4"
    assert warnings == [f"warning: skipping checkpoint {target.parent}: {name} does not match its sha256 checksum"]
    tiny_config(tmp_path, tiny_model_dir, tiny_data)  # writes tiny.yaml
    result = CliRunner().invoke(app, ["--config", str(tmp_path / "tiny.yaml"), "--resume", str(target.parent),
                                      *RUN, "train.keep_last=3"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"error: --resume {target.parent}: not a usable checkpoint: {name} "
                                                  f"does not match its sha256 checksum; choose another one, or "
                                                  "--resume auto for the newest one that verifies"]


def test_resume_past_a_damaged_checkpoint_is_bitwise_exact(tmp_path, full_run, tiny_model_dir, tiny_data, capsys):
    """4 KiB of 0xFF in step-6's weights (once a NaN stop that named step-6 as good): the resume warns, continues
    from step-4 and ends with the uninterrupted run's weights; step-6 is saved again, whole."""
    run, target = damaged_copy(tmp_path, full_run, "weights-4KiB-of-0xFF")
    train(tiny_config(tmp_path, tiny_model_dir, tiny_data, *RUN, "train.keep_last=3"), resume="auto")
    out = capsys.readouterr().out
    assert out.count("warning: skipping checkpoint") == 1 and f"Resumed from {run / 'checkpoints' / 'step-4'}" in out
    assert "torch thread" not in out  # the same thread count as the run that wrote it: no note
    expected, got = final_weights(full_run / "run"), final_weights(run)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert damage(target.parent) is None


def test_a_resume_with_another_thread_count_says_it_may_not_be_bitwise(tmp_path, full_run, tiny_model_dir, tiny_data,
                                                                      capsys):
    run = tmp_path / "run"
    shutil.copytree(full_run / "run", run)
    shutil.rmtree(run / "final")
    written_with = json.loads((run / "checkpoints" / "step-6" / "trainer_state.json").read_text())["torch_threads"]
    assert written_with == TORCH_THREADS
    other = 1 if TORCH_THREADS > 1 else 2
    train(tiny_config(tmp_path, tiny_model_dir, tiny_data, *RUN, "train.keep_last=3", f"train.num_threads={other}"),
          resume="auto")
    out = capsys.readouterr().out
    assert (f"note: {run / 'checkpoints' / 'step-6'} was written with {TORCH_THREADS} torch thread(s) a process and "
            f"this run has {other}: CPU sums split differently, so the resumed run may differ from an uninterrupted "
            f"one by rounding, not bitwise (train.num_threads={TORCH_THREADS} keeps it bitwise)") in out
    assert (run / "final" / "model.safetensors").is_file()  # allowed: only said


def test_the_nan_stop_names_the_newest_checkpoint_that_verifies(tmp_path, tiny_model_dir, tiny_data, monkeypatch):
    """step-4 is damaged on disk right after it is saved; a NaN at step 5 names step-2, the newest that verifies."""
    import dpo_train.trainer as trainer
    real_save, real_step, calls = trainer.save_checkpoint, trainer.training_step, []

    def save_then_damage(accelerator, root, step, *args, **kwargs):
        path = real_save(accelerator, root, step, *args, **kwargs)
        if step == 4:
            flip(path / "optimizer.bin", 4096, b"\x00" * 8)
        return path

    def nan_at_step_5(*args):
        loss, sums = real_step(*args)
        calls.append(None)
        return (loss * float("nan") if (len(calls) - 1) // 2 == 5 else loss), sums

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_damage)
    monkeypatch.setattr(trainer, "training_step", nan_at_step_5)
    with pytest.raises(NonFiniteError) as error:
        train(tiny_config(tmp_path, tiny_model_dir, tiny_data, *RUN))
    assert str(error.value).endswith(f"Last good checkpoint: {tmp_path / 'run' / 'checkpoints' / 'step-2'}")


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


def test_a_second_sigint_aborts_at_once():
    # what SIGINT did before: Python's handler, or SIG_IGN where the tests run as a background job (no job control)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        stop.phase = "train"
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers restored


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


def test_a_train_file_changed_since_the_checkpoint_is_refused(tmp_path, tiny_model_dir, tiny_data, capsys):
    """One answer edited in place, the row count unchanged (what a mixture's `rows` cannot see): the tokenized
    pairs' fingerprint in the checkpoint differs, so the resume is refused in one line; --force-resume goes on."""
    from conftest import arithmetic_pairs, write_jsonl

    rows = arithmetic_pairs(48, 0)
    train_file = tmp_path / "pairs.jsonl"
    write_jsonl(train_file, rows)
    overrides = [*RUN, "train.max_steps=3", f"data.train={train_file}"]
    train(tiny_config(tmp_path, tiny_model_dir, tiny_data, *overrides))
    rows[30]["chosen"] = rows[30]["chosen"] + "0"
    write_jsonl(train_file, rows)
    with pytest.raises(CheckpointError) as error:
        train(tiny_config(tmp_path, tiny_model_dir, tiny_data, *overrides), resume="auto")
    assert str(error.value) == (f"{tmp_path / 'run' / 'checkpoints' / 'step-2'}: this run differs from the "
                                "checkpoint's in the content of data.train (its tokenized pairs: a file changed "
                                "since), which changes the training math; pass --force-resume to continue anyway")
    capsys.readouterr()
    train(tiny_config(tmp_path, tiny_model_dir, tiny_data, *overrides), resume="auto", force_resume=True)
    assert "warning: resuming despite differences in the content of data.train" in capsys.readouterr().out
