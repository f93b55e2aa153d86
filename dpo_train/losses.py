"""Preference losses: pure functions of per-sequence log-probs, chosen from a table.

Each returns (losses, chosen_rewards, rejected_rewards), all (B,); the trainer takes the mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    reference_free: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r))).

    All inputs (B,). With `reference_free`, the reference log-ratio is taken as 0 (a uniform
    reference). Rewards are beta * (policy - reference) log-probs, detached: they are metrics.
    """
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = 0 if reference_free else reference_chosen_logps - reference_rejected_logps
    losses = -F.logsigmoid(beta * (pi_logratios - ref_logratios))
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


LOSSES = {"sigmoid": dpo_loss}
