"""Per-sequence log-probabilities of completions, and the concatenated forward pass."""

from __future__ import annotations

import torch

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


def concatenated_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over the 2B rows of a collated batch (chosen first, then rejected).

    Returns (chosen_logps, rejected_logps), each (B,).
    """
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
