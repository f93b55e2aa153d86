"""`dpo-train rounds`: iterative on-policy DPO. Round N samples pairs from the policy round N-1 ended
with (round 1: model.name_or_path), as `dpo-train generate` does with prompts from data.train, and
DPO-trains that policy on them, as `dpo-train` does. The reference is the original model or the
previous round's policy (rounds.reference).

    {train.output_dir}/rounds.yaml        the config the rounds started with (a rerun must match it)
    {train.output_dir}/round-N/
        generate.yaml, train.yaml         the configs of the round's two phases
        pairs.jsonl, pairs.generation.yaml
        config.yaml, metrics.jsonl, checkpoints/, final/, eval_results.json   the round's DPO run
        ROUND.json                        written last: the round is complete (its counts and evaluation)

A rerun continues where a run stopped, SIGKILL included, with the results of an uninterrupted run: a
complete round is skipped; a pairs file exists only once complete, and sampling is seeded, so an
interrupted generation is redone with the same completions; training resumes from its newest
checkpoint (bitwise) or, without one, starts again from the same seed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
from pathlib import Path

import yaml

from .checkpoint import SAFE_TO_CHANGE, CheckpointError
from .config import Columns, Config, ConfigError, Source, load_config

DONE = "ROUND.json"
# what a rerun may change: what a training run may change, and how many rounds there are and how they run
RERUN_SAFE = SAFE_TO_CHANGE | {"rounds.count", "rounds.launcher"}


class PhaseFailed(RuntimeError):
    """A phase run under rounds.launcher exited with an error (its own message is above)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def run_rounds(config: Config, force: bool = False) -> list[dict]:
    """Run (or continue) every round; returns each round's record (ROUND.json)."""
    r, m = config.rounds, config.model
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("dpo-train rounds runs once, not under a launcher: set rounds.launcher to the launch "
                          "command, and each phase runs launched")
    if m.lora.r and r.reference == "original":
        raise ConfigError("rounds.reference: must be previous with LoRA (model.lora.r > 0): the reference is the "
                          "policy with its adapter switched off, which is the previous round's model")
    root = Path(config.train.output_dir)
    check_same_config(root / "rounds.yaml", config.to_dict(), force)
    root.mkdir(parents=True, exist_ok=True)
    write_atomically(root / "rounds.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    records = []
    for number in range(1, r.count + 1):
        folder = root / f"round-{number}"
        if not (folder / DONE).is_file():
            print(f"\n=== round {number} of {r.count}: {folder}", flush=True)
            run_round(config, number, folder)
        records.append(json.loads((folder / DONE).read_text()))
    print("\n" + "\n".join(table(records)))
    return records


def round_configs(config: Config, number: int, folder: Path) -> tuple[Config, Config]:
    """(the generation's config, the DPO run's config) of round `number`."""
    m, g, d, t = config.model, config.generate, config.data, config.train
    policy = m.name_or_path if number == 1 else str(folder.parent / f"round-{number - 1}" / "final")
    reference = (m.ref_name_or_path or m.name_or_path) if config.rounds.reference == "original" else policy
    pairs = folder / "pairs.jsonl"
    sampling = dataclasses.replace(config, model=dataclasses.replace(m, name_or_path=policy),
                                   generate=dataclasses.replace(g, output=str(pairs), seed=g.seed + number - 1))
    # the pairs file's own column names, whatever data.columns maps for the prompts and the eval data
    source = Source(path=str(pairs), split="train", columns=Columns("prompt", "chosen", "rejected"))
    training = dataclasses.replace(config, model=dataclasses.replace(
        m, name_or_path=policy, ref_name_or_path=None if reference == policy else reference),
        data=dataclasses.replace(d, train=[source]), train=dataclasses.replace(
            t, output_dir=str(folder), push_to_hub=t.push_to_hub if number == config.rounds.count else None))  # the last only
    return sampling, training


def run_round(config: Config, number: int, folder: Path) -> None:
    """Generate the round's pairs unless they are complete, train on them (resuming), then mark it done."""
    folder.mkdir(parents=True, exist_ok=True)
    sampling, training = round_configs(config, number, folder)
    for name, phase in (("generate", sampling), ("train", training)):  # the record, and what each phase reads
        write_atomically(folder / f"{name}.yaml", yaml.safe_dump(phase.to_dict(), sort_keys=False))
    if not (folder / "pairs.jsonl").is_file():
        run_phase("generate", folder / "generate.yaml", config.rounds.launcher, number)
    run_phase("train", folder / "train.yaml", config.rounds.launcher, number)
    generation = yaml.safe_load((folder / "pairs.generation.yaml").read_text())
    results = json.loads((folder / "eval_results.json").read_text()) if (folder / "eval_results.json").is_file() else {}
    record = {"round": number, "policy_from": training.model.name_or_path,
              "reference": training.model.ref_name_or_path or training.model.name_or_path,
              "model": str(folder / "final"), "pairs": generation["counts"]["pairs"], "counts": generation["counts"],
              "completions_per_s": generation["completions_per_s"],
              "eval": {name: {k: v for k, v in metrics.items() if k != "examples"} for name, metrics in results.items()}}
    write_atomically(folder / DONE, json.dumps(record, indent=2))


def run_phase(command: str, config_path: Path, launcher: str | None, number: int) -> None:
    """One phase: in this process, or as its own launched job under `launcher`."""
    if launcher is None:
        phase = load_config(config_path)
        if command == "generate":
            from .generate import generate_pairs
            generate_pairs(phase)
        else:
            from .trainer import train
            train(phase, resume="auto")
        return
    args = [*shlex.split(launcher), "-m", "dpo_train", command, "--config", str(config_path),
            *(["--resume", "auto"] if command == "train" else [])]
    code = subprocess.run(args, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    if code:
        raise PhaseFailed(f"round {number}: {command} failed (exit code {code}): {shlex.join(args)}; fix the cause "
                          "and run the same dpo-train rounds command again to continue", code if code < 128 else 1)


def check_same_config(path: Path, current: dict, force: bool) -> None:
    """A rerun continues the rounds only with the config they started with, but for RERUN_SAFE keys."""
    if not path.is_file():
        return
    saved = yaml.safe_load(path.read_text())
    differing = [f"{section}.{key}" for section in sorted(set(saved) | set(current))
                 for key in sorted(set(saved.get(section, {})) | set(current.get(section, {})))
                 if saved.get(section, {}).get(key) != current.get(section, {}).get(key)]
    differing = [key for key in differing if key not in RERUN_SAFE]
    if differing and not force:
        raise CheckpointError(f"{path}: the rounds started with another config ({', '.join(differing)} differ); "
                              "pass --force-resume to continue anyway (what is done stays as it is), or choose "
                              "another train.output_dir")
    if differing:
        print(f"warning: continuing the rounds despite config differences in {', '.join(differing)} (--force-resume)")


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(path)


def table(records: list[dict]) -> list[str]:
    """One line per round: pairs, completions/s, and the policy's held-out metrics."""
    lines = [f"{'round':>5s} {'pairs':>6s} {'compl/s':>8s} {'reward acc':>11s} {'exact answers':>14s}  reference"]
    for record in records:
        policy = record["eval"].get("policy", {})
        cells = [f"{policy[key]:.3f}" if key in policy else "-" for key in ("rewards/accuracies", "exact_answer_accuracy")]
        lines.append(f"{record['round']:>5d} {record['pairs']:>6d} {record['completions_per_s'] or 0:>8.2f} "
                     f"{cells[0]:>11s} {cells[1]:>14s}  {record['reference']}")
    return lines
