"""FLOP/s against the machine's limit, for scripts/bench.py: MFU on known GPUs, and on any device
each trainer's counted FLOP/s as a fraction of a measured matrix-product rate.

The limit is this machine's rate on one large matrix product (`matmul_rate`), measured in a
process like the bench's runs (same thread count, same dtype). A trainer's work is what its exact
training steps execute, counted by torch.utils.flop_counter.FlopCounterMode over real optimizer
steps (`count_flops`): every matrix product that ran, recomputation included, whatever the layout
or trainer does. Achieved FLOP/s is that count per pair token times the measured tokens/s.

What the count leaves out: elementwise work, softmax, norms, the optimizer's update (all memory-
bound and small in FLOPs), and it counts attention over the full (queries x keys) block even
where a causal kernel skips the masked half. On CPU, torch 2.13's counter does not know the CPU
SDPA kernels; they are added here with the counter's own SDPA formulas.
"""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten

# Peak dense tensor-core TFLOPS of SXM parts (NVIDIA datasheets); fp32 without TF32 runs on CUDA cores
PEAK_TFLOPS = {"H100": {"bfloat16": 989.4, "float32": 66.9}, "H200": {"bfloat16": 989.4, "float32": 66.9},
               "A100": {"bfloat16": 312.0, "float32": 19.5}}


def device_peak_tflops(dtype: str) -> float | None:
    """This GPU's peak for `dtype`, when it is in PEAK_TFLOPS; None on a CPU or an unknown GPU."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peaks[dtype] for part, peaks in PEAK_TFLOPS.items() if part in name), None)


def model_parameters(model: str) -> int:
    """The model's parameter count (a tied head counted once), from its config alone."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from dpo_train.models import hf_dir
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf_dir(model))).num_parameters()


def mfu(tokens_per_second: float, parameters: int, peak_tflops: float) -> float:
    """Model FLOPs utilisation: a DPO step costs about 8 x parameters FLOPs per pair token (policy
    forward 2N and backward 4N, reference forward 2N), whatever the trainer does on top; over the
    device's peak. Attention's own FLOPs are left out, as in the usual 6N rule."""
    return 8 * parameters * tokens_per_second / (peak_tflops * 1e12)


def cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, ...): as for CUDA SDPA."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """aten._scaled_dot_product_flash_attention_for_cpu_backward(grad_out, query, key, value, ...)."""
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


CPU_ATTENTION = {aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa_flop,
                 aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_sdpa_backward_flop}


def boolean_lower_right(q: int, k: int) -> torch.Tensor:
    """The (q, k) lower-right causal mask as booleans: query i sees keys up to k - q + i."""
    return torch.ones(q, k, dtype=torch.bool).tril(k - q)


def count_flops(run) -> int:
    """FLOPs of the matrix products (and attention kernels) that `run()` executes."""
    from dpo_train import attention
    # The pair attention's rejected blocks use a CausalBias mask, a tensor subclass that cannot be created under
    # the counter's dispatch mode (torch 2.13); an equal boolean mask runs instead (the same count: q x k).
    lower_right, attention.causal_lower_right = attention.causal_lower_right, boolean_lower_right
    try:
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
            run()
    finally:
        attention.causal_lower_right = lower_right
    return counter.get_total_flops()


def matmul_rate(dtype: torch.dtype = torch.float32, size: int = 4096, repeats: int = 5,
                device: str | None = None, clock=time.perf_counter) -> float:
    """FLOP/s of the fastest of `repeats` (size x size) @ (size x size) products (2 size^3 FLOPs each)
    after one warm-up, on the GPU when there is one: the machine's practical peak for the dtype at
    this process's thread count."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    seconds = []
    for _ in range(repeats + 1):
        sync()
        start = clock()
        a @ b
        sync()
        seconds.append(clock() - start)
    return 2 * size ** 3 / min(seconds[1:])  # the first product warms up (allocations, kernel selection)


def achieved(flops_per_token: float, tokens_per_second: float, rate: float) -> tuple[float, float]:
    """(achieved FLOP/s, its fraction of `rate`): the counted FLOPs per pair token at the measured
    pair tokens per second. E.g. 1.2 GFLOP per token at 100 tokens/s is 120 GFLOP/s, 0.6 of 200."""
    flops_per_second = flops_per_token * tokens_per_second
    return flops_per_second, flops_per_second / rate
