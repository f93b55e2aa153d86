"""Preference losses: pure functions, one per objective, chosen by name from a table (LOSSES).

A loss names the per-pair tensors it reads by its parameters, all (B,); the objective
(objective.py) supplies them, and its hyperparameters, and returns per-pair losses (B,):

    policy_chosen_logps, policy_rejected_logps  log pi(y|x), summed over the completion's tokens
    chosen_lengths, rejected_lengths            completion token counts
    chosen_logratios, rejected_logratios        log pi(y|x) - log ref(y|x), each side (LD-DPO-weighted)
    policy_logratios, reference_logratios       log pi(y_c|x) - log pi(y_r|x), and the same under ref
    chosen_scores, rejected_scores              f'(pi/ref) of loss.f_divergence; the log-ratios under
                                                reverse KL (DPO's), the default
    margins                                     chosen_scores - rejected_scores: DPO's h

The math is TRL 1.16's DPOTrainer's, term by term (trl/trainer/dpo_trainer.py, `_compute_loss`),
plus SimPO and ORPO, which TRL keeps in trainers of their own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             reference_chosen_logps: torch.Tensor | None = None, reference_rejected_logps: torch.Tensor | None = None,
             beta: float = 0.1, reference_free: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023, eq. 7) on its own: -log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r))).

    All (B,) -> (losses, chosen_rewards, rejected_rewards), each (B,); rewards are beta * (pi - ref),
    detached. With `reference_free` the reference log-ratio is 0 (a uniform reference) and the
    reference log-probs may be left out; without it they are required.
    """
    if not reference_free and (reference_chosen_logps is None or reference_rejected_logps is None):
        raise ValueError("dpo_loss: reference_chosen_logps and reference_rejected_logps are required unless "
                         "reference_free=True")
    if reference_free:
        reference_chosen_logps = reference_rejected_logps = torch.zeros_like(policy_chosen_logps)
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = 0 if reference_free else reference_chosen_logps - reference_rejected_logps
    losses = sigmoid(pi_logratios - ref_logratios, beta)
    return (losses, beta * (policy_chosen_logps - reference_chosen_logps).detach(),
            beta * (policy_rejected_logps - reference_rejected_logps).detach())


def sigmoid(margins, beta: float):
    """DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta h)."""
    return -F.logsigmoid(beta * margins)


def hinge(margins, beta: float):
    """SLiC hinge (Zhao et al. 2023; its DPO form in Liu et al. 2024, RSO): max(0, 1 - beta h).
    Pairs already separated by 1/beta stop contributing."""
    return torch.relu(1 - beta * margins)


def ipo(chosen_scores, rejected_scores, chosen_lengths, rejected_lengths, beta: float):
    """IPO (Azar et al. 2023, eq. 17): (h - 1/(2 beta))^2 with h from per-token mean log-ratios,
    h = s_c / |y_c| - s_r / |y_r|: the form the IPO authors confirmed to TRL is behind the paper's
    results. A squared loss pulls the margin to a finite target instead of pushing it to infinity."""
    return (chosen_scores / chosen_lengths - rejected_scores / rejected_lengths - 1 / (2 * beta)) ** 2


def exo_pair(margins, beta: float, label_smoothing: float):
    """EXO (Ji et al. 2024, eq. 16, K = 2): KL(p_f || p_rh) between the policy's preference
    p_f = sigmoid(+-beta h) and the smoothed label p_rh = (1 - eps, eps), eps = label_smoothing > 0."""
    eps = torch.tensor(label_smoothing, device=margins.device)
    return (torch.sigmoid(beta * margins) * (F.logsigmoid(beta * margins) - torch.log1p(-eps))
            + torch.sigmoid(-beta * margins) * (F.logsigmoid(-beta * margins) - torch.log(eps)))


def nca_pair(chosen_logratios, rejected_logratios, beta: float):
    """NCA (Chen et al. 2024), pairwise, with rewards r = beta * log-ratio:
    -log sigmoid(r_c) - 1/2 log sigmoid(-r_c) - 1/2 log sigmoid(-r_r). Pushes the chosen reward up
    in absolute terms, not only relative to the rejected one."""
    chosen, rejected = beta * chosen_logratios, beta * rejected_logratios
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def robust(margins, beta: float, label_smoothing: float):
    """Robust DPO (Chowdhury et al. 2024, eq. 8) for labels flipped with probability eps:
    ((1 - eps) * -log sigmoid(beta h) - eps * -log sigmoid(-beta h)) / (1 - 2 eps), an unbiased
    estimate of the clean-label DPO loss; eps = label_smoothing in [0, 0.5), and eps = 0 is DPO."""
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(beta * margins) + eps * F.logsigmoid(-beta * margins)) / (1 - 2 * eps)


def bco_pair(chosen_logratios, rejected_logratios, beta: float):
    """BCO on pairs (Jung et al. 2024), as TRL 1.16 computes it: -log sigmoid(r_c) - log sigmoid(-r_r),
    r = beta * log-ratio. (The paper shifts rewards by a running mean delta; TRL 1.16 does not.)"""
    return -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)


def sppo_hard(chosen_logratios, rejected_logratios, beta: float):
    """SPPO (Wu et al. 2024, eq. 4.7) with hard probabilities (1 for the winner, 0 for the loser):
    (log-ratio_c - 1/(2 beta))^2 + (log-ratio_r + 1/(2 beta))^2."""
    return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2


def smoothed_sigmoid(delta, beta: float, label_smoothing: float):
    """-(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d): the DPO loss with labels smoothed by eps."""
    return -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing


def aot(policy_logratios, reference_logratios, beta: float, label_smoothing: float):
    """AOT (Melnyk et al. 2024), paired: the policy's and the reference's log-ratios (pi_c - pi_r)
    are each sorted over the batch, and the DPO loss (labels smoothed by label_smoothing) is taken
    on their sorted differences: distributional dominance of chosen over rejected."""
    delta = torch.sort(policy_logratios, dim=0)[0] - torch.sort(reference_logratios, dim=0)[0]
    return smoothed_sigmoid(delta, beta, label_smoothing)


def aot_unpaired(chosen_logratios, rejected_logratios, beta: float, label_smoothing: float):
    """AOT (Melnyk et al. 2024), unpaired: the chosen and the rejected log-ratios (pi - ref) are
    each sorted over the batch, and the DPO loss is taken on their sorted differences."""
    delta = torch.sort(chosen_logratios, dim=0)[0] - torch.sort(rejected_logratios, dim=0)[0]
    return smoothed_sigmoid(delta, beta, label_smoothing)


def apo_zero(chosen_logratios, rejected_logratios, beta: float):
    """APO-zero (D'Oosterlinck et al. 2024, eq. 7): 1 - sigmoid(r_c) + sigmoid(r_r), r = beta *
    log-ratio. For chosen answers better than the model's own: raise chosen, lower rejected."""
    return 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)


def apo_down(chosen_logratios, rejected_logratios, beta: float):
    """APO-down (D'Oosterlinck et al. 2024, eq. 8): sigmoid(r_c) + 1 - sigmoid(r_c - r_r). For chosen
    answers worse than the model's own: lower both, the rejected one more."""
    return (torch.sigmoid(beta * chosen_logratios)
            + 1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios)))


def discopop(margins, beta: float, discopop_tau: float):
    """DiscoPOP (Chris Lu et al. 2024, eq. 5), log-ratio modulated: with z = beta h and
    m = sigmoid(z / tau), (1 - m) * -log sigmoid(z) + m * exp(-z)."""
    logits = beta * margins
    modulation = torch.sigmoid(logits / discopop_tau)
    return -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation


def sigmoid_norm(chosen_scores, rejected_scores, chosen_lengths, rejected_lengths, beta: float):
    """DPO on per-token mean log-ratios: -log sigmoid(beta (s_c / |y_c| - s_r / |y_r|))."""
    return -F.logsigmoid(beta * (chosen_scores / chosen_lengths - rejected_scores / rejected_lengths))


def sft(policy_chosen_logps, chosen_lengths):
    """The NLL per token over all chosen tokens of the batch, -sum(log pi(y_c)) / sum(|y_c|), as TRL
    computes it (one scalar, not a mean of per-pair means), given to every pair: their mean is it."""
    return (-policy_chosen_logps.sum() / chosen_lengths.sum()).expand(policy_chosen_logps.shape[0])


def simpo(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, beta: float, gamma: float):
    """SimPO (Meng et al. 2024, eq. 6): -log sigmoid(beta * (pi_c / |y_c| - pi_r / |y_r|) - gamma),
    reference-free: per-token mean log-probs are the reward and gamma is the target reward margin."""
    return -F.logsigmoid(beta * (policy_chosen_logps / chosen_lengths - policy_rejected_logps / rejected_lengths)
                         - gamma)


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, without cancellation (Maechler 2012: the branch at -ln 2)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, beta: float):
    """ORPO (Hong et al. 2024), reference-free: L_SFT + lambda * L_OR, lambda = beta.

    L_OR = -log sigmoid(log odds(y_c) - log odds(y_r)) (eq. 7), odds(y) = P(y) / (1 - P(y)) with
    log P(y) the per-token mean log-prob (eq. 4). The NLL is the sft term: the chosen completions'
    tokens of the batch averaged together, as TRL's ORPOTrainer averages them (it also counts the
    prompt's tokens; the paper's L_SFT and this function count the completion's only).
    """
    chosen, rejected = policy_chosen_logps / chosen_lengths, policy_rejected_logps / rejected_lengths
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    return sft(policy_chosen_logps, chosen_lengths) - beta * F.logsigmoid(log_odds)


LOSSES = {f.__name__: f for f in (sigmoid, hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot,
                                  aot_unpaired, apo_zero, apo_down, discopop, sigmoid_norm, sft, simpo, orpo)}
REFERENCE_FREE = {"simpo", "orpo", "sft"}  # read no reference log-probs: alone, they load no reference model
# Their rewards are beta * per-token mean log-probs (SimPO's reward; TRL's ORPOTrainer logs the same).
MEAN_LOGP_REWARDS = {"simpo", "orpo"}
