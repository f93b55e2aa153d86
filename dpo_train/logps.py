"""Per-sequence log-probabilities of completions, and the concatenated forward pass.

The LM head runs outside the model's forward (`hidden_states_or_logits`), over completion-predicting
positions only, in chunks (`token_logps`): only chunk-sized blocks of logits ever exist. Models whose
head cannot run on its own (`separable_head` is None) produce their logits as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.fsdp import FSDPModule
from torch.utils.checkpoint import checkpoint

from . import attention, router, sequence

IGNORE_INDEX = -100
CHUNK_SIZE = 1024  # positions per head + log-softmax chunk: (1024, V) fp32 is 200 MB at V = 49 152
# Config fields of models that change logits after the head (Gemma softcapping, Cohere and Granite scales,
# a padded vocabulary): such a head cannot run on its own, so these models keep theirs inside the forward.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "logits_soft_cap",
                    "output_multiplier", "unpadded_vocab_size")
# What an objective may ask for beyond the log-prob sums; router_aux: the MoE router loss, a scalar (router.py)
EXTRAS = frozenset({"shared_logps", "log_sum_sq", "router_aux"})


class Hidden(torch.nn.Identity):
    """What stands in for the LM head during the forward: the final hidden states pass through. Its
    `weight` is an empty tensor of the head's dtype, for models that cast to it (Mamba does)."""
    dtype = torch.float32

    @property
    def weight(self) -> torch.Tensor:
        return torch.empty(0, dtype=self.dtype)


HEAD_INSIDE = "dpo_train_head_inside"  # set on a model whose logits layouts.check_head found are not head(hidden)
HIDDEN = Hidden()  # one instance, so that a compiled forward is guarded on the same module each step


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP, FSDP or DeepSpeed wrappers (each keeps it as `.module`). A PEFT model
    stays as it is: it forwards get/set_output_embeddings to the model it adapts."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def separable_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The LM head, when it can run outside the model's forward on its final hidden states; None
    when the model must apply its own head (head_inside says why)."""
    return _head_or_reason(model)[0]


def head_inside(model: torch.nn.Module) -> str | None:
    """Why the model applies its own LM head inside the forward, or None when the head runs outside it."""
    return _head_or_reason(model)[1]


def _head_or_reason(model: torch.nn.Module) -> tuple[torch.nn.Module | None, str | None]:
    if getattr(model, "find_unused_parameters", False):
        return None, "DDP looks for unused parameters and would mark a head used after its forward as unused"
    base = unwrapped(model)
    if measured := getattr(base, HEAD_INSIDE, None):  # layouts.check_head found its logits are not head(hidden)
        return None, measured
    head = base.get_output_embeddings() if hasattr(base, "set_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None, "the model has no plain output embedding"
    config = getattr(base, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if transform := next((name for name in LOGIT_TRANSFORMS if getattr(config, name, None) is not None), None):
        return None, f"the model transforms its logits after the head ({transform})"
    # FSDP2 and ZeRO-3 gather a sharded weight only inside the forward: a model FSDP2 shards is known by its
    # class (its root's weights stay gathered after a forward), ZeRO-3's weight by its empty ds_* placeholder.
    if isinstance(base, FSDPModule) or type(weight).__name__ == "DTensor" or hasattr(weight, "ds_id") or weight.dim() != 2:
        return None, "its weight is sharded (FSDP2 or ZeRO-3) and gathered only inside the forward"
    return head, None


def token_logps(inputs: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module | None = None,
                chunk_size: int = CHUNK_SIZE, log_sum_sq: bool = False):
    """log p(target) per row, the head and an fp32 log-softmax applied one chunk of rows at a time.

    inputs: (K, H) hidden states with a head, or (K, V) logits without one, in any dtype; targets:
    (K,) -> (K,) fp32. Under autograd, a chunk that would keep logits alive for the backward pass
    (the head's output, or an fp32 copy of bf16/fp16 logits) is recomputed there instead, all but
    the last: its backward runs first, as soon as the backward pass starts, so keeping its logits
    costs no more memory than recomputing them would. At most one chunk of logits is ever kept.

    With `log_sum_sq`, returns ((K,), (K,)): also log sum_v p(v)^2 of each position's distribution,
    = logsumexp(2 log_softmax), without gradient (WPO's weights, as TRL's chunked head computes them).
    """
    def chunk_logps(chunk: torch.Tensor, chunk_targets: torch.Tensor):
        logits = (chunk if head is None else head(chunk.to(head.weight.dtype))).float()
        log_z = logits.logsumexp(-1)
        logps = logits.gather(-1, chunk_targets.unsqueeze(-1)).squeeze(-1) - log_z
        if not log_sum_sq:
            return logps
        return logps, (2 * (logits.detach() - log_z.detach().unsqueeze(-1))).logsumexp(-1)

    # fp32 logits passed in already exist whole: recomputing their chunks would save nothing
    keeps_logits = torch.is_grad_enabled() and (head is not None or inputs.dtype != torch.float32)
    chunks = list(zip(inputs.split(chunk_size), targets.split(chunk_size))) or [(inputs, targets)]  # K may be 0
    outputs = [checkpoint(chunk_logps, c, t, use_reentrant=False) if keeps_logits and i < len(chunks) - 1
               else chunk_logps(c, t) for i, (c, t) in enumerate(chunks)]
    if not log_sum_sq:
        return torch.cat(outputs)
    return torch.cat([o[0] for o in outputs]), torch.cat([o[1] for o in outputs])


def sequence_logps(outputs: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module | None = None,
                   chunk_size: int = CHUNK_SIZE) -> torch.Tensor:
    """Sum of log p(token) over each row's labelled (completion) tokens.

    outputs: (N, T, V) logits, or (N, T, H) hidden states with their head; labels: (N, T) with
    IGNORE_INDEX on prompt and padding -> (N,) fp32. Position t predicts token t+1: outputs[:, :-1]
    are scored against labels[:, 1:]. Only the labelled positions reach token_logps.
    """
    return owner_sums(*labelled_positions(outputs, labels), outputs.shape[0], head, chunk_size, {})["logps"]


def labelled_positions(outputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, T, *) outputs and (N, T) labels -> the outputs at the K positions that predict a labelled
    token (K, *), those tokens (K,) and their rows (K,), row by row (each row's tokens contiguous, in order)."""
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)  # next token
    rows, positions = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    return outputs[rows, positions], targets[rows, positions], rows


def owner_sums(outputs: torch.Tensor, targets: torch.Tensor, owners: torch.Tensor, num_rows: int,
               head: torch.nn.Module | None, chunk_size: int, batch: dict[str, torch.Tensor],
               extras: frozenset = frozenset()) -> dict[str, torch.Tensor]:
    """Per-row sums over K completion tokens: (K, H) hidden states (or (K, V) logits) at the positions
    that predict them, the tokens (K,) and their rows (K,) -> {"logps": (num_rows,) fp32 log-prob sums},
    plus what `extras` names (EXTRAS; shared_logps reads the batch's completion lengths). A row's
    tokens are contiguous and in order, in every layout; rows are 2B, chosen then rejected.
    """
    if "log_sum_sq" in extras:
        per_token, per_token_sum_sq = token_logps(outputs, targets, head, chunk_size, log_sum_sq=True)
    else:
        per_token = token_logps(outputs, targets, head, chunk_size)  # (K,)
    add = lambda values: values.new_zeros(num_rows).index_add(0, owners, values)
    sums = {"logps": add(per_token)}
    if "log_sum_sq" in extras:
        sums["log_sum_sq"] = add(per_token_sum_sq)
    if "shared_logps" in extras:  # each token's place in its own completion (a sequence share brings its own)
        place = batch["token_places"] if "token_places" in batch else sequence.places(owners, num_rows)
        shared = torch.minimum(batch["chosen_lengths"], batch["rejected_lengths"]).repeat(2).to(owners.device)
        sums["shared_logps"] = add(per_token * (place < shared[owners]))
    return sums


def hidden_states_or_logits(model: torch.nn.Module, **inputs) -> tuple[torch.Tensor, torch.nn.Module | None]:
    """(final hidden states (N, T', H), the head to apply to them), or (logits (N, T', V), None) for a
    model that must apply its own head (separable_head). T' is the positions in `logits_to_keep`.

    The forward still goes through every wrapper (DDP, compile, PEFT): only the head is swapped for an
    identity, on the unwrapped model, and put back even if the forward fails.
    """
    head = separable_head(model)
    if hasattr(router.text_config(unwrapped(model)), "output_router_logits"):
        inputs["output_router_logits"] = False  # the model's own aux loss would read our masks as padding; router.py
    if head is None:
        return model(**inputs, use_cache=False).logits, None
    base = unwrapped(model)
    HIDDEN.dtype = head.weight.dtype
    base.set_output_embeddings(HIDDEN)
    try:
        return model(**inputs, use_cache=False).logits, head
    finally:
        base.set_output_embeddings(head)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, T, T) bool (True: attend) -> 0 / most-negative `dtype` values. A custom 4-D mask reaches
    the attention as it is: SDPA reads either form, but eager attention adds it to the scores."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def completion_sums(outputs: torch.Tensor, batch: dict[str, torch.Tensor], head: torch.nn.Module | None,
                    chunk_size: int, extras: frozenset = frozenset()) -> dict[str, torch.Tensor]:
    """(K, H) hidden states (or (K, V) logits) at the positions predicting the batch's K completion
    tokens -> owner_sums: {"logps": (2B,) fp32 sums, chosen then rejected, and the extras}."""
    return owner_sums(outputs, batch["targets"], batch["owners"], int(batch["num_rows"]), head, chunk_size, batch,
                      extras)


def packed_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = CHUNK_SIZE,
                 extras: frozenset = frozenset()) -> dict[str, torch.Tensor]:
    """Completion sums (completion_sums) of the padding-free row of collate.collate_packed, or of a sequence.share
    of it. Attention goes through attention.pair_attention; the forward stops at the K completion positions."""
    base = unwrapped(model)
    attention.enable(base.config)
    spans = attention.batch_spans(batch["pair_spans"], base.config, batch["input_ids"].device)
    if sequence.SHARE_KEY in batch:  # this process's share of the row: attention exchanges heads for tokens
        spans.exchange = sequence.Exchange(sequence.GROUP, int(batch[sequence.SHARE_KEY]))
    # a 4-D mask is passed to the attention as it is, so transformers builds none; the spans replace it
    placeholder = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=batch["input_ids"].device)
    outputs, head = hidden_states_or_logits(model, input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                            attention_mask=placeholder, logits_to_keep=batch["logits_to_keep"],
                                            **batch.get("image_inputs", {}), **{attention.SPANS_KWARG: spans})
    if not spans.used:
        raise RuntimeError(f"padding-free layout: {type(base).__name__} does not route its attention through "
                           "transformers' AttentionInterface; use train.layout: padded")
    sums = completion_sums(outputs[0], batch, head, chunk_size, extras)  # outputs (1, K, H), or (1, K, V) and no head
    return sequence.group_sum(sums, spans.exchange.group) if spans.exchange else sums


def rows_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = CHUNK_SIZE,
               extras: frozenset = frozenset()) -> dict[str, torch.Tensor]:
    """Completion sums (completion_sums) of shared-prompt rows (collate.collate_rows).
    The model's forward stops at the rows' last K' positions, where the completions are."""
    base = unwrapped(model)
    attention.enable(base.config)
    rows = attention.RowMasks(batch["position_ids"])  # each layer's sliding window cuts the mask
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "logits_to_keep")} | batch.get("image_inputs", {})
    inputs["attention_mask"] = additive_mask(batch["attention_mask"], next(model.parameters()).dtype)
    outputs, head = hidden_states_or_logits(model, **inputs, **{attention.SPANS_KWARG: rows})  # (B, K', H) or (B, K', V)
    if not rows.used:
        raise RuntimeError(f"shared-prompt rows: {type(base).__name__} does not route its attention through "
                           "transformers' AttentionInterface; use train.layout: padded")
    return completion_sums(outputs.flatten(0, 1)[batch["predict_index"]], batch, head, chunk_size, extras)


def padded_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = CHUNK_SIZE,
                 extras: frozenset = frozenset()) -> dict[str, torch.Tensor]:
    """Completion sums (owner_sums) of the 2B right-padded rows of collate.collate."""
    outputs, head = hidden_states_or_logits(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                            **batch.get("image_inputs", {}))
    return owner_sums(*labelled_positions(outputs, batch["labels"]), outputs.shape[0], head, chunk_size, batch, extras)


def forward_sums(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = CHUNK_SIZE,
                 extras: frozenset = frozenset()) -> dict[str, torch.Tensor]:
    """One forward over a collated batch: the padding-free row of collate.collate_packed, the
    shared-prompt rows of collate.collate_rows, or the 2B padded rows of collate.collate. All give the
    same numbers: {"logps": (2B,) completion log-prob sums, chosen first, then rejected} and the
    `extras` an objective asked for (EXTRAS), each (2B,); "router_aux" a scalar ()."""
    forward = packed_logps if "pair_spans" in batch else rows_logps if "predict_index" in batch else padded_logps
    if "router_aux" not in extras:
        return forward(model, batch, chunk_size, extras)
    base = unwrapped(model)
    with router.RouterLogits(base) as router_logits:
        sums = forward(model, batch, chunk_size, extras - {"router_aux"})
    return {**sums, "router_aux": router.aux_loss(base, router_logits, batch["token_copies"])}


def concatenated_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                         chunk_size: int = CHUNK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """forward_sums' (chosen_logps, rejected_logps), each (B,)."""
    return forward_sums(model, batch, chunk_size)["logps"].chunk(2)


@dataclass
class PairLogps:
    """Per-sequence quantities of B pairs, each (B,) fp32: what an objective reads. The optional
    ones are None unless the objective asked for them (its `extras`)."""
    policy_chosen_logps: torch.Tensor  # sum over the completion's tokens of log pi(token)
    policy_rejected_logps: torch.Tensor
    reference_chosen_logps: torch.Tensor  # the same under the reference; zeros without one
    reference_rejected_logps: torch.Tensor
    chosen_lengths: torch.Tensor  # completion token counts
    rejected_lengths: torch.Tensor
    # shared_logps: the sums over each completion's first min(chosen, rejected length) tokens (LD-DPO)
    policy_chosen_shared_logps: torch.Tensor | None = None
    policy_rejected_shared_logps: torch.Tensor | None = None
    reference_chosen_shared_logps: torch.Tensor | None = None
    reference_rejected_shared_logps: torch.Tensor | None = None
    # log_sum_sq: the sums over the completion's tokens of log sum_v pi(v)^2, without gradient (WPO)
    policy_chosen_log_sum_sq: torch.Tensor | None = None
    policy_rejected_log_sum_sq: torch.Tensor | None = None
    # router_aux: the policy's MoE load-balancing loss over the batch, () with gradient (router.py)
    policy_router_aux_loss: torch.Tensor | None = None


def policy_and_reference_logps(policy: torch.nn.Module, reference: torch.nn.Module | None,
                               batch: dict[str, torch.Tensor], extras: frozenset = frozenset()) -> PairLogps:
    """The batch's PairLogps, with the `extras` asked for.

    The reference runs without gradients. Precomputed reference log-probs in the batch are used
    as they are. With neither (a reference-free loss) they are zeros, which makes the rewards
    beta * policy log-probs.
    """
    if "reference_chosen_logps" in batch:
        reference = {"logps": torch.cat([batch["reference_chosen_logps"], batch["reference_rejected_logps"]])}
    elif reference is not None:  # first: its transient memory is freed before the policy's activations exist
        with torch.no_grad():
            reference = forward_sums(reference, batch, extras=extras & {"shared_logps"})
    policy = forward_sums(policy, batch, extras=extras)
    if reference is None:
        reference = {k: torch.zeros_like(v).detach() for k, v in policy.items() if k != "log_sum_sq"}
    sides = lambda name, values: dict(zip((name.format("chosen_"), name.format("rejected_")), values.chunk(2)))
    fields = {"chosen_lengths": batch["chosen_lengths"], "rejected_lengths": batch["rejected_lengths"],
              "policy_router_aux_loss": policy.pop("router_aux", None)}
    for model, sums in (("policy", policy), ("reference", reference)):
        for key, values in sums.items():
            fields.update(sides(f"{model}_{{}}{key}", values))
    return PairLogps(**fields)
