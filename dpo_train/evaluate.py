"""Held-out evaluation: preference metrics over a loader, greedy exact-answer accuracy, and
`dpo-train eval` (a trained model against its reference on preference pairs)."""

from __future__ import annotations

import re
from functools import partial

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import DataLoader

from . import attention
from .data import COLLATES, build_dataset
from .logps import policy_and_reference_logps
from .objective import Objective
from .metrics import add, means, pair_metrics
from .models import ModelError, freeze, load_model, load_tokenizer

# (label, metric key) of the printed comparison; a key no model has is left out
TABLE_ROWS = (("reward accuracy (margin > 0)", "rewards/accuracies"), ("mean reward margin", "rewards/margins"),
              ("log-prob accuracy (chosen > rejected)", "logps_accuracy"), ("loss", "loss"),
              ("exact-answer accuracy (greedy)", "exact_answer_accuracy"))


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
        logps = policy_and_reference_logps(policy, reference, batch, loss_fn.extras)
        losses, chosen_rewards, rejected_rewards = loss_fn(logps)
        batch_sums = pair_metrics(losses, chosen_rewards, rejected_rewards, logps.policy_chosen_logps,
                                  logps.policy_rejected_logps)
        batch_sums["logps_accuracy"] = (logps.policy_chosen_logps > logps.policy_rejected_logps).float().sum()
        sums = add(sums, batch_sums)
    policy.train(was_training)
    return means(accelerator.reduce(sums, reduction="sum"), prefix)


def normalize(text: str) -> str:
    """Compare answers without case, surrounding blanks or trailing punctuation."""
    return re.sub(r"[\s.!?,;:]+$", "", text.strip()).strip().lower()


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, batch_size: int = 16,
             synced: bool = False) -> list[str]:
    """Greedy completions for already-tokenized prompts, decoded without special tokens. `synced`
    keeps every process stepping until all are done (sharded weights gather inside each forward)."""
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
                                   eos_token_id=tokenizer.eos_token_id, synced_gpus=synced)
        outputs += tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
    model.train(was_training)
    return outputs


def generate_on_every_process(accelerator, model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int,
                              synced: bool) -> list[str]:
    """Greedy completions of all prompts, in order, on every process: each process generates its share
    (equal shares, the last one padded with repeats), in lock-step when `synced`."""
    with accelerator.split_between_processes(list(prompt_ids), apply_padding=True) as share:
        outputs = generate(accelerator.unwrap_model(model), tokenizer, share, max_new_tokens, synced=synced)
    return gather_object(outputs)[:len(prompt_ids)]


def exact_match(outputs: list[str], answers: list[str]) -> float:
    return sum(normalize(o) == normalize(a) for o, a in zip(outputs, answers)) / len(answers)


def metrics_table(results: dict[str, dict]) -> list[str]:
    """One line per metric, one column per model, in the order of `results`."""
    lines = [f"{'metric':40s}" + "".join(f"{name:>12s}" for name in results)]
    for label, key in TABLE_ROWS:
        if all(key in metrics for metrics in results.values()):
            lines.append(f"{label:40s}" + "".join(f"{metrics[key]:12.3f}" for metrics in results.values()))
    return lines


def evaluate_models(model_path: str, ref_path: str, data: str, split: str = "test", beta: float = 0.1,
                    max_length: int = 512, max_prompt_length: int = 256, batch_size: int = 4,
                    max_new_tokens: int = 32, num_examples: int = 3, dtype: str = "float32") -> dict:
    """`dpo-train eval`: preference metrics of a model against a frozen reference on the pairs in
    `data` (rewards are beta * (log model - log ref), so the reference column is its own baseline:
    loss ln 2, margin 0), and greedy generations of both. Rows with an `answer` are all generated
    for exact-answer accuracy; the first `num_examples` are returned as examples.
    The tokenizer is the model's. Returns a JSON-ready dict."""
    accelerator = Accelerator()
    model, reference = freeze(load_model(model_path, dtype)), freeze(load_model(ref_path, dtype))
    tokenizer = load_tokenizer(model_path)
    for path, m in ((model_path, model), (ref_path, reference)):
        # Both score the same token ids; embedding tables may be padded beyond the tokenizer, not short of it.
        if m.get_input_embeddings().num_embeddings < len(tokenizer):
            raise ModelError(f"{path}: {m.get_input_embeddings().num_embeddings} token embeddings, fewer than the "
                             f"{len(tokenizer)} tokens of {model_path}'s tokenizer; model and reference must share it")
    pairs, rows, stats = build_dataset(data, split, tokenizer, max_length, max_prompt_length)
    layout, _ = attention.usable_layout("packed", [model.config, reference.config])  # as in training
    loader = accelerator.prepare(DataLoader(pairs, batch_size=batch_size,
                                            collate_fn=partial(COLLATES[layout], pad_token_id=tokenizer.pad_token_id)))
    models = {"reference": reference.to(accelerator.device), "model": model.to(accelerator.device)}
    loss_fn = Objective("sigmoid", beta=beta)
    metrics = {name: preference_metrics(accelerator, m, reference, loader, loss_fn) for name, m in models.items()}
    has_answers = "answer" in rows.column_names
    count = (len(rows) if has_answers else min(num_examples, len(rows))) if max_new_tokens else 0
    outputs = {name: generate(m, tokenizer, pairs["prompt_ids"][:count], max_new_tokens) for name, m in models.items()}
    if has_answers and count:
        for name in models:
            metrics[name]["exact_answer_accuracy"] = exact_match(outputs[name], rows["answer"])
    examples = [{"prompt": rows[i]["prompt"], **({"answer": rows[i]["answer"]} if has_answers else {}),
                 **{name: outputs[name][i] for name in models}} for i in range(min(num_examples, count))]
    return {"model": model_path, "reference": ref_path, "data": data, "pairs": len(pairs), "data_stats": str(stats),
            "beta": beta, "max_new_tokens": max_new_tokens, "metrics": metrics, "examples": examples}


def format_report(result: dict) -> str:
    """The metrics table and the example generations, for a terminal."""
    def one_line(value, width: int = 100) -> str:
        text = value[-1]["content"] if isinstance(value, list) else str(value)  # a conversation: its last turn
        text = text.replace("\n", "\\n")
        return text if len(text) <= width else "..." + text[-width:]  # a prompt's end matters most

    lines = [f"{result['model']} against the reference {result['reference']}, beta {result['beta']}",
             f"{result['data']}: {result['data_stats']}", "", *metrics_table(result["metrics"])]
    if result["examples"]:
        lines += ["", f"Greedy generations (first {len(result['examples'])} prompts, "
                      f"at most {result['max_new_tokens']} new tokens):"]
    for i, example in enumerate(result["examples"]):
        for j, (key, value) in enumerate(example.items()):
            lines.append(f"{f'[{i}]' if j == 0 else '':4s} {key + ':':10s} {one_line(value)}")
    return "\n".join(lines)


def final_evaluation(accelerator, policy, reference, eval_loader, loss_fn, tokenizer, eval_set, eval_rows,
                     max_new_tokens: int, synced: bool = False) -> dict:
    """Held-out metrics for the trained policy and, when there is one, the reference; plus greedy
    exact-answer accuracy when the eval rows carry an `answer`. Prints a side-by-side table."""
    models = {"policy": policy} if reference is None else {"reference": reference, "policy": policy}
    results = {name: preference_metrics(accelerator, model, reference, eval_loader, loss_fn)
               for name, model in models.items()}
    if "answer" in eval_rows.column_names and max_new_tokens:
        for name, model in models.items():
            outputs = generate_on_every_process(accelerator, model, tokenizer, eval_set["prompt_ids"], max_new_tokens,
                                                synced)
            results[name]["exact_answer_accuracy"] = exact_match(outputs, eval_rows["answer"])
            results[name]["examples"] = [{"prompt": p, "answer": a, "output": o} for p, a, o in
                                         zip(eval_rows["prompt"][:5], eval_rows["answer"][:5], outputs[:5])]
    accelerator.print("\n".join([f"Held-out evaluation on {len(eval_set)} pairs", *metrics_table(results)]))
    return results
