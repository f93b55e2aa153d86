"""Every engine on CPU processes, launched as a user launches it (`scripts/launch.sh ENGINE CONFIG`,
which on a machine without GPUs is the CPU rehearsal): DDP, FSDP2, DeepSpeed ZeRO-2, ZeRO-3 and ZeRO-3
with CPU offload, each against one process with gradient accumulation; resume after SIGKILL; export;
faults on one process that must not leave the others waiting; two machines simulated on localhost."""

import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import cache_at
from dpo_train.checkpoint import CheckpointError, complete_checkpoints
from dpo_train.engines import EngineError
from dpo_train.trainer import train
from test_checkpoint import without_timing
from test_trainer import final_weights, read_metrics, tiny_config

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("ddp", "fsdp", "zero2", "zero3", "zero3_offload")
VARIANTS = {"live": [], "precomputed": ["model.precompute_reference=true"],
            "lora": ["model.lora.r=4", "model.lora.save_merged=true"]}
# 5 optimizer steps of 8 pairs, checkpoints at steps 2 and 4, evaluation with greedy generation (eval rows carry
# an `answer`) at steps 2 and 4 and at the end
RUN = ["train.max_steps=5", "train.save_every=2", "train.eval_every=2", "train.eval_max_new_tokens=3",
       "train.learning_rate=1e-4", "train.collective_timeout=60"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_command(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run `cmd` in its own process group; on timeout kill the whole group and fail: a hang is a failure."""
    process = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{' '.join(cmd[:4])} still running after {timeout} s:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)


def launch(engine: str, config: Path, *overrides: str, fault: str = "", cache: Path, timeout: float = 600,
           check: bool = True, mixed_precision: str = "no", processes: int = 2) -> subprocess.CompletedProcess:
    """`NUM_PROCESSES=processes scripts/launch.sh ENGINE CONFIG overrides...`, with DPO_TRAIN_FAULT injected by
    tests/faults/sitecustomize.py."""
    env = {**os.environ, "NUM_PROCESSES": str(processes), "MAIN_PROCESS_PORT": str(free_port()), "DPO_TRAIN_CACHE": str(cache),
           "DPO_TRAIN_FAULT": fault, "MIXED_PRECISION": mixed_precision,
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "faults"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = run_command(["bash", str(ROOT / "scripts" / "launch.sh"), engine, str(config), *overrides], env, timeout)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, tiny_data):
    """Runs made once per module and shared by its tests: baseline(variant) trains one process with 2
    accumulation steps in this process; engine(name, variant) launches 2 processes x 1 step."""
    root = tmp_path_factory.mktemp("engines")
    tiny_config(root, tiny_model_dir, tiny_data)  # writes root/tiny.yaml
    config = root / "tiny.yaml"

    @functools.cache
    def baseline(variant: str) -> Path:
        out = root / f"one-{variant}"
        with cache_at(root / f"cache-one-{variant}"):
            train(tiny_config(root, tiny_model_dir, tiny_data, *RUN, *VARIANTS[variant], "train.grad_accum_steps=2",
                              f"train.output_dir={out}"))
        return out

    @functools.cache
    def engine(name: str, variant: str) -> tuple[Path, subprocess.CompletedProcess]:
        out = root / f"{name}-{variant}"
        result = launch(name, config, *RUN, *VARIANTS[variant], "train.grad_accum_steps=1", f"train.output_dir={out}",
                        cache=root / f"cache-{name}-{variant}")  # its own cache: the reference is computed, not read
        return out, result

    return type("Runs", (), {"root": root, "config": config, "baseline": staticmethod(baseline),
                             "engine": staticmethod(engine)})


def assert_same_run(one: Path, two: Path, atol: float = 1e-5, weights=final_weights) -> None:
    """Final weights to `atol` (0: bitwise), and the same metrics records (reduced over processes, written once).
    `weights`: a run folder -> its final weights by name."""
    expected, got = weights(one), weights(two)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.allclose(expected[key], got[key], rtol=0, atol=atol), (key, (expected[key] - got[key]).abs().max())
    one_records, two_records = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in one_records] == [r["step"] for r in two_records]
    for a, b in zip(one_records, two_records):
        for key in ("loss", "eval/loss", "rewards/accuracies", "logps/chosen", "eval/exact_answer_accuracy"):
            if key in a:
                assert abs(a[key] - b[key]) < 1e-4, (a["step"], key, a[key], b[key])


# ZeRO-3 with offload differs from ZeRO-3 in where the optimizer's state lives, not in how the model is held,
# so it runs with the live reference only (and resumes, below); the reference and LoRA variants run under ZeRO-3.
MATRIX = [(engine, variant) for engine in ENGINES for variant in VARIANTS if engine != "zero3_offload" or variant == "live"]


@pytest.mark.slow  # launches processes that import torch, transformers and DeepSpeed
@pytest.mark.parametrize("engine, variant", MATRIX, ids=[f"{engine}-{variant}" for engine, variant in MATRIX])
def test_two_processes_match_one_process_with_accumulation(runs, engine, variant):
    """2 processes x 4 pairs == 1 process x 4 pairs x 2 accumulation steps, to 1e-5 in fp32: each optimizer
    step sees the same 8 pairs and averages the same gradients, whatever holds the weights. final/ is a
    complete model (gathered, not a shard; LoRA: the adapter, and merged/) that from_pretrained loads."""
    out, result = runs.engine(engine, variant)
    assert result.stdout.count("CPU rehearsal:") == 1 and "on 2 CPU processes (gloo), fp32" in result.stdout
    assert "shm_comm" not in result.stdout + result.stderr  # DeepSpeed's shared-memory allreduce: not built, not loaded
    sharded = engine in ("fsdp", "zero3", "zero3_offload")
    if variant == "live":  # the reference: each process holds its shard under FSDP2 and ZeRO-3, all of it otherwise
        found = re.search(r"this process holds ([\d,]+) of its ([\d,]+) parameters", result.stdout)
        held, total = (int(group.replace(",", "")) for group in found.groups())
        assert held == total if not sharded else 0.4 * total < held < 0.6 * total, (held, total)
    # the fast paths: packed attention under every engine; the chunked head only where its weight is whole
    assert "using the rows layout instead" not in result.stdout
    assert ("the LM head runs inside the model's forward" in result.stdout) == sharded
    assert "5 optimizer steps of 8 pairs" in result.stdout
    # progress is drawn by the main process alone: each bar's first frame appears once, not once per process
    bars = ("final evaluation: policy:   0%", "eval at step 2:   0%") + (("Loading weights:   0%",) if not sharded
                                                                      and variant == "live" else ())
    for first_frame in bars:  # (the policy is loaded once, and copied for the reference, where weights are whole)
        assert result.stderr.count(first_frame) == 1, (first_frame, result.stderr[-3000:])
    assert result.stdout.count("eval at step 2: loss") + result.stderr.count("eval at step 2: loss") == 1
    assert_same_run(runs.baseline(variant), out)
    assert read_metrics(out)[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)  # policy == reference at step 0
    final = out / "final"
    if variant == "lora":
        merged = load_file(final / "merged" / "model.safetensors")
        expected = load_file(runs.baseline(variant) / "final" / "merged" / "model.safetensors")
        assert merged.keys() == expected.keys() and all(torch.allclose(merged[k], expected[k], atol=1e-5) for k in merged)
    model = AutoModelForCausalLM.from_pretrained(final)  # LoRA: base + adapter, through peft
    whole = AutoModelForCausalLM.from_pretrained(runs.baseline(variant) / "final")
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(model.state_dict().values(), whole.state_dict().values()))
    results = json.loads((out / "eval_results.json").read_text())
    assert "exact_answer_accuracy" in results["policy"]  # greedy generation ran, on every process


@pytest.mark.slow  # launches processes that import torch, transformers and DeepSpeed
@pytest.mark.parametrize("engine", ["ddp", "fsdp", "zero2", "zero3", "zero3_offload"])
def test_resume_after_sigkill_is_bitwise_exact_under_each_engine(runs, engine):
    """Killed with SIGKILL right after the step-4 checkpoint, resumed with --resume auto: the same weights
    and records as the uninterrupted run under the same engine, bit for bit."""
    full, _ = runs.engine(engine, "live")
    killed = runs.root / f"{engine}-killed"
    cache = runs.root / f"cache-{engine}-killed"
    result = launch(engine, runs.config, *RUN, "train.grad_accum_steps=1", f"train.output_dir={killed}",
                    fault="kill_after_save:4", cache=cache, check=False)
    assert result.returncode != 0 and not (killed / "final").exists()
    assert [p.name for p in complete_checkpoints(killed / "checkpoints")] == ["step-2", "step-4"]
    resumed = launch(engine, runs.config, *RUN, "train.grad_accum_steps=1", f"train.output_dir={killed}",
                     "--resume", "auto", cache=cache)
    assert "Resumed from" in resumed.stdout and "step-4 at step 4" in resumed.stdout
    assert_same_run(full, killed, atol=0)
    assert without_timing(read_metrics(full)) == without_timing(read_metrics(killed))


@pytest.mark.slow  # launches processes that import torch, transformers and DeepSpeed
def test_a_checkpoint_is_resumed_only_by_as_many_processes_as_wrote_it(runs, tiny_model_dir, tiny_data):
    full, _ = runs.engine("zero3", "live")
    copy = runs.root / "zero3-copy"
    shutil.copytree(full, copy)
    shutil.rmtree(copy / "final")
    size = (copy / "metrics.jsonl").stat().st_size
    with pytest.raises(CheckpointError, match=r"step-4: written by 2 process\(es\); resume it with 2, not 1"):
        train(tiny_config(runs.root, tiny_model_dir, tiny_data, *RUN, f"train.output_dir={copy}"), resume="auto")
    assert (copy / "metrics.jsonl").stat().st_size == size  # refused before training started


# fault: (engine, DPO_TRAIN_FAULT, the one error line expected on stderr)
FAULTS = {
    # the disk (a real tmpfs, filled) is full when both processes write their shards: every process stops with
    # that error, printed once
    "disk-full-at-a-checkpoint": ("fsdp", "", r"^error: cannot save checkpoint .*step-2: no space left on device"),
    # one process meets bad data mid-run: its error, named by rank; the launcher ends the others
    "data-error-on-one-rank": ("zero3", "data_error:1:3", r"^\[rank 1\] error: .*a bad batch on rank 1$"),
    # one process's loss is NaN: every process stops at the same step (before DeepSpeed's backward applies it)
    "nan-on-one-rank": ("zero2", "nan_loss:1:2", r"^error: step 2: the loss or a gradient is NaN or infinite; "
                                                  r"stopped without applying it"),
}


@pytest.mark.slow  # launches processes that import torch, transformers and DeepSpeed
@pytest.mark.parametrize("fault", FAULTS)
def test_a_fault_on_one_process_ends_every_process_with_one_error(runs, fault):
    """No process is left waiting for a failed one: the launch ends well inside its timeout (each
    process would give up on a collective after train.collective_timeout = 60 s), with one error line."""
    engine, spec, message = FAULTS[fault]
    out, start = runs.root / fault, time.monotonic()
    try:
        if fault == "disk-full-at-a-checkpoint":
            from test_run_dir import fill, mount_tmpfs

            mount_tmpfs(runs.root / "small-fs", "size=20m")
            out = runs.root / "small-fs" / "run"
            fill(runs.root / "small-fs", 8)  # the lock, config.yaml and metrics.jsonl fit; a checkpoint does not
        result = launch(engine, runs.config, *RUN, "train.grad_accum_steps=1", f"train.output_dir={out}",
                        fault=spec, cache=runs.root / f"cache-{fault}", timeout=240, check=False)
        if fault == "disk-full-at-a-checkpoint":
            assert not list((out / "checkpoints").glob(".tmp*"))  # the partial folder removed
    finally:
        if fault == "disk-full-at-a-checkpoint":
            subprocess.run(["umount", "-l", str(runs.root / "small-fs")], check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if re.match(r"^(\[rank \d+\] )?error: ", line)]
    assert len(errors) == 1 and re.search(message, errors[0]), result.stderr[-3000:]
    print(f"{fault}: ended in {time.monotonic() - start:.0f} s")


@pytest.mark.slow  # launches processes that import torch, transformers and DeepSpeed
def test_two_machines_simulated_on_localhost_match_one_process(runs):
    """Two torchrun agents (--nnodes 2, one process each) meeting through a c10d rendezvous, as on two
    machines, train the same weights as one process with accumulation."""
    out, port = runs.root / "two-nodes", free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "two-nodes",
           "-m", "dpo_train", "--config", str(runs.config), *RUN, "train.grad_accum_steps=1", f"train.output_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DPO_TRAIN_CACHE": str(runs.root / "cache-two-nodes")}
    nodes = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for _ in range(2)]
    try:
        outputs = [node.communicate(timeout=600) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    assert all(node.returncode == 0 for node in nodes), outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert [stdout.count("5 optimizer steps of 8 pairs") for stdout, _ in outputs] == [1, 1]  # once per machine
    assert_same_run(runs.baseline("live"), out)


# what the launched engine cannot run: (accelerate launch's environment, overrides, the one line)
REFUSED = {
    "skip-under-deepspeed": ({"ACCELERATE_USE_DEEPSPEED": "true"}, ["train.on_nonfinite=skip"],
                             "train.on_nonfinite: skip cannot run under DeepSpeed"),
    "fsdp-version-1": ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, [], "FSDP version 1 is not supported"),
    "compile-under-fsdp": ({"ACCELERATE_USE_FSDP": "true"}, ["train.compile=true"], "train.compile has not run under FSDP"),
    "sequence-groups-that-do-not-divide": ({"WORLD_SIZE": "3"}, ["train.sequence_parallel=2"],
                                           "train.sequence_parallel: 2 does not divide the 3 processes launched"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_an_engine_cannot_run_stops_before_anything_loads(tmp_path, tiny_model_dir, tiny_data, monkeypatch, case):
    environment, overrides, message = REFUSED[case]
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr("dpo_train.trainer.load_policy_and_reference", lambda *a, **k: pytest.fail("a model loaded"))
    with pytest.raises(EngineError, match=re.escape(message)):
        train(tiny_config(tmp_path, tiny_model_dir, tiny_data, *overrides))
    assert not (tmp_path / "run").exists()  # nothing written either


@pytest.mark.slow  # launches processes that import torch, transformers and DeepSpeed
@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_bf16_mixed_precision_under_the_sharded_engines(runs, engine):
    """Every shipped Accelerate config sets bf16: under FSDP2 (which casts the forward's arguments) and
    ZeRO-3 it trains with the fp32 run's losses to bf16 precision (one step at ln 2: 2^-9)."""
    out = runs.root / f"{engine}-bf16"
    result = launch(engine, runs.config, *RUN, "train.grad_accum_steps=1", f"train.output_dir={out}",
                    cache=runs.root / f"cache-{engine}-bf16", mixed_precision="bf16")
    assert "on 2 CPU processes (gloo), bf16 mixed precision" in result.stdout
    fp32 = [r for r in read_metrics(runs.baseline("live")) if "loss" in r]
    bf16 = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in bf16] == list(range(5))
    assert all(abs(a["loss"] - b["loss"]) < 2**-9 for a, b in zip(fp32, bf16)), [(a["loss"], b["loss"]) for a, b in zip(fp32, bf16)]


def test_deepspeed_settings_the_run_owns_and_bucket_sizes_left_unset():
    """The micro-batch, clipping and the whole-weights save are the run's; bucket sizes the user's DeepSpeed
    config leaves unset get Accelerate's `auto` values from the hidden size, a set one is kept."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType
    from transformers import LlamaConfig

    from dpo_train.engines import configure_deepspeed
    ds_config = {"zero_optimization": {"stage": 3, "reduce_bucket_size": 12345}}
    accelerator = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED,
                                  state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds_config)))
    configure_deepspeed(accelerator, 4, 0.5, LlamaConfig(hidden_size=64))
    assert (ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_clipping"]) == (4, 0.5)
    assert ds_config["zero_optimization"] == {
        "stage": 3, "reduce_bucket_size": 12345, "allgather_bucket_size": 64 * 64, "stage3_prefetch_bucket_size": 3686,
        "stage3_param_persistence_threshold": 640, "stage3_gather_16bit_weights_on_model_save": True}


def test_deepspeed_is_not_imported_without_a_deepspeed_engine(tmp_path, tiny_model_dir, tiny_data):
    """One process, with DeepSpeed installed: training, checkpoints and the final save never import it, so
    none of its accelerator warnings are printed."""
    pytest.importorskip("deepspeed")
    tiny_config(tmp_path, tiny_model_dir, tiny_data, "train.max_steps=2", "train.save_every=1")  # writes tiny.yaml
    code = ("import sys; from dpo_train.cli import app\n"
            f"try: app([\"--config\", {str(tmp_path / 'tiny.yaml')!r}, \"train.max_steps=2\", \"train.save_every=1\"])\n"
            "except SystemExit as e: assert not e.code, e.code\n"
            "print('deepspeed imported:', 'deepspeed' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "deepspeed imported: False" in result.stdout
    assert "Setting accelerator" not in result.stderr + result.stdout
