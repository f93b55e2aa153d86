"""Every loss against its paper's formula, worked in plain Python floats (math, not torch); the
objective's composition (weights, f-divergences, LD-DPO, WPO) likewise; and the seed's own call."""

import math

import pytest
import torch

from dpo_train.logps import PairLogps
from dpo_train.losses import LOSSES, REFERENCE_FREE, dpo_loss
from dpo_train.objective import Objective


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def by_hand(pc, pr, rc, rr, beta):
    """-log sigmoid(beta * ((pc - pr) - (rc - rr))) in plain Python floats."""
    return -log_sigmoid(beta * ((pc - pr) - (rc - rr)))


# Three pairs: policy and reference log-prob sums, and completion lengths
PC, PR, RC, RR = [-1.0, -4.5, -3.0], [-2.0, -3.5, -9.0], [-1.5, -4.0, -2.0], [-1.0, -4.0, -8.0]
LC, LR = [2, 3, 1], [1, 2, 4]
ROWS = list(zip(PC, PR, RC, RR, LC, LR))
# Log-ratio margins h = (pc - rc) - (pr - rr): row 0: 0.5 + 1 = 1.5; row 1: -0.5 - 0.5 = -1.0; row 2: -1 + 1 = 0
H = [1.5, -1.0, 0.0]


def logps(**extras):
    t = lambda values: torch.tensor(values, dtype=torch.float32)
    return PairLogps(t(PC), t(PR), t(RC), t(RR), t(LC), t(LR), **{k: t(v) for k, v in extras.items()})


def losses_of(loss_type, **settings):
    losses, _, _ = Objective(loss_type, **settings)(logps())
    return losses.tolist()


def assert_close(got, expected, tol=1e-5):
    assert got == pytest.approx(expected, abs=tol, rel=tol), (got, expected)


# --- the seed ------------------------------------------------------------------------------------

def test_the_seeds_three_printed_losses_exactly():
    """../shared/seeds/000_3a96afd2ff4fcd68.txt: its call, its tensors, its printed numbers, to the bit."""
    policy_logp_pos = torch.tensor([-1.0, -0.2, -2.0, -0.5])
    policy_logp_neg = torch.tensor([-2.0, -1.5, -3.0, -1.0])
    ref_logp_pos = torch.tensor([-1.2, -0.5, -2.5, -0.7])
    ref_logp_neg = torch.tensor([-1.8, -1.3, -2.7, -0.9])
    loss1 = dpo_loss(policy_logp_pos, policy_logp_neg, beta=0.1, reference_free=True)[0].mean()
    loss2 = dpo_loss(policy_logp_pos, policy_logp_neg, ref_logp_pos, ref_logp_neg, beta=0.1, reference_free=False)[0].mean()
    ref_bad_pos = torch.tensor([-3.0, -2.5, -3.5, -2.0])
    ref_bad_neg = torch.tensor([-1.0, -0.9, -1.1, -0.8])
    loss3 = dpo_loss(policy_logp_pos, policy_logp_neg, ref_bad_pos, ref_bad_neg, beta=0.1, reference_free=False)[0].mean()
    assert float(loss1) == 0.6468777656555176
    assert float(loss2) == 0.6685033440589905
    assert float(loss3) == 0.5655654072761536


def test_dpo_loss_needs_the_reference_unless_reference_free():
    with pytest.raises(ValueError, match="reference_chosen_logps"):
        dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), beta=0.1)


def test_dpo_loss_matches_the_formula_worked_by_hand():
    losses, chosen_rewards, rejected_rewards = dpo_loss(*map(torch.tensor, (PC, PR, RC, RR)), beta=0.1)
    # Row 0: policy margin 1.0, reference margin -0.5, so z = 0.1 * 1.5 and loss = log(1 + e^-0.15) = 0.62096
    assert_close(losses.tolist(), [by_hand(*row, beta=0.1) for row in zip(PC, PR, RC, RR)], 1e-6)
    assert abs(losses[0].item() - 0.62095708) < 1e-6
    assert torch.allclose(chosen_rewards, 0.1 * (torch.tensor(PC) - torch.tensor(RC)))
    assert torch.allclose(rejected_rewards, 0.1 * (torch.tensor(PR) - torch.tensor(RR)))


def test_reference_free_ignores_the_reference():
    losses, chosen_rewards, _ = dpo_loss(torch.tensor(PC), torch.tensor(PR), beta=0.1, reference_free=True)
    assert_close(losses.tolist(), [by_hand(pc, pr, 0.0, 0.0, beta=0.1) for pc, pr in zip(PC, PR)], 1e-6)
    assert torch.allclose(chosen_rewards, 0.1 * torch.tensor(PC))
    other = dpo_loss(torch.tensor(PC), torch.tensor(PR), torch.tensor(RC) * 7, torch.tensor(RR), beta=0.1,
                     reference_free=True)[0]
    assert torch.equal(losses, other)


def test_policy_equal_to_reference_gives_ln2():
    values = torch.randn(5)
    losses, chosen_rewards, rejected_rewards = dpo_loss(values, values - 1, values, values - 1, beta=0.3)
    assert torch.allclose(losses, torch.full((5,), math.log(2)))
    assert torch.equal(chosen_rewards, torch.zeros(5)) and torch.equal(rejected_rewards, torch.zeros(5))


# --- each loss type, from its paper ------------------------------------------------------------------

def test_sigmoid_through_the_objective_is_dpo():
    assert_close(losses_of("sigmoid", beta=0.1), [by_hand(*row[:4], beta=0.1) for row in ROWS])


def test_ipo_squares_the_distance_of_the_per_token_margin_to_one_over_two_beta():
    # h per token: (pc - rc)/lc - (pr - rr)/lr. Row 0: 0.5/2 - (-1)/1 = 1.25; (1.25 - 5)^2 = 14.0625
    expected = [((pc - rc) / lc - (pr - rr) / lr - 1 / (2 * 0.1)) ** 2 for pc, pr, rc, rr, lc, lr in ROWS]
    assert expected[0] == 14.0625
    assert_close(losses_of("ipo", beta=0.1), expected)


def test_hinge_is_zero_once_the_margin_reaches_one_over_beta():
    # beta 1: max(0, 1 - h) = [0 (h = 1.5 > 1), 2, 1]; beta 0.1: [0.85, 1.1, 1.0]
    assert_close(losses_of("hinge", beta=1.0), [0.0, 2.0, 1.0])
    assert_close(losses_of("hinge", beta=0.1), [0.85, 1.1, 1.0])


def test_robust_matches_the_paper_and_reduces_to_dpo_without_noise():
    eps, beta = 0.1, 0.1
    got = losses_of("robust", beta=beta, label_smoothing=eps)
    # row 0, z = 0.15: (0.9 * log(1 + e^-0.15) - 0.1 * log(1 + e^0.15)) / 0.8 = (0.9 * 0.620957 - 0.1 * 0.770957) / 0.8
    assert abs(got[0] - 0.602207) < 1e-6
    assert_close(got, [((1 - eps) * -log_sigmoid(beta * h) + eps * log_sigmoid(-beta * h)) / (1 - 2 * eps) for h in H])
    assert abs(got[2] - math.log(2)) < 1e-6  # at h = 0 it is ln 2 for any eps
    assert_close(losses_of("robust", beta=beta, label_smoothing=0.0), losses_of("sigmoid", beta=beta))


def test_exo_pair_is_the_kl_from_the_smoothed_label():
    # EXO eq. 16, K = 2: p_f = (sigmoid(beta h), sigmoid(-beta h)), p_rh = (1 - eps, eps); KL(p_f || p_rh)
    eps, beta = 1e-3, 0.1
    def kl(h):
        q = [sigmoid(beta * h), sigmoid(-beta * h)]
        return sum(qi * (math.log(qi) - math.log(pi)) for qi, pi in zip(q, [1 - eps, eps]))
    # row 0: 0.537430 * (-0.620957 + 0.0010005) + 0.462570 * (-0.770957 + 6.907755) = 2.5055
    assert abs(kl(1.5) - 2.5055) < 1e-4
    assert_close(losses_of("exo_pair", beta=beta, label_smoothing=eps), [kl(h) for h in H])


def test_nca_bco_sppo_and_apo_read_each_side_on_its_own():
    beta = 0.1
    sides = [(beta * (pc - rc), beta * (pr - rr)) for pc, pr, rc, rr, _, _ in ROWS]  # rewards r_c, r_r
    # row 0: r_c = 0.05, r_r = -0.1
    nca = [-log_sigmoid(c) - 0.5 * log_sigmoid(-c) - 0.5 * log_sigmoid(-r) for c, r in sides]
    bco = [-log_sigmoid(c) - log_sigmoid(-r) for c, r in sides]
    # SPPO eq. 4.7 with P = 1 for the winner, 0 for the loser: (log-ratio_c - 1/(2 beta))^2 + (log-ratio_r + 1/(2 beta))^2
    sppo = [(c / beta - 0.5 / beta) ** 2 + (r / beta + 0.5 / beta) ** 2 for c, r in sides]
    assert abs(sppo[0] - ((0.5 - 5) ** 2 + (-1 + 5) ** 2)) < 1e-9  # 20.25 + 16
    apo_zero = [1 - sigmoid(c) + sigmoid(r) for c, r in sides]  # APO eq. 7
    apo_down = [sigmoid(c) + 1 - sigmoid(c - r) for c, r in sides]  # APO eq. 8
    for name, expected in (("nca_pair", nca), ("bco_pair", bco), ("sppo_hard", sppo), ("apo_zero", apo_zero),
                           ("apo_down", apo_down)):
        assert_close(losses_of(name, beta=beta), expected)


def test_aot_pairs_up_sorted_log_ratios():
    beta, eps = 0.1, 0.05
    smoothed = lambda d: -(1 - eps) * log_sigmoid(beta * d) - eps * log_sigmoid(-beta * d)
    # paired: policy log-ratios pc - pr = [1, -1, 6], reference rc - rr = [-0.5, 0, 6]; sorted: [-1, 1, 6], [-0.5, 0, 6]
    paired = [smoothed(d) for d in (-1 - -0.5, 1 - 0, 6 - 6)]
    # unpaired: chosen log-ratios pc - rc = [0.5, -0.5, -1], rejected pr - rr = [-1, 0.5, -1]; sorted differences
    unpaired = [smoothed(d) for d in (-1 - -1, -0.5 - -1, 0.5 - 0.5)]
    assert_close(losses_of("aot", beta=beta, label_smoothing=eps), paired)
    assert_close(losses_of("aot_unpaired", beta=beta, label_smoothing=eps), unpaired)


def test_discopop_blends_logistic_and_exponential_by_the_margin():
    beta, tau = 0.1, 0.05
    def discopop(h):  # DiscoPOP eq. 5: m = sigmoid(z / tau); (1 - m) * -log sigmoid(z) + m * exp(-z)
        z = beta * h
        m = sigmoid(z / tau)
        return (1 - m) * -log_sigmoid(z) + m * math.exp(-z)
    assert abs(discopop(0.0) - (0.5 * math.log(2) + 0.5)) < 1e-12  # at h = 0 the halves of both
    assert_close(losses_of("discopop", beta=beta, discopop_tau=tau), [discopop(h) for h in H])


def test_sigmoid_norm_is_dpo_on_per_token_log_ratios():
    expected = [-log_sigmoid(0.1 * ((pc - rc) / lc - (pr - rr) / lr)) for pc, pr, rc, rr, lc, lr in ROWS]
    assert_close(losses_of("sigmoid_norm", beta=0.1), expected)


def test_sft_is_the_nll_per_token_over_all_chosen_tokens_of_the_batch():
    # -(-1 - 4.5 - 3) / (2 + 3 + 1) = 8.5 / 6, the same for every pair: not the mean of -pc/lc (= 1.5)
    assert_close(losses_of("sft"), [8.5 / 6] * 3)


def test_simpo_uses_length_normalised_log_probs_and_a_margin():
    # row 0: chosen -1 over 2 tokens, rejected -2 over 1: z = 2 * (-0.5 + 2) - 1 = 2, loss = log(1 + e^-2) = 0.126928
    losses, chosen_rewards, _ = Objective("simpo", beta=2.0, gamma=1.0)(logps())
    assert abs(losses[0].item() - 0.126928) < 1e-6
    assert_close(losses.tolist(), [-log_sigmoid(2.0 * (pc / lc - pr / lr) - 1.0) for pc, pr, _, _, lc, lr in ROWS])
    assert_close(chosen_rewards.tolist(), [2.0 * pc / lc for pc, lc in zip(PC, LC)])  # beta * mean log-prob


def test_orpo_is_the_nll_plus_lambda_times_the_odds_ratio_loss():
    lam = 0.1
    def log_odds(logp):  # odds(y) = P / (1 - P), P = exp(mean token log-prob)  (ORPO eq. 4)
        p = math.exp(logp)
        return math.log(p / (1 - p))
    nll = 8.5 / 6  # the batch's chosen tokens, as the sft term
    # L_SFT + lambda * L_OR, L_OR = -log sigmoid(log odds(y_c) - log odds(y_r))  (eq. 7)
    expected = [nll - lam * log_sigmoid(log_odds(pc / lc) - log_odds(pr / lr)) for pc, pr, _, _, lc, lr in ROWS]
    losses, chosen_rewards, _ = Objective("orpo", beta=lam)(logps())
    assert_close(losses.tolist(), expected)
    assert_close(chosen_rewards.tolist(), [lam * pc / lc for pc, lc in zip(PC, LC)])


def test_the_rpo_term_adds_each_pairs_chosen_nll_per_token():
    plain, with_sft = losses_of("sigmoid", beta=0.1), losses_of("sigmoid", beta=0.1, sft_weight=0.5)
    assert_close([b - a for a, b in zip(plain, with_sft)], [0.5 * -pc / lc for pc, lc in zip(PC, LC)])


# --- how the objective composes them -------------------------------------------------------------

def test_weighted_types_sum_their_terms():
    got = losses_of(["sigmoid", "bco_pair", "sft"], weights=[0.8, 0.2, 1.0], beta=0.1)
    expected = [0.8 * a + 0.2 * b + c for a, b, c in zip(losses_of("sigmoid", beta=0.1), losses_of("bco_pair", beta=0.1),
                                                         losses_of("sft"))]
    assert_close(got, expected)
    assert_close(losses_of(["sigmoid", "hinge"], beta=0.1), [a + b for a, b in zip(losses_of("sigmoid", beta=0.1),
                                                                                   losses_of("hinge", beta=0.1))])


@pytest.mark.parametrize("divergence, f_prime", [
    ("forward_kl", lambda u: 1 - math.exp(-u)),  # f'(t) = 1 - 1/t at t = e^u
    ("js_divergence", lambda u: math.log(2 * math.exp(u) / (1 + math.exp(u)))),  # log(2t / (1 + t))
    ("alpha_divergence", lambda u: (math.exp(-0.7 * u) - 1) / -0.7),  # (t^(a-1) - 1) / (a - 1), a = 0.3
])
def test_f_divergences_replace_each_log_ratio_by_f_prime(divergence, f_prime):
    beta = 0.1
    expected = [-log_sigmoid(beta * (f_prime(pc - rc) - f_prime(pr - rr))) for pc, pr, rc, rr, _, _ in ROWS]
    assert_close(losses_of("sigmoid", beta=beta, f_divergence=divergence, f_alpha=0.3), expected)
    # alpha = 1 is reverse KL, DPO's own
    assert_close(losses_of("sigmoid", beta=beta, f_divergence="alpha_divergence", f_alpha=1.0),
                 losses_of("sigmoid", beta=beta))


def test_ld_alpha_weights_the_tokens_beyond_the_shorter_completion():
    # shared parts (the first min(lc, lr) tokens) of each sum; LD: log p = shared + alpha * (full - shared)
    shared = {"policy_chosen_shared_logps": [-0.4, -2.0, -3.0], "policy_rejected_shared_logps": [-2.0, -3.0, -1.0],
              "reference_chosen_shared_logps": [-1.0, -3.0, -2.0], "reference_rejected_shared_logps": [-1.0, -3.0, -2.5]}
    alpha, beta = 0.5, 0.1
    ld = lambda full, part: part + alpha * (full - part)
    expected = []
    for i, (pc, pr, rc, rr, _, _) in enumerate(ROWS):
        parts = [shared[k][i] for k in shared]
        expected.append(by_hand(ld(pc, parts[0]), ld(pr, parts[1]), ld(rc, parts[2]), ld(rr, parts[3]), beta))
    objective = Objective("sigmoid", beta=beta, ld_alpha=alpha)
    assert objective.extras == {"shared_logps"}
    losses, chosen_rewards, _ = objective(logps(**shared))
    assert_close(losses.tolist(), expected)
    # row 0: beta * (ld(-1, -0.4) - ld(-1.5, -1)) = 0.1 * (-0.7 + 1.25)
    assert abs(chosen_rewards[0].item() - 0.055) < 1e-6
    # alpha = 1 counts every token: plain DPO
    assert_close(Objective("sigmoid", beta=beta, ld_alpha=1.0)(logps(**shared))[0].tolist(),
                 losses_of("sigmoid", beta=beta))


def test_wpo_weighs_each_pair_by_both_completions_probability():
    # w = exp((log p(y) - sum_t log sum_v p(v)^2) / |y|), per side; the pair's loss times w_c * w_r, no gradient
    sum_sq = {"policy_chosen_log_sum_sq": [-0.2, -3.0, -1.0], "policy_rejected_log_sum_sq": [-1.5, -1.0, -2.0]}
    weights = [math.exp((pc - sc) / lc) * math.exp((pr - sr) / lr)
               for pc, pr, lc, lr, sc, sr in zip(PC, PR, LC, LR, *sum_sq.values())]
    # row 0: exp((-1 + 0.2) / 2) * exp((-2 + 1.5) / 1) = e^-0.4 * e^-0.5 = e^-0.9
    assert abs(weights[0] - math.exp(-0.9)) < 1e-12
    objective = Objective(["sigmoid", "sft"], beta=0.1, use_weighting=True)
    assert objective.extras == {"log_sum_sq"}
    pair_logps = logps(**sum_sq)
    pair_logps.policy_chosen_logps.requires_grad_(True)
    losses = objective(pair_logps)[0]
    plain = [a + b for a, b in zip(losses_of("sigmoid", beta=0.1), losses_of("sft"))]
    assert_close(losses.tolist(), [w * p for w, p in zip(weights, plain)])
    # the weights carry no gradient: d/dpc of w0 * (sigmoid + sft) is w0 * the plain term's derivative
    losses[0].backward()
    z = 0.1 * H[0]
    assert_close(pair_logps.policy_chosen_logps.grad[0].item(), weights[0] * (-0.1 * sigmoid(-z) - 1 / 6))


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_every_loss_prefers_the_chosen_completion(loss_type):
    """Raising the chosen log-prob and lowering the rejected one, together, lowers every loss (APO-down
    lowers both, the rejected more)."""
    # h = 0.5 (DiscoPOP is not monotonic around h = 0: it pushes a margin of 0 down)
    pc, pr = torch.tensor([-2.0], requires_grad=True), torch.tensor([-2.5], requires_grad=True)
    settings = {"label_smoothing": 0.1} if loss_type in ("robust", "exo_pair") else {}
    pair_logps = PairLogps(pc, pr, torch.tensor([-2.0]), torch.tensor([-2.0]), torch.tensor([4.0]), torch.tensor([4.0]))
    Objective(loss_type, beta=0.5, discopop_tau=0.05, **settings)(pair_logps)[0].sum().backward()
    grad = lambda x: 0.0 if x.grad is None else x.grad.item()
    assert grad(pc) - grad(pr) < 0


def test_reference_free_types_need_no_reference_model():
    assert REFERENCE_FREE == {"simpo", "orpo", "sft"}
    assert not Objective("orpo").needs_reference and not Objective(["simpo", "sft"]).needs_reference
    assert Objective(["sigmoid", "sft"]).needs_reference and not Objective("sigmoid", reference_free=True).needs_reference
    assert Objective("sigmoid").extras == frozenset()  # the default path asks logps for nothing more
