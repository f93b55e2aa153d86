"""The model card written beside the final model: how it was trained and how it did."""

from __future__ import annotations

import yaml


def model_card(config: dict, steps: int, data_stats: dict, results: dict) -> str:
    """Markdown: the resolved config, data statistics and final held-out metrics."""
    lines = ["---", "library_name: transformers", "tags: [dpo, dpo-train]", "---", "",
             "# DPO-trained policy", "",
             f"Trained with dpo-train from `{config['model']['name_or_path']}` "
             f"for {steps} optimizer steps with the `{' + '.join(config['loss']['type'])}` loss (beta {config['loss']['beta']}).",
             ""]
    lora = config["model"].get("lora", {})
    if lora.get("r"):
        lines += [f"This directory holds a LoRA adapter (rank {lora['r']}, alpha {lora['alpha']}) for that model; "
                  "`AutoModelForCausalLM.from_pretrained` loads base and adapter together when `peft` is installed"
                  + (", and `merged/` holds a plain model with the adapter folded in." if lora.get("save_merged")
                     else "."), ""]
    lines += ["## Data", ""]
    for name, stats in data_stats.items():
        lines.append(f"- {name} (`{config['data'][name]}`): {stats}")
    if results:
        names = list(results)
        lines += ["", "## Held-out results", "", "| metric | " + " | ".join(names) + " |",
                  "| --- |" + " --- |" * len(names)]
        for key, value in results["policy"].items():
            if isinstance(value, float):
                lines.append(f"| {key} | " + " | ".join(f"{results[n].get(key, float('nan')):.4f}" for n in names) + " |")
    lines += ["", "## Config", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)
