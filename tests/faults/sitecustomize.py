"""Faults injected into launched training processes, for the multi-process tests.

Python imports `sitecustomize` at start-up; tests put this folder first on PYTHONPATH and name one
fault in DPO_TRAIN_FAULT, so the command under test stays exactly what a user runs
(`scripts/launch.sh ENGINE CONFIG ...`). Only processes started by a launcher (LOCAL_RANK set) are
touched; the launcher itself is not.

    kill_after_save:STEP      every process SIGKILLs itself right after checkpoint STEP is saved
    data_error:RANK:BATCH     that process's BATCH-th training batch (1-based) is bad data
    nan_loss:RANK:CALL        that process's loss is NaN in its CALL-th training step (0-based)
"""

import os

FAULT = os.environ.get("DPO_TRAIN_FAULT", "")

if FAULT and "LOCAL_RANK" in os.environ:
    import signal

    import dpo_train.trainer as trainer
    from dpo_train.data import DataError

    kind, *args = FAULT.split(":")
    args, rank = [int(a) for a in args], int(os.environ["RANK"])

    if kind == "kill_after_save":
        save = trainer.save_checkpoint

        def save_then_die(accelerator, root, step, *rest, **kwargs):
            path = save(accelerator, root, step, *rest, **kwargs)
            if step == args[0]:
                os.kill(os.getpid(), signal.SIGKILL)
            return path

        trainer.save_checkpoint = save_then_die
    elif kind == "data_error" and rank == args[0]:
        batches = trainer.micro_batches

        def bad_batch(run):
            for number, batch in enumerate(batches(run), 1):
                if number == args[1]:
                    raise DataError(f"{run.config.data.train}: a bad batch on rank {rank}")
                yield batch

        trainer.micro_batches = bad_batch
    elif kind == "nan_loss" and rank == args[0]:
        step, calls = trainer.training_step, []

        def nan_at_call(policy, reference, batch, loss_fn):
            loss, sums = step(policy, reference, batch, loss_fn)
            calls.append(None)
            return (loss * float("nan"), sums) if len(calls) - 1 == args[1] else (loss, sums)

        trainer.training_step = nan_at_call
