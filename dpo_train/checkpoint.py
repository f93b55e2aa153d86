"""Checkpoints (atomic save, newest complete one, resume checks) and the final model.

A checkpoint is `{output_dir}/checkpoints/step-{N}/`: what `accelerator.save_state` writes
(policy weights, optimizer, LR scheduler, RNG states of every process, data sampler) plus
`trainer_state.json` (step, epoch, position in the epoch, metrics log length) and the run's
`config.yaml`. It is written under a temporary name, flushed to disk, given a manifest of its
files' sizes (`COMPLETE.json`, written last) and only then renamed into place. A folder without
the manifest, or whose files no longer match it, is never resumed from.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import warnings
from pathlib import Path

import yaml
from accelerate.utils import gather_object

from .engines import loading_whole_models, on_any_process

MARKER = "COMPLETE.json"
STATE = "trainer_state.json"
# Keys that do not change the math of training: a resumed run may change these freely.
SAFE_TO_CHANGE = {"train.output_dir", "train.eval_every", "train.save_every", "train.keep_last", "train.log_every",
                  "train.eval_max_new_tokens", "train.num_threads", "train.collective_timeout", "data.eval",
                  "data.eval_split", "data.num_proc", "train.report_to", "train.project", "train.run_name",
                  "train.push_to_hub", "train.hub_private"}
SAFE_SECTIONS = ("generate", "rounds")  # read by dpo-train generate and rounds only, never by a training run


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or resumed from, explained in one line."""
    same_on_every_process = True  # resume checks read the same files; a failed save is shared by all


class Stopped(Exception):
    """Training stopped on SIGTERM/SIGINT after saving `checkpoint`."""

    def __init__(self, signal_name: str, checkpoint: Path):
        super().__init__(f"stopped by {signal_name}; saved {checkpoint}; continue with --resume auto")
        self.checkpoint = checkpoint


class StopSignals:
    """While active, SIGTERM and SIGINT ask for a checkpoint at the next optimizer-step boundary
    instead of killing the run; a second SIGINT aborts at once (KeyboardInterrupt)."""

    def __init__(self):
        self.received: str | None = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        print(f"\n{self.received} received: saving a checkpoint after this optimizer step "
              "(press Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(accelerator, root: Path, step: int, state: dict, config_yaml: str, keep_last: int) -> Path:
    """Write `root/step-{step}` atomically on the main process, with every process taking part
    in `save_state`. Keeps the newest `keep_last` checkpoints. Returns the checkpoint's path. A
    failure on any process stops every process with the same CheckpointError, none left waiting."""
    final, tmp = root / f"step-{step}", root / f".tmp-step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover from a save that was killed
    accelerator.wait_for_everyone()
    error = None
    try:
        accelerator.save_state(tmp)
    except OSError as e:
        error = e
    written_everywhere = not on_any_process(accelerator, error is not None)
    if accelerator.is_main_process and written_everywhere:
        try:
            (tmp / STATE).write_text(json.dumps(state, indent=2))
            (tmp / "config.yaml").write_text(config_yaml)
            files = sorted(p for p in tmp.rglob("*") if p.is_file())
            for path in files:
                _fsync(path)
            manifest = {str(p.relative_to(tmp)): p.stat().st_size for p in files}
            (tmp / MARKER).write_text(json.dumps(manifest, indent=2))
            _fsync(tmp / MARKER)
            if final.exists():  # the same step saved again after a resume: replace it
                shutil.rmtree(final)
            tmp.rename(final)
            _fsync(root)
        except OSError as e:
            error = e
    causes = [cause for cause in gather_object([error and str(error)]) if cause]  # every process learns of a failure
    if causes:  # and stops, none left waiting for another
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot save checkpoint {final}: {causes[0]}; the previous checkpoint is untouched")
    if accelerator.is_main_process:
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def is_complete(path: Path) -> bool:
    """True when the manifest exists and every file it lists is there with its recorded size."""
    try:
        manifest = json.loads((path / MARKER).read_text())
        return all((path / name).stat().st_size == size for name, size in manifest.items())
    except (OSError, ValueError):
        return False


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first. Damaged ones are skipped with a warning."""
    found = []
    for path in sorted(root.glob("step-*"), key=step_of):
        if is_complete(path):
            found.append(path)
        else:
            warnings.warn(f"skipping damaged or incomplete checkpoint {path}", stacklevel=2)
    return found


def find_resume_point(output_dir: Path, resume: str | None) -> Path | None:
    """`None`: no resume. `auto`: the newest complete checkpoint in output_dir, or None.
    Anything else: that checkpoint, which must be complete."""
    if resume is None:
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir / "checkpoints") if (output_dir / "checkpoints").is_dir() else []
        return found[-1] if found else None
    path = Path(resume)
    if not is_complete(path):
        raise CheckpointError(f"{path}: not a complete checkpoint (missing or damaged {MARKER})")
    return path


def resume_point(output_dir: Path, resume: str | None, force: bool, config: dict, num_processes: int,
                 log=print) -> Path | None:
    """The checkpoint to continue from, after checking that it was written by `num_processes`
    processes and that its config matches `config` in everything that changes the math (unless
    `force`). None: start fresh."""
    start = find_resume_point(output_dir, resume)
    if start is None:
        if resume == "auto":
            log(f"--resume auto: no complete checkpoint in {output_dir / 'checkpoints'}; starting fresh")
        elif any((output_dir / "checkpoints").glob("step-*")):
            raise CheckpointError(f"{output_dir} already holds checkpoints from an earlier run; continue it with "
                                  "--resume auto, or choose another train.output_dir")
        return None
    # Each process's RNG state and its place in the data order, and under sharded engines its shard of the
    # weights and optimizer, belong to one process of the run that wrote them.
    written_by = json.loads((start / STATE).read_text()).get("num_processes", 1)
    if written_by != num_processes:
        raise CheckpointError(f"{start}: written by {written_by} process(es); resume it with {written_by}, not "
                              f"{num_processes} (each process's data position, random state and shards are its own)")
    saved = yaml.safe_load((start / "config.yaml").read_text())
    differing = config_differences(saved, config)
    if differing and not force:
        raise CheckpointError(f"{start}: the config differs from the checkpoint's in {', '.join(differing)}, "
                              "which changes the training math; pass --force-resume to continue anyway")
    if differing:
        log(f"warning: resuming despite config differences in {', '.join(differing)} (--force-resume)")
    return start


def restore(accelerator, start: Path, metrics_log) -> dict:
    """Load checkpoint `start` into the prepared objects (weights, optimizer, scheduler, the RNG states
    of every process), drop the metrics records written after it; returns its trainer state."""
    accelerator.load_state(start)
    state = json.loads((start / STATE).read_text())
    if accelerator.is_main_process:
        metrics_log.truncate(state["metrics_bytes"])
    return state


def config_differences(saved: dict, current: dict) -> list[str]:
    """Dotted keys whose values differ and that change the math of training."""
    keys = []
    for section in sorted(set(saved) | set(current)):
        a, b = saved.get(section, {}), current.get(section, {})
        keys += [f"{section}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return [k for k in keys if k not in SAFE_TO_CHANGE and k.partition(".")[0] not in SAFE_SECTIONS]


def save_final(accelerator, policy, tokenizer, directory: Path, card: str, merged: bool = False) -> None:
    """Write the policy, tokenizer and a model card (README.md) so that `from_pretrained` loads
    them. A LoRA policy (peft) writes only its adapter, and with `merged` also `merged/`: a plain
    model with the adapter folded in. Every process takes part (sharded engines gather the whole
    weights); only the main process writes."""
    state_dict = accelerator.get_state_dict(policy)
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(policy)
        model.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(directory)
        (directory / "README.md").write_text(card)
        if merged:  # from the saved adapter and its base: sharded weights cannot be merged in place
            from peft import AutoPeftModelForCausalLM

            with loading_whole_models():
                adapted = AutoPeftModelForCausalLM.from_pretrained(directory, dtype=next(iter(state_dict.values())).dtype)
            adapted.merge_and_unload().save_pretrained(directory / "merged")
            tokenizer.save_pretrained(directory / "merged")
    accelerator.wait_for_everyone()
