import math

import torch

from dpo_train.losses import dpo_loss


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
