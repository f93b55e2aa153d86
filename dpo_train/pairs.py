"""Preference pairs from scored completions, and the pairs file.

`best_worst` pairs each prompt's highest-scored completion (chosen) with its lowest (rejected), the
first sampled of each where several share the score. `all_pairs` pairs every two completions whose
scores differ, the higher one chosen. A blank completion is never paired. What is not paired is
counted: prompts whose completions all score the same, prompts with fewer than two non-blank
completions, and (all_pairs) pairs of equal scores.

The file is JSON Lines, one pair a row, `prompt` as its row gave it, `chosen` and `rejected` as
text, their scores, every completion's score, and the row's `answer` when it has one: `dpo-train`
trains on it as it is. Beside it, `NAME.generation.yaml` records how it was made. Both are written
under temporary names and renamed into place, the pairs file last: it exists only when complete.
"""

from __future__ import annotations

import json
import os
from itertools import combinations
from pathlib import Path

import yaml

ALL_EQUAL, TOO_FEW = "all completions scored the same", "fewer than 2 non-blank completions"


def make_pairs(prompts, completions: list[list[str]], scores: list[list[float]], pairing: str) -> tuple[list[dict], dict]:
    """(pair rows, counts) for `prompts` and their scored completions."""
    rows, dropped, tied, blank = [], {ALL_EQUAL: 0, TOO_FEW: 0}, 0, 0
    for prompt, texts, values in zip(prompts, completions, scores):
        scored = [(value, text) for text, value in zip(texts, values) if text.strip()]
        blank += len(texts) - len(scored)
        if len(scored) < 2:
            dropped[TOO_FEW] += 1
            continue
        if pairing == "best_worst":
            best = max(scored, key=lambda item: item[0])  # max and min keep the first of equal scores
            worst = min(scored, key=lambda item: item[0])
            chosen_rejected = [(best, worst)] if best[0] != worst[0] else []
        else:
            chosen_rejected = []
            for a, b in combinations(scored, 2):
                if a[0] == b[0]:
                    tied += 1
                else:
                    chosen_rejected.append((a, b) if a[0] > b[0] else (b, a))
        if not chosen_rejected:
            dropped[ALL_EQUAL] += 1
        extra = {"answer": prompt.row["answer"]} if prompt.row.get("answer") is not None else {}
        rows += [{"prompt": prompt.given, "chosen": chosen[1], "rejected": rejected[1], "chosen_score": chosen[0],
                  "rejected_score": rejected[0], "scores": list(values), **extra} for chosen, rejected in chosen_rejected]
    counts = {"prompts": len(prompts), "completions": sum(map(len, completions)), "blank_completions": blank,
              "pairs": len(rows), "prompts_dropped": dropped}
    if pairing == "all_pairs":
        counts["tied_pairs_dropped"] = tied
    return rows, counts


def settings_path(pairs_path: Path) -> Path:
    """Where the record of how a pairs file was made lives: NAME.generation.yaml beside NAME.jsonl."""
    return pairs_path.with_name(pairs_path.stem + ".generation.yaml")


def write_pairs(path: Path, rows: list[dict], settings: dict) -> None:
    """Write the pairs and their settings, each under a temporary name, flushed, then renamed; the
    pairs file last, so that it exists only when both are complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, text in ((settings_path(path), yaml.safe_dump(settings, sort_keys=False)),
                         (path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))):
        tmp = target.with_name(f".tmp-{target.name}")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            tmp.rename(target)
        finally:
            tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)  # the renames themselves reach the disk
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
