"""Per-process peak memory and step time of long pairs, sequence-parallel 1 against 2 (train.sequence_parallel).

The model is built here with random weights: Qwen2-0.5B's layer shape (hidden 896, 14 query heads, 2 key-value
heads, MLP 4864), cut to --layers decoder layers, with the embedded SmolLM2 tokenizer's 49,152-token vocabulary
(tied embeddings). Each length is one pair: a prompt of half its tokens, a chosen and a rejected answer of a
quarter each, so the packed row holds exactly LENGTH tokens. One optimizer step each (the live reference's
forward, the policy's forward and backward), fp32, gradient checkpointing on, train.layout_check off (it scores the
first batch whole on every process). Each run is a fresh launch:

  sp1: one process, the whole row (torch's threads: every core)
  sp2: two processes (scripts/launch.sh ENGINE, one thread each) sharing the row, FSDP2 by default: the
       weights, gradients and AdamW state are sharded over the two, the activations split by sequence

Peak memory is each process's peak RSS from the start of training (metrics' memory/peak_mb, the largest over
processes). --cap-mb states a per-process memory cap; the longest length each setting trained under it is read
off the runs, never extrapolated. A length that fails (out of memory, or past --timeout) is reported as such.

    python scripts/bench_sequence.py --lengths 2048,4096,8192 --json sequence.json
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


def make_model(out: Path, layers: int) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dpo_train.config import EMBEDDED_MODEL
    from dpo_train.models import load_tokenizer
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=65536,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    Qwen2ForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


def make_pair(length: int, out: Path) -> None:
    """One pair of plain texts long enough that truncation cuts them to length/2 + length/4 + length/4 tokens."""
    words = "the of and to in is was for on that with as by at from his her an which or be are".split()
    rng = random.Random(length)
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))
    out.write_text(json.dumps({"prompt": text(length), "chosen": text(length), "rejected": text(length)}) + "\n")


def run(setting: str, length: int, model: Path, work: Path, engine: str, timeout: float) -> dict:
    data, out = work / f"pair-{length}.jsonl", work / f"{setting}-{length}"
    make_pair(length, data)
    config = work / f"{setting}-{length}.yaml"
    config.write_text(json.dumps({
        "model": {"name_or_path": str(model)},
        "data": {"train": str(data), "max_length": 3 * length // 4, "max_prompt_length": length // 2},
        "train": {"output_dir": str(out), "per_device_batch_size": 1, "max_steps": 1, "learning_rate": 1e-6,
                  "eval_max_new_tokens": 0, "gradient_checkpointing": True, "layout_check": False, "seed": 0,
                  "sequence_parallel": 2 if setting == "sp2" else 1, "collective_timeout": int(timeout)}}))
    command = ([sys.executable, "-m", "dpo_train", "train", "--config", str(config)] if setting == "sp1" else
               ["bash", str(ROOT / "scripts" / "launch.sh"), engine, str(config)])
    env = {**os.environ, "NUM_PROCESSES": "2", "DPO_TRAIN_CACHE": str(work / "cache"),
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
    # the row holds `length` tokens when the prompt and both answers were cut to their limits
    assert "truncated prompts 1, truncated completions 1" in result.stdout, result.stdout[-2000:]
    return {"setting": setting, "length": length, "peak_mb": record["memory/peak_mb"],
            "step_s": round(length / record["tokens/s"], 1), "wall_s": round(wall, 1), "loss": record["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="2048,4096,8192,16384", help="tokens per pair (a multiple of 4)")
    parser.add_argument("--settings", default="sp1,sp2")
    parser.add_argument("--engine", default="fsdp", help="the engine of the sp2 runs (scripts/launch.sh)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--cap-mb", type=float, default=6144, help="the per-process memory cap of the summary")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds a run may take")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-sequence-"))
    make_model(work / "model", args.layers)
    rows = []
    for length in map(int, args.lengths.split(",")):
        for setting in args.settings.split(","):
            rows.append(run(setting, length, work / "model", work, args.engine, args.timeout))
            print(json.dumps(rows[-1]), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"\n{'setting':8s}{'tokens':>8s}{'peak MiB/process':>18s}{'step s':>8s}")
    for row in rows:
        print(f"{row['setting']:8s}{row['length']:8d}" + (f"{row['peak_mb']:18.0f}{row['step_s']:8.1f}" if "peak_mb" in row
                                                         else f"  {row['failed']}"))
    for setting in args.settings.split(","):
        fits = [r["length"] for r in rows if r["setting"] == setting and r.get("peak_mb", float("inf")) <= args.cap_mb]
        print(f"{setting}: the longest pair trained under {args.cap_mb:.0f} MiB a process: "
              f"{max(fits) if fits else 'none of those run'} tokens")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
