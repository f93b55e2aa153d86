"""The training objective: from a batch's per-pair log-probs (logps.PairLogps) to per-pair losses and rewards.

It composes the pure losses of losses.py the way TRL 1.16's DPOTrainer does:

  1. LD-DPO (ld_alpha): each log-prob counts the tokens beyond the shorter completion's length
     ld_alpha times: log pi = shared + ld_alpha * tail (Liu et al. 2024, LD-DPO).
  2. The f-divergence (Wang et al. 2023, f-DPO): each side's score is f'(pi/ref) of its log-ratio.
  3. Each loss type's per-pair term; with use_weighting, times the WPO weights w_c * w_r, w = the
     policy's per-token mean of log p(y_t) - log sum_v p(v)^2, exponentiated, no gradient (Zhou et
     al. 2024, eq. 2).
  4. The terms summed with their weights (TRL's loss_weights; MPO), plus sft_weight times each
     chosen completion's per-token NLL (RPO, Pang et al. 2024, eq. 2), plus router_aux_coef times
     the policy's MoE load-balancing loss (router.py; TRL adds it to the batch's mean loss).

Every per-pair tensor a loss may read is computed here once, by name; a loss takes what its
parameters name. The trainer builds `Objective(**loss settings)` and calls it on each
batch's PairLogps; it asks logps for `extras` and loads a reference only if `needs_reference`.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F

from .losses import LOSSES, MEAN_LOGP_REWARDS, REFERENCE_FREE


def f_divergence_scores(logratios: torch.Tensor, divergence: str, alpha: float | None) -> torch.Tensor:
    """f'(t) at t = pi/ref, from log t (B,) -> (B,): the score f-DPO puts where DPO has log t.

    reverse_kl: log t (DPO); forward_kl: 1 - 1/t; js_divergence: log(2t / (1 + t));
    alpha_divergence: (t^(alpha-1) - 1) / (alpha - 1), log t at alpha = 1. The exponent is clamped at
    80 as TRL does, so that exp stays finite in fp32.
    """
    if divergence == "forward_kl":
        return 1 - torch.exp(-logratios)
    if divergence == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if divergence == "alpha_divergence" and abs(alpha - 1.0) >= 1e-6:
        return (torch.exp(torch.clamp((alpha - 1.0) * logratios, max=80.0)) - 1.0) / (alpha - 1.0)
    return logratios


def ld_logps(full: torch.Tensor, shared: torch.Tensor, ld_alpha: float) -> torch.Tensor:
    """LD-DPO's log-prob (B,): the shared part (the shorter completion's length) in full, the rest
    ("tail", full - shared) times ld_alpha."""
    return shared + ld_alpha * (full - shared)


def wpo_weights(policy_logps: torch.Tensor, policy_log_sum_sq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """WPO (Zhou et al. 2024, eq. 2, TRL's form): exp of the per-token mean of log p(y_t) - log
    sum_v p(v)^2, sums (B,) and lengths (B,) -> (B,), without gradient. 1 when the policy is
    certain of every token; small for completions it would not sample."""
    return torch.exp((policy_logps.detach() - policy_log_sum_sq) / lengths)


class Objective:
    """A weighted sum of loss types, applied to PairLogps. See the module docstring."""

    def __init__(self, type: str | list[str] = "sigmoid", weights: list[float] | None = None, beta: float = 0.1,
                 reference_free: bool = False, label_smoothing: float = 0.0, gamma: float = 0.0,
                 discopop_tau: float | None = None, f_divergence: str = "reverse_kl", f_alpha: float | None = None,
                 use_weighting: bool = False, ld_alpha: float | None = None, sft_weight: float = 0.0,
                 router_aux_coef: float | None = 0.0):
        self.types = [type] if isinstance(type, str) else list(type)
        self.weights = list(weights) if weights is not None else [1.0] * len(self.types)
        self.beta, self.reference_free, self.sft_weight = beta, reference_free, sft_weight
        self.router_aux_coef = router_aux_coef or 0.0  # None: not resolved for a model yet (router.coefficient)
        self.f_divergence, self.use_weighting, self.ld_alpha = f_divergence, use_weighting, ld_alpha
        self.f_alpha = 0.5 if f_alpha is None else f_alpha  # null: TRL's defaults, as config resolves them
        self.hyperparameters = {"beta": beta, "label_smoothing": label_smoothing, "gamma": gamma,
                                "discopop_tau": 0.05 if discopop_tau is None else discopop_tau}
        # (loss, the names it reads, its weight) per type
        self.terms = [(LOSSES[name], list(inspect.signature(LOSSES[name]).parameters), weight)
                      for name, weight in zip(self.types, self.weights, strict=True)]
        # with loss.reference_free the reference is uniform: zeros, no model
        self.needs_reference = not reference_free and not set(self.types) <= REFERENCE_FREE

    @property
    def extras(self) -> frozenset:
        """What logps computes beyond the sums: only what the options ask for."""
        return frozenset(name for name, asked in (("shared_logps", self.ld_alpha is not None),
                                                  ("log_sum_sq", self.use_weighting),
                                                  ("router_aux", bool(self.router_aux_coef))) if asked)

    def tensors(self, logps) -> dict[str, torch.Tensor]:
        """Every per-pair tensor a loss may read (losses.py's list), each (B,)."""
        pc, pr = logps.policy_chosen_logps, logps.policy_rejected_logps
        rc, rr = logps.reference_chosen_logps, logps.reference_rejected_logps
        if self.ld_alpha is not None:  # the losses compare LD-weighted log-probs; sft and WPO read the plain ones
            pc, pr = (ld_logps(pc, logps.policy_chosen_shared_logps, self.ld_alpha),
                      ld_logps(pr, logps.policy_rejected_shared_logps, self.ld_alpha))
            rc, rr = (ld_logps(rc, logps.reference_chosen_shared_logps, self.ld_alpha),
                      ld_logps(rr, logps.reference_rejected_shared_logps, self.ld_alpha))
        chosen_scores = f_divergence_scores(pc - rc, self.f_divergence, self.f_alpha)
        rejected_scores = f_divergence_scores(pr - rr, self.f_divergence, self.f_alpha)
        return {"policy_chosen_logps": logps.policy_chosen_logps, "policy_rejected_logps": logps.policy_rejected_logps,
                "chosen_lengths": logps.chosen_lengths, "rejected_lengths": logps.rejected_lengths,
                "chosen_logratios": pc - rc, "rejected_logratios": pr - rr,
                "policy_logratios": pc - pr, "reference_logratios": rc - rr,
                "chosen_scores": chosen_scores, "rejected_scores": rejected_scores,
                "margins": chosen_scores - rejected_scores}

    def __call__(self, logps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """PairLogps of B pairs -> (losses, chosen_rewards, rejected_rewards), each (B,); the loss to
        minimise is the mean of `losses`. Rewards (metrics, detached) are beta * the log-ratios, or
        beta * per-token mean log-probs when the first loss type is simpo or orpo."""
        tensors = {**self.tensors(logps), **self.hyperparameters}
        if self.use_weighting:
            pair_weights = (wpo_weights(logps.policy_chosen_logps, logps.policy_chosen_log_sum_sq, logps.chosen_lengths)
                            * wpo_weights(logps.policy_rejected_logps, logps.policy_rejected_log_sum_sq,
                                          logps.rejected_lengths))
        losses = None
        for loss, parameters, weight in self.terms:
            term = loss(**{name: tensors[name] for name in parameters})
            term = term * pair_weights if self.use_weighting else term
            term = weight * term if weight != 1.0 else term
            losses = term if losses is None else losses + term
        if self.sft_weight:
            losses = losses - self.sft_weight * logps.policy_chosen_logps / logps.chosen_lengths
        if self.router_aux_coef:  # one value per batch: added to every pair's loss, so to their mean
            losses = losses + self.router_aux_coef * logps.policy_router_aux_loss
        if self.types[0] in MEAN_LOGP_REWARDS:
            chosen_rewards = self.beta * (logps.policy_chosen_logps / logps.chosen_lengths).detach()
            rejected_rewards = self.beta * (logps.policy_rejected_logps / logps.rejected_lengths).detach()
        else:
            chosen_rewards = self.beta * tensors["chosen_logratios"].detach()
            rejected_rewards = self.beta * tensors["rejected_logratios"].detach()
        return losses, chosen_rewards, rejected_rewards

