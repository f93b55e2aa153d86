"""Training health: a NaN or infinite loss or gradient (`train.on_nonfinite`), and divergence
(`train.on_divergence`): a loss far beyond its first value, or a gradient norm that falls to 0 after
a spike (the weights saturated: the model stopped learning and is likely broken). Divergence is a
warning in the log and the model card, or with `on_divergence: stop` a stop.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import engines
from .checkpoint import newest_verified

SPIKE = 10  # a loss or gradient norm more than this many times its first value is a spike
LOSS_FLOOR = 0.1  # a first loss below this counts as this much (10 x a loss that starts near 0 is no spike)
COLLAPSED = 1e-8  # a gradient norm below this fraction of its first value counts as 0


class NonFiniteError(RuntimeError):
    """A NaN or infinite loss or gradient, with the step and the last good checkpoint."""
    same_on_every_process = True  # every process checks the same all-reduced flag


class DivergenceError(RuntimeError):
    """Divergence with `train.on_divergence: stop`, with the step and the last good checkpoint."""
    same_on_every_process = True  # every process checks the same reduced record


def all_finite(accelerator, *values) -> bool:
    """Whether every value (tensors, floats or None) is finite on every process: the same answer everywhere."""
    finite = all(v is None or bool(torch.isfinite(torch.as_tensor(v)).all()) for v in values)
    return not engines.on_any_process(accelerator, not finite)


def fresh() -> dict:
    """What a run remembers of its health; kept in the run's position, so checkpoints carry it."""
    return {"first_loss": None, "first_grad_norm": None, "loss_spike": None, "grad_spike": None, "collapsed": None,
            "warnings": []}


def check(health: dict, step: int, loss: float, grad_norm: float | None) -> list[str]:
    """The warnings that the logged training record of `step` raises for the first time (each kind is
    said once), added to `health['warnings']`. `loss` is the record's mean, the same on every process,
    and `grad_norm` the total norm before clipping, also the same everywhere."""
    if health["first_loss"] is None:
        health["first_loss"], health["first_grad_norm"] = loss, grad_norm
        return []
    first_loss, first_norm, warnings = health["first_loss"], health["first_grad_norm"], []
    if health["loss_spike"] is None and loss > SPIKE * max(abs(first_loss), LOSS_FLOOR):
        health["loss_spike"] = step
        warnings.append(f"step {step}: the loss {loss:.4g} is more than {SPIKE} times its first value "
                        f"{first_loss:.4g}: training is diverging (a lower train.learning_rate may help)")
    if grad_norm is not None and first_norm:
        if health["grad_spike"] is None and grad_norm > SPIKE * first_norm:
            health["grad_spike"] = step
        spiked = health["loss_spike"] is not None or health["grad_spike"] is not None
        if spiked and health["collapsed"] is None and grad_norm < COLLAPSED * first_norm:
            health["collapsed"] = step
            warnings.append(f"step {step}: the gradient norm fell to {grad_norm:.3g} after a spike (its first value "
                            f"{first_norm:.4g}): the weights saturated and stopped learning; the model is likely "
                            "broken")
    health["warnings"] += warnings
    return warnings


def last_good(accelerator, out: Path) -> str:
    """The newest checkpoint under `out` that verifies (only the main process hashes: only its message is printed)."""
    found = newest_verified(out / "checkpoints") if accelerator.is_main_process else None
    return str(found) if found else "none (set train.save_every to keep some)"


def nonfinite_error(accelerator, out: Path, step: int, applied: bool) -> NonFiniteError:
    how = "DeepSpeed had already applied it" if applied else "without applying it"
    return NonFiniteError(f"step {step}: the loss or a gradient is NaN or infinite; stopped {how}. "
                          f"Last good checkpoint: {last_good(accelerator, out)}")


def watch(accelerator, position: dict, loss: float, grad_norm: float | None, on_divergence: str, out: Path) -> None:
    """Say (or with on_divergence: stop, raise) what the logged record of position['step'] shows of divergence."""
    for warning in check(position["health"], position["step"], loss, grad_norm):
        accelerator.print(f"\nwarning: {warning}")
        if on_divergence == "stop":
            raise DivergenceError(f"{warning}; stopped (train.on_divergence: stop). Last good checkpoint: "
                                  f"{last_good(accelerator, out)}")
