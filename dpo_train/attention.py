"""Attention for the shared-prompt layouts: the pairs of a batch in one padding-free row (`packed`,
collate.collate_packed) or one left-padded row per pair (`rows`, collate.collate_rows).

In `packed` each pair is a span [prompt | chosen | rejected] of the row. Per span, the chosen answer
attends causally over prompt + chosen, and the rejected answer over the prompt and itself: exactly
what each sees alone in a padded row, and nothing of the other pairs. Nothing is computed on padding,
and no (N, N) mask exists: on CUDA one FlexAttention call per layer reads a block mask built once
per batch (flex.py); elsewhere each block is one causal SDPA call (`uses_flex` picks). Softcapped
scores (Gemma 2) and attention sinks (GPT-OSS) are computed here too, from the layer's own values.

In `rows` the model's own attention runs with the rows' 4-D mask; a layer with a sliding window gets
that mask cut to its window, on positions within the pair (a layer says its window as it calls).

It runs as a transformers attention implementation (`enable`), so the model's own projections,
rotary embeddings and layers are untouched. A forward called with `SPANS_KWARG` (a Spans, a RowMasks
or a Survey: each has `attend`) gets this attention; any other call (generation, evaluation) falls
through to the model's own attention.
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
# keyword arguments models pass to their attention that do not change its result here (MoE models pass
# their router flag down every layer)
HARMLESS = {"position_ids", "use_cache", "output_attentions", "output_hidden_states", "output_router_logits",
            "cache_position"}
# keyword arguments whose meaning the pair attention implements: a tanh cap on the scores (Gemma 2),
# a per-head sink logit in the softmax (GPT-OSS)
IMPLEMENTED = {"softcap", "s_aux"}
# the model's own implementations that read a custom 4-D mask (the rows layout's); flash attention reads none
READS_4D_MASK = {"eager", "sdpa", "flex_attention"}


class Spans:
    """The pairs of a packed row, [(start, prompt, chosen, rejected) lengths], for every layer's attention;
    `used` tells that the attention read them (a model that bypasses transformers' interface never
    would). A plain object, not a list: wrappers that rebuild the containers among the forward's
    arguments (FSDP2's mixed-precision cast does) pass it through as it is, flag included."""

    def __init__(self, pairs):
        self.pairs, self.used = list(pairs), False
        self.exchange = None  # a sequence.Exchange when this process holds a share of the row's tokens

    def __iter__(self):
        return iter(self.pairs)

    def block_mask(self, window: int | None, device: torch.device) -> "flex.BlockMask":
        """The row's FlexAttention block mask for this sliding window (None: none), built on first
        use and kept: every layer reads the same one, recomputation under gradient checkpointing too."""
        masks = self.__dict__.setdefault("masks", {})
        if window not in masks:
            masks[window] = flex.block_mask(tuple(self), window, device)
        return masks[window]

    def attend(self, module, query, key, value, attention_mask, dropout, scaling, sliding_window, kwargs):
        """query (1, Hq, N, D), key and value (1, Hkv, N, D) -> (1, N, Hq, D). The mask is not read. With an
        exchange, N is this process's share of the tokens, and the attention runs on every token of its heads."""
        softcap, sinks = kwargs.pop("softcap", None), kwargs.pop("s_aux", None)
        if extra := sorted(name for name, setting in kwargs.items() if setting is not None and name not in HARMLESS):
            raise NotImplementedError(f"padding-free layout: the model's attention uses {extra}, which it does not "
                                      "implement; use train.layout: rows")
        self.used = True
        if self.exchange is None:
            return self.attend_row(query, key, value, dropout, scaling, sliding_window, softcap, sinks)
        query, key, value = map(self.exchange.heads, (query, key, value))
        return self.exchange.tokens(self.attend_row(query, key, value, dropout, scaling, sliding_window, softcap,
                                                    self.exchange.my_heads(sinks)))

    def attend_row(self, query, key, value, dropout, scaling, sliding_window, softcap, sinks) -> torch.Tensor:
        """The whole row's pair attention: query (1, Hq, N, D), key and value (1, Hkv, N, D) -> (1, N, Hq, D)."""
        if dropout == 0.0 and uses_flex(query.device):  # FlexAttention has no dropout; attention dropout takes the loop
            query, key, value = autocast_inputs(query, key, value)
            return flex.attend(query, key, value, self.block_mask(sliding_window, query.device), scaling, softcap,
                               sinks).transpose(1, 2).contiguous()
        outputs = []
        for start, prompt, chosen, rejected in self:
            prompt_and_chosen = slice(start, start + prompt + chosen)
            outputs.append(attend(query[:, :, prompt_and_chosen], key[:, :, prompt_and_chosen],
                                  value[:, :, prompt_and_chosen], sliding_window, dropout, scaling, softcap, sinks))
            # the rejected answer sees the prompt and itself, never the chosen answer between them
            prompt_part = slice(start, start + prompt)
            rejected_part = slice(start + prompt + chosen, start + prompt + chosen + rejected)
            outputs.append(attend(query[:, :, rejected_part],
                                  torch.cat([key[:, :, prompt_part], key[:, :, rejected_part]], dim=2),
                                  torch.cat([value[:, :, prompt_part], value[:, :, rejected_part]], dim=2),
                                  sliding_window, dropout, scaling, softcap, sinks))
        return torch.cat(outputs, dim=2).transpose(1, 2).contiguous()


class RowMasks:
    """The rows layout's position ids (B, T), for every layer's attention: the model's own attention
    runs on the rows' mask, cut to the layer's sliding window (a 4-D mask reaches the attention as it
    is, so without this a windowed layer would see its whole row)."""

    def __init__(self, position_ids: torch.Tensor):
        self.position_ids, self.used, self.masks = position_ids, False, {}

    def windowed(self, mask: torch.Tensor, window: int) -> torch.Tensor:
        """mask (B, 1, T, T), bool or additive, without the keys `window` or more positions back; kept per window."""
        if window not in self.masks:
            positions = self.position_ids.to(mask.device)
            outside = positions[:, None, :, None] - positions[:, None, None, :] >= window  # (B, 1, T, T)
            self.masks[window] = (mask & ~outside if mask.dtype == torch.bool
                                  else mask.masked_fill(outside, torch.finfo(mask.dtype).min))
        return self.masks[window]

    def attend(self, module, query, key, value, attention_mask, dropout, scaling, sliding_window, kwargs):
        self.used = True
        if sliding_window is not None and attention_mask is not None:
            attention_mask = self.windowed(attention_mask, sliding_window)
        return own_attention(module)(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                     sliding_window=sliding_window, **kwargs)[0]


class Survey:
    """One forward in which every attention call leaves tokens unmixed (each query reads only its own
    value) and notes what the layer passed: its windows and the keywords that would change the pair
    attention's result. layouts.py reads it: what still mixes tokens is something other than attention."""

    def __init__(self):
        self.calls, self.windows, self.keywords = 0, set(), set()

    def attend(self, module, query, key, value, attention_mask, dropout, scaling, sliding_window, kwargs):
        self.calls += 1
        self.windows.add(sliding_window)
        self.keywords |= {name for name, setting in kwargs.items() if setting is not None and name not in HARMLESS}
        groups = query.shape[1] // value.shape[1]
        return value.repeat_interleave(groups, dim=1).transpose(1, 2).contiguous()


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
    """Why this attention cannot be registered in place of the model's, or None when it can."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    implementation = config._attn_implementation or "eager"
    if implementation.startswith(PREFIX):
        return None
    if implementation not in ALL_MASK_ATTENTION_FUNCTIONS or (
            implementation != "eager" and implementation not in ALL_ATTENTION_FUNCTIONS):
        return f"the model's attention implementation {implementation!r} is not a standard one"
    return None


def own_implementation(config) -> str:
    """The model's attention implementation as it was before `enable`."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return (config._attn_implementation or "eager").removeprefix(PREFIX)


def enable(config) -> None:
    """Route the model's attention through `pair_attention` (idempotent). Its own implementation
    keeps serving every call without spans, with its own masks. Only the language model's layers: a vision
    tower keeps its own attention (some models pass the spans to it too; its attention ignores them)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    implementation = config._attn_implementation or "eager"
    if implementation.startswith(PREFIX):
        return
    if reason := unsupported(config):
        raise ValueError(f"padding-free layout: {reason}; use train.layout: padded")
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
           dropout: float, scaling: float | None, softcap: float | None = None,
           sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of the last q positions over all k: query (1, Hq, q, D), key and value
    (1, Hkv, k, D) with k >= q -> (1, Hq, q, D). Query i sits at key position k - q + i. Grouped
    keys and values (Hkv < Hq) are read in place, not repeated. A softcap or sinks (Hq,) take the
    explicit scores of `scored_attend`."""
    q, k = query.shape[2], key.shape[2]
    query, key, value = autocast_inputs(query, key, value)
    if softcap is not None or sinks is not None:
        return scored_attend(query, key, value, allowed(q, k, sliding_window, query.device), dropout, scaling,
                             softcap, sinks)
    mask, is_causal = None, q == k
    if sliding_window is not None and k > sliding_window:  # a key at distance >= window is out of reach
        mask, is_causal = allowed(q, k, sliding_window, query.device), False
    elif q != k:
        mask = causal_lower_right(q, k)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=is_causal, dropout_p=dropout,
                                          scale=scaling, enable_gqa=query.shape[1] != key.shape[1])


def allowed(q: int, k: int, sliding_window: int | None, device: torch.device) -> torch.Tensor:
    """(q, k) bool: the last q of k positions each read the keys at or before them, within the window."""
    distance = torch.arange(k - q, k, device=device)[:, None] - torch.arange(k, device=device)[None]
    return (distance >= 0) & (distance < sliding_window) if sliding_window is not None else distance >= 0


def scored_attend(query, key, value, mask: torch.Tensor, dropout: float, scaling: float | None,
                  softcap: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
    """Attention with its scores written out, as the models' eager attention computes them:
    scores = cap * tanh(q.k * scale / cap) with a softcap; a sink adds one logit per head to the
    softmax's denominator (a weight no value carries). query (1, Hq, q, D), key and value (1, Hkv, k, D),
    mask (q, k) bool -> (1, Hq, q, D)."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = query @ key.transpose(2, 3) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    if sinks is not None:
        sink = sinks.reshape(1, -1, 1, 1).to(scores.dtype).expand(1, -1, scores.shape[2], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1, dtype=torch.float32)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    probs = F.dropout(probs.to(value.dtype), p=dropout, training=dropout > 0)
    return probs @ value


def pair_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                   sliding_window: int | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query (B, Hq, N, D), key and value (B, Hkv, N, D) -> ((B, N, Hq, D), None): the layout's
    attention given as kwargs[SPANS_KWARG], or the model's own without one."""
    spans = kwargs.pop(SPANS_KWARG, None)
    if spans is None:
        return own_attention(module)(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                     sliding_window=sliding_window, **kwargs)
    return spans.attend(module, query, key, value, attention_mask, dropout, scaling, sliding_window, kwargs), None
