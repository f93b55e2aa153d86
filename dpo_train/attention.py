"""Attention for the padding-free layout (data.collate_packed): every pair of a batch in one row.

Each pair is a span [prompt | chosen | rejected] of the row. Per span, the chosen answer attends
causally over prompt + chosen, and the rejected answer over the prompt and itself: exactly what
each sees alone in a padded row, and nothing of the other pairs. Nothing is computed on padding,
and no (N, N) mask exists: each block is one causal SDPA call.

It runs as a transformers attention implementation (`enable`), so the model's own projections,
rotary embeddings and layers are untouched. A forward called with `SPANS_KWARG` gets the pair
attention; any other call (generation, evaluation) falls through to the model's own attention.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

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
    device = query.device.type
    if torch.is_autocast_enabled(device):  # a CausalBias mask dispatches around autocast: cast as autocast would
        dtype = torch.get_autocast_dtype(device)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
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
