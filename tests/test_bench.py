"""scripts/bench.py's own arithmetic: the synthetic shapes and MFU (the runs themselves need TRL and minutes)."""

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench  # noqa: E402


def words(turn):
    return len(turn[0]["content"].split())


def test_shapes_fix_lengths_and_spread_varies_them_within_bounds():
    fixed = bench.make_pairs("prompt-heavy", 20)
    assert {(words(p["prompt"]), words(p["chosen"]), words(p["rejected"])) for p in fixed} == {(192, 48, 48)}
    varied = bench.make_pairs("completion-heavy", 200, spread=0.5)
    prompts, chosen = [words(p["prompt"]) for p in varied], [words(p["chosen"]) for p in varied]
    assert 24 <= min(prompts) < 30 and 66 < max(prompts) <= 72  # 48 words x [0.5, 1.5]
    assert 96 <= min(chosen) < 110 and 280 < max(chosen) <= 288  # 192 words x [0.5, 1.5]
    assert bench.make_pairs("completion-heavy", 3, spread=0.5) == varied[:3]  # seeded: every trainer gets the same


def test_mfu_counts_eight_flops_per_parameter_per_pair_token():
    # 135M parameters at 1 000 pair tokens/s: 1.08e15 FLOPs/s out of 989.4 TFLOPS
    assert bench.mfu(1000, 135_000_000, 989.4) == pytest.approx(8 * 135e6 * 1000 / 989.4e12)
    assert bench.mfu(1000, 135_000_000, 989.4) == pytest.approx(0.0010916, rel=1e-4)


def test_model_parameters_come_from_the_config_alone(tiny_model_dir):
    assert bench.model_parameters(str(tiny_model_dir)) == AutoModelForCausalLM.from_pretrained(tiny_model_dir).num_parameters()


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CPU only")
def test_no_mfu_on_a_cpu():
    assert bench.device_peak_tflops("bfloat16") is None
