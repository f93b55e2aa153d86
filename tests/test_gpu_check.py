"""scripts/gpu_check.sh and its Python parts, on a CPU: the scripts parse, the phases and their
selection, the Qwen2-0.5B shape, the deadline, the report's ratios and verdicts; a dry run (slow)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402
import gpu_report  # noqa: E402


def helper(*args):
    return subprocess.run([sys.executable, "scripts/gpu_check.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_bundle.sh", "launch.sh"])
def test_the_shell_scripts_parse(script):
    assert subprocess.run(["bash", "-n", ROOT / "scripts" / script]).returncode == 0


def test_the_phases_run_in_order_and_a_prefix_selects_them():
    names = lambda out: [line.split()[0] for line in out.splitlines()]
    listed = names(helper("--list").stdout)
    assert listed[:6] == ["setup", "bench-qwen2-prompt-heavy", "bench-qwen2-completion-heavy",
                          "bench-smollm2-prompt-heavy", "bench-smollm2-completion-heavy", "resume"]
    assert {"fsdp", "zero3", "families", "flex-vs-loop-prompt-heavy", "compiled-packed-qwen2-completion-heavy",
            "sequence-1gpu", "sequence-2gpu"} <= set(listed)
    assert names(helper("--list", "--phases", "resume,compiled-packed-qwen2").stdout) == [
        "resume", "compiled-packed-qwen2-prompt-heavy", "compiled-packed-qwen2-completion-heavy"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CPU only")
def test_without_a_gpu_it_stops_and_names_the_dry_run(tmp_path):
    result = helper("--out", str(tmp_path), "--phases", "setup")
    assert result.returncode == 1 and "--dry-run" in result.stderr


def test_the_qwen2_shape_has_qwen2_05bs_parameter_count():
    """Qwen2-0.5B: 151 936 x 896 tied embeddings, 24 layers of (q, k, v with biases; o; a 4 864-wide
    MLP; 2 norms), a final norm: 494 032 768 parameters."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**gpu_check.QWEN2_05B))
    layer = (896 * 896 + 896) + 2 * (896 * 128 + 128) + 896 * 896 + 3 * 896 * 4864 + 2 * 896
    assert model.num_parameters() == 151936 * 896 + 24 * layer + 896 == 494_032_768


def test_a_command_past_the_deadline_is_stopped(tmp_path):
    """With what it started: a child of the command (here a second sleep) is stopped too."""
    run = gpu_check.Runner(budget=1, log=tmp_path / "log")
    result = run(["bash", "-c", f"sleep 20 & echo $! > {tmp_path / 'child'}; wait"])
    assert result["rc"] is None and result["seconds"] < 20  # stopped: the sleep alone lasts 20 s
    child = int((tmp_path / "child").read_text())
    time.sleep(0.5)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
    assert "$ bash -c sleep 20" in (tmp_path / "log").read_text()


def results():
    row = lambda trainer, tokens, mb, mfu: {"shape": "prompt-heavy", "trainer": trainer, "batch": 13,
                                             "tokens/s": tokens, "peak_mb": mb, "mfu": mfu}
    return {
        "setup": {"rc": 0, "seconds": 5, "device": "NVIDIA H100 80GB HBM3", "versions": {"torch": "2.11.0"},
                  "gemm": {"flops_per_second": 7.5e14, "threads": 16, "size": 8192}},
        "bench-qwen2-prompt-heavy": {"rc": 0, "seconds": 61, "model": "qwen2", "variant": "eager",
                                     "rows": [row("ours-packed", 30000, 7000, 0.12), row("trl", 15000, 14000, 0.06)]},
        "compiled-packed-qwen2-prompt-heavy": {"rc": 0, "seconds": 90, "model": "qwen2", "variant": "compiled",
                                               "rows": [row("ours-packed-compiled", 45000, 6000, 0.41)]},
        "flex-vs-loop-prompt-heavy": {"rc": 0, "seconds": 20, "model": "qwen2", "variant": "per-pair loop",
                                      "rows": [row("ours-packed", 60000, 1000, 0.9)]},
        "resume": {"ok": True, "rc": 0, "seconds": 50, "weights_max_diff_resumed": 0.0, "weights_max_diff_rerun": 0.0,
                   "losses": {"full": [0.6931]}},
        "fsdp": {"rc": 2, "seconds": 10, "tail": "error: a one-line reason"},
        "zero3": {"skipped": "20 s left, about 45 s needed"},
    }


def test_the_report_gives_ratios_to_trl_and_the_targets_verdicts():
    report = gpu_report.render(results(), "bfloat16", 510)
    assert "| qwen2 | prompt-heavy | ours-packed | eager | 13 | 30000 | 2.00 | 7000 | 0.50 | 12.0% |" in report
    assert "| qwen2 | prompt-heavy | ours-packed | compiled | 13 | 45000 | 3.00 | 6000 | 0.43 | 41.0% |" in report
    assert "Measured GEMM rate: 750.0 TFLOP/s (bfloat16, 8192³)" in report
    # the best packed row per target; the per-pair loop A/B is not a candidate
    assert "qwen2, prompt-heavy: tokens/s 3.00× TRL (compiled; target ≥ 1.5×: met), peak memory 0.43× (compiled" in report
    assert "qwen2, completion-heavy: not measured" in report
    assert "MFU: best 41.0% (ours-packed-compiled, prompt-heavy, compiled; target ≥ 40%: met)" in report
    assert "differ by 0 (the device's own nondeterminism): ok" in report
    assert "FSDP2, 1 process: failed (exit 2, 10 s)" in report and "error: a one-line reason" in report
    assert "| zero3 | skipped (20 s left, about 45 s needed) |" in report


def test_the_report_gives_the_long_pair_rows_and_says_what_failed(tmp_path):
    rows = [{"setting": "fsdp-sp2", "length": 16384, "peak_mb": 3407.0, "step_s": 103.5},
            {"setting": "one", "length": 32768, "failed": "exit 1: out of memory"}]
    report = gpu_report.render({"sequence-2gpu": {"rc": 0, "seconds": 300, "long_pairs": rows},
                                "sequence-1gpu": {"skipped": "0 GPU(s) here; the phase needs 1"}}, "bfloat16", 510)
    assert "  - fsdp-sp2, 16384 tokens: 3407 MiB a process, 103.5 s a step" in report
    assert "  - one, 32768 tokens: exit 1: out of memory" in report
    assert "long pairs (sequence-1gpu, scripts/bench_sequence.py, one pair a step): skipped" in report


def test_a_target_missed_is_said_so():
    slow = results()
    slow["bench-qwen2-prompt-heavy"]["rows"][0].update({"tokens/s": 18000, "peak_mb": 12000, "mfu": 0.1})
    del slow["compiled-packed-qwen2-prompt-heavy"]
    report = gpu_report.render(slow, "bfloat16", 510)
    assert "tokens/s 1.20× TRL (eager; target ≥ 1.5×: NOT met), peak memory 0.86× (eager; target ≤ 0.7×: NOT met)" in report
    assert "MFU: best 10.0%" in report and "target ≥ 40%: NOT met" in report


@pytest.mark.slow
def test_a_dry_run_on_the_cpu_runs_the_python_parts(tmp_path):
    """Tiny sizes: the Qwen2-shaped model made, a bench of it against TRL, the SIGKILL + resume check
    (exact on a CPU), the engines and compiled runs named but not launched; one report."""
    result = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(tmp_path / "out"), "--work",
                             str(tmp_path / "work"), "--budget", "1200", "--phases",
                             "setup,bench-qwen2-prompt,resume,fsdp,compiled-packed-qwen2-prompt,sequence"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (tmp_path / "out" / "gpu_check.md").read_text()
    saved = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert {row["trainer"] for row in saved["bench-qwen2-prompt-heavy"]["rows"]} == {"ours-packed", "trl"}
    assert saved["resume"]["weights_max_diff_resumed"] == 0 and saved["resume"]["ok"]
    assert "NUM_PROCESSES=1 bash scripts/launch.sh fsdp" in report and "--compile" in report
    assert "scripts/bench_sequence.py --settings one,fsdp-sp1,fsdp-sp2" in report  # named, not launched
    assert "| qwen2 | prompt-heavy | trl | eager |" in report
