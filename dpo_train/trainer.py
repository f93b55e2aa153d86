"""The DPO recipe: setup, loop, finish.

A logged `step` is the number of optimizer updates the weights have had: the training record
for step 0 is computed on the initial weights (policy == reference, so its loss is ln 2), and an
eval record for step N describes the weights after N updates.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import yaml
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import engines, health, hub, layouts, reference as precomputed, router, sequence, templates, tracking, vision
from .card import model_card
from .checkpoint import restore, resume_point, save_checkpoint, save_final
from .config import Config
from .collate import COLLATES
from .data import fingerprint, train_and_eval_sets
from .evaluate import final_evaluation, midrun_evaluation
from .extras import require_packages
from .health import all_finite, nonfinite_error, watch
from .logps import head_inside, policy_and_reference_logps
from .objective import Objective
from .progress import say
from .metrics import MetricsLog, add, pair_metrics, reset_peak_memory, write_record
from .models import (AdapterDisabled, cache_dir, enable_activation_checkpointing, hf_dir, load_policy_and_reference,
                     load_tokenizer, num_parameters)
from .run_dir import check_usable, hold, remove_leftovers, write_text
from .signals import StopSignals, Stopped


def lr_lambda(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to the peak, then cosine decay to zero at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def training_step(policy, reference, batch, loss_fn):
    """Reference forward (no grad), policy forward, loss. Returns (mean loss, metric sums)."""
    logps = policy_and_reference_logps(policy, reference, batch, loss_fn.extras)
    losses, chosen_rewards, rejected_rewards = loss_fn(logps)
    sums = pair_metrics(losses, chosen_rewards, rejected_rewards, logps.policy_chosen_logps, logps.policy_rejected_logps,
                        logps.policy_router_aux_loss)
    return losses.mean(), sums


@dataclass
class Run:
    """What the loop and the finish need; `setup` builds it."""
    config: Config
    accelerator: object
    policy: torch.nn.Module
    reference: torch.nn.Module | None
    optimizer: object
    scheduler: object
    loss_fn: object
    train_loader: object
    eval_loader: object
    eval_set: object
    eval_rows: object
    tokenizer: object
    vision: object  # vision.Vision (the processor) of a vision-language model, else None
    data_stats: dict
    metrics_log: MetricsLog
    total_steps: int
    # step, epoch, batches_done (micro-batches into `epoch`), skipped (non-finite updates dropped), health
    position: dict
    data_fingerprint: str | None  # of the tokenized training pairs (main process), kept in checkpoints

    @property
    def out(self) -> Path:
        return Path(self.config.train.output_dir)


def train(config: Config, resume: str | None = None, force_resume: bool = False) -> dict:
    """Run one DPO training job; returns the final held-out metrics (empty without eval data).

    `resume`: None starts fresh; "auto" continues from the newest checkpoint in output_dir that
    verifies (or starts fresh, saying so); a path continues from that checkpoint, which must verify.
    """
    t = config.train
    with StopSignals() as stop:  # the command's, when it installed them: setup stops at once, the loop at a step's end
        require_packages(config)  # a tracker or peft that is missing: one line, before anything loads
        engines.check_config(config)  # and what the launched engine cannot run
        check_usable(Path(t.output_dir))  # and an output_dir that cannot be written
        accelerator = engines.build_accelerator(t.grad_accum_steps, tracking.trackers(t.report_to) or None,
                                                Path(t.output_dir) / "tracking", t.collective_timeout)
        with hold(accelerator, Path(t.output_dir), accelerator.print):  # one run per output_dir
            run = setup(config, accelerator, resume, force_resume)
            stop.phase = "train"
            loop(run, stop)
            return finish(run, stop)


def setup(config: Config, accelerator, resume: str | None, force_resume: bool) -> Run:
    """Data, policy and reference, optimizer and schedule, checkpoint state."""
    m, d, l, t = config.model, config.data, config.loss, config.train
    log, out = accelerator.print, Path(t.output_dir)
    if accelerator.is_main_process:
        remove_leftovers(out, log)
    with accelerator.local_main_process_first():  # the first process of each machine fills the GGUF and datasets caches
        tokenizer = load_tokenizer(m.name_or_path, m.init_kwargs)
        vlm = vision.load(m.name_or_path, tokenizer, m.init_kwargs)  # a vision-language model's processor, or None
        templates.adopt(tokenizer, d.chat_template, vlm and vlm.processor)  # final/ keeps the template
        if m.ref_name_or_path:
            hf_dir(m.ref_name_or_path)
        # a mixture's rows per source go into the config (config.yaml, the resume check)
        train_set, eval_set, eval_rows, data_stats = train_and_eval_sets(d, tokenizer, t.seed, vlm)
    images = "images" in train_set.column_names
    pairs_fingerprint = fingerprint(train_set) if accelerator.is_main_process else None  # the data actually used
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    start = resume_point(accelerator, out, resume, force_resume, config.to_dict(), pairs_fingerprint, log)
    set_seed(t.seed)
    if accelerator.is_main_process:
        log("Resolved config:\n" + yaml.safe_dump(config.to_dict(), sort_keys=False))
        write_text(out / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
        if start is None:
            (out / "metrics.jsonl").unlink(missing_ok=True)  # a fresh run starts a fresh log
    log("\n".join(f"{split} data: {stats}" for split, stats in data_stats.items()))
    # Every process at once: under ZeRO-3 loading is collective (each process keeps its partition).
    # The reference always comes from the original model, never from a checkpoint.
    lora = {k: v for k, v in vars(m.lora).items() if k != "save_merged"} if m.lora.r else None
    loss_fn = Objective(**vars(l))
    policy, reference = load_policy_and_reference(m.name_or_path, m.ref_name_or_path, m.dtype, loss_fn.needs_reference,
                                                  lora, m.init_kwargs, images, m.freeze_vision)
    loss_fn.router_aux_coef = router.coefficient(l.router_aux_coef, policy)  # null: the model's own, as TRL
    if t.gradient_checkpointing:
        enable_activation_checkpointing(policy)
    if t.compile:  # in place: parameter names, checkpoints and the saved model are unchanged
        policy.compile(dynamic=True)
    trainable = [p for p in policy.parameters() if p.requires_grad]  # with LoRA, only the adapter
    log(f"training {num_parameters(trainable):,} of {num_parameters(policy.parameters()):,} parameters")
    optimizer = torch.optim.AdamW(trainable, lr=t.learning_rate, weight_decay=t.weight_decay)
    engines.configure_deepspeed(accelerator, t.per_device_batch_size, t.max_grad_norm, policy.config)
    trained_tower = images and not m.freeze_vision
    policy, optimizer = engines.prepare_policy(accelerator, policy, optimizer, trained_tower)
    if reference is not None and not isinstance(reference, AdapterDisabled):  # that one lives inside the policy
        reference = engines.place_reference(accelerator, reference)
        held, total = engines.held_here(reference)
        log(f"the frozen reference: this process holds {held:,} of its {total:,} parameters")
    scorers = [accelerator.unwrap_model(policy)] + ([reference] if reference is not None else [])
    collates = vlm.collates() if images else COLLATES  # with images: their pixel values in each batch
    layout = layouts.decide(accelerator, t.layout, scorers, train_set, t.per_device_batch_size, tokenizer.pad_token_id,
                            t.layout_check, log, collates)
    group = sequence.start(accelerator, t.sequence_parallel, scorers[0], layout, images, loss_fn.router_aux_coef, log)
    if reason := head_inside(policy):
        log(f"the LM head runs inside the model's forward: {reason}")
    collate_fn = partial(collates[layout], pad_token_id=tokenizer.pad_token_id)  # whole rows: a group's are shared
    if m.precompute_reference and reference is not None:
        train_set, eval_set = precomputed.attach(accelerator, reference, [train_set, eval_set], collate_fn,
                                                 t.per_device_batch_size, cache_dir(), log)
        reference = None  # freed: training now holds one model
    loader = partial(DataLoader, batch_size=t.per_device_batch_size, collate_fn=sequence.sharing(collate_fn, group))
    train_loader, eval_loader = sequence.prepare_loaders(accelerator, group, loader(train_set, shuffle=True),
                                                         None if eval_set is None else loader(eval_set))
    total_steps = t.max_steps or t.epochs * math.ceil(len(train_loader) / t.grad_accum_steps)
    # On the torch optimizer inside the engine's wrappers, stepped by hand once per optimizer update, so
    # the schedule counts updates on any number of processes.
    scheduler = torch.optim.lr_scheduler.LambdaLR(engines.stepping_optimizer(optimizer),
                                                  partial(lr_lambda, warmup_steps=t.warmup_steps, total_steps=total_steps))
    accelerator.register_for_checkpointing(scheduler)
    tracking.start(accelerator, config)
    run = Run(config, accelerator, policy, reference, optimizer, scheduler, loss_fn, train_loader, eval_loader,
              eval_set, eval_rows, tokenizer, vlm, data_stats, MetricsLog(out / "metrics.jsonl", accelerator), total_steps,
              {"step": 0, "epoch": 0, "batches_done": 0, "skipped": 0, "health": health.fresh()}, pairs_fingerprint)
    if start is not None:
        run.position = {key: value for key, value in restore(accelerator, start, run.metrics_log).items()
                        if key in run.position}
        log(f"Resumed from {start} at step {run.position['step']}")
    log(f"{len(train_set)} train pairs, {total_steps} optimizer steps of "
        f"{t.per_device_batch_size * t.grad_accum_steps * accelerator.num_processes // t.sequence_parallel} pairs")
    return run


def micro_batches(run: Run):
    """Training micro-batches from the run's position on, epoch after epoch, counted in run.position."""
    position, skip = run.position, run.position["batches_done"]  # a resumed run skips what its epoch had done
    while True:
        loader = run.accelerator.skip_first_batches(run.train_loader, skip) if skip else run.train_loader
        loader.set_epoch(position["epoch"])  # the seeded sampler's order depends on (seed, epoch) only
        for batch in loader:
            position["batches_done"] += 1
            yield batch
        position["epoch"], position["batches_done"], skip = position["epoch"] + 1, 0, 0


def optimizer_step(run: Run, batches) -> tuple[dict, float | None]:
    """One update: forward, loss and backward over the accumulation's micro-batches (taken from
    `batches` as they come), then clip, check, step the optimizer and the schedule.
    Returns the metric sums of its pairs and the gradient norm before clipping."""
    accelerator, policy, t = run.accelerator, run.policy, run.config.train
    sums = None
    for batch in batches:
        with accelerator.accumulate(policy):
            loss, batch_sums = training_step(policy, run.reference, batch, run.loss_fn)
            if engines.steps_inside_backward(accelerator) and not all_finite(accelerator, loss):  # DeepSpeed steps
                raise nonfinite_error(accelerator, run.out, run.position["step"], applied=False)  # inside backward
            accelerator.backward(loss)  # accelerate divides it by grad_accum_steps
        sums = add(sums, sequence.counted_once({**batch_sums, "tokens": batch["num_tokens"]}))
        if accelerator.sync_gradients:
            break
    grad_norm = accelerator.clip_grad_norm_(policy.parameters(), t.max_grad_norm)
    if not all_finite(accelerator, sums["loss"], grad_norm):
        if t.on_nonfinite == "stop":
            raise nonfinite_error(accelerator, run.out, run.position["step"], engines.steps_inside_backward(accelerator))
        run.position["skipped"] += 1  # on_nonfinite: skip drops the update and counts it
    else:
        run.optimizer.step()
    run.optimizer.zero_grad()
    run.scheduler.step()
    return sums, None if grad_norm is None else float(grad_norm)


def loop(run: Run, stop: StopSignals) -> None:
    """Optimizer steps until total_steps, with logging, evaluation, checkpoints and stop signals."""
    accelerator, t, position = run.accelerator, run.config.train, run.position
    batches, window, t0 = micro_batches(run), None, time.perf_counter()
    reset_peak_memory()  # memory/peak_mb: the peak of the training steps, not of loading
    with tqdm(total=run.total_steps, initial=position["step"], desc="train",
              disable=not accelerator.is_main_process) as progress:  # closed on errors too
        while position["step"] < run.total_steps:
            lr = run.scheduler.get_last_lr()[0]
            sums, grad_norm = optimizer_step(run, batches)
            window = add(window, sums)
            if position["step"] % t.log_every == 0 or position["step"] == run.total_steps - 1:
                elapsed, t0 = time.perf_counter() - t0, time.perf_counter()
                record = write_record(accelerator, run.metrics_log, position, window, elapsed, grad_norm, lr)
                progress.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['rewards/accuracies']:.2f}",
                                     margin=f"{record['rewards/margins']:.3f}")
                window = None
                watch(accelerator, position, record["loss"], grad_norm, t.on_divergence, run.out)  # divergence
            position["step"] += 1
            progress.update(1)
            pause, step = time.perf_counter(), position["step"]  # evaluation and saving don't count toward tokens/s
            if run.eval_loader and t.eval_every and step % t.eval_every == 0 and step < run.total_steps:
                run.metrics_log.write(step, midrun_evaluation(accelerator, run.policy, run.reference, run.eval_loader,
                                                              run.loss_fn, step))
            stopping = engines.on_any_process(accelerator, stop.received is not None) and step < run.total_steps
            if stopping or (t.save_every and step % t.save_every == 0 and step < run.total_steps):
                path = save(run)
            if stopping:
                raise Stopped(f"stopped by {stop.received or 'a signal to another process'}; saved {path}; "
                              "continue with --resume auto")
            t0 += time.perf_counter() - pause


def save(run: Run) -> Path:
    """A checkpoint of the run as it stands after run.position['step'] updates."""
    state = {**run.position, "num_processes": run.accelerator.num_processes, "data_fingerprint": run.data_fingerprint,
             "metrics_bytes": run.metrics_log.size() if run.accelerator.is_main_process else 0}
    path = save_checkpoint(run.accelerator, run.out / "checkpoints", run.position["step"], state,
                           yaml.safe_dump(run.config.to_dict(), sort_keys=False), run.config.train.keep_last)
    say(f"Saved checkpoint {path}", run.accelerator.is_main_process)  # below the progress bar, not through it
    return path


def finish(run: Run, stop: StopSignals) -> dict:
    """Final held-out evaluation (skipped on a signal), then the trained policy in Hugging Face format."""
    accelerator, m, t = run.accelerator, run.config.model, run.config.train
    results, notes = {}, list(run.position["health"]["warnings"])
    if run.eval_loader:
        stop.phase = "evaluation"
        results = final_evaluation(accelerator, run.policy, run.reference, run.eval_loader, run.loss_fn, run.tokenizer,
                                   run.eval_set, run.eval_rows, t.eval_max_new_tokens,
                                   synced=engines.shards_weights(accelerator), vision=run.vision,
                                   stop=lambda: engines.on_any_process(accelerator, stop.received is not None))
        if results is None:  # a signal: the model is trained, so it is still saved
            notes.append(f"The final evaluation was skipped: {stop.received or 'a signal'} arrived before it ended.")
            accelerator.print(f"{notes[-1]} final/ is still written; evaluate it later with dpo-train eval --model "
                              f"{run.out}")
            results = {}
        else:
            run.metrics_log.write(run.position["step"], {f"eval/{k}": v for k, v in results["policy"].items()
                                                         if k != "examples"})
            if accelerator.is_main_process:
                write_text(run.out / "eval_results.json", json.dumps(results, indent=2))
    stop.phase = "saving"
    card = model_card(run.config.to_dict(), run.position["step"], run.data_stats, results, notes)
    saved = run.vision.processor if run.vision else run.tokenizer  # a processor saves its tokenizer too
    save_final(accelerator, run.policy, saved, run.out / "final", card, merged=m.lora.save_merged)
    accelerator.print(f"Saved the trained policy and {'processor' if run.vision else 'tokenizer'} to {run.out / 'final'}")
    accelerator.end_training()
    if t.push_to_hub and accelerator.is_main_process:  # after the local save: a failed upload loses nothing
        stop.phase = "upload"
        url = hub.push(run.out / "final", t.push_to_hub, t.hub_private)
        accelerator.print(f"Uploaded {run.out / 'final'} to {t.push_to_hub}: {url}")
    return results
