"""`dpo-train generate`: sample K completions for each prompt of data.train from model.name_or_path,
score them with the judge, and write preference pairs that `dpo-train` trains on as they are.

Under a launcher every process loads the model whole and samples its share of the batches
(accelerator.split_between_processes); the batches, their completions and scores are gathered and the
main process writes the file. Each batch has its own seed, so the pairs do not depend on the number
of processes.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from accelerate.utils import gather_object

from . import engines, templates
from .judges import JudgeError, build_judge
from .models import hf_dir, load_model, load_tokenizer
from .pairs import make_pairs, settings_path, write_pairs
from .progress import bar
from .prompts import load_prompts
from .rows import DataError
from .sampling import HFSampler, VLLMSampler, batch_seed, choose_backend


class NoPairsError(DataError):
    """Every prompt was dropped: nothing to write."""
    same_on_every_process = True  # every process pairs the same gathered scores


def output_path(config) -> Path:
    """generate.output, or {train.output_dir}/pairs.jsonl."""
    return Path(config.generate.output or Path(config.train.output_dir) / "pairs.jsonl")


def generate_pairs(config) -> dict:
    """Sample, judge, pair, write; returns what generate wrote beside the pairs (settings, counts, rates)."""
    g, m, d, t = config.generate, config.model, config.data, config.train
    accelerator = engines.build_accelerator(1, None, None, t.collective_timeout)
    log, out = accelerator.print, output_path(config)
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    with accelerator.local_main_process_first():  # the first process of each machine fills the caches
        tokenizer = load_tokenizer(m.name_or_path)
        templates.adopt(tokenizer, d.chat_template)
        prompts = load_prompts(d, tokenizer, t.seed)
    backend = choose_backend(g.backend, accelerator.num_processes)
    with engines.loading_whole_models():  # inference only: every process holds whole models, also under ZeRO-3
        judge = build_judge(g, accelerator.device, m.dtype)  # one that cannot load stops before the policy loads
        judge.check(prompts)
        if backend == "hf":
            sampler = HFSampler(load_model(m.name_or_path, m.dtype).to(accelerator.device).eval(), tokenizer, g)
        else:
            log("generate.backend: vLLM (this path has not run in dpo-train's tests)")
            sampler = VLLMSampler(hf_dir(m.name_or_path), m.dtype, g)
    log(f"sampling {g.num_samples} completions for each of {len(prompts)} prompts from {m.name_or_path} "
        f"({backend}, {accelerator.num_processes} process(es)), judged by {judge.name}")
    completions, scores, at_limit, seconds = sample_and_judge(accelerator, sampler, judge, prompts, g)
    rows, counts = make_pairs(prompts, completions, scores, g.pairing)
    counts["completions_at_max_new_tokens"] = at_limit
    settings = {"model": m.name_or_path, "prompts": d.train if isinstance(d.train, str) else
                [dataclasses.asdict(s) for s in d.train], "backend": backend, "processes": accelerator.num_processes,
                "sampling": {k: getattr(g, k) for k in ("num_samples", "max_new_tokens", "temperature", "top_p",
                                                        "top_k", "batch_size", "seed")},
                "judge": {"judge": g.judge, "judge_model": g.judge_model, "judge_function": g.judge_function},
                "pairing": g.pairing, "counts": counts, "seconds": seconds,
                "completions_per_s": round(counts["completions"] / seconds["sampling"], 3) if seconds["sampling"] else None}
    if not rows:
        raise NoPairsError(f"generate: no pairs: {describe(counts)}; sample more (generate.num_samples, "
                        "generate.temperature) or use a judge that tells the completions apart")
    if accelerator.is_main_process:
        write_pairs(out, rows, settings)
    accelerator.wait_for_everyone()
    log(f"wrote {len(rows)} pairs to {out} ({describe(counts)}); {settings['completions_per_s']} completions/s; "
        f"settings in {settings_path(out)}")
    accelerator.end_training()
    return settings


def sample_and_judge(accelerator, sampler, judge, prompts, g) -> tuple[list, list, int, dict]:
    """(completions, scores: one list per prompt, in order; how many completions reached max_new_tokens;
    seconds of sampling and judging). Each process samples and judges its share of the batches; a judge
    error is gathered with the results and raised on every process, so none is left waiting."""
    batches = list(enumerate(range(0, len(prompts), g.batch_size)))  # (index, first prompt)
    results, sampling_s, judging_s = [], 0.0, 0.0
    with accelerator.split_between_processes(batches, apply_padding=True) as share:
        for index, start in bar(share, "sampling", show=accelerator.is_main_process, unit="batch"):
            chunk = prompts[start:start + g.batch_size]
            t0 = time.perf_counter()
            sampled = sampler([p.ids for p in chunk], batch_seed(g.seed, index))
            t1 = time.perf_counter()
            try:
                scores, error = judge.score(chunk, sampled.texts), None
            except DataError as e:
                scores, error = None, str(e)
            sampling_s, judging_s = sampling_s + t1 - t0, judging_s + time.perf_counter() - t1
            results.append((index, sampled, scores, error))
            if error:
                break
    gathered = {index: (sampled, scores, error) for index, sampled, scores, error in gather_object(results)}
    if errors := [gathered[i][2] for i in sorted(gathered) if gathered[i][2]]:
        raise JudgeError(errors[0])
    ordered = [gathered[i] for i in range(len(batches))]  # padding repeated the last batch: each index once
    times = gather_object([(sampling_s, judging_s)])  # the processes work side by side: the slowest sets the pace
    return ([texts for sampled, _, _ in ordered for texts in sampled.texts],
            [values for _, scores, _ in ordered for values in scores],
            sum(sum(flags) for sampled, _, _ in ordered for flags in sampled.at_limit),
            {"sampling": round(max(s for s, _ in times), 3), "judging": round(max(j for _, j in times), 3)})


def describe(counts: dict) -> str:
    """The counts in words: '40 prompts, 320 completions (3 blank); prompts dropped: 12 (all completions ...)'."""
    dropped = ", ".join(f"{n} ({why})" for why, n in counts["prompts_dropped"].items() if n) or "none"
    tied = f", {counts['tied_pairs_dropped']} tied pairs dropped" if "tied_pairs_dropped" in counts else ""
    return (f"{counts['prompts']} prompts, {counts['completions']} completions ({counts['blank_completions']} blank); "
            f"prompts dropped: {dropped}{tied}")
