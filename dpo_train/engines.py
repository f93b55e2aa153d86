"""Engines: the Accelerator of a run, the CPU rehearsal of sharded engines, and where the frozen
reference lives under each engine.

`accelerate launch` names the engine in its environment (ACCELERATE_USE_DEEPSPEED, ACCELERATE_USE_FSDP);
without either, several processes run DDP. On a machine without an accelerator the same engines run
on CPU processes over gloo: a rehearsal of the GPU run (config, engine, data, checkpoints, resume,
export) before paying for GPU hours.
"""

from __future__ import annotations

import contextlib
import copy
import os
from datetime import timedelta

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DataLoaderConfiguration, DistributedType, InitProcessGroupKwargs

from . import sequence
from .exits import KEPT_UNTIL_EXIT, LAUNCHED
from .progress import quiet_unless

ENGINE_NAMES = {"deepspeed": "DeepSpeed", "fsdp": "FSDP", "ddp": "DDP", None: "one process"}


class EngineError(RuntimeError):
    """An engine that cannot run this config, explained in one line before any model loads."""
    same_on_every_process = True  # printed once, by the main process


def requested_engine() -> str | None:
    """The engine `accelerate launch` asked for: deepspeed, fsdp, ddp (several processes), or None."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    return "ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None


def on_cpu() -> bool:
    return not torch.accelerator.is_available()


def allow_fsdp_on_cpu(timeout: timedelta) -> None:
    """Accelerate selects FSDP only when the process group sits on GPU-like devices, although FSDP2
    (`fully_shard`) runs on CPU tensors over gloo. Initialise the CPU process group first and show
    Accelerate a GPU-like distributed type while it selects the engine; the device stays the CPU.
    CPU rehearsal only; it can go once Accelerate selects FSDP for MULTI_CPU."""
    state = PartialState(backend="gloo", timeout=timeout)
    if state.distributed_type == DistributedType.NO and state.num_processes > 1:
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def leave_deepspeed_unimported() -> None:
    """Accelerate's unwrap_model (also inside get_state_dict and save_state) imports DeepSpeed whenever it
    is installed, to recognise a DeepSpeedEngine; importing it prints DeepSpeed's accelerator warnings.
    Without a DeepSpeed engine there is none to recognise, so tell that function DeepSpeed is absent.
    It can go once Accelerate imports DeepSpeed only under a DeepSpeed engine."""
    import accelerate.utils.other

    accelerate.utils.other.is_deepspeed_available = lambda: False


def leave_deepspeed_shm_unbuilt() -> None:
    """On CPU, DeepSpeed's communication backend JIT-compiles a shared-memory allreduce at its first launch
    on a machine (C++: 13 minutes measured on a busy 2-core machine) that a CPU rehearsal never
    needs: gloo does the collectives. Mark the op unusable, so DeepSpeed skips the build. CPU rehearsal only."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build_accelerator(grad_accum_steps: int, log_with, project_dir, timeout_s: int) -> Accelerator:
    """The run's Accelerator, on the engine `accelerate launch` asked for. Raises EngineError when a
    different engine would run."""
    engine, cpu = requested_engine(), on_cpu()
    timeout = timedelta(seconds=timeout_s)  # a process left waiting for a failed one gives up after this
    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1  # by torchrun or accelerate launch, even for one process
    handlers = [InitProcessGroupKwargs(backend="gloo", timeout=timeout) if cpu and launched
                else InitProcessGroupKwargs(timeout=timeout)]
    if cpu and engine == "deepspeed":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
        leave_deepspeed_shm_unbuilt()
    if engine != "deepspeed":
        leave_deepspeed_unimported()
    if cpu and engine == "fsdp":
        allow_fsdp_on_cpu(timeout)
    accelerator = Accelerator(gradient_accumulation_steps=grad_accum_steps,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
                              # DeepSpeed and FSDP keep their own process group; DDP on CPU needs Accelerate's
                              cpu=cpu and engine not in ("deepspeed", "fsdp"),
                              kwargs_handlers=handlers, log_with=log_with, project_dir=project_dir)
    quiet_unless(accelerator.is_main_process)
    if (running := running_engine(accelerator)) != engine:
        raise EngineError(f"the launch asked for {ENGINE_NAMES[engine]} but Accelerate set up "
                          f"{ENGINE_NAMES[running]}; check the accelerate config and the installed packages")
    if cpu and engine:
        precision = "fp32" if accelerator.mixed_precision == "no" else f"{accelerator.mixed_precision} mixed precision"
        accelerator.print(f"CPU rehearsal: {describe(accelerator)} on {accelerator.num_processes} CPU processes (gloo), "
                          f"{precision}: the same config, data, checkpoints, resume and export as on GPUs")
    return accelerator


def on_any_process(accelerator, flag: bool) -> bool:
    """True on every process when `flag` is true on at least one (one all-reduce when distributed)."""
    if accelerator.num_processes == 1:
        return flag
    return accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="sum").item() > 0


def check_config(config) -> None:
    """Stop, before any model loads, on what the launched engine cannot run (one line naming the setting)."""
    engine = requested_engine()
    if engine == "deepspeed" and config.train.on_nonfinite == "skip":  # (a missing deepspeed: extras.py)
        raise EngineError("train.on_nonfinite: skip cannot run under DeepSpeed, whose engine applies the update "
                          "inside backward; use stop")
    if engine == "fsdp" and os.environ.get("FSDP_VERSION", "2") != "2":
        raise EngineError("FSDP version 1 is not supported; set fsdp_version: 2 in the accelerate config")
    if engine in ("deepspeed", "fsdp") and config.train.compile:
        raise EngineError(f"train.compile has not run under {ENGINE_NAMES[engine]}; set it to false")
    if reason := sequence.refusal(config.train.sequence_parallel, int(os.environ.get("WORLD_SIZE", "1")),
                                  config.train.compile):
        raise EngineError(reason)


def configure_deepspeed(accelerator, micro_batch_size: int, max_grad_norm: float, model_config) -> None:
    """Settings of the DeepSpeed config that the run owns: the micro-batch (the loaders are prepared on
    their own), clipping at train.max_grad_norm (DeepSpeed clips inside its engine), and whole weights
    gathered at save under ZeRO-3, so that final/ is a complete model and never a shard. Bucket sizes
    the config leaves unset get the values Accelerate and the HF Trainer give `auto` (from the model's
    hidden size): DeepSpeed's own defaults (5e8 elements, 2 GB in fp32, per bucket) cost more memory
    per process than sharding saves on a model under a billion parameters."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    ds_config["train_micro_batch_size_per_gpu"] = micro_batch_size
    ds_config["gradient_clipping"] = max_grad_norm
    zero, hidden_size = ds_config.setdefault("zero_optimization", {}), model_config.get_text_config().hidden_size
    zero["stage3_gather_16bit_weights_on_model_save"] = True
    for key, value in (("reduce_bucket_size", hidden_size * hidden_size), ("allgather_bucket_size", hidden_size * hidden_size),
                       ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
                       ("stage3_param_persistence_threshold", 10 * hidden_size)):
        zero.setdefault(key, value)


def stepping_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer that applies the updates inside the engines' wrappers: ours, or the one DeepSpeed
    put in its place (its CPU Adam when the optimizer is offloaded). The LR schedule sits on this one."""
    inner = getattr(optimizer, "optimizer", None)
    while inner is not None:
        if isinstance(inner, torch.optim.Optimizer):
            optimizer = inner
        inner = getattr(inner, "optimizer", None)
    return optimizer


def held_here(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters this process holds, parameters of the whole model): a shard's elements under FSDP2
    (DTensor) and ZeRO-3, every element otherwise."""
    held = total = 0
    for parameter in model.parameters():
        if type(parameter).__name__ == "DTensor":
            held, total = held + parameter.to_local().numel(), total + parameter.numel()
        elif hasattr(parameter, "ds_id"):
            held, total = held + parameter.ds_tensor.numel(), total + parameter.ds_numel
        else:
            held, total = held + parameter.numel(), total + parameter.numel()
    return held, total


def whole_tensors(model: torch.nn.Module):
    """(name, whole tensor) of the model's parameters and buffers in name order, gathered from the
    shards under FSDP2 (DTensor) and ZeRO-3. A collective when sharded: every process must iterate."""
    from .logps import unwrapped

    for name, tensor in sorted(unwrapped(model).state_dict(keep_vars=True).items()):
        if type(tensor).__name__ == "DTensor":
            tensor = tensor.full_tensor()
        elif hasattr(tensor, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([tensor]):
                tensor = tensor.data.clone()
        yield name, tensor.detach()


@contextlib.contextmanager
def loading_whole_models():
    """Models loaded inside are whole on this process, also under ZeRO-3, whose partitioned loading is
    collective and would wait for the other processes (the merged LoRA export runs on the main one).
    transformers keeps the switch in a module global; the reach into it is here only."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def steps_inside_backward(accelerator) -> bool:
    """DeepSpeed clips and applies the update inside `accelerator.backward` at the accumulation's end."""
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def running_engine(accelerator) -> str | None:
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    if kind == DistributedType.FSDP:
        return "fsdp"
    return "ddp" if accelerator.num_processes > 1 else None


def describe(accelerator) -> str:
    """The engine in words: 'DeepSpeed ZeRO-3', 'FSDP2', 'DDP', 'one process'."""
    engine = running_engine(accelerator)
    if engine == "deepspeed":
        plugin = accelerator.state.deepspeed_plugin
        offload = plugin.offload_param_device not in (None, "none") or plugin.offload_optimizer_device not in (None, "none")
        return f"DeepSpeed ZeRO-{plugin.zero_stage}" + (" with CPU offload" if offload else "")
    if engine == "fsdp":
        return f"FSDP{accelerator.state.fsdp_plugin.fsdp_version}"
    return "DDP" if engine else "one process"


def shards_weights(accelerator) -> bool:
    """Whether each process holds only a shard of the weights (FSDP, ZeRO-3)."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return accelerator.distributed_type == DistributedType.FSDP


def place_reference(accelerator, reference: torch.nn.Module) -> torch.nn.Module:
    """Put the frozen reference where each engine wants it: sharded for inference only (no
    optimizer, no gradients) under DeepSpeed ZeRO-3 and FSDP; otherwise a plain replica on this
    process's device, never wrapped for gradients (DDP would all-reduce nothing but cost memory)."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        ds_config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
        for key in ("optimizer", "scheduler"):
            ds_config.pop(key, None)
        engine, *_ = deepspeed.initialize(model=reference, config=ds_config)
        engine.eval()  # DeepSpeedEngine.eval returns None, not the engine
        return engine
    if accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.fsdp import fully_shard

        layer_classes = set(blocks(reference))
        for layer in [m for m in reference.modules() if type(m).__name__ in layer_classes]:
            fully_shard(layer.to(accelerator.device))  # block by block: one block is whole at a time
        fully_shard(reference.to(accelerator.device))
        return reference
    return reference.to(accelerator.device)


def blocks(model: torch.nn.Module) -> list[str]:
    """The model's blocks that FSDP shards one by one: the classes of its `_no_split_modules` that it holds.
    A vision-language model lists those of its parts' whole models (LLaVA: CLIPTextEmbeddings, for a CLIP
    that has only its vision half), which Accelerate's wrap policy would refuse as not found."""
    present = {type(m).__name__ for m in model.modules()}
    return [name for name in getattr(model, "_no_split_modules", None) or [] if name in present]


def plan_wrapping(accelerator, policy: torch.nn.Module, trained_tower: bool) -> None:
    """How the engine will wrap the policy; only before `prepare`.

    FSDP: block by block over the blocks the policy holds, unless the accelerate config names them
    (fsdp_transformer_layer_cls_to_wrap). DDP with a trained vision tower: look for parameters without
    gradients, as TRL does for a vision-language model (the tower holds some its model never reads: LLaVA
    reads CLIP's hidden states, not its post-layernorm's output, nor, at vision_feature_layer -2, its last
    layer); DDP then keeps the LM head inside the forward (logps.head_inside)."""
    from accelerate.utils import DistributedDataParallelKwargs

    if accelerator.distributed_type == DistributedType.FSDP:
        if accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap is None:
            accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = blocks(policy)
    elif trained_tower:
        accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)


def prepare_policy(accelerator, policy: torch.nn.Module, optimizer, trained_tower: bool) -> tuple:
    """`accelerator.prepare(policy, optimizer)`, the wrapping planned first (plan_wrapping). A launched process
    keeps the wrapped policy until it exits (exits.KEPT_UNTIL_EXIT says why; Accelerate keeps only the model
    inside a DDP wrapper)."""
    plan_wrapping(accelerator, policy, trained_tower)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    if LAUNCHED:
        KEPT_UNTIL_EXIT.append(policy)
    return policy, optimizer
