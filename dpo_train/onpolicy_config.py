"""The config sections of on-policy pairs: `generate` (sample, judge, pair: `dpo-train generate`)
and `rounds` (generate from the current policy, then DPO on its pairs, N times: `dpo-train rounds`).

Both read the prompts from `data.train` (prompt-only rows are enough) and the model from
`model.name_or_path`; training runs ignore these sections.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Optional

from .typed import setting

JUDGES = ("answer", "reward_model", "function")


@dataclass
class GenerateConfig:
    """On-policy pairs (dpo-train generate): K completions sampled per prompt of data.train from
    model.name_or_path, each scored by a judge, paired best against worst, written as a file dpo-train trains on."""
    output: Optional[str] = setting(None, "the pairs file (.jsonl); null: {train.output_dir}/pairs.jsonl")
    num_samples: int = setting(4, "K: completions sampled per prompt")
    max_new_tokens: int = setting(64, "tokens per completion; one that reaches it is cut there")
    temperature: float = setting(1.0, "sampling temperature; 1.0 with top_p 1 and top_k 0 samples the policy itself "
                                      "(on-policy)")
    top_p: float = setting(1.0, "nucleus sampling: the smallest set of tokens holding this probability")
    top_k: int = setting(0, "sample from the k most likely tokens only; 0: no cut")
    batch_size: int = setting(8, "prompts per generate call, each sampled num_samples times")
    seed: int = setting(0, "each batch of prompts is sampled under (seed, its index): the same pairs on any "
                           "process count")
    judge: Literal["answer", "reward_model", "function"] = setting(
        "answer", "answer: 1 for the row's `answer` exactly (as eval checks it), else 0; reward_model: judge_model's "
                  "score; function: judge_function(prompt, completion, row) -> float")
    judge_model: Optional[str] = setting(None, "a sequence-classification checkpoint with one output: hub id or "
                                               "directory (judge: reward_model)")
    judge_function: Optional[str] = setting(None, "MODULE:FUNCTION or path/to/file.py:FUNCTION (judge: function)")
    judge_batch_size: int = setting(16, "completions per reward-model forward")
    pairing: Literal["best_worst", "all_pairs"] = setting("best_worst", "best_worst: one pair per prompt, its best "
                                                                        "completion against its worst; all_pairs: "
                                                                        "every pair of different scores")
    backend: Literal["auto", "hf", "vllm"] = setting("auto", "auto: vLLM if installed and a GPU is there (not run "
                                                             "yet), else Hugging Face generation")


@dataclass
class RoundsConfig:
    """Rounds of on-policy DPO (dpo-train rounds): each round samples pairs from the current policy (the
    generate section) and DPO-trains it on them, in round-N/ folders of train.output_dir."""
    count: int = setting(2, "rounds of (generate from the current policy, DPO on its pairs); raise it to add rounds")
    reference: Literal["original", "previous"] = setting("original", "each round's frozen reference: the original "
                                                                     "model, or the previous round's policy")
    launcher: Optional[str] = setting(None, "a command each phase runs under, e.g. \"accelerate launch --config_file "
                                            "configs/accelerate/ddp.yaml\" (then -m dpo_train generate|train ...); "
                                            "null: every phase runs in this process")


def validate_onpolicy(config, check) -> None:
    """The generate and rounds sections, checked with config.checker's `check`."""
    g, r = config.generate, config.rounds
    for key in ("num_samples", "max_new_tokens", "batch_size", "judge_batch_size"):
        check(getattr(g, key) >= 1, f"generate.{key}", "must be >= 1", getattr(g, key))
    check(g.num_samples >= 2, "generate.num_samples", "must be >= 2: a pair needs two completions", g.num_samples)
    check(g.temperature > 0, "generate.temperature", "must be > 0 (sampling; greedy would give K equal completions)",
          g.temperature)
    check(0 < g.top_p <= 1, "generate.top_p", "must be in (0, 1]", g.top_p)
    check(g.top_k >= 0, "generate.top_k", "must be >= 0 (0: no cut)", g.top_k)
    check(0 <= g.seed < 2**32, "generate.seed", "must be in [0, 2**32) (the range torch's seed takes)", g.seed)
    check(g.output is None or g.output.endswith(".jsonl"), "generate.output", "must be a .jsonl file", g.output)
    check(g.judge != "reward_model" or bool(g.judge_model), "generate.judge_model",
          "is required with generate.judge: reward_model (a hub id or directory)", g.judge_model)
    check(g.judge == "reward_model" or g.judge_model is None, "generate.judge_model",
          f"is read only with generate.judge: reward_model (it is {g.judge})", g.judge_model)
    check(g.judge != "function" or bool(g.judge_function and re.fullmatch(r"[^:]+:[A-Za-z_]\w*", g.judge_function)),
          "generate.judge_function", "must be MODULE:FUNCTION or path/to/file.py:FUNCTION with generate.judge: function",
          g.judge_function)
    check(g.judge == "function" or g.judge_function is None, "generate.judge_function",
          f"is read only with generate.judge: function (it is {g.judge})", g.judge_function)
    check(r.count >= 1, "rounds.count", "must be >= 1", r.count)
    check(r.launcher is None or bool(r.launcher.strip()), "rounds.launcher", "must be a command or null", r.launcher)
