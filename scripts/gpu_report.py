"""The markdown report of scripts/gpu_check.py: the bench tables with ratios to TRL, the issue's
targets met or not, the engine and resume checks, and what each phase did."""

from __future__ import annotations

# Targets of the GPU acceptance run, as ratios from one run on one H100 or H200
SPEED_TARGETS = {"prompt-heavy": 1.5, "completion-heavy": 1.2}  # ours / TRL tokens/s, at least
MEMORY_TARGET = 0.7  # ours / TRL peak memory, at most
MFU_TARGET = 0.40  # the 0.5B model, at least


def status(result: dict) -> str:
    if "skipped" in result:
        return f"skipped ({result['skipped']})"
    if "dry" in result:
        return f"dry run, not launched: `{result['dry']}`"
    if "error" in result:
        return f"error: {result['error']}"
    if result.get("rc", 0) is None:
        return f"stopped at the deadline after {result['seconds']} s"
    if result.get("rc", 0) != 0:
        return f"failed (exit {result['rc']}, {result['seconds']} s)"
    if "ok" in result:
        return f"{'ok' if result['ok'] else 'MISMATCH'} ({result['seconds']} s)"
    return f"ok ({result['seconds']} s)"


def bench_rows(results: dict) -> list[dict]:
    """Every bench row, tagged with its model and variant, with ratios to TRL's uncompiled row of
    the same model and shape (where that ran)."""
    rows = [{**row, "model": result["model"], "variant": result["variant"]}
            for result in results.values() for row in result.get("rows", [])]
    for row in rows:
        trl = next((r for r in rows if r["trainer"] == "trl" and r["model"] == row["model"]
                    and r["shape"] == row["shape"]), None)
        if trl:
            row["speed_vs_trl"], row["memory_vs_trl"] = row["tokens/s"] / trl["tokens/s"], row["peak_mb"] / trl["peak_mb"]
    return rows


def fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def bench_table(rows: list[dict]) -> list[str]:
    lines = ["| model | shape | trainer | variant | pairs/step | tokens/s | × TRL | peak MB | memory × TRL | MFU |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['shape']} | {r['trainer'].removesuffix('-compiled')} | {r['variant']} "
                     f"| {r['batch']} | {r['tokens/s']:.0f} | {fmt(r.get('speed_vs_trl'), '.2f')} | {r['peak_mb']:.0f} "
                     f"| {fmt(r.get('memory_vs_trl'), '.2f')} | {fmt(r.get('mfu'), '.1%')} |")
    return lines


def targets(rows: list[dict]) -> list[str]:
    """Each target against the best packed row (eager or compiled; the per-pair loop is an A/B, not
    the product) per model and shape."""
    lines = []
    packed = [r for r in rows if r["trainer"].startswith("ours-packed") and r["variant"] != "per-pair loop"
              and "speed_vs_trl" in r]
    for model in sorted({r["model"] for r in rows}):
        for shape, goal in SPEED_TARGETS.items():
            mine = [r for r in packed if r["model"] == model and r["shape"] == shape]
            if not mine:
                lines.append(f"- {model}, {shape}: not measured")
                continue
            fast, small = max(mine, key=lambda r: r["speed_vs_trl"]), min(mine, key=lambda r: r["memory_vs_trl"])
            lines.append(f"- {model}, {shape}: tokens/s {fast['speed_vs_trl']:.2f}× TRL ({fast['variant']}; target "
                         f"≥ {goal}×: {'met' if fast['speed_vs_trl'] >= goal else 'NOT met'}), peak memory "
                         f"{small['memory_vs_trl']:.2f}× ({small['variant']}; target ≤ {MEMORY_TARGET}×: "
                         f"{'met' if small['memory_vs_trl'] <= MEMORY_TARGET else 'NOT met'})")
    mfus = [r for r in rows if r["model"] == "qwen2" and r["trainer"].startswith("ours") and r.get("mfu") is not None
            and r["variant"] != "per-pair loop"]
    if mfus:
        best = max(mfus, key=lambda r: r["mfu"])
        lines.append(f"- qwen2 (0.5B-shaped) MFU: best {best['mfu']:.1%} ({best['trainer']}, {best['shape']}, "
                     f"{best['variant']}; target ≥ {MFU_TARGET:.0%}: {'met' if best['mfu'] >= MFU_TARGET else 'NOT met'})")
    else:
        lines.append("- qwen2 (0.5B-shaped) MFU: not measured (no run, or a GPU without a datasheet peak)")
    return lines


def checks(results: dict) -> list[str]:
    lines = []
    resume = results.get("resume", {})
    if "weights_max_diff_resumed" in resume:
        lines.append(f"- SIGKILL after the step-4 checkpoint, then `--resume auto`: final weights differ from an "
                     f"uninterrupted run by at most {resume['weights_max_diff_resumed']:.3g}; two uninterrupted runs "
                     f"differ by {resume['weights_max_diff_rerun']:.3g} (the device's own nondeterminism): "
                     f"{'ok' if resume['ok'] else 'MISMATCH'}. Losses per step: {resume['losses']}")
    else:
        lines.append(f"- resume: {status(resume) if resume else 'not run'}" + (f" ({resume['why']})" if "why" in resume else ""))
    for engine, name in (("fsdp", "FSDP2"), ("zero3", "DeepSpeed ZeRO-3")):
        result = results.get(engine, {})
        detail = ""
        if result.get("records"):
            losses = [r["loss"] for r in result["records"] if "loss" in r]
            detail = (f": {len(losses)} steps, losses {[round(x, 4) for x in losses]}, final model saved: "
                      f"{result['final_saved']}")
        lines.append(f"- {name}, 1 process: {status(result) if result else 'not run'}{detail}")
    families = results.get("families", {})
    lines.append(f"- model families on FlexAttention (packed) and rows, fp32, max relative difference from a naive "
                 f"forward (log-probs) and from padded (gradients): {status(families) if families else 'not run'}")
    e = lambda value: f"{value:.1e}" if isinstance(value, float) else str(value)  # a crash stays its words
    lines += [f"  - {r['family']}: packed {e(r['packed'])}, rows {e(r['rows'])}, gradients packed "
              f"{e(r.get('packed_grads'))}, rows {e(r.get('rows_grads'))}" for r in families.get("families", [])]
    for name in ("sequence-1gpu", "sequence-2gpu"):
        result = results.get(name, {})
        lines.append(f"- long pairs ({name}, scripts/bench_sequence.py, one pair a step): "
                     f"{status(result) if result else 'not run'}")
        lines += [f"  - {r['setting']}, {r['length']} tokens: " + (f"{r['peak_mb']:.0f} MiB a process, {r['step_s']} s a step"
                  if "peak_mb" in r else r["failed"]) for r in result.get("long_pairs", [])]
    return lines


def render(results: dict, dtype: str, budget: float, dry: bool = False) -> str:
    """The whole report, from gpu_check.py's results by phase."""
    setup = results.get("setup", {})
    gemm = setup.get("gemm") or {}
    rows = bench_rows(results)
    lines = ["# GPU check" + (" (dry run on CPU, tiny sizes: the numbers mean nothing)" if dry else ""), "",
             f"Device: {setup.get('device', '?')}; {setup.get('versions', {})}; {dtype}.",
             f"Measured GEMM rate: {gemm['flops_per_second'] / 1e12:.1f} TFLOP/s ({dtype}, {gemm.get('size')}³)."
             if gemm else "Measured GEMM rate: not measured.", "",
             "tokens/s counts each pair's prompt + chosen + rejected tokens once; peak memory is max allocated "
             "CUDA memory (process RSS on a CPU); MFU is 8 × parameters × tokens/s over the datasheet peak. TRL ran uncompiled; "
             "its row is the denominator of every ratio for its model and shape.", "",
             "## Bench", "", *bench_table(rows), "", "## Targets", "", *targets(rows), "",
             "## Engines and resume", "", *checks(results), "",
             f"## Phases (budget {budget:.0f} s)", "", "| phase | result |", "| --- | --- |",
             *(f"| {name} | {status(result)} |" for name, result in results.items())]
    failed = [(name, r["tail"]) for name, r in results.items() if r.get("rc") not in (0, None) and "tail" in r]
    for name, tail in failed:
        lines += ["", f"### {name}: last lines", "", "```", tail, "```"]
    return "\n".join(lines) + "\n"
