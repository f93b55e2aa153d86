"""The FlexAttention path of the padding-free layout (dpo_train/flex.py): its mask against one built
by hand from the spans, and its forward (CPU: eager, no_grad, as FlexAttention has no CPU backward)
against the per-pair SDPA loop to 1e-5, on eager and SDPA models, grouped KV and sliding windows."""

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from conftest import make_model, make_tokenizer
from dpo_train import attention, flex
from dpo_train.collate import collate, collate_packed
from dpo_train.data import tokenize_pair
from dpo_train.logps import concatenated_forward

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

ROWS = [{"prompt": "1+2=", "chosen": "3", "rejected": "four"},
        {"prompt": "a longer prompt here", "chosen": "a much longer chosen answer", "rejected": "no"},
        {"prompt": "x", "chosen": "yes", "rejected": "a rejected answer that is long"}]
SPANS = ((0, 5, 3, 7), (15, 1, 1, 1), (18, 4, 9, 2), (33, 2, 6, 6))  # 47 tokens, hand-made


def pairs():
    tokenizer = make_tokenizer()
    return tokenizer, [tokenize_pair(r, tokenizer, 128, 64) for r in ROWS]


def mask_by_hand(spans, window):
    """(N, N) bool from the definition: each answer sees its prompt and itself causally, the prompt
    itself causally, within `window` positions of the sequence it sees (prompt + that answer)."""
    n = sum(p + c + r for _, p, c, r in spans)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for start, p, c, r in spans:
        prompt = list(range(start, start + p))
        for answer in (range(start + p, start + p + c), range(start + p + c, start + p + c + r)):
            seen = prompt + list(answer)  # what this answer's padded row holds, in order
            for i, q in enumerate(seen):
                for j, kv in enumerate(seen[:i + 1]):
                    mask[q, kv] = window is None or i - j < window
    return mask


@pytest.mark.parametrize("window", [None, 1, 3, 6, 1000])
def test_the_mask_allows_exactly_what_each_answer_sees_in_its_own_row(window):
    n = sum(p + c + r for _, p, c, r in SPANS)
    mask_mod = flex.pair_mask_mod(*flex.span_tables(SPANS, torch.device("cpu")), window)
    dense = create_mask(mask_mod, 1, 1, n, n, device="cpu")[0, 0]
    expected = mask_by_hand(SPANS, window)
    assert torch.equal(dense, expected)
    assert not dense[31:33, 22:31].any()  # the third pair's rejected answer never sees its chosen one
    assert dense[31:33, 18:22].all() == (window is None or window > 5)  # all its prompt, unless a window cuts it
    assert not dense[33:, :33].any() and not dense[:33, 33:].any()  # nor does any pair see another


def test_the_block_mask_keeps_every_block_someone_reads_and_skips_the_rest():
    spans = tuple((start, 40, 30, 50) for start in range(0, 480, 120))  # 480 tokens: 4 x 4 blocks of 128
    expected = torch.nn.functional.pad(mask_by_hand(spans, None), (0, 32, 0, 32))  # to 512: whole blocks
    blocks = flex.block_mask(spans, None, torch.device("cpu")).to_dense()[0, 0].bool()
    read = expected.unflatten(0, (4, 128)).unflatten(2, (4, 128)).any(3).any(1)  # (4, 4): any allowed entry
    assert torch.equal(blocks, read) and not blocks.triu(1).any()  # nothing above the diagonal, and no more


def random_qkv(n, heads=4, kv_heads=2, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(1, heads, n, dim, generator=generator), torch.randn(1, kv_heads, n, dim, generator=generator),
            torch.randn(1, kv_heads, n, dim, generator=generator))


@pytest.mark.parametrize("window", [None, 2, 5])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_one_flex_call_equals_the_per_pair_loop(monkeypatch, window, kv_heads):
    query, key, value = random_qkv(47, kv_heads=kv_heads)
    module = torch.nn.Module()
    call = lambda: attention.pair_attention(module, query, key, value, None, scaling=0.3, sliding_window=window,
                                            **{attention.SPANS_KWARG: attention.Spans(SPANS)})[0]
    monkeypatch.setenv("DPO_TRAIN_PAIR_ATTENTION", "loop")
    loop = call()
    monkeypatch.setenv("DPO_TRAIN_PAIR_ATTENTION", "flex")
    calls = []
    monkeypatch.setattr(flex, "attend", lambda *args: calls.append(1) or flex_attend(*args))
    got = call()
    assert calls == [1] and got.shape == loop.shape == (1, 47, 4, 8)
    assert torch.allclose(got, loop, rtol=1e-6, atol=1e-5)


flex_attend = flex.attend


def test_the_device_picks_the_kernel(monkeypatch):
    monkeypatch.delenv("DPO_TRAIN_PAIR_ATTENTION", raising=False)
    assert attention.uses_flex(torch.device("cuda", 0)) and not attention.uses_flex(torch.device("cpu"))
    monkeypatch.setenv("DPO_TRAIN_PAIR_ATTENTION", "loop")
    assert not attention.uses_flex(torch.device("cuda", 0))
    monkeypatch.setenv("DPO_TRAIN_PAIR_ATTENTION", "flex")
    assert attention.uses_flex(torch.device("cpu"))
    assert flex.kernel("cpu") is torch.nn.attention.flex_attention.flex_attention  # compiled on CUDA only
    assert (flex.kernel("cuda") is None) == (not torch.cuda.is_available())


def packed_forward(model, batch, monkeypatch, choice):
    """concatenated_forward over the packed batch under no_grad with the pair attention's kernel
    chosen, counting FlexAttention calls."""
    monkeypatch.setenv("DPO_TRAIN_PAIR_ATTENTION", choice)
    calls = []
    monkeypatch.setattr(flex, "attend", lambda *args: calls.append(1) or flex_attend(*args))
    with torch.no_grad():
        return concatenated_forward(model, batch), len(calls)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_a_model_on_flex_gives_the_loops_and_the_padded_log_probs(monkeypatch, implementation):
    """The tiny Llama has 4 query heads and 2 key/value heads: grouped KV read in place by both."""
    tokenizer, tokenized = pairs()
    model = make_model(len(tokenizer))
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        padded = concatenated_forward(model, collate(tokenized, tokenizer.pad_token_id))
    batch = collate_packed(tokenized, tokenizer.pad_token_id)
    loop, loop_calls = packed_forward(model, batch, monkeypatch, "loop")
    fused, flex_calls = packed_forward(model, batch, monkeypatch, "flex")
    assert loop_calls == 0 and flex_calls == model.config.num_hidden_layers  # one call per layer
    for expected in (loop, padded):
        assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-5) for a, b in zip(expected, fused))


@pytest.mark.parametrize("window", [4, 12, 1000])
def test_a_sliding_window_model_on_flex_gives_the_loops_log_probs(monkeypatch, window):
    """Mistral, as in test_packing: 12 cuts some rows' view of their prompt, 4 nearly all, 1000 none."""
    from transformers import MistralConfig, MistralForCausalLM
    tokenizer, tokenized = pairs()
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             sliding_window=window, pad_token_id=1))
    batch = collate_packed(tokenized, tokenizer.pad_token_id)
    loop, _ = packed_forward(model, batch, monkeypatch, "loop")
    fused, flex_calls = packed_forward(model, batch, monkeypatch, "flex")
    assert flex_calls == 2 and all(torch.allclose(a, b, rtol=1e-6, atol=1e-5) for a, b in zip(loop, fused))


def test_the_block_masks_are_built_once_per_batch_before_the_forward(monkeypatch):
    """Built with the spans, for no window and the model's window, and reused by the next forward over
    the same batch (the reference's after the policy's): the forward itself only reads them."""
    tokenizer, tokenized = pairs()
    model = make_model(len(tokenizer))
    model.config.sliding_window = 7
    batch = collate_packed(tokenized, tokenizer.pad_token_id)
    monkeypatch.setenv("DPO_TRAIN_PAIR_ATTENTION", "flex")
    flex.block_mask.cache_clear()
    spans = attention.batch_spans(batch["pair_spans"], model.config, torch.device("cpu"))
    assert set(spans.masks) == {None, 7} and flex.block_mask.cache_info().misses == 2
    attention.batch_spans(batch["pair_spans"], model.config, torch.device("cpu"))
    assert flex.block_mask.cache_info().misses == 2  # the second forward over this batch builds nothing
    monkeypatch.setenv("DPO_TRAIN_PAIR_ATTENTION", "loop")
    assert not hasattr(attention.batch_spans(batch["pair_spans"], model.config, torch.device("cpu")), "masks")


def test_flex_under_bf16_autocast_agrees_with_the_loop(monkeypatch):
    """Rotary embeddings leave query and key in fp32 and value in bf16: FlexAttention gets them cast."""
    tokenizer, tokenized = pairs()
    model = make_model(len(tokenizer))
    batch = collate_packed(tokenized, tokenizer.pad_token_id)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loop, _ = packed_forward(model, batch, monkeypatch, "loop")
        fused, flex_calls = packed_forward(model, batch, monkeypatch, "flex")
    assert flex_calls == 2
    # the same bf16 arithmetic in another order: sums of ~100 nats agree to a few bf16 steps (2^-8 relative)
    assert all(torch.allclose(a, b, rtol=2e-2, atol=0.1) for a, b in zip(loop, fused))


@pytest.mark.slow
@pytest.mark.filterwarnings("error:Dynamo detected")
@pytest.mark.parametrize("nested", [False, True], ids=["flex", "compiled-flex"])
def test_a_compiled_model_reads_the_prebuilt_masks_in_one_graph_across_batches(monkeypatch, nested):
    """What train.compile does on CUDA, traced by dynamo with the aot_eager backend: inductor's CPU
    FlexAttention template does not build with dynamic shapes in torch 2.13 (a C++ compile error),
    and CPU has no backward. One graph serves four batches of new lengths and spans: no graph break,
    no recompilation, the loop's numbers. `compiled-flex` nests a compiled flex_attention made
    outside the forward, as flex.COMPILED is on CUDA."""
    if nested:
        compiled = torch.compile(torch.nn.attention.flex_attention.flex_attention, backend="aot_eager")
        monkeypatch.setattr(flex, "kernel", lambda device_type: compiled)
    import random

    from torch._dynamo.utils import counters
    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer))
    batches = []
    for seed in range(4):
        rng = random.Random(seed)
        rows = [{"prompt": "p" * rng.randint(3, 40), "chosen": "c" * rng.randint(2, 30),
                 "rejected": "r" * rng.randint(2, 30)} for _ in range(3)]
        batches.append(collate_packed([tokenize_pair(r, tokenizer, 256, 128) for r in rows], tokenizer.pad_token_id))
    assert len({b["input_ids"].shape[1] for b in batches}) == 4
    loops = [packed_forward(model, batch, monkeypatch, "loop")[0] for batch in batches]
    model.compile(dynamic=True, backend="aot_eager")
    counters.clear()
    for batch, loop in zip(batches, loops):
        fused, _ = packed_forward(model, batch, monkeypatch, "flex")
        assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-5) for a, b in zip(loop, fused))
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


@pytest.mark.parametrize("softcap, sinks", [(5.0, False), (None, True), (3.0, True)])
@pytest.mark.parametrize("window", [None, 3])
def test_flex_with_a_softcap_and_sinks_equals_the_loop(monkeypatch, softcap, sinks, window):
    """Gemma 2's softcap is a score_mod; GPT-OSS's sinks scale each output by sigmoid(lse - sink): both
    give the loop's explicit scores (attention.scored_attend)."""
    query, key, value = random_qkv(47)
    extra = {"softcap": softcap, "s_aux": torch.randn(4, generator=torch.Generator().manual_seed(1)) if sinks else None}
    call = lambda: attention.pair_attention(torch.nn.Module(), query, key, value, None, scaling=0.3,
                                            sliding_window=window, **extra,
                                            **{attention.SPANS_KWARG: attention.Spans(SPANS)})[0]
    monkeypatch.setenv("DPO_TRAIN_PAIR_ATTENTION", "loop")
    loop = call()
    monkeypatch.setenv("DPO_TRAIN_PAIR_ATTENTION", "flex")
    assert torch.allclose(call(), loop, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gemma2", "gpt_oss", "gemma3_text"])
def test_window_softcap_and_sink_families_on_flex_give_the_loops_log_probs(monkeypatch, family):
    """Mixed sliding (8 tokens) and full layers, each layer's window read from the call: one block mask
    per window, one FlexAttention call per layer (forward only: CPUs have no FlexAttention backward)."""
    from families import make_family_model, tokenized_pairs
    tokenizer = make_tokenizer()
    model = make_family_model(family, len(tokenizer))
    batch = collate_packed(tokenized_pairs(tokenizer), tokenizer.pad_token_id)
    loop, _ = packed_forward(model, batch, monkeypatch, "loop")
    fused, flex_calls = packed_forward(model, batch, monkeypatch, "flex")
    assert flex_calls == model.config.num_hidden_layers
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-4) for a, b in zip(loop, fused))
