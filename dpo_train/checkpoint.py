"""Checkpoints (written whole, checksummed, the newest that verifies, resume checks) and the final model.

A checkpoint is `{output_dir}/checkpoints/step-{N}/`: what `accelerator.save_state` writes
(policy weights, optimizer, LR scheduler, RNG states of every process, data sampler) plus
`trainer_state.json` (step, epoch, position in the epoch, metrics log length, the training pairs'
fingerprint) and the run's `config.yaml`. It is written under a temporary name, flushed to disk,
given a manifest of its files' sizes and sha256 checksums (`COMPLETE.json`, written last) and only
then renamed into place. A resume uses only a checkpoint whose every file matches its manifest.
`final/` too is written aside and renamed: it appears whole or not at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml
from accelerate.utils import broadcast_object_list, gather_object
from torch.distributed.checkpoint.api import CheckpointException

from .engines import loading_whole_models, on_any_process
from .run_dir import cause

MARKER = "COMPLETE.json"
STATE = "trainer_state.json"
HASH_THREADS = 8  # files hashed at once (hashlib releases the GIL): the optimizer and the weights in parallel
# Keys that do not change the math of training: a resumed run may change these freely.
SAFE_TO_CHANGE = {"train.output_dir", "train.eval_every", "train.save_every", "train.keep_last", "train.log_every",
                  "train.eval_max_new_tokens", "train.num_threads", "train.collective_timeout", "data.eval",
                  "data.eval_split", "data.num_proc", "train.report_to", "train.project", "train.run_name",
                  "train.push_to_hub", "train.hub_private", "train.on_divergence"}
SAFE_SECTIONS = ("generate", "rounds")  # read by dpo-train generate and rounds only, never by a training run


class CheckpointError(RuntimeError):
    """A checkpoint or final model that cannot be written or resumed from, explained in one line."""
    same_on_every_process = True  # resume checks are the main process's, shared; a failed save is shared by all


def step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sealed(path: Path) -> dict:
    """Flush `path` to disk; its manifest entry: size and sha256 (read back from the page cache)."""
    _fsync(path)
    return {"bytes": path.stat().st_size, "sha256": _digest(path)}


def _digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def seal(folder: Path) -> None:
    """Write `folder`'s manifest, last: every file's size and sha256, hashed in parallel."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        entries = list(pool.map(_sealed, files))
    manifest = {"files": {str(p.relative_to(folder)): entry for p, entry in zip(files, entries)}}
    (folder / MARKER).write_text(json.dumps(manifest, indent=2))
    _fsync(folder / MARKER)


def move_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished folder `tmp` to `final`, replacing a folder of that name, and flush the rename."""
    old = final.with_name(f".tmp-old-{final.name}")
    if final.exists():  # the same step saved again after a resume, or a rerun's final/
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    _fsync(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(accelerator, root: Path, step: int, state: dict, config_yaml: str, keep_last: int) -> Path:
    """Write `root/step-{step}` atomically on the main process, with every process taking part
    in `save_state`. Keeps the newest `keep_last` checkpoints. Returns the checkpoint's path. A
    failure on any process stops every process with the same CheckpointError, none left waiting,
    and the partial folder removed."""
    final, tmp = root / f"step-{step}", root / f".tmp-step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover from a save that was killed
    accelerator.wait_for_everyone()
    error = None
    try:
        accelerator.save_state(tmp)
    except (Exception, CheckpointException) as e:  # on a full disk torch.save and safetensors raise their own
        error = cause(e, tmp)  # errors, and FSDP's distributed checkpoint a BaseException: run_dir.no_space says
    written_everywhere = not on_any_process(accelerator, error is not None)
    if accelerator.is_main_process and written_everywhere:
        try:
            # the thread count too: CPU matmuls split their sums by thread, so it is part of a bitwise resume
            (tmp / STATE).write_text(json.dumps({**state, "torch_threads": torch.get_num_threads()}, indent=2))
            (tmp / "config.yaml").write_text(config_yaml)
            seal(tmp)
            move_into_place(tmp, final)
        except Exception as e:
            error = cause(e, tmp)
    causes = [why for why in gather_object([error]) if why]  # every process learns of a failure
    if causes:  # and stops, none left waiting for another
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot save checkpoint {final}: {causes[0]}; the partial {tmp.name} is removed and "
                              "the earlier checkpoints are intact: continue with --resume auto once this is fixed")
    if accelerator.is_main_process:
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _manifest(path: Path) -> dict[str, dict]:
    """{file: {bytes, sha256}} of checkpoint `path`; ValueError when it is unreadable or has no checksums."""
    files = json.loads((path / MARKER).read_text()).get("files")
    if not isinstance(files, dict) or not all(isinstance(e, dict) and {"bytes", "sha256"} <= set(e)
                                              for e in files.values()):
        raise ValueError(f"{MARKER} lists no checksums")
    return files


def is_complete(path: Path) -> bool:
    """True when the manifest exists and every file it lists is there with its recorded size (cheap;
    `damage` also compares the checksums)."""
    try:
        return all((path / name).stat().st_size == entry["bytes"] for name, entry in _manifest(path).items())
    except (OSError, ValueError):
        return False


def damage(path: Path) -> str | None:
    """What is wrong with checkpoint `path`, or None when every file its manifest lists is there with
    its size and sha256: any changed byte of any file, a damaged header included, is found."""
    if not path.is_dir():
        return "no such checkpoint folder"
    try:
        files = _manifest(path)
    except FileNotFoundError:
        return f"no {MARKER}: its save did not finish"
    except (OSError, ValueError) as e:
        return f"{MARKER} is damaged ({str(e)[:100]})"
    for name, entry in files.items():
        if not (path / name).is_file() or (path / name).stat().st_size != entry["bytes"]:
            return f"{name} is missing or not the size it was saved with"
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        digests = dict(zip(files, pool.map(_digest, [path / name for name in files])))
    return next((f"{name} does not match its sha256 checksum" for name, entry in files.items()
                 if digests[name] != entry["sha256"]), None)


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoints under `root` whose files are all there with their sizes, oldest first."""
    return [path for path in sorted(root.glob("step-*"), key=step_of) if is_complete(path)]


def newest_verified(root: Path, log=None) -> Path | None:
    """The newest checkpoint under `root` whose files all match their checksums; each newer damaged
    one is named in a warning through `log`."""
    for path in sorted(root.glob("step-*"), key=step_of, reverse=True):
        if (reason := damage(path)) is None:
            return path
        if log:
            log(f"warning: skipping checkpoint {path}: {reason}")
    return None


def find_resume_point(output_dir: Path, resume: str | None, log=print) -> Path | None:
    """`None`: no resume. `auto`: the newest checkpoint in output_dir that verifies, or None.
    Anything else: that checkpoint, which must verify."""
    if resume is None:
        return None
    if resume == "auto":
        return newest_verified(output_dir / "checkpoints", log)
    path = Path(resume)
    if reason := damage(path):
        raise CheckpointError(f"--resume {path}: not a usable checkpoint: {reason}; choose another one, or "
                              "--resume auto for the newest one that verifies")
    return path


def resume_point(accelerator, output_dir: Path, resume: str | None, force: bool, config: dict, fingerprint: str,
                 log=print) -> Path | None:
    """The checkpoint to continue from, after checking that it verifies, that it was written by as
    many processes as run now, and that its config and training pairs (`fingerprint`) match in
    everything that changes the math (unless `force`). None: start fresh. Decided by the main
    process (it alone reads and hashes the checkpoints), the same on every process."""
    choice = None
    if accelerator.is_main_process:
        try:
            choice = _resume_point(output_dir, resume, force, config, fingerprint, accelerator.num_processes, log,
                                   accelerator.device.type == "cpu")
        except CheckpointError as e:
            choice = e
    if accelerator.num_processes > 1:
        choice = broadcast_object_list([choice])[0]
    if isinstance(choice, CheckpointError):
        raise choice
    return choice


def _resume_point(output_dir, resume, force, config, fingerprint, num_processes, log, cpu) -> Path | None:
    start = find_resume_point(output_dir, resume, log)
    if start is None:
        if resume == "auto":
            log(f"--resume auto: no checkpoint that verifies in {output_dir / 'checkpoints'}; starting fresh")
        elif any((output_dir / "checkpoints").glob("step-*")):
            raise CheckpointError(f"{output_dir} already holds checkpoints from an earlier run; continue it with "
                                  "--resume auto, or choose another train.output_dir")
        return None
    # Each process's RNG state and its place in the data order, and under sharded engines its shard of the
    # weights and optimizer, belong to one process of the run that wrote them.
    state = json.loads((start / STATE).read_text())
    written_by = state.get("num_processes", 1)
    if written_by != num_processes:
        raise CheckpointError(f"{start}: written by {written_by} process(es); resume it with {written_by}, not "
                              f"{num_processes} (each process's data position, random state and shards are its own)")
    threads, now = state.get("torch_threads"), torch.get_num_threads()
    if cpu and threads not in (None, now):  # allowed (train.num_threads is safe to change), but said
        log(f"note: {start} was written with {threads} torch thread(s) a process and this run has {now}: CPU sums "
            f"split differently, so the resumed run may differ from an uninterrupted one by rounding, not bitwise "
            f"(train.num_threads={threads} keeps it bitwise)")
    saved = yaml.safe_load((start / "config.yaml").read_text())
    differing = config_differences(saved, config)
    if state.get("data_fingerprint") not in (None, fingerprint) and "data.train" not in differing:
        differing.append("the content of data.train (its tokenized pairs: a file changed since)")
    if differing and not force:
        raise CheckpointError(f"{start}: this run differs from the checkpoint's in {', '.join(differing)}, "
                              "which changes the training math; pass --force-resume to continue anyway")
    if differing:
        log(f"warning: resuming despite differences in {', '.join(differing)} (--force-resume)")
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
    weights); only the main process writes, into `.tmp-final`, renamed to `directory` when whole. A
    failure stops every process with the same CheckpointError, the partial folder removed."""
    state_dict = accelerator.get_state_dict(policy)
    tmp, error = directory.with_name(f".tmp-{directory.name}"), None
    if accelerator.is_main_process:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            model = accelerator.unwrap_model(policy)
            model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / "README.md").write_text(card)
            if merged:  # from the saved adapter and its base: sharded weights cannot be merged in place
                from peft import AutoPeftModelForCausalLM

                with loading_whole_models():
                    adapted = AutoPeftModelForCausalLM.from_pretrained(tmp, dtype=next(iter(state_dict.values())).dtype)
                adapted.merge_and_unload().save_pretrained(tmp / "merged")
                tokenizer.save_pretrained(tmp / "merged")
            for path in (p for p in tmp.rglob("*") if p.is_file()):
                _fsync(path)
            move_into_place(tmp, directory)
        except Exception as e:  # safetensors raises its own error on a full disk (run_dir.no_space)
            error = cause(e, tmp)
            shutil.rmtree(tmp, ignore_errors=True)
    if causes := [why for why in gather_object([error]) if why]:
        raise CheckpointError(f"cannot write the final model {directory}: {causes[0]}; the partial {tmp.name} is "
                              "removed and the checkpoints are intact: continue with --resume auto once this is fixed")
    accelerator.wait_for_everyone()
