"""The output directory under real faults: a full filesystem (a tmpfs this test mounts, filled for real)
at a checkpoint, at final/, at metrics.jsonl and at the start; a file size limit (ulimit -f, in a child
process); an output_dir that is a file, under a file or read-only; two runs in one output_dir."""

import json
import math
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from dpo_train.checkpoint import complete_checkpoints, damage
from dpo_train.cli import app
from dpo_train.run_dir import LOCK, no_space
from dpo_train.trainer import train
from test_checkpoint import RUN, without_timing
from test_trainer import final_weights, read_metrics, tiny_config

PAGE = 4096  # tmpfs counts whole pages


def mount_tmpfs(path, options: str) -> None:
    path.mkdir(exist_ok=True)
    try:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                                text=True)
    except FileNotFoundError:
        pytest.skip("no mount command here; test_a_file_size_limit_reads_as_a_full_disk covers a full disk")
    if result.returncode != 0:
        pytest.skip(f"this process may not mount a tmpfs ({result.stderr.strip()}); "
                    "test_a_file_size_limit_reads_as_a_full_disk covers a full disk without privileges")


@pytest.fixture
def small_fs(tmp_path):
    """A real 20 MiB filesystem mounted at tmp_path/fs (skipped where mounting is refused), unmounted after."""
    mount = tmp_path / "fs"
    mount_tmpfs(mount, "size=20m")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(fs, leave_pages: int):
    """Write a file of zeros into `fs` until `leave_pages` pages stay free; deleting it frees the space."""
    filler, left = fs / "filler", shutil.disk_usage(fs).free - leave_pages * PAGE
    with open(filler, "wb") as f:
        while left > 0:
            left -= f.write(bytes(min(left, 1 << 20)))
    assert shutil.disk_usage(fs).free == leave_pages * PAGE
    return filler


def pages(folder) -> int:
    assert folder.is_dir(), folder
    return sum(math.ceil(p.stat().st_size / PAGE) for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, tiny_data):
    """The uninterrupted run: 8 steps, checkpoints every 2, eval every 2 (on an ordinary disk)."""
    root = tmp_path_factory.mktemp("reference")
    train(tiny_config(root, tiny_model_dir, tiny_data, *RUN))
    return root / "run"


def cli(config, *args):
    """The command as a user runs it, in this process; (exit code, its error lines, all of stderr)."""
    result = CliRunner().invoke(app, ["--config", str(config), *RUN, *args])
    assert "Traceback" not in result.output + result.stderr, result.stderr[-3000:]
    return result.exit_code, [line for line in result.stderr.splitlines() if line.startswith("error:")], result.stderr


def same_weights(a, b) -> bool:
    expected, got = final_weights(a), final_weights(b)
    return expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def no_leftovers(run) -> bool:
    return not list(run.glob(".tmp*")) and not list((run / "checkpoints").glob(".tmp*"))


def test_a_full_disk_at_a_checkpoint(tmp_path, small_fs, reference, tiny_model_dir, tiny_data):
    """Room for one checkpoint, not two: step-4's save fails in one line, its partial folder goes, step-2 stays
    whole; once space is freed, --resume auto ends bitwise equal to the uninterrupted run."""
    run = small_fs / "run"
    tiny_config(tmp_path, tiny_model_dir, tiny_data, f"train.output_dir={run}")
    filler = fill(small_fs, 6 + pages(reference / "checkpoints" / "step-6") + 16)  # + config, lock, metrics
    code, errors, _ = cli(tmp_path / "tiny.yaml", f"train.output_dir={run}")
    assert code == 2 and len(errors) == 1
    assert errors[0].startswith(f"error: cannot save checkpoint {run / 'checkpoints' / 'step-4'}: no space left on "
                                f"device (") and "the partial .tmp-step-4 is removed" in errors[0]
    assert no_leftovers(run) and [p.name for p in complete_checkpoints(run / "checkpoints")] == ["step-2"]
    assert damage(run / "checkpoints" / "step-2") is None
    filler.unlink()
    code, errors, stderr = cli(tmp_path / "tiny.yaml", f"train.output_dir={run}", "--resume", "auto")
    assert code == 0 and not errors, stderr[-2000:]
    assert same_weights(reference, run) and no_leftovers(run)
    assert without_timing(read_metrics(reference)) == without_timing(read_metrics(run))


def test_a_full_disk_at_final(tmp_path, small_fs, reference, tiny_model_dir, tiny_data):
    """Training ends, final/ does not fit: one line, no final/ and no .tmp-final; the checkpoint stays; the resume
    once space is freed writes final/ equal to the uninterrupted run's."""
    run = small_fs / "run"
    tiny_config(tmp_path, tiny_model_dir, tiny_data)
    args = (f"train.output_dir={run}", "train.save_every=6")  # one checkpoint, at step 6; saving does not change the math
    filler = fill(small_fs, 6 + pages(reference / "checkpoints" / "step-6") + 12)  # final/ needs more than 12 pages
    code, errors, _ = cli(tmp_path / "tiny.yaml", *args)
    assert code == 2 and len(errors) == 1
    assert errors[0].startswith(f"error: cannot write the final model {run / 'final'}: no space left on device (")
    assert not (run / "final").exists() and no_leftovers(run) and damage(run / "checkpoints" / "step-6") is None
    filler.unlink()
    code, errors, stderr = cli(tmp_path / "tiny.yaml", *args, "--resume", "auto")
    assert code == 0 and not errors, stderr[-2000:]
    assert same_weights(reference, run) and no_leftovers(run)


def test_a_full_disk_at_metrics_jsonl(tmp_path, small_fs, reference, tiny_model_dir, tiny_data):
    """metrics.jsonl outgrows its page mid-run: one line naming it, and no partial record is left."""
    run = small_fs / "run"
    tiny_config(tmp_path, tiny_model_dir, tiny_data)
    args = (f"train.output_dir={run}", "train.save_every=0", "train.eval_every=1")  # two records a step
    filler = fill(small_fs, 3)  # the lock, config.yaml and one page of records
    code, errors, _ = cli(tmp_path / "tiny.yaml", *args)
    assert code == 2 and len(errors) == 1
    assert errors[0].startswith(f"error: cannot write {run / 'metrics.jsonl'}: no space left on device (")
    text = (run / "metrics.jsonl").read_text()
    assert text.endswith("\n") and 1 < len([json.loads(line) for line in text.splitlines()]) < 16
    filler.unlink()
    code, errors, stderr = cli(tmp_path / "tiny.yaml", *args[:2], "--resume", "auto")  # no checkpoint: a fresh
    assert code == 0 and not errors, stderr[-2000:]  # start, evaluating every 2 steps like the reference
    assert same_weights(reference, run)


def test_a_full_disk_at_the_start_stops_before_anything_loads(tmp_path, small_fs, tiny_model_dir, tiny_data,
                                                              monkeypatch):
    monkeypatch.setattr("dpo_train.trainer.load_tokenizer", lambda *a: pytest.fail("the tokenizer loaded"))
    tiny_config(tmp_path, tiny_model_dir, tiny_data)
    fill(small_fs, 0)
    code, errors, _ = cli(tmp_path / "tiny.yaml", f"train.output_dir={small_fs / 'run'}")
    assert code == 2 and len(errors) == 1
    assert errors[0].startswith(f"error: train.output_dir {small_fs / 'run'}: cannot be written (no space left on "
                                "device (0 bytes free")


def test_the_libraries_errors_on_a_full_disk_are_recognised(small_fs):
    """torch.save raises RuntimeError and safetensors its own error, neither with an errno: the filesystem says."""
    from safetensors.torch import save_file

    fill(small_fs, 1)
    tensors = {"w": torch.zeros(1 << 18)}  # 1 MiB
    for write in (lambda path: torch.save(tensors, path), lambda path: save_file(tensors, path)):
        with pytest.raises(Exception) as error:
            write(small_fs / "t.bin")
        assert not isinstance(error.value, OSError)
        assert no_space(error.value, small_fs / "t.bin").startswith("no space left on device (0 bytes free")
    assert no_space(RuntimeError("a bug"), small_fs.parent) is None  # an ordinary disk with room: not a full disk


@pytest.mark.slow
def test_a_file_size_limit_reads_as_a_full_disk(tmp_path, reference, tiny_model_dir, tiny_data):
    """ulimit -f (RLIMIT_FSIZE) in a child process, unprivileged: optimizer.bin cannot reach its size, so the first
    checkpoint fails in one line with nothing left behind; without the limit, --resume auto trains it exactly."""
    step_6 = reference / "checkpoints" / "step-6"  # all checkpoints have the same files and sizes
    limit = ((step_6 / "model.safetensors").stat().st_size + (step_6 / "optimizer.bin").stat().st_size) // 2
    tiny_config(tmp_path, tiny_model_dir, tiny_data)
    command = [sys.executable, "-m", "dpo_train", "--config", str(tmp_path / "tiny.yaml"), *RUN]
    result = subprocess.run(command, capture_output=True, text=True,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    run = tmp_path / "run"
    assert errors == [f"error: cannot save checkpoint {run / 'checkpoints' / 'step-2'}: no space left: a file reached "
                      f"this process's file size limit of {limit:,} bytes (ulimit -f); the partial .tmp-step-2 is "
                      "removed and the earlier checkpoints are intact: continue with --resume auto once this is fixed"]
    assert no_leftovers(run) and not list((run / "checkpoints").iterdir())
    code, errors, stderr = cli(tmp_path / "tiny.yaml", "--resume", "auto")
    assert code == 0 and not errors, stderr[-2000:]
    assert same_weights(reference, run)


@pytest.mark.parametrize("kind", ["a file", "under a file", "read-only", "read-only, to be created"])
def test_an_unusable_output_dir_is_one_line_before_anything_loads(tmp_path, tiny_model_dir, tiny_data, monkeypatch,
                                                                  kind):
    """Root ignores permission bits, so the unwritable case is a filesystem mounted read-only."""
    monkeypatch.setattr("dpo_train.trainer.load_tokenizer", lambda *a: pytest.fail("the tokenizer loaded"))
    tiny_config(tmp_path, tiny_model_dir, tiny_data)
    (tmp_path / "file").write_text("not a folder")
    if kind.startswith("read-only"):
        mount_tmpfs(tmp_path / "ro", "ro,size=1m")
    out = {"a file": tmp_path / "file", "under a file": tmp_path / "file" / "run", "read-only": tmp_path / "ro",
           "read-only, to be created": tmp_path / "ro" / "run"}[kind]
    expected = {"a file": f"train.output_dir {out} is a file, not a directory",
                "under a file": f"train.output_dir {out} is under {tmp_path / 'file'}, which is a file, not a directory",
                "read-only": f"train.output_dir {out}: cannot be written ([Errno 30] Read-only file system",
                "read-only, to be created": f"train.output_dir {out}: cannot be written ([Errno 30] Read-only file "
                                            "system"}[kind]
    try:
        code, errors, _ = cli(tmp_path / "tiny.yaml", f"train.output_dir={out}")
    finally:
        if kind.startswith("read-only"):
            subprocess.run(["umount", "-l", str(tmp_path / "ro")], check=False)
    assert code == 2 and len(errors) == 1 and errors[0].startswith(f"error: {expected}"), errors


def wait_for(condition, process, what: str, timeout: float = 120):
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended ({process.returncode}) before {what}"
        assert time.time() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


def test_one_run_per_output_dir(tmp_path, tiny_model_dir, tiny_data, capsys, monkeypatch):
    """A real run holds output_dir; a second one is refused at once, before anything loads, naming it, and
    touches nothing; once the first is SIGKILLed (the kernel drops its lock) the next run takes over and says so."""
    config = tiny_config(tmp_path, tiny_model_dir, tiny_data, "train.max_steps=2", "data.eval=null")
    run, log = tmp_path / "run", tmp_path / "first.log"
    with open(log, "w") as out:
        first = subprocess.Popen([sys.executable, "-m", "dpo_train", "--config", str(tmp_path / "tiny.yaml"),
                                  "train.max_steps=100000", "data.eval=null"], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").stat().st_size, first,
                 "a training record")
        with monkeypatch.context() as patch:
            patch.setattr("dpo_train.trainer.load_tokenizer", lambda *a: pytest.fail("the tokenizer loaded"))
            code, errors, _ = cli(tmp_path / "tiny.yaml", "data.eval=null")
        holder = (run / LOCK).read_text().strip()
        assert holder.startswith(f"pid {first.pid} on {socket.gethostname()}, started ")
        assert code == 2 and errors == [f"error: train.output_dir {run} is in use by another run ({holder}); wait for "
                                        "it to end, or choose another train.output_dir"]
        records = read_metrics(run)
        time.sleep(0.5)
        assert first.poll() is None and read_metrics(run)[:len(records)] == records  # the first run goes on, untouched
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    capsys.readouterr()
    train(config)
    assert f"{run}: taking over from a run that ended without releasing it ({holder})" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(run)] == [0, 1] and (run / "final").is_dir()
    assert (run / LOCK).read_text() == ""  # a run that ended names no holder


@pytest.mark.slow
def test_a_launched_run_is_refused_once_by_every_process(tmp_path, tiny_model_dir, tiny_data):
    """Two launched processes into a held output_dir: the main process finds the lock taken, both stop, one line."""
    from test_engines import launch

    tiny_config(tmp_path, tiny_model_dir, tiny_data, "data.eval=null")
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
                               "os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'pid test'); "
                               "print('held', flush=True); time.sleep(600)", str(run / LOCK)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        result = launch("ddp", tmp_path / "tiny.yaml", "data.eval=null", cache=tmp_path / "cache", check=False)
    finally:
        holder.kill()
        holder.wait()
    errors = [line for line in result.stderr.splitlines() if "error:" in line or "stopped:" in line]
    assert result.returncode != 0, result.stderr[-3000:]  # the launcher's own summary follows the line
    assert errors == [f"error: train.output_dir {run} is in use by another run (pid test); wait for it to end, or "
                      "choose another train.output_dir"]
    assert not (run / "metrics.jsonl").exists() and not (run / "config.yaml").exists()
