"""The run's output directory: checked before anything loads, held by one run at a time, cleared of
what a killed run left, and a write that fails for lack of space said so in one line.

The lock is `flock` on `{output_dir}/.lock`, taken by the main process only: the kernel releases it
when the holder exits or is killed, so a killed run's lock is simply taken over. The file names the
holder (pid, host, start time) for the run that is refused.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import resource
import shutil
import socket
import time
from pathlib import Path

LOCK = ".lock"
LEFTOVERS = ".tmp-*"  # what a save writes before renaming it into place
NO_SPACE_MARGIN = 1 << 20  # a failed write with less than this free (bytes) is put down to a full disk
FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "no space left: disk quota exceeded"}


class OutputError(RuntimeError):
    """An output directory or file that cannot be used or written, explained in one line."""
    same_on_every_process = True  # the main process's line is printed; the others learn of it in a collective


def check_usable(out: Path) -> None:
    """Create `out` and check that files can be written in it, or raise OutputError (one line)."""
    existing = next(p for p in (out, *out.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        where = "is a file" if existing == out else f"is under {existing}, which is a file"
        raise OutputError(f"train.output_dir {out} {where}, not a directory; choose another train.output_dir")
    probe = out / f".tmp-write-test-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"1")
        probe.unlink(missing_ok=True)
    except OSError as e:
        raise OutputError(f"train.output_dir {out}: cannot be written ({cause(e, out)}); choose another "
                          "train.output_dir") from None


@contextlib.contextmanager
def hold(accelerator, out: Path, log=print):
    """Hold `out`'s lock while the body runs. The main process takes it, before anything loads; every
    process raises the same OutputError when it cannot (another run holds it, the disk is full)."""
    from .engines import on_any_process

    fd, error = None, None
    if accelerator.is_main_process:
        try:
            fd = _lock(out, log)
        except OutputError as e:
            error = e
    if on_any_process(accelerator, error is not None):
        raise error or OutputError(f"train.output_dir {out}: the main process could not take its lock")
    try:
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # a run that ended names no holder
            os.close(fd)  # releases the lock


def _lock(out: Path, log) -> int:
    path = out / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise OutputError(f"{path}: cannot be created ({cause(e, out)})") from None
    holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputError(f"train.output_dir {out} is in use by another run ({holder or 'a run that is starting'}); "
                          "wait for it to end, or choose another train.output_dir") from None
    except OSError as e:  # a filesystem without file locks (some FUSE and NFS setups): run, but say what is lost
        log(f"warning: {path}: cannot be locked ({e.strerror}); a second run into {out} would not be refused")
    if holder:
        log(f"{out}: taking over from a run that ended without releasing it ({holder})")
    me = f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S %z')}"
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (me + "\n").encode(), 0)
    except OSError as e:
        os.close(fd)
        raise OutputError(f"{path}: cannot be written ({cause(e, out)})") from None
    return fd


def write_text(path: Path, text: str) -> None:
    """Write a file of the run (main process), or raise OutputError naming it and why (a full disk)."""
    try:
        path.write_text(text)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {cause(e, path)}") from None


def remove_leftovers(out: Path, log=print) -> None:
    """Delete the temporary folders of saves that a killed run left (`.tmp-*` in `out` and checkpoints/)."""
    for leftover in [*out.glob(LEFTOVERS), *(out / "checkpoints").glob(LEFTOVERS)]:
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        log(f"removed {leftover}, left by a save that did not finish")


def no_space(error: BaseException, path: Path) -> str | None:
    """Why a write under `path` that raised `error` failed for lack of space, or None. The libraries
    that write checkpoints rarely say (torch.save raises RuntimeError, safetensors its own error), so
    the filesystem is asked: an errno of a full disk anywhere in the exception chain, a file under
    `path` at this process's file size limit (ulimit -f), or less than NO_SPACE_MARGIN bytes free."""
    limit, errors, seen = resource.getrlimit(resource.RLIMIT_FSIZE)[0], set(), error
    while seen is not None:
        errors.add(getattr(seen, "errno", None))
        seen = seen.__cause__ or seen.__context__
    if full := errors & set(FULL):
        return f"{FULL[full.pop()]} ({free_space(path)})"
    if limit != resource.RLIM_INFINITY:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
        if errno.EFBIG in errors or any(f.stat().st_size >= limit for f in files):
            return f"no space left: a file reached this process's file size limit of {limit:,} bytes (ulimit -f)"
    existing = next(p for p in (path, *path.parents) if p.exists())
    if shutil.disk_usage(existing).free < NO_SPACE_MARGIN:
        return f"no space left on device ({free_space(path)})"
    return None


def free_space(path: Path) -> str:
    existing = next(p for p in (path, *path.parents) if p.exists())
    return f"{shutil.disk_usage(existing).free:,} bytes free on the filesystem of {existing}"


def cause(error: BaseException, path: Path) -> str:
    """One line saying why a write under `path` failed: lack of space when it was that, else the error."""
    if reason := no_space(error, path):
        return reason
    detail = (str(error).strip().splitlines() or [""])[0][:300]
    return detail if isinstance(error, OSError) else f"{type(error).__name__}: {detail}"
