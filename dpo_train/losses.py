"""Preference losses: pure functions of per-sequence log-probs, chosen from a table.

Each loss takes (policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
reference_rejected_logps), all (B,), plus its own hyperparameters, and returns
(losses, chosen_rewards, rejected_rewards), all (B,); the trainer takes the mean. Without a
reference model the reference log-probs are zeros (a uniform reference).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F


def rewards(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
            beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Implicit rewards beta * (policy - reference) log-probs, detached: they are metrics."""
    return (beta * (policy_chosen_logps - reference_chosen_logps).detach(),
            beta * (policy_rejected_logps - reference_rejected_logps).detach())


def logratio_margins(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
    """h = (pi_c - pi_r) - (ref_c - ref_r), (B,): how much more than the reference the policy
    prefers the chosen answer."""
    return (policy_chosen_logps - policy_rejected_logps) - (reference_chosen_logps - reference_rejected_logps)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    reference_free: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r))).

    With `reference_free`, the reference log-ratio is taken as 0 (a uniform reference).
    """
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = 0 if reference_free else reference_chosen_logps - reference_rejected_logps
    losses = -F.logsigmoid(beta * (pi_logratios - ref_logratios))
    return losses, *rewards(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                            reference_rejected_logps, beta)


def ipo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             beta: float):
    """IPO (Azar et al. 2023, eq. 17): (h - 1/(2 beta))^2, h = (pi_c - pi_r) - (ref_c - ref_r).

    A squared loss pulls the log-ratio margin to a finite target 1/(2 beta) instead of pushing it
    to infinity, which resists overfitting to deterministic preferences. h uses sequence log-prob
    sums, as in the paper (TRL divides them by length).
    """
    h = logratio_margins(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    losses = (h - 1 / (2 * beta)) ** 2
    return losses, *rewards(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                            reference_rejected_logps, beta)


def hinge_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
               beta: float):
    """SLiC-style hinge (Zhao et al. 2023; the DPO form of Liu et al. 2024, RSO):
    max(0, 1 - beta * h), h the log-ratio margin. Pairs already separated by 1/beta stop contributing."""
    h = logratio_margins(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    losses = torch.relu(1 - beta * h)
    return losses, *rewards(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                            reference_rejected_logps, beta)


def robust_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                beta: float, label_smoothing: float):
    """Robust DPO (Chowdhury et al. 2024, eq. 8) for labels flipped with probability eps:
    ((1 - eps) * -log sigmoid(beta h) - eps * -log sigmoid(-beta h)) / (1 - 2 eps).

    An unbiased estimate of the clean-label DPO loss; eps = label_smoothing in [0, 0.5), and eps = 0 is DPO.
    """
    h = logratio_margins(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    eps = label_smoothing
    losses = ((1 - eps) * -F.logsigmoid(beta * h) - eps * -F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    return losses, *rewards(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                            reference_rejected_logps, beta)


def simpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
               beta: float, gamma: float):
    """SimPO (Meng et al. 2024, eq. 6): -log sigmoid(beta * (pi_c - pi_r) - gamma), reference-free.

    The policy inputs are per-token MEAN log-probs (the length-normalised reward the paper
    uses; the caller divides the sums by completion lengths), and gamma is the target reward
    margin. The reference inputs are ignored. Rewards are beta * mean log-probs.
    """
    losses = -F.logsigmoid(beta * (policy_chosen_logps - policy_rejected_logps) - gamma)
    return losses, beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach()


LOSSES = {"sigmoid": dpo_loss, "ipo": ipo_loss, "hinge": hinge_loss, "robust": robust_loss, "simpo": simpo_loss}
REFERENCE_FREE = {"simpo"}  # these load no reference model
LENGTH_NORMALIZED = {"simpo"}  # these score per-token mean log-probs, not sums


def sft_loss(policy_chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each chosen completion per token (RPO, Pang et al. 2024, eq. 2):
    -log pi(y_c | x) / |y_c|. (B,) sums and (B,) token counts -> (B,)."""
    return -policy_chosen_logps / chosen_lengths


def objective(loss_type: str, beta: float, label_smoothing: float = 0.0, gamma: float = 0.0,
              sft_weight: float = 0.0):
    """The training objective as one function of the four log-prob sums and the completion lengths:

        fn(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
           reference_rejected_logps, chosen_lengths, rejected_lengths) -> (losses, chosen_rewards, rejected_rewards)

    It feeds the preference loss `loss_type` (per-token means where it is length-normalised) and
    adds `sft_weight` times the chosen completions' per-token NLL to each pair's loss.
    """
    loss = LOSSES[loss_type]
    given = {"beta": beta, "label_smoothing": label_smoothing, "gamma": gamma}
    hyperparameters = {k: v for k, v in given.items() if k in inspect.signature(loss).parameters}

    def fn(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
           chosen_lengths, rejected_lengths):
        logps = policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
        if loss_type in LENGTH_NORMALIZED:
            logps = (policy_chosen_logps / chosen_lengths, policy_rejected_logps / rejected_lengths,
                     reference_chosen_logps / chosen_lengths, reference_rejected_logps / rejected_lengths)
        losses, chosen_rewards, rejected_rewards = loss(*logps, **hyperparameters)
        if sft_weight:
            losses = losses + sft_weight * sft_loss(policy_chosen_logps, chosen_lengths)
        return losses, chosen_rewards, rejected_rewards

    return fn
