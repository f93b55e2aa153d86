"""scripts/bench.py's own arithmetic: the synthetic shapes, MFU, the FLOP count and the GEMM rate
(the runs themselves need TRL and minutes)."""

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench  # noqa: E402
import bench_flops  # noqa: E402


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
    assert bench_flops.mfu(1000, 135_000_000, 989.4) == pytest.approx(8 * 135e6 * 1000 / 989.4e12)
    assert bench_flops.mfu(1000, 135_000_000, 989.4) == pytest.approx(0.0010916, rel=1e-4)


def test_model_parameters_come_from_the_config_alone(tiny_model_dir):
    assert bench_flops.model_parameters(str(tiny_model_dir)) == AutoModelForCausalLM.from_pretrained(tiny_model_dir).num_parameters()


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CPU only")
def test_no_mfu_on_a_cpu():
    assert bench_flops.device_peak_tflops("bfloat16") is None


def test_cpu_attention_is_counted_with_the_sdpa_formulas():
    """torch 2.13's counter knows no CPU SDPA kernel (it counts 0); ours adds them. Forward: scores
    and output, 2 products of 2 x h x q x k x d FLOPs; backward: 5 of them (scores recomputed,
    grads of probabilities, value, query and key). Grouped KV heads count as the query's."""
    from torch.utils.flop_counter import FlopCounterMode
    h, q, k, d = 4, 64, 48, 8
    query = torch.randn(1, h, q, d, requires_grad=True)
    key, value = (torch.randn(1, 2, k, d, requires_grad=True) for _ in range(2))
    run = lambda: torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=torch.ones(q, k, dtype=torch.bool).tril(k - q), enable_gqa=True).sum().backward()
    with FlopCounterMode(display=False) as plain:
        run()
    assert plain.get_total_flops() == 0
    assert bench_flops.count_flops(run) == 7 * (2 * h * q * k * d)


def test_a_packed_policy_step_counts_the_flops_worked_by_hand():
    """The tiny Llama (hidden 32, 2 layers, 4 query and 2 KV heads of 8, MLP 64) on a packed batch:
    every linear layer costs 2 x weights FLOPs per token forward and twice that backward (input
    and weight gradients), the head 2 x V x 32 per scored position; attention per block as above."""
    from conftest import make_model, make_tokenizer
    from dpo_train.collate import collate_packed
    from dpo_train.data import tokenize_pair
    from dpo_train.logps import concatenated_forward
    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer))
    rows = [{"prompt": "1+2=", "chosen": "3", "rejected": "four"}, {"prompt": "a prompt", "chosen": "yes", "rejected": "no"}]
    batch = collate_packed([tokenize_pair(r, tokenizer, 128, 64) for r in rows], tokenizer.pad_token_id)
    flops = bench_flops.count_flops(lambda: sum(map(torch.sum, concatenated_forward(model, batch))).backward())
    n, scored = batch["input_ids"].shape[1], len(batch["targets"])
    layer_weights = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64  # q, k and v, o, gate, up and down
    blocks = sum((p + c) * (p + c) + r * (p + r) for _, p, c, r in batch["pair_spans"].tolist())  # (queries x keys)
    attention = 2 * (2 * 4 * 8) * blocks * (1 + 5 / 2)  # forward 2 products per block, backward 5
    expected = 3 * (2 * 2 * layer_weights * n + 2 * len(tokenizer) * 32 * scored) + 2 * attention
    assert flops == expected


def test_the_gemm_rate_is_the_fastest_product_after_a_warm_up():
    clock = iter([0, 5, 10, 12, 20, 21, 30, 33])  # warm-up 5 s, then 2, 1 and 3 s
    assert bench_flops.matmul_rate(size=64, repeats=3, device="cpu", clock=lambda: next(clock)) == 2 * 64 ** 3 / 1


def test_achieved_flops_are_counted_flops_per_token_times_tokens_per_second():
    assert bench_flops.achieved(1.2e9, 100, 200e9) == pytest.approx((120e9, 0.6))


def test_tokens_per_batch_sets_the_pairs_per_step_for_each_shape(tiny_model_dir):
    args = bench.argparse.Namespace(model=str(tiny_model_dir), scale=0.2, spread=0.0, max_length=1024, batch=4,
                                    tokens_per_batch=2000)
    for shape in bench.SHAPES:
        batch, tokens = bench.batch_size(args, shape)
        assert abs(batch * tokens - 2000) <= tokens / 2  # the nearest whole number of pairs
    assert bench.batch_size(bench.argparse.Namespace(**{**vars(args), "tokens_per_batch": 0}), "prompt-heavy")[0] == 4


def test_bench_vision_pairs_are_image_heavy_and_alike(tmp_path):
    """scripts/bench_vision.py: every pair has the same tokens, and its two images (196 image tokens each) are
    most of them."""
    import bench_vision
    bench_vision.build_model(tmp_path / "model", width=64, layers=1)
    (tmp_path / "data").mkdir()
    rows = bench_vision.make_pairs(tmp_path / "data", 3, images=2)
    data = tmp_path / "data" / "pairs.jsonl"
    data.write_text("".join(bench.json.dumps(r) + "\n" for r in rows))
    from transformers import AutoProcessor
    from dpo_train.data import build_dataset
    from dpo_train.vision import Vision
    processor = AutoProcessor.from_pretrained(tmp_path / "model")
    pairs, _, _ = build_dataset(str(data), "train", processor.tokenizer, 2048, 2047, vision=Vision(processor))
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert [p["prompt_ids"].count(image_id) for p in pairs] == [2 * 196] * 3
    sizes = {len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs}
    assert sizes == {bench_vision.pair_tokens(tmp_path / "model", data)} and 2 * 196 > 0.7 * sizes.pop()


@pytest.mark.slow  # trains a small VLM twice in fresh processes (ours, TRL): about 30 s
def test_bench_vision_runs_both_trainers_side_by_side(tmp_path):
    import json
    import subprocess
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_vision.py"
    out = subprocess.run([sys.executable, str(script), "--batch", "2", "--steps", "1", "--width", "64", "--layers", "1",
                          "--json", str(tmp_path / "rows.json")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {r["trainer"]: r for r in json.loads((tmp_path / "rows.json").read_text())}
    assert set(rows) == {"ours-packed", "trl"} and all(r["tokens/s"] > 0 and r["peak_mb"] > 0 for r in rows.values())
    assert "tok/s vs TRL" in out.stdout
