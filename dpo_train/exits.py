"""How a command ends: the exit codes, the errors a user can fix (one line, exit code 2), and what a
launched process does when it is done or when another process failed."""

from __future__ import annotations

import os
import sys
import traceback

import typer

EXIT_CODES = ("Exit codes: 0 done (a signal during the final evaluation skips it; final/ is written); 1 unexpected "
              "error; 2 config, data, model, checkpoint or output error, a full disk included (one line); 3 trained "
              "and saved in final/, but the upload to the hub (train.push_to_hub) failed or was stopped (one line); "
              "75 stopped by SIGTERM/SIGINT with nothing lost, during setup or after saving a checkpoint (continue "
              "with --resume auto); 130 aborted by a second Ctrl-C. docs/faults.md has the table of every phase.")
RANK = int(os.environ.get("RANK", 0))  # set by torchrun and accelerate launch
LAUNCHED = os.environ.get("WORLD_SIZE", "1") != "1"  # one of several processes

# A launched process's wrapped policy (engines.prepare_policy) is kept here until exit_if_launched ends the
# process: freeing a DDP model drops the last reference to the gloo process group in a destructor that holds
# the GIL while it joins gloo's worker thread, and that thread may be waiting for the GIL to free a finished
# collective's tensors (seen: rank 1 of a 2-process run stuck there after final/ was written; pytorch#56297).
# A run that ends in an error clears it, so that its objects are freed as they were before, not at finalization.
KEPT_UNTIL_EXIT: list = []


def user_errors() -> tuple[type[Exception], ...]:
    """The errors a user can fix, reported as one line with exit code 2. A function, so that the
    modules (and torch, which they import) load only when an exception is being matched."""
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .engines import EngineError
    from .health import DivergenceError, NonFiniteError
    from .models import ModelError
    from .run_dir import OutputError
    from .sequence import SequenceError
    return (ConfigError, DataError, ModelError, CheckpointError, NonFiniteError, DivergenceError, EngineError, OutputError,
            SequenceError)


def fail(error: Exception) -> None:
    """One line on stderr and exit code 2. Under a launcher, an error every process raises alike is
    printed once, by the main process; one raised by a single process names its rank, on a line of
    its own (the main process's progress bar may hold the current one)."""
    if RANK == 0 or not getattr(error, "same_on_every_process", False):
        typer.echo(f"\n[rank {RANK}] error: {error}" if RANK else f"error: {error}", err=True)
    raise typer.Exit(2)


def exit_if_launched() -> None:
    """Launched and done (every process passed the last barrier, the process group is destroyed): exit
    without the interpreter's teardown, where a C++ thread of the distributed stack left joinable aborts
    the process ("terminate called without an active exception", once in CI after a complete ZeRO-3
    run), which the launcher would report as a failed run."""
    if LAUNCHED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def from_a_collective(error: BaseException) -> bool:
    """Whether `error` was raised inside a torch.distributed collective: under a launcher, the sign that
    another process failed (its error is reported by that process) and this one lost contact with it."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and f"torch{os.sep}distributed{os.sep}" in frames[-1].filename
