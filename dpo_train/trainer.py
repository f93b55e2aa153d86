"""The DPO recipe: setup, train, evaluate, save.

A logged `step` is the number of optimizer updates the weights have had: the training record
for step 0 is computed on the initial weights (policy == reference, so its loss is ln 2), and an
eval record for step N describes the weights after N updates.
"""

from __future__ import annotations

import json
import math
import time
from functools import partial
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .card import model_card
from .checkpoint import (STATE, StopSignals, Stopped, complete_checkpoints, resume_point, save_checkpoint,
                         save_final)
from .config import Config, save_config
from .data import COLLATES, build_dataset, settings, with_rows
from .evaluate import exact_match, generate, metrics_table, preference_metrics
from .logps import policy_and_reference_logps
from .losses import REFERENCE_FREE, objective
from .metrics import MetricsLog, add, means, pair_metrics
from . import attention, hub, reference as precomputed, templates, tracking
from .extras import require_packages
from .rows import as_given
from .models import (AdapterDisabled, cache_dir, enable_activation_checkpointing, load_policy_and_reference,
                     load_tokenizer, place_reference)


def lr_lambda(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to the peak, then cosine decay to zero at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def training_step(policy, reference, batch, loss_fn):
    """Reference forward (no grad), policy forward, loss. Returns (mean loss, metric sums)."""
    policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps = (
        policy_and_reference_logps(policy, reference, batch))
    losses, chosen_rewards, rejected_rewards = loss_fn(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
        batch["chosen_lengths"], batch["rejected_lengths"])
    sums = pair_metrics(losses, chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps)
    return losses.mean(), sums


def on_any_process(accelerator, flag: bool) -> bool:
    """True on every process when `flag` is true on at least one (one all-reduce when distributed)."""
    if accelerator.num_processes == 1:
        return flag
    return accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="sum").item() > 0


class NonFiniteError(RuntimeError):
    """A NaN or infinite loss or gradient, with the step and the last good checkpoint."""


def all_finite(accelerator, loss: torch.Tensor, grad_norm) -> bool:
    """Whether every process's loss and the gradient norm are finite (the same answer everywhere)."""
    finite = torch.isfinite(loss.detach()).item() and (grad_norm is None or torch.isfinite(grad_norm).item())
    return not on_any_process(accelerator, not finite)


def last_checkpoint(root: Path) -> str:
    found = complete_checkpoints(root) if root.is_dir() else []
    return str(found[-1]) if found else "none (set train.save_every to keep some)"


def train(config: Config, resume: str | None = None, force_resume: bool = False) -> dict:
    """Run one DPO training job; returns the final held-out metrics (empty without eval data).

    `resume`: None starts fresh; "auto" continues from the newest complete checkpoint in
    output_dir (or starts fresh, saying so); a path continues from that checkpoint.
    """
    m, d, l, t = config.model, config.data, config.loss, config.train
    # --- setup ---
    require_packages(config)  # a tracker, peft or deepspeed that is missing: one line, before anything loads
    accelerator = Accelerator(gradient_accumulation_steps=t.grad_accum_steps,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
                              cpu=not torch.accelerator.is_available(),  # lets torchrun on CPU use gloo
                              log_with=tracking.trackers(t.report_to) or None,
                              project_dir=Path(t.output_dir) / "tracking")
    log = accelerator.print
    out, checkpoints = Path(t.output_dir), Path(t.output_dir) / "checkpoints"
    with accelerator.main_process_first():  # the first process fills the GGUF and datasets caches
        tokenizer = load_tokenizer(m.name_or_path)
        templates.adopt(tokenizer, d.chat_template)  # final/ keeps the template the data was rendered with
        tokenize = partial(build_dataset, tokenizer=tokenizer, **settings(d, t.seed))
        train_set, _, train_stats = tokenize(d.train, d.train_split, key="data.train")
        eval_set, eval_rows, eval_stats = (tokenize(d.eval, d.eval_split, key="data.eval") if d.eval
                                           else (None, None, None))
    # A mixture's rows per source go into config.yaml, so that the resume check below covers the mix.
    d.train, d.eval = with_rows(d.train, train_stats), with_rows(d.eval, eval_stats)
    start = resume_point(out, resume, force_resume, config.to_dict(), log)
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    set_seed(t.seed)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        log("Resolved config:\n" + yaml.safe_dump(config.to_dict(), sort_keys=False))
        save_config(config, out / "config.yaml")
        if start is None:
            (out / "metrics.jsonl").unlink(missing_ok=True)  # a fresh run starts a fresh log

    with accelerator.main_process_first():  # the first process fills the GGUF cache
        # The reference always comes from the original model, never from a checkpoint.
        lora = {k: v for k, v in vars(m.lora).items() if k != "save_merged"} if m.lora.r else None
        policy, reference = load_policy_and_reference(m.name_or_path, m.ref_name_or_path, m.dtype, lora=lora,
                                                      need_reference=not (l.reference_free or l.type in REFERENCE_FREE))
    log(f"train data: {train_stats}")
    if eval_stats:
        log(f"eval data: {eval_stats}")

    if t.gradient_checkpointing:
        enable_activation_checkpointing(policy)
    if t.compile:  # in place: parameter names, checkpoints and the saved model are unchanged
        policy.compile(dynamic=True)
    trainable = [p for p in policy.parameters() if p.requires_grad]  # with LoRA, only the adapter
    log(f"training {sum(p.numel() for p in trainable):,} of {sum(p.numel() for p in policy.parameters()):,} parameters")
    optimizer = torch.optim.AdamW(trainable, lr=t.learning_rate, weight_decay=t.weight_decay)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # the loaders are prepared on their own, below
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = t.per_device_batch_size
    policy, optimizer = accelerator.prepare(policy, optimizer)
    scorers = [accelerator.unwrap_model(policy)] + ([reference] if reference is not None else [])
    layout, reason = attention.usable_layout(t.layout, [model.config for model in scorers])
    if reason:
        log(f"train.layout packed: {reason}; using the rows layout instead (the same numbers, with padding)")
    collate_fn = partial(COLLATES[layout], pad_token_id=tokenizer.pad_token_id)
    if reference is not None and not isinstance(reference, AdapterDisabled):  # that one lives inside the policy
        reference = place_reference(accelerator, reference)
    if m.precompute_reference and reference is not None:
        train_set, eval_set = precomputed.attach(accelerator, reference, [train_set, eval_set], collate_fn,
                                                 t.per_device_batch_size, cache_dir(), log)
        reference = None  # freed: training now holds one model
    train_loader = DataLoader(train_set, batch_size=t.per_device_batch_size, shuffle=True, collate_fn=collate_fn)
    eval_loader = None
    if eval_set is not None:
        eval_loader = DataLoader(eval_set, batch_size=t.per_device_batch_size, collate_fn=collate_fn)
    train_loader, eval_loader = accelerator.prepare(train_loader, eval_loader)
    total_steps = t.max_steps or t.epochs * math.ceil(len(train_loader) / t.grad_accum_steps)
    # Stepped by hand once per optimizer update, so the schedule counts updates on any number of processes.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer.optimizer, partial(lr_lambda, warmup_steps=t.warmup_steps, total_steps=total_steps))
    accelerator.register_for_checkpointing(scheduler)
    loss_fn = objective(l.type, l.beta, l.label_smoothing, l.gamma, l.sft_weight)
    evaluate = partial(preference_metrics, accelerator, loss_fn=loss_fn)
    metrics_log = MetricsLog(out / "metrics.jsonl", accelerator)
    tracking.start(accelerator, config)
    state = {"step": 0, "epoch": 0, "batches_done": 0, "skipped": 0}  # batches_done: micro-batches into `epoch`
    if start is not None:
        accelerator.load_state(start)  # weights, optimizer, scheduler, RNG states of every process
        state = json.loads((start / STATE).read_text())
        if accelerator.is_main_process:
            metrics_log.truncate(state["metrics_bytes"])  # drop records written after the checkpoint
        log(f"Resumed from {start} at step {state['step']}")
    log(f"{len(train_set)} train pairs, {total_steps} optimizer steps of "
        f"{t.per_device_batch_size * t.grad_accum_steps * accelerator.num_processes} pairs")

    def save(step: int) -> Path:
        state = {"step": step, "epoch": epoch, "batches_done": batches_done, "skipped": skipped,
                 "metrics_bytes": metrics_log.size() if accelerator.is_main_process else 0}
        path = save_checkpoint(accelerator, checkpoints, step, state,
                               yaml.safe_dump(config.to_dict(), sort_keys=False), t.keep_last)
        log(f"Saved checkpoint {path}")
        return path

    # --- train ---
    step, epoch, skipped = state["step"], state["epoch"], state.get("skipped", 0)
    window, tokens, t0 = None, 0, time.perf_counter()
    progress = tqdm(total=total_steps, initial=step, desc="train", disable=not accelerator.is_main_process)
    with StopSignals() as stop:
        while step < total_steps:
            skip, batches_done = (state["batches_done"], state["batches_done"]) if epoch == state["epoch"] else (0, 0)
            loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
            loader.set_epoch(epoch)  # the seeded sampler's order depends on (seed, epoch) only
            for batch in loader:
                batches_done += 1
                with accelerator.accumulate(policy):
                    loss, sums = training_step(policy, reference, batch, loss_fn)
                    accelerator.backward(loss)  # accelerate divides by grad_accum_steps
                    finite = True
                    if accelerator.sync_gradients:
                        # None under DeepSpeed, which clips inside its engine (gradient_clipping)
                        grad_norm = accelerator.clip_grad_norm_(policy.parameters(), t.max_grad_norm)
                        finite = all_finite(accelerator, loss, grad_norm)
                        if not finite and t.on_nonfinite == "stop":
                            raise NonFiniteError(f"step {step}: the loss or a gradient is NaN or infinite; stopped "
                                                 f"without applying it. Last good checkpoint: {last_checkpoint(checkpoints)}")
                        skipped += not finite
                    if finite:  # else (on_nonfinite: skip) the update is dropped and counted
                        optimizer.step()
                    optimizer.zero_grad()
                window, tokens = add(window, sums), tokens + batch["num_tokens"]
                if not accelerator.sync_gradients:
                    continue
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                if step % t.log_every == 0 or step == total_steps - 1:
                    totals = accelerator.reduce({**window, "tokens": tokens}, reduction="sum")
                    elapsed, t0 = time.perf_counter() - t0, time.perf_counter()
                    record = {**means({k: v for k, v in totals.items() if k != "tokens"}),
                              "grad_norm": None if grad_norm is None else grad_norm.item(), "lr": lr,
                              "tokens/s": totals["tokens"].item() / elapsed, "skipped_steps": skipped}
                    metrics_log.write(step, record)
                    if accelerator.is_main_process:
                        progress.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['rewards/accuracies']:.2f}",
                                             margin=f"{record['rewards/margins']:.3f}")
                    window, tokens = None, 0
                step += 1
                progress.update(1)
                pause = time.perf_counter()  # evaluation and saving don't count toward tokens/s
                if eval_loader and t.eval_every and step % t.eval_every == 0 and step < total_steps:
                    metrics_log.write(step, evaluate(policy, reference, eval_loader, prefix="eval/"))
                stopping = on_any_process(accelerator, stop.received is not None) and step < total_steps
                if stopping or (t.save_every and step % t.save_every == 0 and step < total_steps):
                    path = save(step)
                if stopping:
                    raise Stopped(stop.received or "a signal to another process", path)
                t0 += time.perf_counter() - pause
                if step >= total_steps:
                    break
            epoch += 1
    progress.close()

    # --- evaluate and save ---
    results = {}
    if eval_loader:
        results = final_evaluation(accelerator, policy, reference, eval_loader, evaluate, tokenizer,
                                   eval_set, eval_rows, t.eval_max_new_tokens)
        metrics_log.write(step, {f"eval/{k}": v for k, v in results["policy"].items() if k != "examples"})
        if accelerator.is_main_process:
            (out / "eval_results.json").write_text(json.dumps(results, indent=2))
    stats = {"train": train_stats} if eval_stats is None else {"train": train_stats, "eval": eval_stats}
    save_final(accelerator, policy, tokenizer, out / "final", model_card(config.to_dict(), step, stats, results),
               merged=m.lora.save_merged)
    log(f"Saved the trained policy and tokenizer to {out / 'final'}")
    accelerator.end_training()
    if t.push_to_hub and accelerator.is_main_process:  # after the local save: a failed upload loses nothing
        log(f"Uploaded {out / 'final'} to {t.push_to_hub}: {hub.push(out / 'final', t.push_to_hub, t.hub_private)}")
    return results


def final_evaluation(accelerator, policy, reference, eval_loader, evaluate, tokenizer, eval_set, eval_rows,
                     max_new_tokens) -> dict:
    """Held-out metrics for the trained policy and, when there is one, the reference; plus greedy
    exact-answer accuracy when the eval rows carry an `answer`. Prints a side-by-side table."""
    models = {"policy": policy} if reference is None else {"reference": reference, "policy": policy}
    results = {name: evaluate(model, reference, eval_loader) for name, model in models.items()}
    if "answer" in eval_rows.column_names and max_new_tokens and accelerator.is_main_process:
        for name, model in models.items():
            outputs = generate(accelerator.unwrap_model(model), tokenizer, eval_set["prompt_ids"], max_new_tokens)
            results[name]["exact_answer_accuracy"] = exact_match(outputs, eval_rows["answer"])
            results[name]["examples"] = [{"prompt": p, "answer": a, "output": o} for p, a, o in
                                         zip(map(as_given, eval_rows["prompt"][:5], eval_rows["text"][:5]),
                                             eval_rows["answer"][:5], outputs[:5])]
    accelerator.print("\n".join([f"Held-out evaluation on {len(eval_set)} pairs", *metrics_table(results)]))
    return results
