"""Progress on the console for every phase that takes more than a few seconds, on the main process
only: under a launcher the other processes stay quiet (`quiet_unless`)."""

from __future__ import annotations

from tqdm.auto import tqdm


def bar(iterable=None, desc: str = "", total: int | None = None, show: bool = True, unit: str = "batch"):
    """A progress bar that disappears when done (its result is printed as a line), or an inert one
    where `show` is false."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, disable=not show, dynamic_ncols=True)


def say(text: str, show: bool = True) -> None:
    """Print a line without breaking the progress bars open below it."""
    if show:
        tqdm.write(text)


def quiet_unless(main_process: bool) -> None:
    """Turn off the progress bars transformers and datasets draw (loading weights, tokenizing) on every
    process but the main one, which draws them once for all."""
    if main_process:
        return
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
