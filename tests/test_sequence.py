"""Sequence parallelism is exact: a packed row split over 2 CPU processes (gloo) gives the log-prob sums,
the extras and, averaged over the processes as the engines average them, the gradients of the whole row in
one process; every packed family; the shares; the settings that cannot work refused in one line."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import make_tokenizer
from families import (FAMILIES, USED, dpo_gradients, gradient_difference, layout_gradients, make_family_model,
                      tokenized_pairs)
from dpo_train import sequence
from dpo_train.collate import collate_packed
from dpo_train.logps import forward_sums

PACKED = [family for family in FAMILIES if USED[family] == "packed"]
EXTRAS = frozenset({"shared_logps", "log_sum_sq"})


def split_gradients(model, batch) -> dict[str, torch.Tensor]:
    """layout_gradients' loss on this process's share, the gradients averaged over the processes (as DDP does)."""
    grads = dpo_gradients(model, forward_sums(model, batch)["logps"])
    for grad in grads.values():
        dist.all_reduce(grad)
        grad /= dist.get_world_size()
    return grads


def worker(rank: int, size: int, store: str, families: list[str], out: str) -> None:
    """On each of `size` processes: every family's row whole and split; rank 0 writes the largest differences."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size)
    torch.set_num_threads(1)
    sequence.GROUP = sequence.Group(size, size, "cpu")
    tokenizer = make_tokenizer()
    results = {}
    for family in families:
        model = make_family_model(family, len(tokenizer))
        batch = collate_packed(tokenized_pairs(tokenizer), tokenizer.pad_token_id)
        shared = sequence.share(batch, rank, size)
        with torch.no_grad():
            whole, split = forward_sums(model, batch, extras=EXTRAS), forward_sums(model, shared, extras=EXTRAS)
        whole_grads = layout_gradients(model, tokenized_pairs(tokenizer), "packed")
        split_grads = split_gradients(model, shared)
        results[family] = {
            **{key: float((whole[key] - split[key]).abs().max() / whole[key].abs().max()) for key in whole},
            "gradients": gradient_difference(split_grads, whole_grads)}  # (it asserts the same parameters have one)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


def split_differences(tmp_path, families: list[str], size: int = 2) -> dict:
    out = tmp_path / "results.json"
    mp.start_processes(worker, args=(size, str(tmp_path / "store"), families, str(out)), nprocs=size,
                       start_method="spawn")
    return json.loads(out.read_text())


def test_a_split_row_gives_the_whole_rows_log_probs_extras_and_gradients(tmp_path):
    """A grouped-query Llama, Gemma 2 (softcapped scores, sliding windows) and GPT-OSS (attention sinks, MoE)."""
    results = split_differences(tmp_path, ["llama", "gemma2", "gpt_oss"])
    for family, differences in results.items():
        assert max(differences.values()) < 1e-5, (family, differences)


@pytest.mark.slow  # every family the packed layout serves
def test_every_packed_family_split_over_two_processes_is_exact(tmp_path):
    results = split_differences(tmp_path, PACKED)
    assert sorted(results) == sorted(PACKED)
    for family, differences in results.items():
        assert max(differences.values()) < 1e-5, (family, differences)


def test_a_share_holds_every_nth_token_and_the_positions_that_predict_from_them():
    tokenizer = make_tokenizer()
    batch = collate_packed(tokenized_pairs(tokenizer), tokenizer.pad_token_id)
    length = batch["input_ids"].shape[1]
    shares = [sequence.share(batch, rank, 3) for rank in range(3)]
    for rank, share in enumerate(shares):
        padded = torch.cat([batch["input_ids"][0], torch.zeros(-length % 3, dtype=torch.long)])
        assert share["input_ids"][0].tolist() == padded[rank::3].tolist()
        assert share[sequence.SHARE_KEY] == length and torch.equal(share["pair_spans"], batch["pair_spans"])
        # each kept position is local index j of global position j * 3 + rank
        global_positions = share["logits_to_keep"] * 3 + rank
        assert all(p % 3 == rank for p in global_positions.tolist())
    # together the shares keep every completion token once, with its owner and place in its completion
    # (a prompt's last position predicts both answers' first tokens: positions repeat)
    from dpo_train.sequence import places
    whole_places = places(batch["owners"], int(batch["num_rows"]))
    expected = sorted(zip(batch["logits_to_keep"].tolist(), batch["targets"].tolist(), batch["owners"].tolist(),
                          whole_places.tolist()))
    kept = sorted(t for r, s in enumerate(shares) for t in zip((s["logits_to_keep"] * 3 + r).tolist(),
                  s["targets"].tolist(), s["owners"].tolist(), s["token_places"].tolist()))
    assert kept == expected
    sizes = [len(s["targets"]) for s in shares]
    assert max(sizes) - min(sizes) <= len(batch["pair_spans"]) * 2  # balanced: about a third each


@pytest.mark.parametrize("size, processes, compile, expected", [
    (2, 3, False, "train.sequence_parallel: 2 does not divide the 3 processes"),
    (2, 2, True, "train.compile has not run with train.sequence_parallel"),
    (1, 3, True, None), (2, 4, False, None)])
def test_what_the_split_cannot_run_on_is_refused_before_loading(size, processes, compile, expected):
    reason = sequence.refusal(size, processes, compile)
    assert reason is None if expected is None else reason.startswith(expected)


@pytest.mark.parametrize("family, size, layout, images, router, expected", [
    ("llama", 4, "packed", False, 0.0, "does not divide the model's num_key_value_heads (2)"),
    ("llama", 2, "rows", False, 0.0, "splits the packed layout only, and this run uses rows"),
    ("llama", 2, "packed", True, 0.0, "does not split image pairs"),
    ("qwen3_moe", 2, "packed", False, 0.001, "with the MoE router loss"),
    ("llama", 2, "packed", False, 0.0, None)])
def test_what_the_split_cannot_serve_is_refused_in_one_line(family, size, layout, images, router, expected):
    model = make_family_model(family, len(make_tokenizer()))
    reason = sequence.model_refusal(size, model, layout, images, router)
    assert reason is None if expected is None else (expected in reason and "\n" not in reason), reason


# --- end to end: launched as a user launches it (scripts/launch.sh), against one process -------------------------

# 5 optimizer steps of 4 pairs, checkpoints at steps 2 and 4, evaluation (with greedy generation) at 2, 4 and the end
RUN = ["train.max_steps=5", "train.save_every=2", "train.eval_every=2", "train.eval_max_new_tokens=3",
       "train.learning_rate=1e-4", "train.collective_timeout=60", "train.per_device_batch_size=4"]
SHORT = ("train.max_steps=3", "train.eval_every=0")  # 4 processes on 2 cores: 3 steps, evaluated at the end
VARIANTS = {"live": [], "precomputed": ["model.precompute_reference=true"],
            "lora": ["model.lora.r=4", "train.gradient_checkpointing=true"]}


@pytest.fixture(scope="module")
def split_runs(tmp_path_factory):
    """A Llama with weights large enough to show a leak between spans (initializer_range 0.2), its config, and
    runs made once: one(variant, accumulation) in this process, split(engine, processes, variant) launched."""
    import functools
    from conftest import arithmetic_pairs, cache_at, write_jsonl
    from test_trainer import tiny_config
    from dpo_train.trainer import train
    root = tmp_path_factory.mktemp("sequence")
    tokenizer = make_tokenizer()
    make_family_model("llama", len(tokenizer)).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    data = (write_jsonl(root / "train.jsonl", arithmetic_pairs(48, 0)), write_jsonl(root / "eval.jsonl", arithmetic_pairs(16, 1)))
    tiny_config(root, root / "model", data)  # writes root/tiny.yaml

    @functools.cache
    def one(variant: str, accumulation: int, *extra: str) -> Path:
        out = root / f"one-{variant}-{accumulation}-{len(extra)}"
        with cache_at(root / f"cache-{out.name}"):
            train(tiny_config(root, root / "model", data, *RUN, *VARIANTS[variant],
                              f"train.grad_accum_steps={accumulation}", f"train.output_dir={out}", *extra))
        return out

    @functools.cache  # the resume test continues from the live run of the test before it
    def split(engine: str, processes: int, variant: str, *extra: str, name: str = "", **kwargs):
        from test_engines import launch
        out = root / (name or f"{engine}-{processes}-{variant}")
        result = launch(engine, root / "tiny.yaml", *RUN, *VARIANTS[variant], "train.grad_accum_steps=1",
                        "train.sequence_parallel=2", f"train.output_dir={out}", *extra, processes=processes,
                        cache=root / f"cache-{out.name}", **kwargs)
        return out, result

    return type("SplitRuns", (), {"root": root, "one": staticmethod(one), "split": staticmethod(split)})


def assert_same_losses(one: Path, two: Path, atol: float = 1e-5) -> None:
    from test_trainer import read_metrics
    for a, b in zip(read_metrics(one), read_metrics(two), strict=True):
        for key in ("loss", "eval/loss"):
            if key in a:
                assert abs(a[key] - b[key]) <= atol, (a["step"], key, a[key], b[key])


@pytest.mark.slow  # launches processes that import torch and transformers
def test_two_processes_sharing_each_row_match_one_process(split_runs):
    """Sequence-parallel 2 on 2 processes (one data-parallel group): the same global batch as one process,
    so the same per-step losses, metrics and final weights (the precomputed reference and LoRA: below)."""
    from test_engines import assert_same_run
    one = split_runs.one("live", 1)
    two, result = split_runs.split("ddp", 2, "live")
    assert "2 processes share each packed row" in result.stdout and "optimizer steps of 4 pairs" in result.stdout
    assert_same_run(one, two)
    assert_same_losses(one, two)


@pytest.mark.slow  # 4 processes on a 2-core machine: about a minute each
@pytest.mark.parametrize("engine, variant", [("ddp", "live"), ("fsdp", "precomputed"), ("zero3", "lora")])
def test_sequence_groups_compose_with_each_data_parallel_engine(split_runs, engine, variant):
    """4 processes = 2 data-parallel x 2 sequence-parallel under DDP (the live reference), FSDP2 (precomputed)
    and ZeRO-3 (LoRA, gradient checkpointing) equal one process accumulating 2 micro-batches; 3 steps."""
    from test_engines import assert_same_run
    one = split_runs.one(variant, 2, *SHORT)
    four, result = split_runs.split(engine, 4, variant, *SHORT, timeout=900)
    assert "(2 data-parallel group(s) of 2)" in result.stdout and "optimizer steps of 8 pairs" in result.stdout
    assert_same_run(one, four)
    assert_same_losses(one, four)


@pytest.mark.slow  # launches processes that import torch and transformers
def test_resume_after_sigkill_with_shared_rows_is_bitwise_exact(split_runs):
    from dpo_train.checkpoint import complete_checkpoints
    from test_checkpoint import without_timing
    from test_engines import assert_same_run
    from test_trainer import read_metrics
    full, _ = split_runs.split("ddp", 2, "live")
    killed, result = split_runs.split("ddp", 2, "live", name="killed", fault="kill_after_save:4", check=False)
    assert result.returncode != 0 and not (killed / "final").exists()
    assert [p.name for p in complete_checkpoints(killed / "checkpoints")] == ["step-2", "step-4"]
    _, resumed = split_runs.split("ddp", 2, "live", "--resume", "auto", name="killed")
    assert "step-4 at step 4" in resumed.stdout
    assert_same_run(full, killed, atol=0)
    assert without_timing(read_metrics(full)) == without_timing(read_metrics(killed))


@pytest.mark.slow  # launches processes that import torch and transformers
def test_a_layout_the_split_cannot_serve_stops_the_launch_in_one_line(split_runs):
    out, result = split_runs.split("ddp", 2, "live", "train.layout=rows", name="rows", check=False)
    assert result.returncode != 0 and not (out / "final").exists()
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors == ["error: train.sequence_parallel: 2 splits the packed layout only, and this run uses rows (see "
                      "the layout line above); use 1"], result.stderr[-2000:]
