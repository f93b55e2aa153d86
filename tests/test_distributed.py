"""Data parallelism on CPU: two processes (gloo, launched by torchrun) against one."""

import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from dpo_train.checkpoint import complete_checkpoints
from dpo_train.trainer import train
from test_checkpoint import without_timing
from test_trainer import final_weights, read_metrics, tiny_config

RUN = ["train.max_steps=5", "train.eval_every=2", "train.eval_max_new_tokens=0", "train.learning_rate=1e-4"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(config_path, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "dpo_train", "--config", str(config_path), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("precompute, lora", [("false", 0), ("true", 0), ("false", 4)],
                         ids=["live", "precomputed", "lora"])
def test_two_processes_match_one_process_with_accumulation(tmp_path, tiny_model_dir, tiny_data, precompute, lora,
                                                           monkeypatch):
    """2 processes x 4 pairs == 1 process x 4 pairs x 2 accumulation steps: each optimizer step sees
    the same 8 pairs (consecutive batches of one seeded order) and averages the same gradients.
    With a precomputed reference, each process computes its shard and all gather them in order.
    With LoRA, DDP averages the adapter's gradients and the reference is the adapter switched off."""
    monkeypatch.setenv("DPO_TRAIN_CACHE", str(tmp_path / "cache"))
    run = [*RUN, f"model.precompute_reference={precompute}", f"model.lora.r={lora}"]
    train(tiny_config(tmp_path, tiny_model_dir, tiny_data, *run, "train.grad_accum_steps=2",
                      f"train.output_dir={tmp_path / 'one'}"))
    if precompute == "true":
        shutil.rmtree(tmp_path / "cache")  # the two processes compute it themselves
    result = torchrun(tmp_path / "tiny.yaml", *run, "train.grad_accum_steps=1", f"train.output_dir={tmp_path / 'two'}")
    assert "5 optimizer steps of 8 pairs" in result.stdout
    one, two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert all(torch.allclose(one[k], two[k], rtol=0, atol=1e-5) for k in one)
    one_records, two_records = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in one_records] == [r["step"] for r in two_records]  # written once, not per process
    for a, b in zip(one_records, two_records):  # metrics are reduced over both processes
        for key in ("loss", "eval/loss", "rewards/accuracies", "logps/chosen"):
            if key in a:
                assert abs(a[key] - b[key]) < 1e-4, (a["step"], key)


def test_resume_with_two_processes_is_exact(tmp_path, tiny_model_dir, tiny_data):
    tiny_config(tmp_path, tiny_model_dir, tiny_data)  # writes tiny.yaml
    run = [*RUN, "train.save_every=2"]
    torchrun(tmp_path / "tiny.yaml", *run, f"train.output_dir={tmp_path / 'full'}")
    torchrun(tmp_path / "tiny.yaml", *run, f"train.output_dir={tmp_path / 'cut'}", "train.max_steps=5")
    # Simulate an interruption after step 2: keep only that checkpoint and the log as it was then.
    cut = tmp_path / "cut"
    shutil.rmtree(cut / "final")
    checkpoints = complete_checkpoints(cut / "checkpoints")
    assert [p.name for p in checkpoints] == ["step-2", "step-4"] and len(list(checkpoints[0].glob("random_states_*"))) == 2
    shutil.rmtree(checkpoints[1])
    torchrun(tmp_path / "tiny.yaml", *run, f"train.output_dir={cut}", "--resume", "auto")
    full, resumed = final_weights(tmp_path / "full"), final_weights(cut)
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert without_timing(read_metrics(tmp_path / "full")) == without_timing(read_metrics(cut))


def test_shipped_accelerate_configs_parse():
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file
    configs = sorted((Path(__file__).parent.parent / "configs" / "accelerate").glob("*.yaml"))
    engines = {p.stem: load_config_from_file(str(p)).distributed_type.value for p in configs}
    assert engines == {"ddp": "MULTI_GPU", "fsdp": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED",
                       "zero3_offload": "DEEPSPEED"}
