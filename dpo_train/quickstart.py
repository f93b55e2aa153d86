"""The demo that ships with dpo-train: the quickstart config, its data and the Accelerate configs of
every engine. In a checkout they sit in the repository's configs/ and data/; an installed package
carries the same files under dpo_train/demo/ (pyproject.toml maps them there). `dpo-train init DIR`
writes them into DIR in the checkout's layout, so the README's commands run from DIR as they are."""

from __future__ import annotations

import shutil
from pathlib import Path

PARTS = ("configs", "data")  # the folders the quickstart's commands name, relative to where they run


class InitError(RuntimeError):
    """Files that cannot be written out, explained in one line."""


def demo_root() -> Path:
    """The folder holding configs/ and data/: dpo_train/demo in an installed package, else the checkout."""
    package = Path(__file__).resolve().parent
    shipped = package / "demo"
    return shipped if shipped.is_dir() else package.parent


def demo_files() -> list[Path]:
    """The demo's files, relative to demo_root(): configs (.yaml) and data (.jsonl)."""
    root = demo_root()
    return sorted(path.relative_to(root) for part in PARTS for path in (root / part).rglob("*")
                  if path.suffix in (".yaml", ".jsonl"))


def write_demo(directory: Path) -> list[Path]:
    """Copy the demo's files into `directory` (created if needed); returns their new paths. Refuses,
    before writing anything, when one of them would replace an existing file."""
    root, files = demo_root(), demo_files()
    if not files:
        raise InitError(f"no demo files found under {root}; reinstall dpo-train")
    if clashing := [directory / name for name in files if (directory / name).exists()]:
        raise InitError(f"{clashing[0]} already exists ({len(clashing)} of the {len(files)} demo files do); "
                        "choose an empty directory")
    written = []
    try:
        for name in files:
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            written.append(Path(shutil.copyfile(root / name, directory / name)))
    except OSError as e:  # a file where a folder should be, a read-only place, a full disk
        raise InitError(f"cannot write the demo into {directory}: {e.strerror or e}") from None
    return written
