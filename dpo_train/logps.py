"""Per-sequence log-probabilities of completions, and the concatenated forward pass."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token) over each row's labelled (completion) tokens.

    logits: (N, T, V), labels: (N, T) with IGNORE_INDEX on prompt and padding -> (N,) fp32.
    Position t predicts token t+1: logits[:, :-1] are scored against labels[:, 1:]. Only the
    labelled positions reach the log-softmax, in chunks (token_logps).
    """
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)  # next token
    rows, positions = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    per_token = token_logps(logits[rows, positions], targets[rows, positions])
    return per_token.new_zeros(logits.shape[0]).index_add(0, rows, per_token)


def token_logps(logits: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """log p(target) per row of logits, the log-softmax taken in fp32 one chunk at a time.

    logits: (K, V) in any dtype, targets: (K,) -> (K,) fp32. The log-softmax's temporaries are
    chunk-sized; for bf16/fp16 logits each chunk's fp32 copy is recomputed in the backward pass
    instead of being kept, so no fp32 copy of (K, V) ever exists at once.
    """
    def chunk_logps(chunk: torch.Tensor, chunk_targets: torch.Tensor) -> torch.Tensor:
        chunk = chunk.float()
        return chunk.gather(-1, chunk_targets.unsqueeze(-1)).squeeze(-1) - chunk.logsumexp(-1)

    recompute = logits.requires_grad and logits.dtype != torch.float32  # in fp32 there is no copy to save
    return torch.cat([checkpoint(chunk_logps, c, t, use_reentrant=False) if recompute else chunk_logps(c, t)
                      for c, t in zip(logits.split(chunk_size), targets.split(chunk_size))])


def packed_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Completion log-probs of shared-prompt rows (data.collate_packed), (2B,) chosen then rejected.
    The LM head runs only over the rows' last K' positions, where the completions are."""
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                   attention_mask=batch["attention_mask"], logits_to_keep=batch["logits_to_keep"],
                   use_cache=False).logits  # (B, K', V)
    per_token = token_logps(logits.flatten(0, 1)[batch["predict_index"]], batch["targets"])  # (K,)
    return per_token.new_zeros(int(batch["num_rows"])).index_add(0, batch["owners"], per_token)


def concatenated_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over a collated batch: the shared-prompt rows of data.collate_packed, or the
    2B padded rows of data.collate (chosen first, then rejected). Both give the same numbers.

    Returns (chosen_logps, rejected_logps), each (B,).
    """
    if "predict_index" in batch:
        logps = packed_logps(model, batch)
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        logps = sequence_logps(logits, batch["labels"])
    half = logps.shape[0] // 2
    return logps[:half], logps[half:]


def policy_and_reference_logps(policy: torch.nn.Module, reference: torch.nn.Module | None,
                               batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """(policy_chosen, policy_rejected, reference_chosen, reference_rejected) log-probs, each (B,).

    The reference runs without gradients. Precomputed reference log-probs in the batch are used
    as they are. With neither (a reference-free loss) they are zeros, which makes the rewards
    beta * policy log-probs.
    """
    if "reference_chosen_logps" in batch:
        reference_logps = batch["reference_chosen_logps"], batch["reference_rejected_logps"]
    elif reference is not None:  # first: its transient memory is freed before the policy's activations exist
        with torch.no_grad():
            reference_logps = concatenated_forward(reference, batch)
    else:
        reference_logps = None
    policy_chosen_logps, policy_rejected_logps = concatenated_forward(policy, batch)
    if reference_logps is None:
        zeros = torch.zeros_like(policy_chosen_logps).detach()
        reference_logps = zeros, zeros
    return policy_chosen_logps, policy_rejected_logps, *reference_logps
