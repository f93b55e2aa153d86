"""SIGTERM and Ctrl-C (SIGINT) in every phase of a run: what the first one does, and a second Ctrl-C.

    phase        first SIGTERM or SIGINT                                      a second SIGINT
    setup        stops at once (exit 75): nothing had trained, nothing is lost  aborts (130)
    train        a checkpoint after the current optimizer step, then exit 75   aborts at once (130)
    evaluation   the rest of the final evaluation is skipped, final/ written (0) aborts (130): no final/
    saving       final/ is finished (exit 0)                                   aborts (130): no final/
    upload       the upload stops (exit 3): final/ is saved                    -

Setup runs from the command's start (imports included) to the first training step; `train` covers
the steps, periodic evaluations and checkpoints. Only the standard library is imported here: the
command installs the handlers before torch loads.
"""

from __future__ import annotations

import os
import signal
import sys

FIRST = {"train": "saving a checkpoint after this optimizer step",
         "evaluation": "skipping the rest of the final evaluation; final/ will still be written",
         "saving": "final/ is being written and will be finished"}
ABORTED = {"setup": "aborted by a second Ctrl-C during setup; nothing was lost",
           "train": "aborted by a second Ctrl-C; nothing saved since the last checkpoint",
           "evaluation": "aborted by a second Ctrl-C before final/ was written; continue with --resume auto",
           "saving": "aborted by a second Ctrl-C while final/ was written: there is no final/ (it appears whole or "
                     "not at all); continue with --resume auto"}
_active: StopSignals | None = None  # the handlers installed in this process, if any


class Stopped(BaseException):
    """The run stopped on a signal with nothing lost (a BaseException: a library's `except Exception`
    around the code it interrupts must not swallow it). `exit_code`: 75 (EX_TEMPFAIL: continue with
    --resume auto), 3 for an upload stopped after final/ was saved."""

    def __init__(self, message: str, exit_code: int = 75):
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """While active, SIGTERM and SIGINT act as the module's table says for the current `phase`. Entered
    again while active (the trainer inside the command), it returns the active instance unchanged."""

    def __init__(self):
        self.received: str | None = None
        self.phase = "setup"
        self.outer: StopSignals | None = None

    def __enter__(self) -> StopSignals:
        global _active
        if _active is not None:
            self.outer = _active
            return _active
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        _active = self
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt(ABORTED.get(self.phase, "aborted by a second Ctrl-C"))
            return
        self.received = name
        if self.phase == "setup":
            raise Stopped(f"stopped by {name} during setup, before the first training step; nothing was lost: "
                          "start again (--resume auto continues from the newest checkpoint, if there is one)")
        if self.phase == "upload":
            raise Stopped(f"stopped by {name} during the upload to the hub; final/ is saved: upload it later with "
                          "hf upload REPO_ID RUN/final", exit_code=3)
        if os.environ.get("RANK", "0") == "0":  # launched: every process receives it, one says so
            print(f"\n{name} received: {FIRST[self.phase]} (press Ctrl-C again to abort)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        global _active
        if self.outer is None:
            for s, handler in self.previous.items():
                signal.signal(s, handler)
            _active = None
