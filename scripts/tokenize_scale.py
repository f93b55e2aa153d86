"""Time and peak memory of loading, checking and tokenizing a large preference set, as training does.

Writes N UltraFeedback-sized rows (prompts of 40 to 200 words, answers of 50 to 300, drawn from a
fixed seed) to a JSONL file once, then runs `build_dataset` on it with the embedded SmolLM2
tokenizer (its chat template) in a fresh process per measurement, each with a fresh datasets
cache, then once more reading that cache. Prints one line per run: wall seconds, CPU seconds (all
processes: on a shared machine the steadier figure), the peak RSS of the main process and of the
largest tokenizing worker, and (Linux) their peak anonymous RSS: RSS also counts the pages of the
memory-mapped Arrow files being read, which grow with the data but belong to the page cache, so the
anonymous part is what the process itself holds.

    python scripts/tokenize_scale.py --rows 60000 --num-proc 1,default
    python scripts/tokenize_scale.py --rows 30000,60000 --num-proc 1 --no-rerun

`--num-proc default` leaves data.num_proc unset (the machine's cores, at most 8). Run it with
PYTHONPATH pointing at another checkout to time that version (one without num_proc takes `1` only).
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
from pathlib import Path

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
         "you were her she there been one all we their has would when if so no what up out who them some could more "
         "into time only my than then its two first also new because any these most people way may water over after "
         "system answer question model data value example number result function table energy country city river "
         "language history science music health market policy design process research student teacher problem").split()


def text(rng: random.Random, low: int, high: int) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(low, high))]
    return " ".join(words).capitalize() + "."


def write_rows(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(rows):
            row = {"prompt": text(rng, 40, 200), "chosen": text(rng, 50, 300), "rejected": text(rng, 50, 300)}
            f.write(json.dumps(row) + "\n")


MEASURE = """
import glob, json, resource, sys, threading, time
peak_anon = {"main": 0, "worker": 0}

def anon_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))
    except (OSError, StopIteration):
        return 0

def sample():  # every 50 ms: this process's anonymous RSS and that of each child (the tokenizing workers)
    while True:
        peak_anon["main"] = max(peak_anon["main"], anon_kb("self"))
        for path in glob.glob("/proc/self/task/*/children"):
            for pid in open(path).read().split():
                peak_anon["worker"] = max(peak_anon["worker"], anon_kb(pid))
        time.sleep(0.05)

threading.Thread(target=sample, daemon=True).start()
from dpo_train.config import EMBEDDED_MODEL
from dpo_train.data import build_dataset
from dpo_train.models import load_tokenizer
path, num_proc, max_length, max_prompt_length = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
tokenizer = load_tokenizer(EMBEDDED_MODEL)
kwargs = {} if num_proc == "default" else {"num_proc": int(num_proc)}
cpu = lambda: sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for f in ("ru_utime", "ru_stime"))
start, cpu_start = time.perf_counter(), cpu()
pairs, _, stats = build_dataset(path, "train", tokenizer, max_length, max_prompt_length, **kwargs)
seconds, cpu_seconds = time.perf_counter() - start, cpu() - cpu_start
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "pairs": len(pairs), "kept": stats.kept,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "anon_mb": peak_anon["main"] / 1024, "worker_anon_mb": peak_anon["worker"] / 1024}))
"""


def measure(path: Path, num_proc: str, cache: str, max_length: int, max_prompt_length: int) -> dict:
    env = {**os.environ, "HF_DATASETS_CACHE": cache, "TQDM_DISABLE": "1"}
    result = subprocess.run([sys.executable, "-c", MEASURE, str(path), num_proc, str(max_length), str(max_prompt_length)],
                            env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="60000", help="row counts, comma-separated")
    parser.add_argument("--num-proc", default="1,default", help="data.num_proc values, comma-separated")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--max-prompt-length", type=int, default=1024)
    parser.add_argument("--no-rerun", action="store_true", help="skip the second, cached run")
    parser.add_argument("--workdir", default=None, help="where the JSONL files go (default: a temporary folder)")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tokenize-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"rows  num_proc  run     wall s   CPU s  pairs   peak RSS MB: main (anonymous)  largest worker (anonymous)"
          f"   ({os.cpu_count()} cores)")
    for rows in map(int, args.rows.split(",")):
        path = workdir / f"rows-{rows}.jsonl"
        if not path.exists():
            write_rows(path, rows)
        for num_proc in args.num_proc.split(","):
            cache = tempfile.mkdtemp(prefix="datasets-cache-", dir=workdir)
            for run in ("fresh",) + (() if args.no_rerun else ("cached",)):
                m = measure(path, num_proc, cache, args.max_length, args.max_prompt_length)
                print(f"{rows:<6d}{num_proc:>8s}  {run:7s}{m['seconds']:8.1f}{m['cpu_seconds']:8.1f}  {m['pairs']:<7d}"
                      f"{m['rss_mb']:17.0f} ({m['anon_mb']:4.0f}){m['worker_rss_mb']:20.0f} ({m['worker_anon_mb']:4.0f})",
                      flush=True)
            shutil.rmtree(cache)
    if not args.workdir:  # the generated rows (a --workdir keeps them for the next run)
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
