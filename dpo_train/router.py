"""The load-balancing loss of a mixture-of-experts model's routers, added to the objective as TRL
1.16's DPOTrainer adds it: `coef * aux_loss` on the policy's forward only, coef the model's own
`router_aux_loss_coef` unless loss.router_aux_coef says otherwise.

The model's own function computes it (`load_balancing_loss_func`, Switch Transformer eqs. 4-6, in
the model's module), from router logits recorded by hooks on the modules the model itself records
them from (`_can_record_outputs["router_logits"]`). The model is never asked for its own aux_loss:
it would weigh tokens by the attention mask, which in the packed and rows layouts is not a (B, T)
padding mask. Each token is weighed instead by how many of the 2B padded rows hold it (a prompt is
in both its chosen and its rejected row): the loss TRL computes over its padded batch, in any layout.
"""

from __future__ import annotations

import sys

import torch

from .typed import ConfigError


def text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def coefficient(setting: float | None, model) -> float:
    """The weight of the aux loss: `setting`, or (null) the model's router_aux_loss_coef, as TRL; 0 for a model
    without routers. A weight set for a model that returns no router logits is refused, as TRL refuses it."""
    config = text_config(model)
    if not hasattr(config, "output_router_logits"):
        if setting:
            raise ConfigError(f"loss.router_aux_coef: {type(model).__name__} is not a mixture-of-experts model that "
                              "returns its router logits; leave it null or 0")
        return 0.0
    coef = float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0) if setting is None else float(setting)
    if coef and loss_function(model) is None:
        raise ConfigError(f"loss.router_aux_coef: {type(model).__name__}'s module has no load_balancing_loss_func "
                          "to compute the router loss with; set loss.router_aux_coef: 0")
    return coef


def loss_function(model):
    """The model's own load_balancing_loss_func and its recorder (target class, output index), or None."""
    for module in model.modules():
        recorders = getattr(type(module), "_can_record_outputs", None) or {}
        recorder = recorders.get("router_logits")
        if recorder is None:
            continue
        function = getattr(sys.modules[type(module).__module__], "load_balancing_loss_func", None)
        target, index = (recorder, 0) if isinstance(recorder, type) else (recorder.target_class, recorder.index)
        return (function, target, index) if function is not None else None
    return None


class RouterLogits:
    """`with RouterLogits(model) as logits:` records each router's logits (tokens, experts) in forward order,
    for the forward inside the block only (gradient checkpointing's recomputation records nothing)."""

    def __init__(self, model):
        _, self.target, self.index = loss_function(model)
        self.model, self.logits, self.hooks = model, [], []

    def __enter__(self) -> list:
        record = lambda module, args, output: self.logits.append(output[self.index] if isinstance(output, tuple)
                                                                   else output)
        self.hooks = [m.register_forward_hook(record) for m in self.model.modules() if isinstance(m, self.target)]
        return self.logits

    def __exit__(self, *exc) -> None:
        for hook in self.hooks:
            hook.remove()


def aux_loss(model, router_logits: list[torch.Tensor], token_copies: torch.Tensor) -> torch.Tensor:
    """() the model's load-balancing loss over `router_logits` (one (tokens, experts) per layer), each token
    weighed by token_copies (shaped as the input ids, flattened in the same order: its count in the padded rows)."""
    function, _, _ = loss_function(model)
    # the counts the model's own forward passes it (the causal LM's attributes), else its config's
    config = text_config(model)
    owner = next((m for m in model.modules() if hasattr(m, "num_experts_per_tok") and hasattr(m, "num_experts")), None)
    num_experts = next(getattr(source, name) for source in (owner, config) for name in
                       ("num_experts", "num_local_experts", "n_routed_experts") if getattr(source, name, None))
    top_k = getattr(owner, "num_experts_per_tok", None) or config.num_experts_per_tok
    weights = token_copies.reshape(1, -1).to(router_logits[0].device, torch.float32)
    return function(tuple(router_logits), num_experts, top_k, weights)
