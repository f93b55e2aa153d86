"""The padding-free layout's attention as one FlexAttention call per layer, for CUDA devices.

attention.pair_attention calls SDPA twice per pair and layer: 2B kernel launches per layer and a
key/value copy per rejected span. Here a block mask built once per batch from the spans says who
sees whom in the whole row, and one fused kernel skips the blocks nobody sees. Query i may read
key j when both belong to the same pair, j comes no later than i in the row, i is not a rejected
token reading a chosen one, and (with a sliding window w) their positions in the pair differ by
less than w. That is exactly what attention.attend computes per block.

FlexAttention has no backward pass on CPU, so CPUs keep the per-pair loop (attention.uses_flex).
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, create_block_mask, flex_attention

PROMPT, CHOSEN, REJECTED = 0, 1, 2  # the part of its pair each token of the row belongs to


def span_tables(spans, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[(start, prompt, chosen, rejected) lengths] covering a row of N tokens -> (pair, part,
    position), each (N,) int32: the token's pair, its part, and its position within the pair (both
    answers continue from the prompt's end, as the row's position ids do)."""
    pair, part, position = [], [], []
    for index, (_, p, c, r) in enumerate(spans):
        pair += [index] * (p + c + r)
        part += [PROMPT] * p + [CHOSEN] * c + [REJECTED] * r
        position += list(range(p + c)) + list(range(p, p + r))
    return tuple(torch.tensor(values, dtype=torch.int32, device=device) for values in (pair, part, position))


def pair_mask_mod(pair: torch.Tensor, part: torch.Tensor, position: torch.Tensor, window: int | None):
    """The mask_mod of FlexAttention for these tables: (batch, head, q, kv) indices -> bool, True
    where query q reads key kv. Indices broadcast, so it also builds a dense (N, N) mask."""
    def mask_mod(batch, head, q, kv):
        allowed = (pair[q] == pair[kv]) & (kv <= q) & ~((part[q] == REJECTED) & (part[kv] == CHOSEN))
        if window is not None:  # a key at distance >= window is out of reach
            allowed = allowed & (position[q] - position[kv] < window)
        return allowed
    return mask_mod


@functools.lru_cache(maxsize=8)
def block_mask(spans: tuple, window: int | None, device: torch.device) -> BlockMask:
    """The row's block mask (batch and heads broadcast): blocks of 128 x 128 positions, each empty,
    full or partial, so the kernel skips what no query reads (other pairs, the rejected answer's
    view of the chosen one) and evaluates mask_mod only on partial blocks. Kept for the last few
    batches: the policy's and the reference's forward over one batch build it once."""
    n = sum(p + c + r for _, p, c, r in spans)
    return create_block_mask(pair_mask_mod(*span_tables(spans, device), window), None, None, n, n, device=device)


# One fused kernel: compiled on its first call, then once more for dynamic lengths. Made here, not inside a
# compiled model's forward, where dynamo would trace its making; only where CUDA is (importing dynamo costs seconds).
COMPILED = torch.compile(flex_attention) if torch.cuda.is_available() else None


def kernel(device_type: str):
    """flex_attention compiled on CUDA. Elsewhere the eager one, which computes the dense scores
    and has no backward on CPU: what the CPU tests run, forward only."""
    return COMPILED if device_type == "cuda" else flex_attention


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: BlockMask,
           scaling: float | None, softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """query (1, Hq, N, D), key and value (1, Hkv, N, D), the row's block mask -> (1, Hq, N, D).
    Grouped keys and values (Hkv < Hq) are read in place. A softcap is a score_mod (cap * tanh(score /
    cap)); sinks (Hq,) scale each output by the weight the sink leaves the values: with the row's
    log-sum-exp L over the keys, exp(L) / (exp(L) + exp(sink)) = sigmoid(L - sink)."""
    score_mod = None if softcap is None else (lambda score, b, h, q, kv: softcap * torch.tanh(score / softcap))
    run = functools.partial(kernel(query.device.type), query, key, value, score_mod=score_mod, block_mask=mask,
                            scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    if sinks is None:
        return run()
    out, aux = run(return_aux=AuxRequest(lse=True))
    return out * torch.sigmoid(aux.lse - sinks.reshape(1, -1, 1).to(aux.lse.dtype)).unsqueeze(-1).to(out.dtype)
