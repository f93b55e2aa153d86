"""On-policy rounds against offline DPO on the quickstart's capitals demo, on the same budget of
optimizer steps, with the embedded SmolLM2-135M-Instruct.

On-policy: `dpo-train rounds` with the answer judge (1 for the row's exact answer, as the held-out
evaluation checks it, else 0): each round samples K completions for each train prompt from the current
policy, pairs an exact answer against a miss, and runs --steps optimizer steps of DPO on those pairs,
the reference the original model. Offline: the quickstart's 249 fixed pairs, --steps x round steps,
for each round's budget. Everything else is configs/quickstart.yaml's (batch 8, lr 1e-5, warmup 3).
Each run ends with the trainer's held-out evaluation on data/capitals/eval.jsonl (40 countries that no
train row names): reward accuracy against the original model and greedy exact-answer accuracy. Prints
one table, the completions/s of sampling and the time of each phase. One run at a time.

    python scripts/onpolicy_capitals.py                          # 2 rounds of 15 steps, 249 prompts x 8
    python scripts/onpolicy_capitals.py --prompts 64 --samples 4 --steps 5   # a quick look
    python scripts/onpolicy_capitals.py --threads 1              # on a machine others share

Writes under --out (default a fresh folder in /tmp), deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dpo_train.config import load_config  # noqa: E402
from dpo_train.rounds import run_rounds  # noqa: E402
from dpo_train.trainer import train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=15, help="optimizer steps per round (offline: this x round)")
    parser.add_argument("--prompts", type=int, default=249, help="train prompts sampled each round (of 249)")
    parser.add_argument("--samples", type=int, default=8, help="K: completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    parser.add_argument("--pairing", default="best_worst", choices=("best_worst", "all_pairs"))
    parser.add_argument("--reference", default="original", choices=("original", "previous"))
    parser.add_argument("--no-offline", action="store_true", help="the on-policy rounds only")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep what the runs wrote")
    args = parser.parse_args()
    os.chdir(ROOT)  # the quickstart config names its data relative to the checkout
    out = args.out or Path(tempfile.mkdtemp(prefix="dpo-onpolicy-"))
    prompts = "data/capitals/train.jsonl" if args.prompts >= 249 else \
        f"[{{path: data/capitals/train.jsonl, take: {args.prompts}}}]"
    common = [f"train.num_threads={args.threads}", "train.eval_every=0"]
    timings, rows = {}, []
    try:
        rounds_config = load_config(ROOT / "configs" / "quickstart.yaml", [
            *common, f"data.train={prompts}", f"train.output_dir={out / 'onpolicy'}", f"train.max_steps={args.steps}",
            f"rounds.count={args.rounds}", f"rounds.reference={args.reference}", "generate.judge=answer",
            f"generate.pairing={args.pairing}",
            f"generate.num_samples={args.samples}", f"generate.max_new_tokens={args.max_new_tokens}",
            f"generate.temperature={args.temperature}", f"generate.batch_size={args.batch_size}"])
        start = time.perf_counter()
        records = run_rounds(rounds_config)
        timings["on-policy rounds"] = time.perf_counter() - start
        first = records[0]["eval"]
        rows.append(("original model", 0, "-", first["reference"]["rewards/accuracies"],
                     first["reference"]["exact_answer_accuracy"]))
        for record in records:
            policy = record["eval"]["policy"]
            rows.append((f"on-policy, round {record['round']}", record["round"] * args.steps, record["pairs"],
                         policy["rewards/accuracies"], policy["exact_answer_accuracy"]))
        for number in range(1, 0 if args.no_offline else args.rounds + 1):
            steps = number * args.steps
            config = load_config(ROOT / "configs" / "quickstart.yaml", [
                *common, f"train.output_dir={out / f'offline-{steps}'}", f"train.max_steps={steps}"])
            start = time.perf_counter()
            policy = train(config)["policy"]
            timings[f"offline DPO, {steps} steps"] = time.perf_counter() - start
            rows.append((f"offline DPO, {steps} steps", steps, 249, policy["rewards/accuracies"],
                         policy["exact_answer_accuracy"]))
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    anchor = "the original model" if args.reference == "original" else "the previous round's policy"
    print(f"\nCapitals demo, SmolLM2-135M-Instruct: {args.rounds} rounds of {args.steps} steps (batch 8, lr 1e-5) "
          f"on pairs sampled from {min(args.prompts, 249)} prompts x {args.samples} (max_new_tokens "
          f"{args.max_new_tokens}, temperature {args.temperature}), answer judge, {args.pairing} pairs, reference: "
          f"{anchor}; "
          f"held-out: 40 countries\n")
    print("| run | optimizer steps | train pairs | reward accuracy | exact-answer accuracy |")
    print("| --- | --- | --- | --- | --- |")
    for name, steps, pairs, reward, exact in rows:
        print(f"| {name} | {steps} | {pairs} | {reward:.3f} | {exact:.3f} |")
    sampled = [(r["counts"]["completions"], r["completions_per_s"]) for r in records]
    print("\nsampling: " + "; ".join(f"round {i}: {n} completions at {rate:.2f} completions/s"
                                     for i, (n, rate) in enumerate(sampled, 1)))
    print("time: " + "; ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items()))
    print(json.dumps({"rows": rows, "sampling": sampled, "timings": timings, "settings": vars(args) | {"out": str(out)}},
                     default=str))


if __name__ == "__main__":
    main()
