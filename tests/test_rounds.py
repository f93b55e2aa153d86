"""dpo-train rounds on the tiny model: each round's pairs sampled from the previous round's policy, its
DPO run and evaluation in its own folder, the reference as rounds.reference says; a rerun continues,
after SIGKILLs at several points too, with the results of an uninterrupted run; generation split
across two launched CPU processes gives the pairs of one."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from dpo_train.checkpoint import CheckpointError, complete_checkpoints
from dpo_train.cli import app
from dpo_train.config import ConfigError, load_config
from dpo_train.generate import generate_pairs
from dpo_train.rounds import round_configs, run_rounds
from test_checkpoint import without_timing
from test_engines import free_port, launch, run_command
from test_trainer import read_metrics

ROOT = Path(__file__).resolve().parent.parent
JUDGE = "def digits(prompt, completion, row):\n    return sum(c.isdigit() for c in completion)\n"


def rounds_config(tmp_path, model_dir, tiny_data, *overrides):
    """Prompts: the 48 tiny train rows; held-out: the 16 eval pairs. 2 rounds of 12 pairs or so, 2 steps each."""
    (tmp_path / "judge.py").write_text(JUDGE)
    path = tmp_path / "rounds.yaml"
    path.write_text(f"""
model: {{name_or_path: {model_dir}}}
data: {{train: [{{path: {tiny_data[0]}, take: 16}}], eval: {tiny_data[1]}, max_length: 64, max_prompt_length: 32}}
train: {{output_dir: {tmp_path / 'rounds'}, per_device_batch_size: 4, grad_accum_steps: 1, learning_rate: 1e-3,
         max_steps: 3, save_every: 2, eval_max_new_tokens: 2, seed: 0}}
generate: {{num_samples: 4, max_new_tokens: 6, batch_size: 6, judge: function, judge_function: {tmp_path / 'judge.py'}:digits}}
rounds: {{count: 2}}
""")
    return path, load_config(path, list(overrides))


def test_each_round_samples_from_the_last_policy_and_trains_in_its_own_folder(tmp_path, tiny_model_dir, tiny_data):
    reference = "previous"
    path, config = rounds_config(tmp_path, tiny_model_dir, tiny_data, f"rounds.reference={reference}")
    records = run_rounds(config)
    root = tmp_path / "rounds"
    assert [r["round"] for r in records] == [1, 2]
    for number, record in enumerate(records, 1):
        folder = root / f"round-{number}"
        assert (folder / "final" / "model.safetensors").is_file() and record["model"] == str(folder / "final")
        assert record["pairs"] == len((folder / "pairs.jsonl").read_text().splitlines()) > 0
        assert record["eval"]["policy"]["rewards/accuracies"] == json.loads(
            (folder / "eval_results.json").read_text())["policy"]["rewards/accuracies"]
        assert yaml.safe_load((folder / "train.yaml").read_text())["data"]["train"][0]["path"] == str(folder / "pairs.jsonl")
    second = yaml.safe_load((root / "round-2" / "train.yaml").read_text())
    assert second["model"]["name_or_path"] == str(root / "round-1" / "final") and second["model"]["ref_name_or_path"] is None
    # round 2 starts from round 1's policy, which is its reference: step 0 has loss ln 2
    assert [r for r in read_metrics(root / "round-2") if "loss" in r][0]["loss"] == pytest.approx(math.log(2), abs=1e-6)

    # round 2's pairs are what `dpo-train generate` samples from round 1's policy under round 2's seed
    alone = load_config(path, [f"model.name_or_path={root / 'round-1' / 'final'}", "generate.seed=1",
                               f"generate.output={tmp_path / 'alone.jsonl'}"])
    generate_pairs(alone)
    assert (tmp_path / "alone.jsonl").read_bytes() == (root / "round-2" / "pairs.jsonl").read_bytes()

    # a rerun finds every round complete; a changed sampling setting is refused; more rounds are allowed
    made = (root / "round-2" / "final" / "model.safetensors").stat().st_mtime_ns
    assert run_rounds(load_config(path, [f"rounds.reference={reference}"])) == records
    assert (root / "round-2" / "final" / "model.safetensors").stat().st_mtime_ns == made
    with pytest.raises(CheckpointError, match=r"rounds.yaml: the rounds started with another config "
                                              r"\(generate.num_samples differ\)"):
        run_rounds(load_config(path, [f"rounds.reference={reference}", "generate.num_samples=3"]))
    assert run_rounds(load_config(path, [f"rounds.reference={reference}", "rounds.count=1"])) == records[:1]


def test_a_failed_launched_phase_ends_the_rounds_with_its_exit_code(tmp_path, tiny_model_dir, tiny_data):
    path, _ = rounds_config(tmp_path, tiny_model_dir, tiny_data)
    result = CliRunner().invoke(app, ["rounds", "--config", str(path), "rounds.launcher=/bin/false"])
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert result.exit_code == 1 and len(errors) == 1, result.output
    assert errors[0].startswith("error: round 1: generate failed (exit code 1): /bin/false -m dpo_train generate --config ")
    assert not (tmp_path / "rounds" / "round-1" / "pairs.jsonl").exists()


def test_the_reference_is_the_original_model_or_the_previous_policy(tmp_path, tiny_model_dir, tiny_data):
    _, config = rounds_config(tmp_path, tiny_model_dir, tiny_data, f"model.ref_name_or_path={tmp_path / 'ref'}")
    folder = tmp_path / "rounds" / "round-3"
    for reference, expected in (("original", str(tmp_path / "ref")), ("previous", None)):
        config.rounds.reference = reference
        sampling, training = round_configs(config, 3, folder)
        assert sampling.model.name_or_path == training.model.name_or_path == str(tmp_path / "rounds" / "round-2" / "final")
        assert training.model.ref_name_or_path == expected and sampling.generate.seed == 2
        assert training.train.output_dir == str(folder) and sampling.generate.output == str(folder / "pairs.jsonl")
    config.model.lora.r = 4
    config.rounds.reference = "original"
    with pytest.raises(ConfigError, match="rounds.reference: must be previous with LoRA"):
        run_rounds(config)


KILLER = """
import os, signal, sys
kind, _, at = os.environ.get("KILL_AT", "").partition(":")
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if kind == "sampling":  # as the at-th batch of this process's life starts sampling
    import dpo_train.sampling as sampling
    sample, calls = sampling.HFSampler.__call__, []
    def sample_or_die(self, ids, seed):
        calls.append(seed)
        if len(calls) == int(at):
            die()
        return sample(self, ids, seed)
    sampling.HFSampler.__call__ = sample_or_die
elif kind in ("checkpoint", "final"):  # right after checkpoint step-`at` / the at-th final model is saved
    import dpo_train.trainer as trainer
    name = "save_checkpoint" if kind == "checkpoint" else "save_final"
    save, finals = getattr(trainer, name), []
    def save_then_die(accelerator, where, *args, **kwargs):
        result = save(accelerator, where, *args, **kwargs)
        finals.append(1)
        if (kind == "checkpoint" and args[0] == int(at)) or (kind == "final" and len(finals) == int(at)):
            die()
        return result
    setattr(trainer, name, save_then_die)
from dpo_train.cli import app
app(["rounds", "--config", sys.argv[1]])
"""


def rounds_process(config: Path, kill_at: str = "") -> subprocess.Popen:
    env = {**os.environ, "KILL_AT": kill_at, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", KILLER, str(config)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"dpo-train rounds still running after {timeout} s:\n{process.communicate()[0][-3000:]}")
    return process.returncode, output


def assert_same_rounds(one: Path, two: Path) -> None:
    """Every round's pairs, settings (but the timings), final weights (bitwise), evaluation and metrics."""
    for number in (1, 2):
        a, b = one / f"round-{number}", two / f"round-{number}"
        assert (a / "pairs.jsonl").read_bytes() == (b / "pairs.jsonl").read_bytes()
        untimed = lambda f, run: {k: v for k, v in yaml.safe_load((f / "pairs.generation.yaml").read_text().replace(
            str(run.parent), "HERE")).items() if k not in ("seconds", "completions_per_s")}  # paths differ, no more
        assert untimed(a, one) == untimed(b, two)
        expected, got = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
        assert json.loads((a / "eval_results.json").read_text()) == json.loads((b / "eval_results.json").read_text())
        assert without_timing(read_metrics(a)) == without_timing(read_metrics(b))


@pytest.mark.slow  # six processes, each importing torch and transformers
def test_rounds_resume_after_sigkill_at_any_point_with_the_uninterrupted_results(tmp_path, tiny_model_dir, tiny_data):
    """Killed (SIGKILL) while sampling round 1, right after its step-2 checkpoint, right after its final
    model is saved (before the round is marked complete), and from outside as soon as round 2's pairs
    appear; each time the same command continues. The end: the uninterrupted run, bit for bit."""
    whole_dir, killed_dir = tmp_path / "whole", tmp_path / "killed"
    configs = {}
    for name, folder in (("whole", whole_dir), ("killed", killed_dir)):
        folder.mkdir()
        configs[name], _ = rounds_config(folder, tiny_model_dir, tiny_data)
    code, output = finish(rounds_process(configs["whole"]))
    assert code == 0, output[-3000:]
    root = killed_dir / "rounds"
    for kill_at, left in (("sampling:2", lambda: not (root / "round-1" / "pairs.jsonl").exists()),
                          ("checkpoint:2", lambda: [p.name for p in complete_checkpoints(root / "round-1" / "checkpoints")]
                           == ["step-2"] and not (root / "round-1" / "final").exists()),
                          ("final:1", lambda: (root / "round-1" / "final").is_dir() and
                           not (root / "round-1" / "ROUND.json").exists())):
        code, output = finish(rounds_process(configs["killed"], kill_at))
        assert code == -signal.SIGKILL and left(), (kill_at, output[-3000:])
    process = rounds_process(configs["killed"])  # killed from outside once round 2's pairs are written
    while not (root / "round-2" / "pairs.jsonl").exists() and process.poll() is None:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    code, output = finish(process)
    assert code == -signal.SIGKILL and (root / "round-1" / "ROUND.json").exists(), output[-3000:]
    assert not (root / "round-2" / "ROUND.json").exists()
    code, output = finish(rounds_process(configs["killed"]))
    assert code == 0, output[-3000:]
    assert_same_rounds(whole_dir / "rounds", root)


@pytest.mark.slow  # launches two processes that import torch and transformers
@pytest.mark.parametrize("engine", ["ddp", "fsdp", "zero3"])
def test_generation_on_two_processes_gives_the_pairs_of_one(tmp_path, tiny_model_dir, tiny_data, engine):
    """`COMMAND=generate scripts/launch.sh ENGINE CONFIG`: each process samples its share of the batches with
    the whole model (ZeRO-3 and FSDP2 shard nothing here), the main process writes what was gathered: the
    same pairs as one process, byte for byte."""
    path, config = rounds_config(tmp_path, tiny_model_dir, tiny_data, f"generate.output={tmp_path / 'one.jsonl'}")
    generate_pairs(config)
    os.environ["COMMAND"] = "generate"
    try:
        result = launch(engine, path, f"generate.output={tmp_path / 'two.jsonl'}", cache=tmp_path / "cache")
    finally:
        del os.environ["COMMAND"]
    assert "on 2 CPU processes (gloo)" in result.stdout and "(hf, 2 process(es))" in result.stdout
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert yaml.safe_load((tmp_path / "two.generation.yaml").read_text())["processes"] == 2


@pytest.mark.slow  # launches two processes per phase
def test_rounds_under_a_launcher_run_each_phase_on_two_processes(tmp_path, tiny_model_dir, tiny_data):
    """rounds.launcher: each phase is its own launched job (DDP on 2 CPU processes here); round 1's pairs
    are those of one process, and its run completes with its evaluation."""
    launcher = (f"accelerate launch --config_file {ROOT / 'configs' / 'accelerate' / 'ddp.yaml'} --num_processes 2 "
                f"--mixed_precision no --main_process_port {free_port()}")
    path, config = rounds_config(tmp_path, tiny_model_dir, tiny_data, "rounds.count=1",
                                 f"generate.output={tmp_path / 'one.jsonl'}")
    generate_pairs(config)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = run_command([sys.executable, "-m", "dpo_train", "rounds", "--config", str(path), "rounds.count=1",
                          f"rounds.launcher={launcher}"], env, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "rounds" / "round-1"
    assert (folder / "pairs.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert result.stdout.count("on 2 CPU processes (gloo)") == 2  # the generation and the DPO run
    assert json.loads((folder / "ROUND.json").read_text())["eval"]["policy"]["rewards/accuracies"] >= 0
    assert "3 optimizer steps of 8 pairs" in result.stdout
