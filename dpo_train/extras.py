"""Optional packages a config needs, checked before anything loads: a tracker, peft for LoRA,
deepspeed when Accelerate's engine is DeepSpeed, a CUDA GPU and bitsandbytes for a quantized model. Accelerate itself skips a tracker whose package is
missing without a word, so a run would train for hours and log nothing."""

from __future__ import annotations

import importlib.util

from .config import ConfigError
from .engines import requested_engine
from .tracking import trackers

# tracker -> what to install (Accelerate's is_<tracker>_available says whether it is there)
TRACKER_PACKAGES = {"tensorboard": "tensorboardX", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
                    "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab",
                    "trackio": "trackio"}


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def missing_packages(config) -> list[str]:
    """One line per optional package `config` needs and this environment lacks, naming the key
    and what to install; empty when nothing is missing."""
    import accelerate.utils

    missing = []
    for name in trackers(config.train.report_to):
        if not getattr(accelerate.utils, f"is_{name}_available")():
            missing.append(f"train.report_to: {name} needs the {TRACKER_PACKAGES[name]} package "
                           f"(pip install {TRACKER_PACKAGES[name]})")
        elif name == "mlflow" and (problem := mlflow_store_problem()):
            missing.append(f"train.report_to: mlflow: {problem}")
    if config.model.lora.r and not installed("peft"):
        missing.append("model.lora.r: LoRA needs the peft package (pip install peft)")
    if "quantization_config" in config.model.init_kwargs:  # QLoRA
        import torch
        key = "model.init_kwargs.quantization_config"
        if not torch.cuda.is_available():
            missing.append(f"{key}: quantized (QLoRA) loading needs a CUDA GPU and this machine has none; remove it "
                           "to train unquantized")
        elif not installed("bitsandbytes"):
            missing.append(f"{key}: quantized loading needs the bitsandbytes package (pip install bitsandbytes)")
        if not config.model.lora.r:
            missing.append(f"{key}: quantized weights train only through an adapter; set model.lora.r (QLoRA)")
    if requested_engine() == "deepspeed" and not installed("deepspeed"):
        missing.append("the Accelerate config's engine is DeepSpeed, which needs the deepspeed package (pip install deepspeed)")
    return missing


def mlflow_store_problem() -> str | None:
    """mlflow >= 3 defaults to a SQLite store, which mlflow-skinny cannot open (no sqlalchemy)."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if uri.startswith(("sqlite", "postgresql", "mysql", "mssql")) and not installed("sqlalchemy"):
        return (f"its tracking store {uri} needs sqlalchemy (pip install mlflow), or set MLFLOW_TRACKING_URI "
                "to a server, or to file:DIR with MLFLOW_ALLOW_FILE_STORE=true")
    return None


def require_packages(config) -> None:
    """Raise ConfigError, one line, when `config` needs packages that are not installed."""
    missing = missing_packages(config)
    if missing:
        raise ConfigError("; ".join(missing))
