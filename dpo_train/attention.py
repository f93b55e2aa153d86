"""Attention for the padding-free layout (data.collate_packed): every pair of a batch in one row.

Each pair is a span [prompt | chosen | rejected] of the row. Per span, the chosen answer attends
causally over prompt + chosen, and the rejected answer over the prompt and itself: exactly what
each sees alone in a padded row, and nothing of the other pairs. Nothing is computed on padding,
and no (N, N) mask exists: on CUDA one FlexAttention call per layer reads a block mask built once
per batch (flex.py); elsewhere each block is one causal SDPA call (`uses_flex` picks).

It runs as a transformers attention implementation (`enable`), so the model's own projections,
rotary embeddings and layers are untouched. A forward called with `SPANS_KWARG` gets the pair
attention; any other call (generation, evaluation) falls through to the model's own attention.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from . import flex

PREFIX = "dpo_pairs|"  # registered as PREFIX + the model's own implementation, which it falls back to
SPANS_KWARG = "dpo_pair_spans"
# keyword arguments models pass to their attention that do not change its result here
HARMLESS = {"position_ids", "use_cache", "output_attentions", "cache_position"}
# config fields of attentions this one does not implement; such models use the rows layout
UNSUPPORTED = ("attn_logit_softcapping",)


class Spans:
    """The pairs of a packed row, [(start, prompt, chosen, rejected) lengths], for every layer's attention;
    `used` tells that the attention read them (a model that bypasses transformers' interface never
    would). A plain object, not a list: wrappers that rebuild the containers among the forward's
    arguments (FSDP2's mixed-precision cast does) pass it through as it is, flag included."""

    def __init__(self, pairs):
        self.pairs, self.used = list(pairs), False

    def __iter__(self):
        return iter(self.pairs)

    def block_mask(self, window: int | None, device: torch.device) -> "flex.BlockMask":
        """The row's FlexAttention block mask for this sliding window (None: none), built on first
        use and kept: every layer reads the same one, recomputation under gradient checkpointing too."""
        masks = self.__dict__.setdefault("masks", {})
        if window not in masks:
            masks[window] = flex.block_mask(tuple(self), window, device)
        return masks[window]


def uses_flex(device: torch.device) -> bool:
    """Whether the pair attention runs as one FlexAttention call per layer (CUDA) or as the per-pair
    SDPA loop (elsewhere: FlexAttention has no backward pass on CPU). DPO_TRAIN_PAIR_ATTENTION=loop
    or =flex overrides the choice, for A/B runs on a GPU."""
    choice = os.environ.get("DPO_TRAIN_PAIR_ATTENTION", "auto")
    return choice == "flex" or (choice == "auto" and device.type == "cuda")


def batch_spans(pair_spans: torch.Tensor, config, device: torch.device) -> Spans:
    """The spans of a collate_packed batch, (B, 4). Where FlexAttention runs, the block masks for
    the model's windows (none, and its sliding window if it has one) are built here, once per batch
    and outside the forward, so that a compiled forward only reads them."""
    spans = Spans(map(tuple, pair_spans.tolist()))
    if uses_flex(device):
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        for window in {None, getattr(config, "sliding_window", None)}:
            spans.block_mask(window, device)
    return spans


def unsupported(config) -> str | None:
    """Why the pair attention cannot stand in for this model's, or None when it can."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in UNSUPPORTED:
        if getattr(config, name, None) is not None:
            return f"the model's attention uses {name}"
    implementation = config._attn_implementation or "eager"
    if implementation.startswith(PREFIX):
        return None
    if implementation not in ALL_MASK_ATTENTION_FUNCTIONS or (
            implementation != "eager" and implementation not in ALL_ATTENTION_FUNCTIONS):
        return f"the model's attention implementation {implementation!r} is not a standard one"
    return None


def usable_layout(layout: str, configs: list) -> tuple[str, str | None]:
    """(the layout to run, why it differs from `layout` or None): `packed` becomes `rows` when the
    pair attention cannot stand in for the attention of any of the models (policy, reference)."""
    reason = next(filter(None, map(unsupported, configs)), None) if layout == "packed" else None
    return ("rows", reason) if reason else (layout, None)


def enable(config) -> None:
    """Route the model's attention through `pair_attention` (idempotent). Its own implementation
    keeps serving every call without spans, with its own masks."""
    implementation = config._attn_implementation or "eager"
    if implementation.startswith(PREFIX):
        return
    if reason := unsupported(config):
        raise ValueError(f"padding-free layout: {reason}; use train.layout: rows")
    name = PREFIX + implementation
    AttentionInterface.register(name, pair_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[implementation])
    config._attn_implementation = name


def own_attention(module: torch.nn.Module):
    """The attention function the model would use without us: a registered one, or for "eager"
    the model's own `eager_attention_forward` (each transformers model defines one)."""
    implementation = module.config._attn_implementation.removeprefix(PREFIX)
    if implementation != "eager" and implementation in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[implementation]
    return sys.modules[type(module).__module__].eager_attention_forward


def autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in the autocast dtype when autocast is on: a CausalBias mask and FlexAttention
    dispatch around autocast, which would leave query and key in fp32 (rotary) and value in bf16."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    return tuple(tensor.to(torch.get_autocast_dtype(device)) for tensor in tensors)


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, sliding_window: int | None,
           dropout: float, scaling: float | None) -> torch.Tensor:
    """Causal attention of the last q positions over all k: query (1, Hq, q, D), key and value
    (1, Hkv, k, D) with k >= q -> (1, Hq, q, D). Query i sits at key position k - q + i. Grouped
    keys and values (Hkv < Hq) are read in place, not repeated."""
    q, k = query.shape[2], key.shape[2]
    mask, is_causal = None, q == k
    if sliding_window is not None and k > sliding_window:  # a key at distance >= window is out of reach
        query_positions = torch.arange(k - q, k, device=query.device)[:, None]
        distance = query_positions - torch.arange(k, device=query.device)[None]
        mask, is_causal = (distance >= 0) & (distance < sliding_window), False
    elif q != k:
        mask = causal_lower_right(q, k)
    query, key, value = autocast_inputs(query, key, value)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=is_causal, dropout_p=dropout,
                                          scale=scaling, enable_gqa=query.shape[1] != key.shape[1])


def pair_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                   sliding_window: int | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query (1, Hq, N, D), key and value (1, Hkv, N, D) -> ((1, N, Hq, D), None), the pairs given
    as kwargs[SPANS_KWARG]. The attention mask is not read: the spans say who sees whom."""
    spans = kwargs.pop(SPANS_KWARG, None)
    if spans is None:
        return own_attention(module)(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                     sliding_window=sliding_window, **kwargs)
    if extra := sorted(name for name, setting in kwargs.items() if setting is not None and name not in HARMLESS):
        raise NotImplementedError(f"padding-free layout: the model's attention uses {extra}, which it does not "
                                  "implement; use train.layout: rows")
    spans.used = True
    if dropout == 0.0 and uses_flex(query.device):  # FlexAttention has no dropout; attention dropout takes the loop
        query, key, value = autocast_inputs(query, key, value)
        return flex.attend(query, key, value, spans.block_mask(sliding_window, query.device),
                           scaling).transpose(1, 2).contiguous(), None
    outputs = []
    for start, prompt, chosen, rejected in spans:
        prompt_and_chosen = slice(start, start + prompt + chosen)
        outputs.append(attend(query[:, :, prompt_and_chosen], key[:, :, prompt_and_chosen], value[:, :, prompt_and_chosen],
                              sliding_window, dropout, scaling))
        # the rejected answer sees the prompt and itself, never the chosen answer between them
        prompt_part, rejected_part = slice(start, start + prompt), slice(start + prompt + chosen, start + prompt + chosen + rejected)
        outputs.append(attend(query[:, :, rejected_part],
                              torch.cat([key[:, :, prompt_part], key[:, :, rejected_part]], dim=2),
                              torch.cat([value[:, :, prompt_part], value[:, :, rejected_part]], dim=2),
                              sliding_window, dropout, scaling))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None
