import math

import pytest
import torch

from conftest import make_model, make_tokenizer
from dpo_train.collate import COLLATES, collate
from dpo_train.data import tokenize_pair
from dpo_train.logps import EXTRAS, concatenated_forward, forward_sums, policy_and_reference_logps, sequence_logps

TOKEN_EXTRAS = EXTRAS - {"router_aux"}  # the per-token ones; an MoE model's router loss: tests/test_router.py


def naive_logps(logits, labels):
    """Per example, per position: log_softmax then pick the next token, skipping -100 labels."""
    out = []
    for row_logits, row_labels in zip(logits, labels):
        total = 0.0
        for t in range(len(row_labels) - 1):
            if row_labels[t + 1] != -100:
                total += torch.log_softmax(row_logits[t].double(), -1)[row_labels[t + 1]].item()
        out.append(total)
    return torch.tensor(out)


def test_sequence_logps_matches_a_naive_loop_with_padding():
    torch.manual_seed(0)
    logits = torch.randn(4, 7, 11) * 3
    labels = torch.tensor([[-100, -100, 3, 4, 5, -100, -100],   # prompt 2, completion 3, pad 2
                           [-100, 1, 2, 3, 4, 5, 6],
                           [-100, -100, -100, -100, -100, 9, -100],
                           [-100, -100, -100, 10, 0, -100, -100]])
    assert torch.allclose(sequence_logps(logits, labels), naive_logps(logits, labels).float(), atol=1e-5)


def test_concatenated_forward_matches_one_unpadded_forward_per_sequence():
    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer)).eval()
    rows = [{"prompt": "1+2=", "chosen": "3", "rejected": "four"},
            {"prompt": "a longer prompt here", "chosen": "a much longer chosen answer", "rejected": "no"}]
    pairs = [tokenize_pair(r, tokenizer, 128, 64) for r in rows]
    batch = collate(pairs, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        chosen, rejected = concatenated_forward(model, batch)
        for i, pair in enumerate(pairs):
            for side, got in (("chosen_ids", chosen[i]), ("rejected_ids", rejected[i])):
                input_ids = torch.tensor([pair["prompt_ids"] + pair[side]])
                labels = torch.tensor([[-100] * len(pair["prompt_ids"]) + pair[side]])
                expected = naive_logps(model(input_ids).logits, labels)[0]
                # padding must not change the result; sums of ~100 nats sit at fp32 resolution, hence rtol
                assert torch.allclose(got, expected.float(), rtol=1e-6, atol=1e-5), (side, i)


@pytest.mark.parametrize("layout", ["packed", "rows", "padded"])
def test_extras_match_a_naive_loop_in_every_layout(layout):
    """shared_logps: each completion's first min(chosen, rejected length) tokens; log_sum_sq: log sum_v p(v)^2
    per token (no gradient), summed; the same in the three layouts and under autograd as without."""
    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer)).eval()
    rows = [{"prompt": "1+2=", "chosen": "3", "rejected": "four"},
            {"prompt": "a longer prompt here", "chosen": "a much longer chosen answer", "rejected": "no"}]
    pairs = [tokenize_pair(r, tokenizer, 128, 64) for r in rows]
    batch = COLLATES[layout](pairs, pad_token_id=tokenizer.pad_token_id)
    sums = forward_sums(model, batch, chunk_size=4, extras=TOKEN_EXTRAS)
    assert set(sums) == {"logps", "shared_logps", "log_sum_sq"}
    assert sums["logps"].requires_grad and not sums["log_sum_sq"].requires_grad
    expected = {"logps": [], "shared_logps": [], "log_sum_sq": []}
    with torch.no_grad():
        for side in ("chosen_ids", "rejected_ids"):
            for pair in pairs:
                shared = min(len(pair["chosen_ids"]), len(pair["rejected_ids"]))
                ids = pair["prompt_ids"] + pair[side]
                log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
                start = len(pair["prompt_ids"])
                token = [log_probs[t - 1, ids[t]].item() for t in range(start, len(ids))]
                # log sum_v p(v)^2 of the distribution that predicts each completion token
                sum_sq = [math.log((log_probs[t - 1].exp() ** 2).sum().item()) for t in range(start, len(ids))]
                expected["logps"].append(sum(token))
                expected["shared_logps"].append(sum(token[:shared]))
                expected["log_sum_sq"].append(sum(sum_sq))
    for key, values in expected.items():
        assert torch.allclose(sums[key].detach(), torch.tensor(values, dtype=torch.float32), atol=1e-4), key
    # the first pair's completions have 2 and 5 tokens: the rejected side's shared part is its first 2
    assert sums["shared_logps"][2].item() != sums["logps"][2].item()


def test_policy_and_reference_logps_gives_the_objective_what_it_asks_for():
    tokenizer = make_tokenizer()
    policy, reference = make_model(len(tokenizer), seed=0), make_model(len(tokenizer), seed=1)
    pairs = [tokenize_pair({"prompt": "1+2=", "chosen": "3", "rejected": "four"}, tokenizer, 128, 64)]
    batch = COLLATES["packed"](pairs, pad_token_id=tokenizer.pad_token_id)
    plain = policy_and_reference_logps(policy, reference, batch)
    assert plain.policy_chosen_shared_logps is None and plain.policy_chosen_log_sum_sq is None
    full = policy_and_reference_logps(policy, reference, batch, TOKEN_EXTRAS)
    assert torch.equal(full.policy_chosen_logps, plain.policy_chosen_logps)
    assert full.reference_chosen_shared_logps is not None and full.policy_rejected_log_sum_sq is not None
    assert not full.reference_chosen_logps.requires_grad
    free = policy_and_reference_logps(policy, None, batch, TOKEN_EXTRAS)  # no reference: zeros, shared parts too
    assert torch.equal(free.reference_rejected_shared_logps, torch.zeros(1))
