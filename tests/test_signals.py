"""Real signals sent to a real `dpo-train` process in each phase of a run, at a moment read from its output.

The child holds itself in the phase under test (a hook prints a line there and waits for the signal,
polling, so a signal cannot come too early), so that the test knows where the signal lands without
guessing a sleep. The exit codes and lines are the table in dpo_train/signals.py and docs/faults.md.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
from transformers import AutoModelForCausalLM

from dpo_train.trainer import train
from test_trainer import final_weights, tiny_config

# argv: PHASE-HOOK SIGNALS-TO-WAIT-FOR, then the command's arguments. The hook waits in its place until the
# run has received a signal; with 2 it then waits on, for the second; with 0 it waits forever (for SIGKILL).
CHILD = r"""
import sys, time
import transformers
import dpo_train.checkpoint as checkpoint, dpo_train.evaluate as evaluate, dpo_train.hub as hub
import dpo_train.signals as signals, dpo_train.trainer as trainer
from dpo_train.cli import app

hook, wanted = sys.argv[1], int(sys.argv[2])

def hold(where):
    print(f"holding in {where}", flush=True)
    while wanted == 0 or not signals._active.received:
        time.sleep(0.01)
    if wanted == 2:
        print("received one", flush=True)
        while True:
            time.sleep(0.01)

def holding(owner, name, where, after=False, when=lambda *args, **kwargs: True):
    real = getattr(owner, name)
    def wrapper(*args, **kwargs):
        result = real(*args, **kwargs) if after else None
        if when(*args, **kwargs):
            hold(where)
        return result if after else real(*args, **kwargs)
    setattr(owner, name, wrapper)

if hook == "setup":
    holding(trainer, "load_policy_and_reference", "setup")
elif hook == "train":
    holding(trainer, "optimizer_step", "train")
elif hook == "evaluation":
    # the final evaluation, not the one at step 4 (the same function, named by its progress bar)
    holding(evaluate, "preference_metrics", "evaluation", when=lambda *a, desc="", **kw: desc.startswith("final"))
elif hook == "saving":
    holding(checkpoint, "move_into_place", "saving", when=lambda tmp, final, **kw: final.name == "final")
elif hook == "writing-final":
    holding(transformers.PreTrainedModel, "save_pretrained", "writing-final", after=True)
elif hook == "upload":
    holding(hub, "push", "upload")
app(sys.argv[3:], prog_name="dpo-train")
"""


def run_child(tmp_path, hook: str, signals: list, wanted: int, *overrides, timeout: float = 180):
    """Start the command with `hook`; each time it prints a 'holding' or 'received' line, send the next of
    `signals`. Returns (exit code, stdout, stderr)."""
    out, err = tmp_path / f"{hook}.out", tmp_path / f"{hook}.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        child = subprocess.Popen([sys.executable, "-c", CHILD, hook, str(wanted), "--config",
                                  str(tmp_path / "tiny.yaml"), *overrides], stdout=stdout, stderr=stderr)
    deadline, sent = time.time() + timeout, 0
    try:
        while child.poll() is None and time.time() < deadline:
            lines = [line for line in out.read_text().splitlines() if line.startswith(("holding in", "received one"))]
            if sent < len(signals) and len(lines) > sent:
                child.send_signal(signals[sent])
                sent += 1
            time.sleep(0.02)
        assert child.poll() is not None, f"still running after {timeout} s: {err.read_text()[-2000:]}"
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
    assert sent == len(signals), f"sent {sent} of {len(signals)} signals: {err.read_text()[-2000:]}"
    return child.returncode, out.read_text(), err.read_text()


def last_line(stderr: str) -> str:
    return [line for line in stderr.splitlines() if line.strip()][-1]


# (hook, signals, exit code, the last line on stderr, whether final/ exists after)
PHASES = {
    "setup-SIGTERM": ("setup", [signal.SIGTERM], 75, "stopped by SIGTERM during setup, before the first training step; "
                      "nothing was lost: start again (--resume auto continues from the newest checkpoint, if there "
                      "is one)", False),
    "setup-SIGINT": ("setup", [signal.SIGINT], 75, "stopped by SIGINT during setup, before the first training step; "
                     "nothing was lost: start again (--resume auto continues from the newest checkpoint, if there "
                     "is one)", False),
    "train-second-SIGINT": ("train", [signal.SIGINT, signal.SIGINT], 130,
                            "aborted by a second Ctrl-C; nothing saved since the last checkpoint", False),
    "evaluation-SIGINT": ("evaluation", [signal.SIGINT], 0, None, True),
    "evaluation-second-SIGINT": ("evaluation", [signal.SIGINT, signal.SIGINT], 130, "aborted by a second Ctrl-C "
                                 "before final/ was written; continue with --resume auto", False),
    "saving-SIGTERM": ("saving", [signal.SIGTERM], 0, None, True),
    "saving-second-SIGINT": ("saving", [signal.SIGINT, signal.SIGINT], 130, "aborted by a second Ctrl-C while final/ "
                             "was written: there is no final/ (it appears whole or not at all); continue with "
                             "--resume auto", False),
    "upload-SIGTERM": ("upload", [signal.SIGTERM], 3, "stopped by SIGTERM during the upload to the hub; final/ is "
                       "saved: upload it later with hf upload REPO_ID RUN/final", True),
}
FAST = {"setup-SIGINT"}  # the one that was misreported as a second Ctrl-C; the rest run with -m slow


@pytest.mark.parametrize("phase", [pytest.param(p, marks=() if p in FAST else pytest.mark.slow) for p in PHASES])
def test_signals_in_every_phase(tmp_path, tiny_model_dir, tiny_data, phase):
    hook, signals, code, line, has_final = PHASES[phase]
    tiny_config(tmp_path, tiny_model_dir, tiny_data)  # writes tiny.yaml: 8 steps, eval at 4 and at the end
    overrides = ["train.eval_max_new_tokens=0"] + (["train.push_to_hub=me/tiny-dpo"] if hook == "upload" else [])
    returncode, stdout, stderr = run_child(tmp_path, hook, signals, 2 if len(signals) == 2 else 1, *overrides)
    assert returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr and "second Ctrl-C" not in stderr.replace(line or "", ""), stderr[-3000:]
    if line:
        assert last_line(stderr) == line
    run = tmp_path / "run"
    assert (run / "final").is_dir() == has_final and not (run / "final" / ".tmp").exists()
    if has_final:
        AutoModelForCausalLM.from_pretrained(run / "final")  # whole
    if phase == "evaluation-SIGINT":  # the rest of the evaluation skipped, the model saved and the card says so
        assert "SIGINT received: skipping the rest of the final evaluation; final/ will still be written" in stderr
        assert not (run / "eval_results.json").exists()
        assert "The final evaluation was skipped: SIGINT arrived before it ended." in (run / "final" / "README.md").read_text()
    if hook == "setup":
        assert not (run / "metrics.jsonl").exists()  # stopped before the first step


@pytest.mark.slow
def test_sigkill_while_final_is_written_leaves_no_partial_final(tmp_path, tiny_model_dir, tiny_data):
    """SIGKILL after final/'s weights are written but before its tokenizer: no final/ at all; --resume auto
    removes the leftover and writes final/ whole, equal to an uninterrupted run's."""
    overrides = ["train.eval_max_new_tokens=0", "train.save_every=4"]
    train(tiny_config(tmp_path, tiny_model_dir, tiny_data, *overrides, f"train.output_dir={tmp_path / 'full'}"))
    returncode, _, stderr = run_child(tmp_path, "writing-final", [signal.SIGKILL], 0, *overrides)
    assert returncode == -signal.SIGKILL, stderr[-2000:]
    run = tmp_path / "run"
    assert not (run / "final").exists() and (run / ".tmp-final" / "model.safetensors").is_file()
    train(tiny_config(tmp_path, tiny_model_dir, tiny_data, *overrides), resume="auto")
    assert not list(run.glob(".tmp*")) and not list((run / "checkpoints").glob(".tmp*"))
    expected, got = final_weights(tmp_path / "full"), final_weights(run)
    assert expected.keys() == got.keys() and all((expected[k] == got[k]).all() for k in expected)
    assert os.listdir(run / "final") == os.listdir(tmp_path / "full" / "final")
