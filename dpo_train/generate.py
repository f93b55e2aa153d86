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
    batches = [(index, start) for index, start in enumerate(range(0, len(prompts), g.batch_size))]
    results, sampling_s, judging_s = [], 0.0, 0.0
    with accelerator.split_between_processes(batches, apply_padding=True) as share:
        for index, start in bar(share, "sampling", show=accelerator.is_main_process, unit="batch"):
            chunk = prompts[start:start + g.batch_size]
            t0 = time.perf_counter()
            sampled = sampler([p.ids for p in chunk], batch_seed(g.seed, index))
            t1 = time.perf_counter()
            try:
                scores, error = judge.score(chunk, sampled.texts), None
            except DataError as e:  # reported once every process has its results: none is left waiting
                scores, error = None, str(e)
            sampling_s, judging_s = sampling_s + t1 - t0, judging_s + time.perf_counter() - t1
            results.append((index, sampled, scores, error))
            if error:
                break
    gathered = {index: (sampled, scores, error) for index, sampled, scores, error in gather_object(results)}
    times = gather_object([(sampling_s, judging_s)])
    errors = [error for _, _, error in (gathered[i] for i in sorted(gathered)) if error]
    if errors:
        raise JudgeError(errors[0])
    if len(gathered) != len(batches):  # a process stopped early on another's error: not reached without one
        raise RuntimeError(f"gathered {len(gathered)} of {len(batches)} batches")
    completions = [texts for i in range(len(batches)) for texts in gathered[i][0].texts]
    at_limit = sum(sum(flags) for i in range(len(batches)) for flags in gathered[i][0].at_limit)
    scores = [values for i in range(len(batches)) for values in gathered[i][1]]
    rows, counts = make_pairs(prompts, completions, scores, g.pairing)
    counts["completions_at_max_new_tokens"] = at_limit
    sampling_wall = max(s for s, _ in times)  # the processes sample side by side: the slowest one sets the pace
    settings = {"model": m.name_or_path, "prompts": d.train if isinstance(d.train, str) else
                [dataclasses.asdict(s) for s in d.train], "backend": backend, "processes": accelerator.num_processes,
                "sampling": {k: getattr(g, k) for k in ("num_samples", "max_new_tokens", "temperature", "top_p",
                                                        "top_k", "batch_size", "seed")},
                "judge": {"judge": g.judge, "judge_model": g.judge_model, "judge_function": g.judge_function},
                "pairing": g.pairing, "counts": counts,
                "seconds": {"sampling": round(sampling_wall, 3), "judging": round(max(j for _, j in times), 3)},
                "completions_per_s": round(counts["completions"] / sampling_wall, 3) if sampling_wall else None}
    if not rows:
        raise DataError(f"generate: no pairs: {describe(counts)}; sample more (generate.num_samples, "
                        "generate.temperature) or use a judge that tells the completions apart")
    if accelerator.is_main_process:
        write_pairs(out, rows, settings)
    accelerator.wait_for_everyone()
    log(f"wrote {len(rows)} pairs to {out} ({describe(counts)}); {settings['completions_per_s']} completions/s; "
        f"settings in {settings_path(out)}")
    accelerator.end_training()
    return settings


def describe(counts: dict) -> str:
    """The counts in words: '40 prompts, 160 completions, 3 blank; dropped 12 (all completions scored the same)'."""
    dropped = ", ".join(f"{n} ({why})" for why, n in counts["prompts_dropped"].items() if n) or "none"
    tied = f", {counts['tied_pairs_dropped']} tied pairs dropped" if "tied_pairs_dropped" in counts else ""
    return (f"{counts['prompts']} prompts, {counts['completions']} completions ({counts['blank_completions']} blank); "
            f"prompts dropped: {dropped}{tied}")
