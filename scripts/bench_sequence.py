"""Per-process peak memory and step time of long pairs, with and without sequence parallelism (train.sequence_parallel).

The model is built here with random weights: Qwen2-0.5B's layer shape (hidden 896, 14 query heads, 2 key-value
heads, MLP 4864), cut to --layers decoder layers, with the embedded SmolLM2 tokenizer's 49,152-token vocabulary
(tied embeddings). Each pair has a prompt of half of LENGTH tokens and a chosen and a rejected answer of a
quarter each, so its packed row holds exactly LENGTH tokens. One optimizer step a run (the live reference's
forward, the policy's forward and backward), one pair per data-parallel group, fp32, gradient checkpointing on,
train.layout_check off (it scores the first batch whole on every process). Each run is a fresh launch; settings:

  one         one process, the whole row (torch's threads: every core)
  ENGINE-spN  two processes through scripts/launch.sh ENGINE (one thread each) with train.sequence_parallel N:
              sp1 gives each process a pair of its own (2 pairs a step), sp2 shares one pair between the two

Peak memory is each process's peak RSS from the start of training on a CPU (with glibc's mmap threshold fixed
at 4 MB: ALLOCATOR below says why), allocated CUDA memory on a GPU
(metrics' memory/peak_mb: the largest process's). --cap-mb states a per-process memory cap; the longest length
each setting trained under it is read off the runs, never extrapolated. A run that fails (out of memory, or past
--timeout) is reported as such.

    python scripts/bench_sequence.py --lengths 2048,4096,8192 --settings one,ddp-sp2,fsdp-sp1,fsdp-sp2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# glibc raises its mmap threshold to the size of each large block freed (up to 32 MB), so later blocks below it
# stay on the heap when freed, and RSS keeps them: a split row's tensors, half the size, fall under it and the
# first step's peak of a split run was as high as the whole row's. A fixed threshold (for every setting) returns
# each block of 4 MB or more when it is freed; --glibc-default measures without it.
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(4 << 20)}


def make_model(out: Path, layers: int) -> None:
    """gpu_check's Qwen2-0.5B-shaped model, cut to `layers`, with the SmolLM2 tokenizer's vocabulary."""
    from gpu_check import QWEN2_05B, make_qwen2_shaped
    make_qwen2_shaped(out, dict(QWEN2_05B, num_hidden_layers=layers, vocab_size=49152, max_position_embeddings=65536))


def make_pairs(length: int, out: Path) -> None:
    """Two pairs of plain texts long enough that truncation cuts them to length/2 + length/4 + length/4 tokens."""
    words = "the of and to in is was for on that with as by at from his her an which or be are".split()
    rng = random.Random(length)
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))
    out.write_text("".join(json.dumps({"prompt": text(length), "chosen": text(length), "rejected": text(length)}) + "\n"
                           for _ in range(2)))


def run(setting: str, length: int, model: Path, work: Path, timeout: float) -> dict:
    data, out = work / f"pairs-{length}.jsonl", work / f"{setting}-{length}"
    make_pairs(length, data)
    engine, _, split = setting.partition("-sp")
    split = int(split or 1)
    config = work / f"{setting}-{length}.yaml"
    config.write_text(json.dumps({
        "model": {"name_or_path": str(model)},
        "data": {"train": str(data), "max_length": 3 * length // 4, "max_prompt_length": length // 2},
        "train": {"output_dir": str(out), "per_device_batch_size": 1, "max_steps": 1, "learning_rate": 1e-6,
                  "eval_max_new_tokens": 0, "gradient_checkpointing": True, "layout_check": False, "seed": 0,
                  "sequence_parallel": split, "collective_timeout": int(timeout)}}))
    command = ([sys.executable, "-m", "dpo_train", "train", "--config", str(config)] if setting == "one" else
               ["bash", str(ROOT / "scripts" / "launch.sh"), engine, str(config)])
    pairs_a_step = 1 if setting == "one" else 2 // split
    env = {**os.environ, "NUM_PROCESSES": "2", "DPO_TRAIN_CACHE": str(work / "cache"), **ALLOCATOR,
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}  # accelerate
    start = time.perf_counter()
    try:
        result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"setting": setting, "length": length, "failed": f"still running after {timeout:.0f} s"}
    wall = time.perf_counter() - start
    metrics = out / "metrics.jsonl"
    if result.returncode != 0 or not metrics.exists():
        tail = (result.stderr.strip().splitlines() or ["?"])[-1][:200]
        return {"setting": setting, "length": length, "failed": f"exit {result.returncode}: {tail}"}
    record = json.loads(metrics.read_text().splitlines()[0])
    shutil.rmtree(out)
    # each row holds `length` tokens when the prompts and answers were cut to their limits
    assert "truncated prompts 2, truncated completions 2" in result.stdout, result.stdout[-2000:]
    return {"setting": setting, "length": length, "pairs_a_step": pairs_a_step, "peak_mb": record["memory/peak_mb"],
            "step_s": round(pairs_a_step * length / record["tokens/s"], 1), "wall_s": round(wall, 1),
            "loss": record["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="2048,4096,8192,16384", help="tokens per pair (a multiple of 4)")
    parser.add_argument("--settings", default="one,ddp-sp2,fsdp-sp1,fsdp-sp2",
                        help="one, or ENGINE-spN with ENGINE a scripts/launch.sh engine, comma-separated")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--cap-mb", type=float, default=3000, help="the per-process memory cap of the summary")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds a run may take")
    parser.add_argument("--glibc-default", action="store_true", help="leave glibc's dynamic mmap threshold as it is")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    if args.glibc_default:
        ALLOCATOR.clear()
    work = Path(tempfile.mkdtemp(prefix="bench-sequence-"))
    make_model(work / "model", args.layers)
    rows = []
    for length in map(int, args.lengths.split(",")):
        for setting in args.settings.split(","):
            rows.append(run(setting, length, work / "model", work, args.timeout))
            print(json.dumps(rows[-1]), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"\n{'setting':10s}{'tokens':>8s}{'peak MiB/process':>18s}{'step s':>8s}{'pairs/step':>12s}")
    for row in rows:
        print(f"{row['setting']:10s}{row['length']:8d}" + (
            f"{row['peak_mb']:18.0f}{row['step_s']:8.1f}{row['pairs_a_step']:12d}" if "peak_mb" in row
            else f"  {row['failed']}"))
    for setting in args.settings.split(","):
        fits = [r["length"] for r in rows if r["setting"] == setting and r.get("peak_mb", float("inf")) <= args.cap_mb]
        print(f"{setting}: the longest pair trained under {args.cap_mb:.0f} MiB a process: "
              f"{max(fits) if fits else 'none of those run'} tokens")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
