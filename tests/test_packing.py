"""The fast paths are exact: the padding-free packed row, shared-prompt rows, the chunked LM head
and log-softmax, and gradient checkpointing give the padded path's log-probs, loss and gradients
to 1e-5 in fp32."""

import math
import time
from pathlib import Path

import pytest
import torch

from conftest import make_model, make_tokenizer
from dpo_train import attention
from dpo_train.collate import COLLATES, collate, collate_packed, collate_rows
from dpo_train.data import tokenize_pair
from dpo_train.logps import concatenated_forward, separable_head, token_logps
from dpo_train.losses import dpo_loss
from dpo_train.models import enable_activation_checkpointing

ROWS = [{"prompt": "1+2=", "chosen": "3", "rejected": "four"},
        {"prompt": "a longer prompt here", "chosen": "a much longer chosen answer", "rejected": "no"},
        {"prompt": "x", "chosen": "yes", "rejected": "a rejected answer that is long"}]


def pairs():
    tokenizer = make_tokenizer()
    return tokenizer, [tokenize_pair(r, tokenizer, 128, 64) for r in ROWS]


def loss_and_grads(model, batch, forward=concatenated_forward):
    model.zero_grad()
    chosen, rejected = forward(model, batch)
    losses, _, _ = dpo_loss(chosen, rejected, chosen.detach() + 0.3, rejected.detach() - 0.2, beta=0.1)
    losses.mean().backward()
    return chosen.detach(), rejected.detach(), losses.mean().item(), {
        name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_same_numbers(expected, got):
    """Two loss_and_grads results agree: log-probs and gradients to 1e-5, the loss to 1e-6."""
    assert torch.allclose(expected[0], got[0], rtol=1e-6, atol=1e-5)
    assert torch.allclose(expected[1], got[1], rtol=1e-6, atol=1e-5)
    assert abs(expected[2] - got[2]) < 1e-6
    for name, grad in expected[3].items():
        assert torch.allclose(grad, got[3][name], atol=1e-5), name


@pytest.mark.parametrize("layout", ["packed", "rows"])
def test_shared_prompt_layouts_give_the_padded_log_probs_loss_and_gradients(layout):
    tokenizer, tokenized = pairs()
    model = make_model(len(tokenizer))
    padded = loss_and_grads(model, collate(tokenized, tokenizer.pad_token_id))
    shared = loss_and_grads(model, COLLATES[layout](tokenized, tokenizer.pad_token_id))
    assert_same_numbers(padded, shared)


def test_the_packed_row_holds_each_pair_once_with_no_padding_and_scores_only_completions():
    tokenizer, tokenized = pairs()
    batch = collate_packed(tokenized, tokenizer.pad_token_id)
    sequences = [p["prompt_ids"] + p["chosen_ids"] + p["rejected_ids"] for p in tokenized]
    assert batch["input_ids"].tolist() == [sum(sequences, [])]  # nothing but the pairs' own tokens
    assert batch["num_tokens"].item() == sum(map(len, sequences))
    start = 0
    for i, pair in enumerate(tokenized):
        p, c, r = (len(pair[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
        assert batch["pair_spans"][i].tolist() == [start, p, c, r]
        # both answers continue from the prompt's end
        assert batch["position_ids"][0, start:start + p + c + r].tolist() == list(range(p + c)) + list(range(p, p + r))
        for side, owner in (("chosen_ids", i), ("rejected_ids", len(tokenized) + i)):
            mine = batch["owners"] == owner
            assert batch["targets"][mine].tolist() == pair[side]
            # the first token is predicted by the prompt's last, each next one by the token before it
            predictors = batch["logits_to_keep"][mine].tolist()
            first = start + p if side == "chosen_ids" else start + p + c
            assert predictors == [start + p - 1] + list(range(first, first + len(pair[side]) - 1))
        start += p + c + r
    assert len(batch["targets"]) == sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in tokenized)


def test_shared_prompt_rows_hold_each_prompt_once_and_score_only_completions():
    tokenizer, tokenized = pairs()
    batch = collate_rows(tokenized, tokenizer.pad_token_id)
    lengths = [len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in tokenized]
    assert batch["input_ids"].shape == (3, max(lengths)) and batch["num_tokens"].item() == sum(lengths)
    assert len(batch["targets"]) == sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in tokenized)
    longest_completions = max(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in tokenized)
    assert len(batch["logits_to_keep"]) == longest_completions + 1  # the head never runs over prompts
    width, (p0, c0, r0) = max(lengths), (len(tokenized[0][k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
    pad = width - lengths[0]
    row = batch["input_ids"][0]
    assert row[:pad].eq(tokenizer.pad_token_id).all() and row[pad:].tolist() == (
        tokenized[0]["prompt_ids"] + tokenized[0]["chosen_ids"] + tokenized[0]["rejected_ids"])
    mask = batch["attention_mask"][0, 0, pad:, pad:]
    rejected_rows, chosen_cols = slice(p0 + c0, p0 + c0 + r0), slice(p0, p0 + c0)
    assert not mask[rejected_rows, chosen_cols].any()  # the rejected answer never sees the chosen one
    assert mask[rejected_rows, :p0].all()  # but sees the whole prompt
    assert not batch["attention_mask"][0, 0, pad:, :pad].any()  # nor the padding
    assert batch["position_ids"][0, pad + p0 + c0].item() == p0  # rejected continues from the prompt's end


def test_chunked_token_logps_match_a_full_log_softmax_with_gradients():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(37, 50) * 4).to(dtype).requires_grad_()
        targets = torch.randint(0, 50, (37,))
        chunked = token_logps(logits, targets, chunk_size=8)
        (chunked * torch.arange(37)).sum().backward()
        grad, logits.grad = logits.grad.clone(), None
        full = torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).squeeze(-1)
        (full * torch.arange(37)).sum().backward()
        assert chunked.dtype == torch.float32 and torch.allclose(chunked, full, atol=1e-5)
        assert torch.allclose(grad.float(), logits.grad.float(), atol=1e-5)


def full_head_logps(model, batch):
    """The model's own head over every position of collate.collate's padded rows, one full fp32
    log-softmax, labelled tokens summed: the (2B, T, V) way. Returns (chosen, rejected), each (B,)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    targets = batch["labels"][:, 1:]  # position t predicts token t+1
    logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logps = (logps * (targets != -100)).sum(-1)
    return logps.chunk(2)


def head_calls(model):
    """Rows given to the LM head in each of its calls (forward and recomputation), as a list."""
    rows = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: rows.append(args[0].shape[:-1].numel()))
    return rows


@pytest.mark.parametrize("layout", ["padded", "rows", "packed"])
@pytest.mark.parametrize("tied", [False, True])
def test_chunked_head_gives_the_full_heads_log_probs_loss_and_gradients(layout, tied):
    tokenizer, tokenized = pairs()
    model = make_model(len(tokenizer))
    if tied:  # SmolLM2's head shares the input embeddings: its gradient comes from both uses
        model.lm_head.weight = model.model.embed_tokens.weight
    head = model.get_output_embeddings()
    expected = loss_and_grads(model, collate(tokenized, tokenizer.pad_token_id), full_head_logps)
    batch = COLLATES[layout](tokenized, tokenizer.pad_token_id)
    rows = head_calls(model)
    chunked = loss_and_grads(model, batch, lambda m, b: concatenated_forward(m, b, chunk_size=8))
    completion_tokens = sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in tokenized)
    # 8 rows per call, every chunk but the last run again in the backward pass: no (N, T, V) block
    last_chunk = completion_tokens % 8 or 8
    assert max(rows) == 8 and sum(rows) == 2 * completion_tokens - last_chunk
    assert model.get_output_embeddings() is head and separable_head(model) is head  # put back after the forward
    assert_same_numbers(expected, chunked)


def test_chunked_head_in_bf16_gives_the_full_heads_numbers_at_bf16_precision():
    tokenizer, tokenized = pairs()
    model = make_model(len(tokenizer)).to(torch.bfloat16)
    expected = loss_and_grads(model, collate(tokenized, tokenizer.pad_token_id), full_head_logps)
    for collate_fn in (collate, collate_rows, collate_packed):
        chunked = loss_and_grads(model, collate_fn(tokenized, tokenizer.pad_token_id),
                                 lambda m, b: concatenated_forward(m, b, chunk_size=8))
        assert chunked[0].dtype == torch.float32  # log-probs are summed in fp32 whatever the weights' dtype
        # the body runs in bf16 either way (about 3 significant digits); sums of up to ~140 nats
        assert torch.allclose(expected[0], chunked[0], rtol=1e-3, atol=1e-2)
        assert torch.allclose(expected[1], chunked[1], rtol=1e-3, atol=1e-2)
        for name, grad in expected[3].items():
            got = chunked[3][name]
            # bf16 gradients summed in another order: within a few bf16 epsilons (2^-8) of each other
            assert got.dtype == torch.bfloat16 and (got.float() - grad.float()).norm() <= 2e-2 * grad.float().norm(), name


@pytest.mark.parametrize("family", ["gemma2", "cohere"])
def test_models_that_transform_logits_after_the_head_keep_their_own_head(family):
    """Gemma2 softcaps logits (cap * tanh(logits / cap)), Cohere scales them: a head run outside the
    model would miss that, so these models take the (N, T', V) path, with the same numbers."""
    from transformers import CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM
    tokenizer, tokenized = pairs()
    shape = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=1)
    torch.manual_seed(0)
    model = (Gemma2ForCausalLM(Gemma2Config(**shape, final_logit_softcapping=2.0)) if family == "gemma2" else
             CohereForCausalLM(CohereConfig(**shape, logit_scale=0.25)))
    assert separable_head(model) is None
    with torch.no_grad():
        expected = full_head_logps(model, collate(tokenized, tokenizer.pad_token_id))
        # Gemma2 runs eager attention here, softcapped: the packed layout's attention does not implement that
        for collate_fn in (collate, collate_rows) + ((collate_packed,) if family == "cohere" else ()):
            got = concatenated_forward(model, collate_fn(tokenized, tokenizer.pad_token_id), chunk_size=8)
            assert all(torch.allclose(e, g, rtol=1e-6, atol=1e-5) for e, g in zip(expected, got)), collate_fn


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "lm_head"]])
def test_chunked_head_through_a_peft_lora_model(targets):
    """PeftModel forwards get/set_output_embeddings to the model it adapts; a head with its own
    adapter runs, adapter and all, in chunks."""
    peft = pytest.importorskip("peft")
    tokenizer, tokenized = pairs()
    model = peft.get_peft_model(make_model(len(tokenizer)),
                                peft.LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    assert separable_head(model) is model.get_output_embeddings()
    expected = loss_and_grads(model, collate(tokenized, tokenizer.pad_token_id), full_head_logps)
    chunked = loss_and_grads(model, collate_packed(tokenized, tokenizer.pad_token_id),
                             lambda m, b: concatenated_forward(m, b, chunk_size=8))
    assert torch.allclose(expected[0], chunked[0], rtol=1e-6, atol=1e-5)
    assert expected[3].keys() == chunked[3].keys() and any("lora" in name for name in chunked[3])
    assert all(torch.allclose(g, chunked[3][n], atol=1e-5) for n, g in expected[3].items())


@pytest.mark.parametrize("ddp_options", [{}, {"static_graph": True}, {"find_unused_parameters": True}])
def test_chunked_head_under_ddp(tmp_path, ddp_options):
    """The forward goes through DistributedDataParallel's (one process, gloo), whose hooks then
    all-reduce the head's gradient from the chunks. DDP looking for unused parameters would count a
    head applied after its forward as unused, so there the model keeps its own head."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    tokenizer, tokenized = pairs()
    model = make_model(len(tokenizer))
    expected = loss_and_grads(model, collate(tokenized, tokenizer.pad_token_id), full_head_logps)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model, **ddp_options)
        assert (separable_head(ddp) is None) == ("find_unused_parameters" in ddp_options)
        for _ in range(2):  # a second step: DDP's reducer must be ready for it
            chunked = loss_and_grads(ddp, collate_packed(tokenized, tokenizer.pad_token_id))
            assert all(torch.allclose(g, chunked[3]["module." + n], atol=1e-5) for n, g in expected[3].items())
    finally:
        # DDP is freed when this returns, and its reducer frees the gloo process group in a destructor that
        # holds the GIL while it joins gloo's worker thread; a worker still freeing a finished collective's
        # tensors waits for the GIL, and both wait for ever (seen once in a fresh-venv CI rehearsal; exits.py
        # keeps a launched run's models until exit for this). A last collective, then time with the GIL free:
        # the worker is idle when the reducer goes.
        dist.barrier()
        time.sleep(0.5)
        dist.destroy_process_group()


def test_a_sharded_head_is_not_taken_outside_the_forward():
    tokenizer, _ = pairs()
    model = make_model(len(tokenizer))
    assert separable_head(model) is model.lm_head
    model.lm_head.weight.data = torch.empty(0)  # ZeRO-3's placeholder outside the forward; FSDP1 leaves 1-D shards
    assert separable_head(model) is None


@pytest.mark.parametrize("layout", ["padded", "rows", "packed"])
def test_gradient_checkpointing_gives_the_same_gradients(layout):
    """The packed layout's attention is recomputed in the backward pass too, outside our forward:
    it must still see the pairs apart."""
    tokenizer, tokenized = pairs()
    model = make_model(len(tokenizer))
    plain = loss_and_grads(model, collate(tokenized, tokenizer.pad_token_id))
    enable_activation_checkpointing(model)
    checkpointed = loss_and_grads(model, COLLATES[layout](tokenized, tokenizer.pad_token_id))
    assert_same_numbers(plain, checkpointed)


def test_a_padded_run_starts_at_ln2_and_learns(tmp_path, tiny_model_dir, tiny_data):
    from dpo_train.trainer import train
    from test_trainer import read_metrics, tiny_config
    results = train(tiny_config(tmp_path, tiny_model_dir, tiny_data, "train.layout=padded",
                                "train.eval_max_new_tokens=0"))
    assert abs(read_metrics(tmp_path / "run")[0]["loss"] - math.log(2)) < 1e-6
    assert results["policy"]["loss"] < math.log(2)


@pytest.mark.slow
def test_compiled_policy_trains_to_the_same_weights(tmp_path, tiny_model_dir, tiny_data):
    """train.compile (inductor, about a minute to compile on CPU) changes speed, not results."""
    from safetensors.torch import load_file

    from dpo_train.trainer import train
    from test_trainer import tiny_config
    from torch._dynamo.utils import counters
    counters.clear()
    runs = {}
    for compiled in ("false", "true"):
        out = tmp_path / f"compile-{compiled}"
        train(tiny_config(tmp_path, tiny_model_dir, tiny_data, "train.max_steps=3", "data.eval=null",
                          f"train.compile={compiled}", f"train.output_dir={out}", "train.learning_rate=1e-4"))
        runs[compiled] = load_file(out / "final" / "model.safetensors")
    assert counters["stats"]["unique_graphs"] > 0  # the compiled run really went through inductor
    assert runs["false"].keys() == runs["true"].keys()
    assert all(torch.allclose(runs["false"][k], runs["true"][k], atol=1e-5) for k in runs["false"])


@pytest.mark.parametrize("layout", ["rows", "packed"])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_shared_prompt_layouts_are_exact_under_eager_and_sdpa_attention(implementation, layout):
    """Eager attention adds a 4-D mask to its scores; SDPA also reads booleans. The rows layout's
    mask must mean the same to both; the packed layout's attention stands in for either."""
    tokenizer, tokenized = pairs()
    model = make_model(len(tokenizer))
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        padded = concatenated_forward(model, collate(tokenized, tokenizer.pad_token_id))
        shared = concatenated_forward(model, COLLATES[layout](tokenized, tokenizer.pad_token_id))
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-5) for a, b in zip(padded, shared))


@pytest.mark.parametrize("window", [4, 12, 1000])
def test_the_packed_layout_keeps_a_sliding_window(window):
    """Mistral attends only to the last `sliding_window` positions: the pair attention must cut each
    answer's view of its prompt the same way (12 cuts some rows, 4 nearly all, 1000 none)."""
    from transformers import MistralConfig, MistralForCausalLM
    tokenizer, tokenized = pairs()
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             sliding_window=window, pad_token_id=1))
    padded = loss_and_grads(model, collate(tokenized, tokenizer.pad_token_id))
    packed = loss_and_grads(model, collate_packed(tokenized, tokenizer.pad_token_id))
    assert_same_numbers(padded, packed)


def test_the_packed_layout_leaves_the_models_own_attention_for_everything_else():
    """Generation (left-padded, with a cache) after a packed forward runs the model's own attention."""
    tokenizer, tokenized = pairs()
    model = make_model(len(tokenizer))
    prompts = tokenizer(["1+2=", "a longer prompt"], return_tensors="pt", padding=True, padding_side="left")
    before = model.generate(**prompts, max_new_tokens=5, do_sample=False)
    concatenated_forward(model, collate_packed(tokenized, tokenizer.pad_token_id))
    assert model.config._attn_implementation.startswith(attention.PREFIX)
    assert torch.equal(model.generate(**prompts, max_new_tokens=5, do_sample=False), before)


@pytest.mark.parametrize("collate_fn", [collate_packed, collate_rows])
def test_a_model_whose_attention_ignores_the_interface_is_refused(monkeypatch, collate_fn):
    """A model that never calls the registered attention would let pairs attend to each other (packed) or
    its windowed layers see their whole row (rows): the forward stops, and the survey sends it to padded."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama import modeling_llama

    from dpo_train import layouts
    tokenizer, tokenized = pairs()
    model = make_model(len(tokenizer))
    monkeypatch.setattr(modeling_llama.ALL_ATTENTION_FUNCTIONS, "get_interface", lambda *args: sdpa_attention_forward)
    with pytest.raises(RuntimeError, match="AttentionInterface; use train.layout: padded"):
        concatenated_forward(model, collate_fn(tokenized, tokenizer.pad_token_id))
    layout, reason = layouts.choose("packed", [model])
    assert layout == "padded" and "tokens mix outside its attention" in reason


def test_an_attention_keyword_the_pair_attention_lacks_stops_the_forward_and_keeps_it_from_packed(monkeypatch):
    """Should a layer pass its attention a setting the pair attention does not implement, the packed
    forward stops instead of returning numbers without it, and the survey, which sees every keyword the
    layers pass, keeps the model from packed (rows runs the model's own attention, which reads it)."""
    from dpo_train import layouts
    tokenizer, tokenized = pairs()
    model = make_model(len(tokenizer))
    spans = attention.Spans([(0, 3, 2, 2)])
    query = key = value = torch.zeros(1, 4, 7, 8)
    with pytest.raises(NotImplementedError, match="attention_chunk_size.*train.layout: rows"):
        attention.pair_attention(torch.nn.Module(), query, key, value, None, attention_chunk_size=4,
                                 **{attention.SPANS_KWARG: spans})
    original = attention.Survey.attend
    def attend(self, module, query, key, value, mask, dropout, scaling, window, kwargs):  # a layer passing one more
        return original(self, module, query, key, value, mask, dropout, scaling, window, {**kwargs, "attention_chunk_size": 4})
    monkeypatch.setattr(attention.Survey, "attend", attend)
    layout, reason = layouts.choose("packed", [model])
    assert layout == "rows" and "attention_chunk_size" in reason


def test_the_slowest_layout_either_model_needs_serves_both():
    """Policy and reference are scored in one layout: a reference with a convolution sends both to padded;
    a layout the user asked for that is exact stays, padded is never surveyed."""
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from families import make_family_model

    from dpo_train import layouts
    plain, mixing = make_family_model("llama", 105), make_family_model("lfm2", 105)
    assert layouts.choose("packed", [plain, plain]) == ("packed", None)
    assert layouts.choose("rows", [plain]) == ("rows", None)
    layout, reason = layouts.choose("packed", [plain, mixing])
    assert layout == "padded" and "Lfm2ShortConv" in reason
    assert layouts.choose("padded", [mixing]) == ("padded", None)


def test_a_softcapped_model_trains_packed(tmp_path, tiny_data, capsys):
    """Gemma2's softcapped attention is computed by the pair attention (attention.scored_attend): packed
    stays packed, with no switch said, and step 0 is ln 2."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from dpo_train.trainer import train
    from test_trainer import read_metrics, tiny_config
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    Gemma2ForCausalLM(Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=1,
                                   bos_token_id=2, eos_token_id=4)).save_pretrained(tmp_path / "gemma2")
    tokenizer.save_pretrained(tmp_path / "gemma2")
    train(tiny_config(tmp_path, tmp_path / "gemma2", tiny_data, "train.max_steps=2", "data.eval=null",
                      "train.eval_max_new_tokens=0"))
    assert "train.layout packed:" not in capsys.readouterr().out  # the line a switch would print
    assert abs(read_metrics(tmp_path / "run")[0]["loss"] - math.log(2)) < 1e-6


@pytest.mark.parametrize("layout", ["packed", "rows"])
def test_every_layout_runs_under_bf16_autocast_with_the_padded_numbers(layout):
    """Accelerate's bf16 mixed precision is CPU autocast here: rotary embeddings leave query and key in
    fp32 and value in bf16, which SDPA with a lower-right causal mask (the rejected block) refused."""
    tokenizer, tokenized = pairs()
    model = make_model(len(tokenizer))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        padded = loss_and_grads(model, collate(tokenized, tokenizer.pad_token_id))
        shared = loss_and_grads(model, COLLATES[layout](tokenized, tokenizer.pad_token_id))
    fp32 = loss_and_grads(model, collate(tokenized, tokenizer.pad_token_id))
    # the same bf16 arithmetic in another order: sums of ~100 nats agree to a few bf16 steps (2^-8 relative)
    assert torch.allclose(padded[0], shared[0], rtol=2e-2, atol=0.1) and abs(padded[2] - shared[2]) < 1e-2
    assert torch.allclose(fp32[0], shared[0], rtol=2e-2, atol=0.5)  # and near the fp32 numbers
    for name, grad in padded[3].items():
        assert (shared[3][name] - grad).norm() <= 5e-2 * grad.norm(), name


def test_the_spans_reach_the_attention_as_the_same_object_through_fsdp2s_argument_cast():
    """FSDP2 with mixed precision casts the forward's floating-point arguments, rebuilding every list and
    tuple among them; the spans must come through as the object whose `used` flag packed_logps reads."""
    from torch.distributed.utils import _apply_to_tensors

    spans = attention.Spans([(0, 3, 2, 2)])
    kwargs = _apply_to_tensors(lambda t: t.to(torch.bfloat16), {attention.SPANS_KWARG: spans, "x": torch.ones(2)})
    assert kwargs[attention.SPANS_KWARG] is spans and kwargs["x"].dtype == torch.bfloat16
    assert list(spans) == [(0, 3, 2, 2)]
