"""What the checkpoints' sha256 checksums cost: saving and resuming a real checkpoint of a model with
its AdamW state, with and without them.

    python scripts/checkpoint_cost.py                    # the embedded SmolLM2-135M (about 1.6 GB a checkpoint)
    python scripts/checkpoint_cost.py --model DIR --repeats 5 --dir /mnt/fast

One optimizer step gives AdamW its state; then, `--repeats` times: `accelerator.save_state` alone, the
flush to disk (fsync) that every checkpoint had before checksums, and the hashing that `seal` adds
(in threads, and in one thread for comparison); `accelerator.load_state` alone and the verification
(`damage`) that a resume adds. With `--cold` (root) the page cache is dropped before each load and
verification, so the files come from the disk. Medians are printed; what it writes is deleted.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402

from dpo_train import checkpoint  # noqa: E402
from dpo_train.config import EMBEDDED_MODEL  # noqa: E402
from dpo_train.models import load_model  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def drop_page_cache() -> None:
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the checkpoints are written (default: a temp folder)")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each load (needs root)")
    args = parser.parse_args()

    accelerator = Accelerator(cpu=True)
    model = load_model(args.model, "float32")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    model, optimizer = accelerator.prepare(model, optimizer)
    ids = torch.randint(0, model.config.vocab_size, (1, 32))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()  # AdamW's two moments exist from here on
    optimizer.zero_grad()

    root = Path(tempfile.mkdtemp(prefix="checkpoint-cost-", dir=args.dir))
    rows = {k: [] for k in ("save_state", "fsync", "hash (one thread)", "hash (threads)", "load_state", "verify",
                            "load_state after verify")}
    try:
        for i in range(args.repeats):
            folder = root / f"step-{i}"
            rows["save_state"].append(timed(lambda: accelerator.save_state(folder)))
            files = sorted(p for p in folder.rglob("*") if p.is_file())
            size = sum(p.stat().st_size for p in files)
            rows["fsync"].append(timed(lambda: [checkpoint._fsync(p) for p in files]))
            rows["hash (one thread)"].append(timed(lambda: [checkpoint._digest(p) for p in files]))
            rows["hash (threads)"].append(timed(lambda: checkpoint.seal(folder)))  # fsyncs again: already flushed
            if args.cold:
                drop_page_cache()
            rows["load_state"].append(timed(lambda: accelerator.load_state(folder)))  # a resume before checksums
            if args.cold:
                drop_page_cache()
            rows["verify"].append(timed(lambda: checkpoint.damage(folder)))  # a resume now: verify, then load
            rows["load_state after verify"].append(timed(lambda: accelerator.load_state(folder)))
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    median = {k: statistics.median(v) for k, v in rows.items()}
    print(f"{args.model}: a checkpoint of {size / 1e9:.2f} GB in {len(files)} files; medians of {args.repeats}, "
          f"{'cold' if args.cold else 'warm'} page cache, sha256 ({hashlib.sha256().name})")
    for key, value in median.items():
        print(f"  {key:24s} {value:7.2f} s")
    before, hashing = median["save_state"] + median["fsync"], median["hash (threads)"]
    resume = median["verify"] + median["load_state after verify"]
    print(f"saving: {before:.2f} s before checksums, {before + hashing:.2f} s with them (+{hashing:.2f} s, "
          f"{100 * hashing / before:.0f} %); resuming: {median['load_state']:.2f} s before, {resume:.2f} s with them "
          f"(+{resume - median['load_state']:.2f} s, {100 * (resume / median['load_state'] - 1):.0f} %)")


if __name__ == "__main__":
    main()
