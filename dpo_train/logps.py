"""Per-sequence log-probabilities of completions, and the concatenated forward pass."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token) over each row's labelled (completion) tokens.

    logits: (N, T, V), labels: (N, T) with IGNORE_INDEX on prompt and padding -> (N,) fp32.
    Position t predicts token t+1, so the shift happens here, once: logits[:, :-1] vs labels[:, 1:].
    """
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != IGNORE_INDEX
    targets = labels.masked_fill(~mask, 0)  # any valid index; masked out below
    # log softmax at the target = logit at the target - logsumexp over the vocabulary
    token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return (token_logps * mask).sum(-1)


def token_logps(logits: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """log p(target) per row of logits, the log-softmax taken in fp32 one chunk at a time.

    logits: (K, V) in any dtype, targets: (K,) -> (K,) fp32. Each chunk is recomputed in the
    backward pass instead of being kept, so no fp32 copy of (K, V) ever exists at once.
    """
    def chunk_logps(chunk: torch.Tensor, chunk_targets: torch.Tensor) -> torch.Tensor:
        chunk = chunk.float()
        return chunk.gather(-1, chunk_targets.unsqueeze(-1)).squeeze(-1) - chunk.logsumexp(-1)

    return torch.cat([checkpoint(chunk_logps, c, t, use_reentrant=False) if c.requires_grad else chunk_logps(c, t)
                      for c, t in zip(logits.split(chunk_size), targets.split(chunk_size))])


def packed_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over a packed shared-prompt row (data.collate_packed). The LM head runs only at
    the K positions that predict completion tokens, never over prompts or padding.

    Returns (chosen_logps, rejected_logps), each (B,), equal to concatenated_forward's.
    """
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                   attention_mask=batch["attention_mask"], logits_to_keep=batch["predict_positions"],
                   use_cache=False).logits[0]  # (K, V)
    per_token = token_logps(logits, batch["targets"])
    logps = per_token.new_zeros(int(batch["num_rows"])).index_add(0, batch["owners"], per_token)
    half = logps.shape[0] // 2
    return logps[:half], logps[half:]


def concatenated_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over a collated batch: the 2B padded rows of data.collate (chosen first, then
    rejected), or the packed row of data.collate_packed.

    Returns (chosen_logps, rejected_logps), each (B,).
    """
    if "predict_positions" in batch:
        return packed_forward(model, batch)
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
    policy_chosen_logps, policy_rejected_logps = concatenated_forward(policy, batch)
    if "reference_chosen_logps" in batch:
        return (policy_chosen_logps, policy_rejected_logps, batch["reference_chosen_logps"],
                batch["reference_rejected_logps"])
    if reference is None:
        zeros = torch.zeros_like(policy_chosen_logps).detach()
        return policy_chosen_logps, policy_rejected_logps, zeros, zeros
    with torch.no_grad():
        reference_chosen_logps, reference_rejected_logps = concatenated_forward(reference, batch)
    return policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
