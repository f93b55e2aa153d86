"""The model card written beside the final model: hub metadata, how it was trained and how it did."""

from __future__ import annotations

import yaml

from .config import EMBEDDED_MODEL
from .sources import is_hub_id

# Models named by something other than their hub id, and the hub id they came from.
HUB_IDS = {EMBEDDED_MODEL: "HuggingFaceTB/SmolLM2-135M-Instruct"}


def base_model(name_or_path: str) -> str | None:
    """The hub id of the model training started from, when there is one (not for a local path)."""
    if name_or_path in HUB_IDS:
        return HUB_IDS[name_or_path]
    return name_or_path if is_hub_id(name_or_path) and not name_or_path.endswith(".gguf") else None


def source_paths(spec) -> list[str]:
    """The paths of `data.train` / `data.eval`: one string, or a mixture's sources."""
    if not spec:
        return []
    return [spec] if isinstance(spec, str) else [s if isinstance(s, str) else s["path"] for s in spec]


def front_matter(config: dict) -> dict:
    """The hub's metadata: base_model, datasets (the hub ids among the data sources), library_name
    (peft for a LoRA adapter), tags."""
    lora = bool(config["model"].get("lora", {}).get("r"))
    meta = {}
    if base := base_model(config["model"]["name_or_path"]):
        meta["base_model"] = base
        meta["base_model_relation"] = "adapter" if lora else "finetune"
    hub_sets = [p for p in source_paths(config["data"]["train"]) + source_paths(config["data"].get("eval"))
                if is_hub_id(p)]
    if hub_sets:
        meta["datasets"] = list(dict.fromkeys(hub_sets))
    meta["library_name"] = "peft" if lora else "transformers"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = ["dpo", "dpo-train", "lora"] if lora else ["dpo", "dpo-train"]
    return meta


def model_card(config: dict, steps: int, data_stats: dict, results: dict, notes=()) -> str:
    """Markdown with YAML front matter: the resolved config, data statistics, final held-out metrics and
    `notes` (what went wrong on the way: divergence, a skipped evaluation)."""
    lines = ["---", yaml.safe_dump(front_matter(config), sort_keys=False).rstrip(), "---", "",
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
        lines.append(f"- {name} (`{', '.join(source_paths(config['data'][name]))}`): {stats}")
    if results:
        names = list(results)
        lines += ["", "## Held-out results", "", "| metric | " + " | ".join(names) + " |",
                  "| --- |" + " --- |" * len(names)]
        for key, value in results["policy"].items():
            if isinstance(value, float):
                lines.append(f"| {key} | " + " | ".join(f"{results[n].get(key, float('nan')):.4f}" for n in names) + " |")
    if notes:
        lines += ["", "## Warnings", "", *(f"- {note}" for note in notes)]
    lines += ["", "## Config", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)
