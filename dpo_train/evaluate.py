"""Held-out evaluation: preference metrics over a loader, greedy exact-answer accuracy, and
`dpo-train eval` (a trained model against its reference on preference pairs)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import DataLoader

from . import layouts, sequence, vision
from .progress import bar, say
from .config import ConfigError, LossConfig, ModelConfig, checker, load_config
from .collate import COLLATES
from .data import build_dataset
from .logps import policy_and_reference_logps
from .loss_settings import validate_loss
from .objective import Objective
from .metrics import add, means, pair_metrics
from .models import ModelError, freeze, load_model, load_tokenizer
from .rows import as_given

# (label, metric key) of the printed comparison; a key no model has is left out
TABLE_ROWS = (("reward accuracy (margin > 0)", "rewards/accuracies"), ("mean reward margin", "rewards/margins"),
              ("log-prob accuracy (chosen > rejected)", "logps_accuracy"), ("loss", "loss"),
              ("exact-answer accuracy (greedy)", "exact_answer_accuracy"))


@torch.no_grad()
def preference_metrics(accelerator, policy, reference, loader, loss_fn, prefix: str = "",
                       desc: str = "eval", stop=None) -> dict[str, float] | None:
    """Mean loss, rewards and accuracies over every pair of `loader`, across processes; a progress
    bar named `desc` on the main process. None when `stop()`, asked before each batch, says to stop.

    Also `logps_accuracy`: how often the policy alone gives the chosen answer the higher
    log-prob; unlike the reward accuracy it is meaningful for the reference model too.
    None when `stop()` (asked before each batch, the same answer on every process) says to stop.
    """
    was_training = policy.training
    policy.eval()
    sums = None
    for batch in bar(loader, desc, show=accelerator.is_main_process):
        if stop and stop():
            policy.train(was_training)
            return None
        logps = policy_and_reference_logps(policy, reference, batch, loss_fn.extras)
        losses, chosen_rewards, rejected_rewards = loss_fn(logps)
        batch_sums = pair_metrics(losses, chosen_rewards, rejected_rewards, logps.policy_chosen_logps,
                                  logps.policy_rejected_logps, logps.policy_router_aux_loss)
        batch_sums["logps_accuracy"] = (logps.policy_chosen_logps > logps.policy_rejected_logps).float().sum()
        sums = add(sums, sequence.counted_once(batch_sums))  # a sequence group's processes hold the same sums
    policy.train(was_training)
    return means(accelerator.reduce(sums, reduction="sum"), prefix)


def midrun_evaluation(accelerator, policy, reference, loader, loss_fn, step: int) -> dict[str, float]:
    """The held-out metrics after `step` updates, keys prefixed eval/, also printed as one line."""
    metrics = preference_metrics(accelerator, policy, reference, loader, loss_fn, "eval/", f"eval at step {step}")
    say(f"eval at step {step}: loss {metrics['eval/loss']:.4f}, reward accuracy {metrics['eval/rewards/accuracies']:.3f}, "
        f"reward margin {metrics['eval/rewards/margins']:.3f}", accelerator.is_main_process)
    return metrics


def normalize(text: str) -> str:
    """Compare answers without case, surrounding blanks or trailing punctuation."""
    return re.sub(r"[\s.!?,;:]+$", "", text.strip()).strip().lower()


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, batch_size: int = 16,
             synced: bool = False, desc: str = "generate", show: bool = True, stop=None, images: list | None = None,
             vision=None) -> list[str] | None:
    """Greedy completions for already-tokenized prompts, decoded without special tokens, a progress
    bar over the prompts where `show`. `synced` keeps every process stepping until all are done
    (sharded weights gather inside each forward). None when `stop()`, asked before each batch, says
    to stop. `images`: each prompt's image references, read by `vision` (vision.Vision)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outputs = []
    progress = bar(desc=desc, total=len(prompt_ids), show=show, unit="prompt")
    for start in range(0, len(prompt_ids), batch_size):
        if stop and stop():
            progress.close()
            model.train(was_training)
            return None
        chunk = prompt_ids[start:start + batch_size]
        width = max(map(len, chunk))
        # left-pad so that every prompt ends where generation starts
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in chunk], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        pictures = vision.generation_inputs(images[start:start + batch_size], input_ids) if images else {}
        generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                   **{k: v.to(device) for k, v in pictures.items()},
                                   max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id, synced_gpus=synced)
        outputs += tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
        progress.update(len(chunk))
    progress.close()
    model.train(was_training)
    return outputs


def generate_on_every_process(accelerator, model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int,
                              synced: bool, desc: str = "generate", stop=None, images: list | None = None,
                              vision=None) -> list[str] | None:
    """Greedy completions of all prompts, in order, on every process: each process generates its share
    (equal shares, the last one padded with repeats), in lock-step when `synced`; the main process
    shows its share's progress. None when stopped. `images`, `vision`: as `generate` takes them."""
    with accelerator.split_between_processes(list(zip(prompt_ids, images or [None] * len(prompt_ids))),
                                             apply_padding=True) as share:
        outputs = generate(accelerator.unwrap_model(model), tokenizer, [ids for ids, _ in share], max_new_tokens,
                           synced=synced, desc=desc, show=accelerator.is_main_process, stop=stop,
                           images=[refs for _, refs in share] if images else None, vision=vision)
    return None if outputs is None else gather_object(outputs)[:len(prompt_ids)]


def exact_match(outputs: list[str], answers: list[str]) -> float:
    return sum(normalize(o) == normalize(a) for o, a in zip(outputs, answers)) / len(answers)


def metrics_table(results: dict[str, dict]) -> list[str]:
    """One line per metric, one column per model, in the order of `results`."""
    lines = [f"{'metric':40s}" + "".join(f"{name:>12s}" for name in results)]
    for label, key in TABLE_ROWS:
        if all(key in metrics for metrics in results.values()):
            lines.append(f"{label:40s}" + "".join(f"{metrics[key]:12.3f}" for metrics in results.values()))
    return lines


def resolved_loss(**settings) -> LossConfig:
    """A LossConfig with the settings left null resolved as a run's config resolves them."""
    loss = LossConfig(**settings)
    validate_loss(loss, ModelConfig(), checker(""))
    return loss


@dataclass
class EvalSettings:
    """What `dpo-train eval` compares, on what data, scored how: the options given, and for the rest
    the run's config.yaml when the model is a run directory, else the defaults below."""
    model: str
    ref: str | None = None
    data: object = None  # a path or hub id, or a run's eval mixture
    split: str = "test"
    loss: LossConfig = field(default_factory=resolved_loss)
    max_length: int = 512
    max_prompt_length: int = 256
    chat_template: str = "auto"
    system_prompt: str | None = None
    columns: dict = field(default_factory=dict)
    run_config: str | None = None  # the config.yaml the settings came from


def run_config(model: str) -> tuple[str, Path | None]:
    """(the model to load, its run's config.yaml or None): a run directory means its final/, and a
    run's final/ finds the config beside it."""
    path = Path(model)
    if (path / "config.yaml").is_file() and (path / "final").is_dir():
        return str(path / "final"), path / "config.yaml"
    if path.name == "final" and (path.parent / "config.yaml").is_file():
        return model, path.parent / "config.yaml"
    return model, None


def eval_settings(model: str, ref: str | None = None, data: str | None = None, split: str | None = None,
                  loss_type: str | None = None, beta: float | None = None, max_length: int | None = None,
                  max_prompt_length: int | None = None) -> EvalSettings:
    """Options given (not None) win; then the run's config.yaml (its reference, eval data and split,
    loss, lengths, chat template and system prompt); then EvalSettings' defaults."""
    model, path = run_config(model)
    settings = EvalSettings(model)
    if path is not None:
        run = load_config(path)
        d = run.data
        settings = EvalSettings(model, run.model.ref_name_or_path or run.model.name_or_path, d.eval, d.eval_split,
                                run.loss, d.max_length, d.max_prompt_length, d.chat_template, d.system_prompt,
                                dataclasses.asdict(d.columns), str(path))
    if data is not None:  # other data: the run's column names need not apply to it
        settings.data, settings.columns = data, {}
    loss = settings.loss
    if loss_type is not None and [loss_type] != loss.type:  # the new type with its own defaults for its settings
        loss = resolved_loss(type=[loss_type], reference_free=loss.reference_free, sft_weight=loss.sft_weight)
    settings.loss = dataclasses.replace(loss, beta=loss.beta if beta is None else beta)
    for name, value in (("ref", ref), ("split", split), ("max_length", max_length),
                        ("max_prompt_length", max_prompt_length)):
        if value is not None:
            setattr(settings, name, value)
    for missing, option in ((settings.ref is None, "--ref"), (settings.data is None, "--data")):
        if missing:
            raise ConfigError(f"{option} is required (or give --model a run directory whose config.yaml names it)")
    return settings


def evaluate_models(settings: EvalSettings, batch_size: int = 4, max_new_tokens: int = 32, num_examples: int = 3,
                    dtype: str = "float32") -> dict:
    """`dpo-train eval`: preference metrics of a model against a frozen reference on the pairs of
    `settings.data` (rewards are beta * (log model - log ref), so the reference column is its own
    baseline: loss ln 2, margin 0), and greedy generations of both. Rows with an `answer` are all
    generated for exact-answer accuracy; the first `num_examples` are returned as examples. The
    tokenizer is the model's. Returns a JSON-ready dict."""
    s, l = settings, settings.loss
    accelerator = Accelerator()
    images = vision.is_vision_language(s.model)  # then both load as vision-language models, and images are read
    model, reference = freeze(load_model(s.model, dtype, images=images)), freeze(load_model(s.ref, dtype, images=images))
    tokenizer = load_tokenizer(s.model)
    vlm = vision.load(s.model, tokenizer) if images else None
    for path, m in ((s.model, model), (s.ref, reference)):
        # Both score the same token ids; embedding tables may be padded beyond the tokenizer, not short of it.
        if m.get_input_embeddings().num_embeddings < len(tokenizer):
            raise ModelError(f"{path}: {m.get_input_embeddings().num_embeddings} token embeddings, fewer than the "
                             f"{len(tokenizer)} tokens of {s.model}'s tokenizer; model and reference must share it")
    pairs, rows, stats = build_dataset(s.data, s.split, tokenizer, s.max_length, s.max_prompt_length,
                                       chat_template=s.chat_template, system_prompt=s.system_prompt, columns=s.columns,
                                       vision=vlm)
    for scored in (model, reference):
        layouts.check_head(scored)
    collates = vlm.collates() if "images" in pairs.column_names else COLLATES
    layout, _ = layouts.choose("packed", [model, reference], getattr(collates, "not_exact", None))  # as in training
    loader = accelerator.prepare(DataLoader(pairs, batch_size=batch_size,
                                            collate_fn=partial(collates[layout], pad_token_id=tokenizer.pad_token_id)))
    models = {"reference": reference.to(accelerator.device), "model": model.to(accelerator.device)}
    loss_fn = Objective(**vars(l))  # as the trainer builds it
    scored_against = reference if loss_fn.needs_reference else None  # as in training
    metrics = {name: preference_metrics(accelerator, m, scored_against, loader, loss_fn, desc=f"scoring: {name}")
               for name, m in models.items()}
    has_answers = "answer" in rows.column_names
    count = (len(rows) if has_answers else min(num_examples, len(rows))) if max_new_tokens else 0
    pictures = pairs["images"][:count] if "images" in pairs.column_names else None
    outputs = {name: generate(m, tokenizer, pairs["prompt_ids"][:count], max_new_tokens, desc=f"greedy generation: {name}",
                              images=pictures, vision=vlm) for name, m in models.items()}
    if has_answers and count:
        for name in models:
            metrics[name]["exact_answer_accuracy"] = exact_match(outputs[name], rows["answer"])
    examples = [{"prompt": as_given(rows[i]["prompt"], rows[i]["text"]),
                 **({"answer": rows[i]["answer"]} if has_answers else {}),
                 **{name: outputs[name][i] for name in models}} for i in range(min(num_examples, count))]
    data = s.data if isinstance(s.data, str) else [given["path"] for given in stats.sources]
    return {"model": s.model, "reference": s.ref, "data": data, "pairs": len(pairs), "data_stats": str(stats),
            "loss_type": l.type, "beta": l.beta, "max_length": s.max_length, "max_prompt_length": s.max_prompt_length,
            "run_config": s.run_config, "max_new_tokens": max_new_tokens, "metrics": metrics, "examples": examples}


def format_report(result: dict) -> str:
    """The metrics table and the example generations, for a terminal."""
    def one_line(value, width: int = 100) -> str:
        text = value[-1]["content"] if isinstance(value, list) else str(value)  # a conversation: its last turn
        text = text.replace("\n", "\\n")
        return text if len(text) <= width else "..." + text[-width:]  # a prompt's end matters most

    data = result["data"] if isinstance(result["data"], str) else " + ".join(result["data"])
    lines = [f"{result['model']} against the reference {result['reference']}: {' + '.join(result['loss_type'])} loss, "
             f"beta {result['beta']}" + (f" (from {result['run_config']})" if result["run_config"] else ""),
             f"{data}: {result['data_stats']}", "", *metrics_table(result["metrics"])]
    if result["examples"]:
        lines += ["", f"Greedy generations (first {len(result['examples'])} prompts, "
                      f"at most {result['max_new_tokens']} new tokens):"]
    for i, example in enumerate(result["examples"]):
        for j, (key, value) in enumerate(example.items()):
            lines.append(f"{f'[{i}]' if j == 0 else '':4s} {key + ':':10s} {one_line(value)}")
    return "\n".join(lines)


def final_evaluation(accelerator, policy, reference, eval_loader, loss_fn, tokenizer, eval_set, eval_rows,
                     max_new_tokens: int, synced: bool = False, stop=None, vision=None) -> dict | None:
    """Held-out metrics for the trained policy and, when there is one, the reference; plus greedy
    exact-answer accuracy when the eval rows carry an `answer` (their images read by `vision`). Prints a
    side-by-side table. None when `stop()` (asked before each batch, the same answer on every process) says to stop."""
    images = eval_set["images"] if "images" in eval_set.column_names else None
    models = {"policy": policy} if reference is None else {"reference": reference, "policy": policy}
    results = {}
    for name, model in models.items():
        results[name] = preference_metrics(accelerator, model, reference, eval_loader, loss_fn,
                                           desc=f"final evaluation: {name}", stop=stop)
        if results[name] is None:
            return None
    if "answer" in eval_rows.column_names and max_new_tokens:
        for name, model in models.items():
            outputs = generate_on_every_process(accelerator, model, tokenizer, eval_set["prompt_ids"], max_new_tokens,
                                                synced, f"final evaluation, greedy generation: {name}", stop, images,
                                                vision)
            if outputs is None:
                return None
            results[name]["exact_answer_accuracy"] = exact_match(outputs, eval_rows["answer"])
            results[name]["examples"] = [{"prompt": p, "answer": a, "output": o} for p, a, o in
                                         zip(map(as_given, eval_rows["prompt"][:5], eval_rows["text"][:5]),
                                             eval_rows["answer"][:5], outputs[:5])]
    accelerator.print("\n".join([f"Held-out evaluation on {len(eval_set)} pairs", *metrics_table(results)]))
    return results
