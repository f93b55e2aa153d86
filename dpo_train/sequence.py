"""Sequence parallelism (`train.sequence_parallel: N`): each micro-batch's packed row split over N processes,
Ulysses-style, so that one pair can be longer than one process holds.

The N processes of a group read the same micro-batch. Each keeps every N-th token of the row (`share`:
token i goes to process i mod N, so each holds as many tokens, and as many completion-predicting
positions, as the others, give or take one), and runs the model on its tokens only: embeddings, norms,
MLPs, the chunked LM head and the log-prob sums see 1/N of the row. Attention is the one place tokens
meet: before it an all-to-all gives each process every token for 1/N of the heads, the pair attention
(attention.Spans) runs on them unchanged, and an all-to-all after it gives the tokens back (`Exchange`).
The log-prob sums are then added over the group (`group_sum`), so every process of the group holds the
same losses. What Accelerate's engines see is plain data parallelism over all the processes: DDP,
FSDP2 and ZeRO-3 run as they are, and only the data loaders are split over the groups, not the processes.

Accelerate's own sequence parallelism (ParallelismConfig sp_size) is DeepSpeed's ALST only, and
DeepSpeed's Ulysses attention wraps a model's attention function over padded rows; neither serves
the packed row's pair attention, nor DDP and FSDP2. The communication is one all_to_all_single each way,
which runs over gloo (CPU) and NCCL alike.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .router import text_config

SHARE_KEY = "row_length"  # in a shared batch: the whole row's tokens, before padding to a multiple of N


class Group:
    """The processes that share each row, from a (data, sequence) device mesh over every process:
    `size` of them, this one `rank`-th; `data_size` groups, this one the `data_rank`-th."""

    def __init__(self, size: int, num_processes: int, device_type: str):
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device_type, (num_processes // size, size), mesh_dim_names=("data", "sequence"))
        self.process_group, self.size = mesh["sequence"].get_group(), size
        self.rank, self.data_rank = mesh.get_local_rank("sequence"), mesh.get_local_rank("data")
        self.data_size = mesh["data"].size()


GROUP: Group | None = None  # set by `start`; packed_logps (for shared batches) and counted_once read it


class SequenceError(RuntimeError):
    """A model or layout the split cannot serve, explained in one line."""
    same_on_every_process = True  # printed once, by the main process


def start(accelerator, size: int, model, layout: str, images: bool, router_aux_coef: float, log) -> Group | None:
    """The run's sequence group (every process must call this), or None for size 1, said in one line. Raises
    SequenceError when the split cannot serve the model, its layout or its loss (model_refusal)."""
    global GROUP
    if reason := model_refusal(size, model, layout, images, router_aux_coef):
        raise SequenceError(reason)
    GROUP = Group(size, accelerator.num_processes, accelerator.device.type) if size > 1 else None
    if GROUP:
        log(f"sequence parallelism: {size} processes share each packed row, each holding 1/{size} of its tokens "
            f"({GROUP.data_size} data-parallel group(s) of {size})")
    return GROUP


def refusal(size: int, num_processes: int, compile: bool) -> str | None:
    """Why train.sequence_parallel cannot run on this launch, before any model loads; None when it can."""
    if size == 1:
        return None
    if num_processes % size:
        return (f"train.sequence_parallel: {size} does not divide the {num_processes} processes launched; launch a "
                f"multiple of {size} (NUM_PROCESSES=... scripts/launch.sh)")
    if compile:
        return "train.compile has not run with train.sequence_parallel; set one of them off"
    return None


def model_refusal(size: int, model, layout: str, images: bool, router_aux_coef: float) -> str | None:
    """Why the split cannot serve this model and layout (one line naming the setting); None when it can."""
    if size == 1:
        return None
    if images:
        return (f"train.sequence_parallel: {size} does not split image pairs (the vision tower's features fill "
                "image tokens that would sit on other processes); use 1")
    if layout != "packed":
        return (f"train.sequence_parallel: {size} splits the packed layout only, and this run uses {layout} "
                "(see the layout line above); use 1")
    if router_aux_coef:
        return (f"train.sequence_parallel: {size} with the MoE router loss (its token fractions are over the whole "
                "row); set loss.router_aux_coef: 0 or train.sequence_parallel: 1")
    config = text_config(model)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    for name, count in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
        if count % size:
            return (f"train.sequence_parallel: {size} does not divide the model's {name} ({count}): each process "
                    "attends with 1/N of the heads")
    return None


def places(owners: torch.Tensor, num_rows: int) -> torch.Tensor:
    """(K,) each token's row of num_rows -> (K,) its place in its row's completion, from 0 (a row's tokens are
    contiguous)."""
    index = torch.arange(owners.shape[0], device=owners.device)
    first = torch.full((num_rows,), owners.shape[0], device=owners.device).scatter_reduce(0, owners, index, "amin")
    return index - first[owners]


def share(batch: dict[str, torch.Tensor], rank: int, size: int) -> dict[str, torch.Tensor]:
    """A collate_packed batch -> the share of process `rank` of `size`: tokens rank, rank + size, ... of
    the row padded to a multiple of `size` (the padding sits after every span: no token reads it), and
    the completion-predicting positions among them, indexed locally. pair_spans, the lengths and the
    precomputed reference stay whole; SHARE_KEY holds the row's length; token_places each kept token's
    place in its completion (logps.owner_sums reads it: the share's tokens of a row are not all of them)."""
    length = batch["input_ids"].shape[1]
    pad = -length % size
    mine = torch.arange(rank, length + pad, size)
    keep = batch["logits_to_keep"] % size == rank
    shared = {key: F.pad(batch[key], (0, pad))[:, mine] for key in ("input_ids", "position_ids", "token_copies")}
    return {**batch, **shared, "logits_to_keep": batch["logits_to_keep"][keep] // size,
            "targets": batch["targets"][keep], "owners": batch["owners"][keep],
            "token_places": places(batch["owners"], int(batch["num_rows"]))[keep], SHARE_KEY: torch.tensor(length)}


def sharing(collate_fn, group: Group | None):
    """collate_fn, whose packed batches are cut to this process's share when a group splits them."""
    if group is None:
        return collate_fn
    return lambda pairs, **kwargs: share(collate_fn(pairs, **kwargs), group.rank, group.size)


class _AllToAll(torch.autograd.Function):
    """(N, ...) -> (N, ...): part s goes to process s of the group, and part s of the result came from it.
    Its own backward: the gradients take the way back. (torch.distributed.nn's all_to_all is not used: over
    gloo it scatters from group ranks as if they were global ones, so it fails in any group but the world.)"""

    @staticmethod
    def forward(ctx, parts: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        received = torch.empty_like(parts := parts.contiguous())
        dist.all_to_all_single(received, parts, group=group.process_group)
        return received

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _AllToAll.apply(grad, ctx.group), None


class Exchange:
    """The all-to-alls around one attention call on a shared row of `length` tokens (token j*N + s on process s)."""

    def __init__(self, group: Group, length: int):
        self.group, self.length = group, length

    def heads(self, tensor: torch.Tensor) -> torch.Tensor:
        """(1, H, n, D), this process's n tokens -> (1, H/N, length, D): every token, this process's heads."""
        parts = tensor.unflatten(1, (self.group.size, -1)).movedim(1, 0)  # (N, 1, H/N, n, D): [s] goes to process s
        received = _AllToAll.apply(parts, self.group)  # [s]: process s's tokens, this process's heads
        return received.permute(1, 2, 3, 0, 4).flatten(2, 3)[:, :, :self.length]  # token j*N + s at j*N + s

    def my_heads(self, per_head: torch.Tensor | None) -> torch.Tensor | None:
        """(H,) a value per head (attention sinks) -> (H/N,) this process's."""
        return None if per_head is None else per_head.chunk(self.group.size)[self.group.rank]

    def tokens(self, output: torch.Tensor) -> torch.Tensor:
        """(1, length, H/N, D), every token of this process's heads -> (1, n, H, D): its own tokens, all heads."""
        output = F.pad(output, (0, 0, 0, 0, 0, -self.length % self.group.size))
        parts = output.unflatten(1, (-1, self.group.size)).movedim(2, 0)  # (N, 1, n, H/N, D): [s] process s's tokens
        received = _AllToAll.apply(parts, self.group)  # [s]: this process's tokens, process s's heads
        return received.permute(1, 2, 0, 3, 4).flatten(2, 3)


class _GroupSum(torch.autograd.Function):
    """Sum over the group; the backward passes the gradient on, times N. Every process of the group computes
    the same loss from the sum, so each one's gradient is its tokens' share; the engines then average over all
    processes, N of which hold one micro-batch, where the micro-batch's gradient is its shares' sum."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.size = group.size
        total = tensor.clone()
        dist.all_reduce(total, group=group.process_group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.size, None


def group_sum(sums: dict[str, torch.Tensor], group: Group) -> dict[str, torch.Tensor]:
    """Per-row sums over this process's share -> over the whole row, on every process of the group."""
    return {key: _GroupSum.apply(value, group) for key, value in sums.items()}


def counted_once(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Metric sums of a shared micro-batch, kept by the group's first process only (zeros elsewhere), so that
    the sums over all processes count each pair once."""
    if GROUP is None or GROUP.rank == 0:
        return sums
    return {key: torch.zeros_like(value) for key, value in sums.items()}


def prepare_loaders(accelerator, group: Group | None, *loaders):
    """accelerator.prepare(*loaders), split over the data groups instead of the processes when a group
    shares rows: the processes of one group read the same batches."""
    if group is None:
        return accelerator.prepare(*loaders)
    from accelerate.data_loader import prepare_data_loader

    return tuple(None if loader is None else prepare_data_loader(
        loader, accelerator.device, num_processes=group.data_size, process_index=group.data_rank,
        put_on_device=True, rng_types=accelerator.rng_types.copy(), use_seedable_sampler=True,
        data_seed=accelerator.dataloader_config.data_seed) for loader in loaders)
