import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from conftest import make_model, make_tokenizer
from dpo_train.cli import app
from dpo_train.data import tokenize_pair


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    """A second tiny model (other seed, same tokenizer): the 'trained' model of these tests."""
    path = tmp_path_factory.mktemp("tiny-llama-other")
    make_model(len(make_tokenizer()), seed=1).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def naive_logp(model, prompt_ids, completion_ids) -> float:
    """Sum of log p(completion token | everything before it), one unpadded sequence at a time."""
    logprobs = model(torch.tensor([prompt_ids + completion_ids])).logits[0].log_softmax(-1)
    return sum(logprobs[len(prompt_ids) + k - 1, token].item() for k, token in enumerate(completion_ids))


def test_eval_matches_a_naive_computation(tmp_path, tiny_model_dir, other_model_dir, tiny_data):
    out = tmp_path / "eval.json"
    args = ["eval", "--model", str(other_model_dir), "--ref", str(tiny_model_dir), "--data", tiny_data[1],
            "--beta", "0.5", "--max-new-tokens", "3", "--examples", "2", "--json", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())

    tokenizer = AutoTokenizer.from_pretrained(other_model_dir)
    model, ref = (AutoModelForCausalLM.from_pretrained(p).eval() for p in (other_model_dir, tiny_model_dir))
    rows = [json.loads(line) for line in open(tiny_data[1])]
    margins, losses = [], []
    with torch.no_grad():
        for row in rows:
            pair = tokenize_pair(row, tokenizer, 512, 256)
            chosen, rejected = (0.5 * (naive_logp(model, pair["prompt_ids"], pair[side]) -
                                       naive_logp(ref, pair["prompt_ids"], pair[side]))
                                for side in ("chosen_ids", "rejected_ids"))
            margins.append(chosen - rejected)
            losses.append(math.log1p(math.exp(-(chosen - rejected))))  # -log sigmoid(margin)
    metrics = report["metrics"]["model"]
    assert metrics["rewards/margins"] == pytest.approx(sum(margins) / len(rows), abs=1e-5)
    assert metrics["rewards/accuracies"] == sum(m > 0 for m in margins) / len(rows)
    assert metrics["loss"] == pytest.approx(sum(losses) / len(rows), abs=1e-5)
    assert report["metrics"]["reference"]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # its own baseline
    assert report["pairs"] == len(rows) and len(report["examples"]) == 2

    # greedy generation, one prompt at a time, decoded without special tokens
    first = tokenize_pair(rows[0], tokenizer, 512, 256)["prompt_ids"]
    generated = model.generate(torch.tensor([first]), max_new_tokens=3, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    expected = tokenizer.decode(generated[0, len(first):], skip_special_tokens=True)
    assert report["examples"][0] == {"prompt": rows[0]["prompt"], "answer": rows[0]["answer"],
                                     "reference": report["examples"][0]["reference"], "model": expected}
    # the table shows the same numbers
    assert f"{'reward accuracy (margin > 0)':40s}{0.0:12.3f}{metrics['rewards/accuracies']:12.3f}" in result.stdout
    assert "[1]  prompt:    " + rows[1]["prompt"] in result.stdout


def test_eval_json_to_stdout(tiny_model_dir, tiny_data):
    args = ["eval", "--model", str(tiny_model_dir), "--ref", str(tiny_model_dir), "--data", tiny_data[1],
            "--max-new-tokens", "0", "--json", "-"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["metrics"]["model"]["rewards/margins"] == 0.0 and report["examples"] == []  # model == ref


def test_eval_of_a_model_that_is_not_a_causal_lm(tmp_path, tiny_model_dir, tiny_data):
    from transformers import T5Config
    T5Config(d_model=8, d_ff=8, num_layers=1, num_heads=1, d_kv=4, vocab_size=16).save_pretrained(tmp_path)
    result = CliRunner().invoke(app, ["eval", "--model", str(tmp_path), "--ref", str(tiny_model_dir),
                                      "--data", tiny_data[1]])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path}: not a causal language model (t5)")


def test_eval_options_are_checked_before_loading(tiny_data):
    result = CliRunner().invoke(app, ["eval", "--model", "m", "--ref", "r", "--data", tiny_data[1], "--beta", "0"])
    assert result.exit_code == 2 and result.stderr.strip() == "error: --beta must be > 0, got 0.0"


def test_eval_refuses_a_reference_with_a_smaller_vocabulary(tmp_path, tiny_model_dir, tiny_data):
    make_model(vocab_size=50).save_pretrained(tmp_path)  # the tokenizer has 105 tokens
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--ref", str(tmp_path),
                                      "--data", tiny_data[1]])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path}: 50 token embeddings, fewer than the 105 tokens of {tiny_model_dir}'s tokenizer; "
        "model and reference must share it")


def make_run(tmp_path, model_dir, ref_dir, eval_path, *overrides):
    """A run directory as training leaves it: config.yaml beside final/ (here another tiny model)."""
    import shutil

    from dpo_train.config import load_config, save_config
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{name_or_path: {ref_dir}}}\ndata: {{train: {eval_path}, eval: {eval_path}, "
                      f"max_length: 40, max_prompt_length: 30}}\nloss: {{type: ipo, beta: 0.5}}\n"
                      f"train: {{output_dir: {tmp_path / 'run'}}}\n")
    run = tmp_path / "run"
    shutil.copytree(model_dir, run / "final")
    save_config(load_config(config, list(overrides)), run / "config.yaml")
    return run


def test_eval_of_a_run_directory_reads_its_config(tmp_path, tiny_model_dir, other_model_dir, tiny_data):
    run = make_run(tmp_path, other_model_dir, tiny_model_dir, tiny_data[1])
    out = tmp_path / "new" / "folder" / "eval.json"  # a folder that does not exist yet
    result = CliRunner().invoke(app, ["eval", "--model", str(run), "--max-new-tokens", "0", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert (report["model"], report["reference"], report["data"]) == (str(run / "final"), str(tiny_model_dir), tiny_data[1])
    assert (report["loss_type"], report["beta"], report["max_length"], report["max_prompt_length"]) == (["ipo"], 0.5, 40, 30)
    assert report["run_config"] == str(run / "config.yaml")

    # the IPO loss of the run, (h - 1/(2 beta))^2 with per-token mean log-ratios, worked out one pair at a time
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    model, ref = (AutoModelForCausalLM.from_pretrained(p).eval() for p in (run / "final", tiny_model_dir))
    losses = []
    with torch.no_grad():
        for row in map(json.loads, open(tiny_data[1])):
            pair = tokenize_pair(row, tokenizer, 40, 30)
            h = sum((naive_logp(model, pair["prompt_ids"], pair[side]) - naive_logp(ref, pair["prompt_ids"], pair[side]))
                    * sign / len(pair[side]) for side, sign in (("chosen_ids", 1), ("rejected_ids", -1)))
            losses.append((h - 1 / (2 * 0.5)) ** 2)
    assert report["metrics"]["model"]["loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-4)
    assert report["metrics"]["reference"]["loss"] == pytest.approx(1.0, abs=1e-6)  # h = 0: (0 - 1)^2

    # options still win, and a run's final/ finds the config beside it
    result = CliRunner().invoke(app, ["eval", "--model", str(run / "final"), "--loss-type", "sigmoid", "--beta", "0.2",
                                      "--max-length", "64", "--max-new-tokens", "0", "--json", "-"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["loss_type"], report["beta"], report["max_length"], report["max_prompt_length"]) == (["sigmoid"], 0.2, 64, 30)
    assert report["metrics"]["reference"]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_eval_without_a_run_needs_ref_and_data(tiny_model_dir, tiny_data):
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--data", tiny_data[1]])
    assert result.exit_code == 2 and result.stderr.strip() == (
        "error: --ref is required (or give --model a run directory whose config.yaml names it)")
