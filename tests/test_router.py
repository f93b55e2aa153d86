"""The MoE router's load-balancing loss (router.py): the model's own function over the tokens of the
2B padded rows TRL scores, in every layout, added to the loss with the model's coefficient."""

import math

import pytest
import torch

from conftest import make_tokenizer
from families import make_family_model, tokenized_pairs
from dpo_train import router
from dpo_train.config import ConfigError
from dpo_train.collate import COLLATES
from dpo_train.logps import forward_sums
from dpo_train.models import enable_activation_checkpointing

TOKENIZER = make_tokenizer()
AUX = frozenset({"router_aux"})


def aux_and_router_grads(model, layout):
    model.zero_grad()
    aux = forward_sums(model, COLLATES[layout](tokenized_pairs(TOKENIZER), 1), extras=AUX)["router_aux"]
    aux.backward()
    return aux.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_the_router_loss_is_the_models_own_over_the_padded_batch_in_every_layout(family):
    """The model's aux_loss over collate.collate's 2B rows and their attention mask is what TRL adds; each
    layout weighs a prompt's tokens twice (both its rows hold them) and gives the same value and gradients."""
    model = make_family_model(family, len(TOKENIZER))
    padded = COLLATES["padded"](tokenized_pairs(TOKENIZER), 1)
    with torch.no_grad():
        expected = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                         output_router_logits=True).aux_loss
    _, padded_grads = aux_and_router_grads(model, "padded")
    for layout in ("packed", "rows", "padded"):
        aux, grads = aux_and_router_grads(model, layout)
        assert abs(float(aux) - float(expected)) < 1e-6, layout
        assert grads.keys() == padded_grads.keys() and any("gate" in n or "router" in n for n in grads)
        assert all(torch.allclose(g, padded_grads[n], atol=1e-6) for n, g in grads.items()), layout


def test_the_router_loss_under_gradient_checkpointing():
    """Recomputed layers in the backward pass record nothing more, and their gradients are the same."""
    model = make_family_model("qwen3_moe", len(TOKENIZER))
    plain = aux_and_router_grads(model, "packed")
    enable_activation_checkpointing(model)
    checkpointed = aux_and_router_grads(model, "packed")
    assert torch.equal(plain[0], checkpointed[0])
    assert all(torch.allclose(g, checkpointed[1][n], atol=1e-6) for n, g in plain[1].items())


def test_the_coefficient_is_the_models_unless_set_and_refused_without_routers():
    moe, dense = make_family_model("qwen3_moe", len(TOKENIZER)), make_family_model("llama", len(TOKENIZER))
    assert router.coefficient(None, moe) == moe.config.router_aux_loss_coef == 0.001  # TRL's rule
    assert router.coefficient(0.0, moe) == 0.0 and router.coefficient(0.02, moe) == 0.02
    assert router.coefficient(None, dense) == 0.0 and router.coefficient(0, dense) == 0.0
    with pytest.raises(ConfigError, match="loss.router_aux_coef: LlamaForCausalLM is not a mixture-of-experts"):
        router.coefficient(0.01, dense)


def test_a_moe_run_adds_and_logs_the_router_loss(tmp_path, tiny_data):
    """Step 0: the DPO loss is ln 2 and the logged loss is ln 2 + coef * aux_loss, aux_loss logged as TRL logs it."""
    from dpo_train.trainer import train
    from test_trainer import read_metrics, tiny_config
    model = make_family_model("qwen3_moe", len(TOKENIZER))
    model.config.router_aux_loss_coef = 0.5  # large enough to see in the loss
    model.save_pretrained(tmp_path / "moe")
    TOKENIZER.save_pretrained(tmp_path / "moe")
    train(tiny_config(tmp_path, tmp_path / "moe", tiny_data, "train.max_steps=2", "data.eval=null",
                      "train.eval_max_new_tokens=0"))
    first = read_metrics(tmp_path / "run")[0]
    assert first["aux_loss"] > 1.0  # near top_k (2) for balanced routers: the loss is on, and this is its value
    assert abs(first["loss"] - (math.log(2) + 0.5 * first["aux_loss"])) < 1e-5
