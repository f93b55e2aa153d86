import torch

from conftest import make_model, make_tokenizer
from dpo_train.data import collate, tokenize_pair
from dpo_train.logps import concatenated_forward, sequence_logps


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
