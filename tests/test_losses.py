import math

import pytest
import torch

from dpo_train.losses import LOSSES, dpo_loss, hinge_loss, ipo_loss, objective, robust_loss


def by_hand(pc, pr, rc, rr, beta):
    """-log sigmoid(beta * ((pc - pr) - (rc - rr))) in plain Python floats."""
    z = beta * ((pc - pr) - (rc - rr))
    return math.log1p(math.exp(-z))


PC, PR, RC, RR = [-1.0, -4.5, -3.0], [-2.0, -3.5, -9.0], [-1.5, -4.0, -2.0], [-1.0, -4.0, -8.0]


def test_dpo_loss_matches_the_formula_worked_by_hand():
    losses, chosen_rewards, rejected_rewards = dpo_loss(*map(torch.tensor, (PC, PR, RC, RR)), beta=0.1)
    # Row 0: policy margin 1.0, reference margin -0.5, so z = 0.1 * 1.5 and loss = log(1 + e^-0.15) = log(1.8607) = 0.62096
    expected = [by_hand(*row, beta=0.1) for row in zip(PC, PR, RC, RR)]
    assert torch.allclose(losses, torch.tensor(expected), atol=1e-6)
    assert abs(losses[0].item() - 0.62095708) < 1e-6
    assert torch.allclose(chosen_rewards, 0.1 * (torch.tensor(PC) - torch.tensor(RC)))
    assert torch.allclose(rejected_rewards, 0.1 * (torch.tensor(PR) - torch.tensor(RR)))


def test_reference_free_ignores_the_reference():
    tensors = list(map(torch.tensor, (PC, PR, RC, RR)))
    losses, _, _ = dpo_loss(*tensors, beta=0.1, reference_free=True)
    expected = [by_hand(pc, pr, 0.0, 0.0, beta=0.1) for pc, pr in zip(PC, PR)]
    assert torch.allclose(losses, torch.tensor(expected), atol=1e-6)
    other_reference = dpo_loss(tensors[0], tensors[1], tensors[2] * 7, tensors[3] - 3, beta=0.1, reference_free=True)[0]
    assert torch.equal(losses, other_reference)


def test_policy_equal_to_reference_gives_ln2():
    logps = torch.randn(5)
    losses, chosen_rewards, rejected_rewards = dpo_loss(logps, logps - 1, logps, logps - 1, beta=0.3)
    assert torch.allclose(losses, torch.full((5,), math.log(2)))
    assert torch.equal(chosen_rewards, torch.zeros(5)) and torch.equal(rejected_rewards, torch.zeros(5))


def test_gradient_pushes_chosen_up_and_rejected_down():
    pc, pr = torch.tensor([-2.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    losses, _, _ = dpo_loss(pc, pr, torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5)
    losses.sum().backward()
    # d/dpc of -log sigmoid(beta * (pc - pr)) at 0 is -beta * sigmoid(0) = -0.25
    assert torch.allclose(pc.grad, torch.tensor([-0.25])) and torch.allclose(pr.grad, torch.tensor([0.25]))


# The same three rows for every variant. Log-ratio margins h = (pc - pr) - (rc - rr):
# row 0: (-1 + 2) - (-1.5 + 1) = 1.5;  row 1: (-4.5 + 3.5) - (-4 + 4) = -1.0;  row 2: (-3 + 9) - (-2 + 8) = 0.
H = [1.5, -1.0, 0.0]
TENSORS = lambda: list(map(torch.tensor, (PC, PR, RC, RR)))


def test_ipo_is_the_squared_distance_to_one_over_two_beta():
    # beta 0.1: target 1 / (2 * 0.1) = 5; (1.5 - 5)^2 = 12.25, (-1 - 5)^2 = 36, (0 - 5)^2 = 25
    losses, chosen_rewards, _ = ipo_loss(*TENSORS(), beta=0.1)
    assert torch.allclose(losses, torch.tensor([12.25, 36.0, 25.0]))
    assert torch.allclose(chosen_rewards, 0.1 * (torch.tensor(PC) - torch.tensor(RC)))


def test_hinge_is_zero_once_the_margin_reaches_one_over_beta():
    # beta 1: max(0, 1 - h) = [0 (h = 1.5 > 1), 2, 1]; beta 0.1: [0.85, 1.1, 1.0]
    assert torch.allclose(hinge_loss(*TENSORS(), beta=1.0)[0], torch.tensor([0.0, 2.0, 1.0]))
    assert torch.allclose(hinge_loss(*TENSORS(), beta=0.1)[0], torch.tensor([0.85, 1.1, 1.0]))


def test_robust_matches_the_paper_and_reduces_to_dpo_without_noise():
    eps, beta = 0.1, 0.1
    losses, _, _ = robust_loss(*TENSORS(), beta=beta, label_smoothing=eps)
    # row 0, z = 0.15: ((0.9 * log(1 + e^-0.15)) - 0.1 * log(1 + e^0.15)) / 0.8
    #                = (0.9 * 0.620957 - 0.1 * 0.770957) / 0.8 = 0.602207
    assert abs(losses[0].item() - 0.602207) < 1e-6
    expected = [((1 - eps) * math.log1p(math.exp(-beta * h)) - eps * math.log1p(math.exp(beta * h))) / (1 - 2 * eps)
                for h in H]
    assert torch.allclose(losses, torch.tensor(expected), atol=1e-6)
    assert abs(losses[2].item() - math.log(2)) < 1e-6  # at h = 0 it is ln 2 for any eps
    assert torch.allclose(robust_loss(*TENSORS(), beta=beta, label_smoothing=0.0)[0], dpo_loss(*TENSORS(), beta=beta)[0])


def test_simpo_uses_length_normalised_log_probs_and_a_margin():
    # chosen: -6 over 3 tokens = -2 per token; rejected: -10 over 2 tokens = -5 per token.
    # beta 2, gamma 1: z = 2 * (-2 + 5) - 1 = 5, loss = log(1 + e^-5) = 0.0067153
    pc, pr, zeros = torch.tensor([-6.0]), torch.tensor([-10.0]), torch.zeros(1)
    fn = objective("simpo", beta=2.0, gamma=1.0)
    losses, chosen_rewards, rejected_rewards = fn(pc, pr, zeros, zeros, torch.tensor([3]), torch.tensor([2]))
    assert abs(losses.item() - 0.0067153) < 1e-6
    assert chosen_rewards.item() == -4.0 and rejected_rewards.item() == -10.0  # beta * mean log-prob
    # the reference never enters
    assert torch.equal(fn(pc, pr, torch.tensor([-3.0]), torch.tensor([9.0]), torch.tensor([3]), torch.tensor([2]))[0], losses)


def test_sft_weight_adds_the_chosen_per_token_nll():
    # chosen -6 over 3 tokens: NLL per token 2; weight 0.5 adds 1.0 to the DPO loss
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-6.0, -10.0, -5.0, -9.0))
    lengths = torch.tensor([3]), torch.tensor([2])
    plain = objective("sigmoid", beta=0.1)(pc, pr, rc, rr, *lengths)[0]
    with_sft = objective("sigmoid", beta=0.1, sft_weight=0.5)(pc, pr, rc, rr, *lengths)[0]
    assert abs(with_sft.item() - plain.item() - 1.0) < 1e-6
    assert abs(plain.item() - by_hand(-6.0, -10.0, -5.0, -9.0, 0.1)) < 1e-6


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_every_loss_pushes_chosen_up_and_rejected_down(loss_type):
    pc, pr = torch.tensor([-2.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    fn = objective(loss_type, beta=0.5, label_smoothing=0.1 if loss_type == "robust" else 0.0)
    losses, _, _ = fn(pc, pr, torch.tensor([-2.0]), torch.tensor([-2.0]), torch.tensor([4]), torch.tensor([4]))
    losses.sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()
