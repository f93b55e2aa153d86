"""Held-out evaluation: preference metrics over a loader, and greedy exact-answer accuracy."""

from __future__ import annotations

import re

import torch

from .logps import policy_and_reference_logps
from .metrics import add, means, pair_metrics


@torch.no_grad()
def preference_metrics(accelerator, policy, reference, loader, loss_fn, prefix: str = "") -> dict[str, float]:
    """Mean loss, rewards and accuracies over every pair of `loader`, across processes.

    Also `logps_accuracy`: how often the policy alone gives the chosen answer the higher
    log-prob; unlike the reward accuracy it is meaningful for the reference model too.
    """
    was_training = policy.training
    policy.eval()
    sums = None
    for batch in loader:
        logps = policy_and_reference_logps(policy, reference, batch)
        losses, chosen_rewards, rejected_rewards = loss_fn(*logps)
        batch_sums = pair_metrics(losses, chosen_rewards, rejected_rewards, logps[0], logps[1])
        batch_sums["logps_accuracy"] = (logps[0] > logps[1]).float().sum()
        sums = add(sums, batch_sums)
    policy.train(was_training)
    return means(accelerator.reduce(sums, reduction="sum"), prefix)


def normalize(text: str) -> str:
    """Compare answers without case, surrounding blanks or trailing punctuation."""
    return re.sub(r"[\s.!?,;:]+$", "", text.strip()).strip().lower()


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy completions for already-tokenized prompts, decoded without special tokens."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outputs = []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start:start + batch_size]
        width = max(map(len, chunk))
        # left-pad so that every prompt ends where generation starts
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in chunk], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                   max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id)
        outputs += tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
    model.train(was_training)
    return outputs


def exact_match(outputs: list[str], answers: list[str]) -> float:
    return sum(normalize(o) == normalize(a) for o, a in zip(outputs, answers)) / len(answers)
