"""The fast paths are exact: packed shared-prompt rows, chunked log-softmax and gradient
checkpointing give the padded path's log-probs, loss and gradients to 1e-5 in fp32."""

import math

import pytest
import torch

from conftest import make_model, make_tokenizer
from dpo_train.data import collate, collate_packed, tokenize_pair
from dpo_train.logps import concatenated_forward, token_logps
from dpo_train.losses import dpo_loss
from dpo_train.models import enable_activation_checkpointing

ROWS = [{"prompt": "1+2=", "chosen": "3", "rejected": "four"},
        {"prompt": "a longer prompt here", "chosen": "a much longer chosen answer", "rejected": "no"},
        {"prompt": "x", "chosen": "yes", "rejected": "a rejected answer that is long"}]


def pairs():
    tokenizer = make_tokenizer()
    return tokenizer, [tokenize_pair(r, tokenizer, 128, 64) for r in ROWS]


def loss_and_grads(model, batch):
    model.zero_grad()
    chosen, rejected = concatenated_forward(model, batch)
    losses, _, _ = dpo_loss(chosen, rejected, chosen.detach() + 0.3, rejected.detach() - 0.2, beta=0.1)
    losses.mean().backward()
    return chosen.detach(), rejected.detach(), losses.mean().item(), {
        name: p.grad.clone() for name, p in model.named_parameters()}


def test_packed_rows_give_the_padded_log_probs_loss_and_gradients():
    tokenizer, tokenized = pairs()
    model = make_model(len(tokenizer))
    padded = loss_and_grads(model, collate(tokenized, tokenizer.pad_token_id))
    packed = loss_and_grads(model, collate_packed(tokenized, tokenizer.pad_token_id))
    assert torch.allclose(padded[0], packed[0], rtol=1e-6, atol=1e-5)
    assert torch.allclose(padded[1], packed[1], rtol=1e-6, atol=1e-5)
    assert abs(padded[2] - packed[2]) < 1e-6
    for name, grad in padded[3].items():
        assert torch.allclose(grad, packed[3][name], atol=1e-5), name


def test_shared_prompt_rows_hold_each_prompt_once_and_score_only_completions():
    tokenizer, tokenized = pairs()
    batch = collate_packed(tokenized, tokenizer.pad_token_id)
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


def test_gradient_checkpointing_gives_the_same_gradients():
    tokenizer, tokenized = pairs()
    model = make_model(len(tokenizer))
    batch = collate(tokenized, tokenizer.pad_token_id)
    plain = loss_and_grads(model, batch)
    enable_activation_checkpointing(model)
    checkpointed = loss_and_grads(model, batch)
    assert abs(plain[2] - checkpointed[2]) < 1e-6
    assert all(torch.allclose(g, checkpointed[3][n], atol=1e-5) for n, g in plain[3].items())


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
