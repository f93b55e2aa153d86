"""Which layout a run scores its pairs in: decided once from the models themselves, then checked on
the first batch.

The shared-prompt layouts (`packed`, `rows`) are exact only where the pair attention (attention.py)
stands in for everything that mixes tokens. `survey` runs a model once on two short rows through an
attention that mixes nothing (attention.Survey), the rows alike at every other position, and reads:

- whether tokens still mix (a convolution, a state-space or linear-attention layer, an attention that
  bypasses transformers' interface): the rows' shared positions then differ, and only `padded` is exact;
- which keywords its attention layers pass that the pair attention does not implement: not `packed`;
- whether its own attention reads a 4-D mask (flash attention does not): else not `rows`.

No model is named anywhere: a family is served by what its modules do. `decide` takes the fastest exact
layout and says in one line why it is not the one asked for; then `first_batch_check` scores the first
batch in that layout and in `padded` (no grad) and switches to `padded` on a difference, for whatever
the survey did not foresee.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch
from accelerate.utils import send_to_device

from . import attention, engines
from .collate import COLLATES
from .logps import HEAD_INSIDE, forward_sums, hidden_states_or_logits, separable_head, unwrapped

ORDER = ("packed", "rows", "padded")  # fastest first; padded is exact for every causal model
SURVEY_LENGTH = 16  # tokens per surveyed row
LEAK_TOLERANCE = 1e-4  # relative change at the rows' shared positions that counts as mixing (fp32 noise: ~1e-7)
# largest relative difference of a first-batch log-prob from padded's, per compute dtype (its noise, summed)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def text_config(model):
    config = unwrapped(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def mixers(model) -> str:
    """The module classes that hold a convolution along the sequence, in words, for the log."""
    names = sorted({type(m).__name__ for m in unwrapped(model).modules()
                    if any(isinstance(c, torch.nn.Conv1d) for c in m.children())})
    return ", ".join(names) if names else "a token mixer outside transformers' attention interface"


@contextlib.contextmanager
def evaluating(model):
    """The model in eval mode inside the block (no router noise), every module's own mode back after it
    (a LoRA reference wraps the policy: restoring its mode alone would put the policy in its mode)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def survey_ids(model) -> torch.Tensor:
    """(2, SURVEY_LENGTH) token ids: one random row, then the same with every even position changed."""
    vocab = text_config(model).vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, SURVEY_LENGTH), generator=generator).repeat(2, 1)
    ids[1, 0::2] = (ids[0, 0::2] + torch.randint(1, vocab, (SURVEY_LENGTH // 2,), generator=generator)) % vocab
    return ids.to(next(unwrapped(model).parameters()).device)


@torch.no_grad()
def check_head(model) -> str | None:
    """Whether the model's logits are its LM head applied to its final hidden states (what logps' chunked
    head computes); where they are not (a multiplier, a cap, a transform no config field names), the model
    is marked to keep its own head, and the reason returned."""
    base = unwrapped(model)
    if (head := separable_head(base)) is None:
        return None
    ids = survey_ids(model)
    with evaluating(base):
        hidden, _ = hidden_states_or_logits(base, input_ids=ids)
        logits = base(input_ids=ids, use_cache=False).logits
    ours = head(hidden.to(head.weight.dtype)).float()
    if float((ours - logits.float()).abs().max() / logits.float().abs().max().clamp(min=1e-12)) <= LEAK_TOLERANCE:
        return None
    reason = "its logits are not its LM head applied to its final hidden states (measured)"
    setattr(base, HEAD_INSIDE, reason)
    return reason


@torch.no_grad()
def survey(model) -> dict[str, str]:
    """{layout: why it is not exact for `model`}; a layout not named is exact (padded always is)."""
    base = unwrapped(model)
    if reason := attention.unsupported(base.config):
        return {"packed": reason, "rows": reason}
    ids = survey_ids(model)
    device = ids.device
    attention.enable(base.config)
    seen = attention.Survey()
    try:
        with evaluating(base):
            outputs, _ = hidden_states_or_logits(base, input_ids=ids,
                                                 position_ids=torch.arange(SURVEY_LENGTH, device=device).expand(2, -1),
                                                 **{attention.SPANS_KWARG: seen})
    except Exception as e:  # noqa: BLE001 (any failure means: not through the pair attention)
        reason = f"its forward fails through the pair attention ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        return {"packed": reason, "rows": reason}
    same, other = outputs[0, 1::2].float(), outputs[1, 1::2].float()  # positions whose tokens the rows share
    leak = float((same - other).abs().max() / same.abs().max().clamp(min=1e-12))
    if seen.calls == 0 or leak > LEAK_TOLERANCE:
        reason = f"tokens mix outside its attention ({mixers(model)}), which would read across pairs and answers"
        return {"packed": reason, "rows": reason}
    reasons = {}
    if unimplemented := sorted(seen.keywords - attention.IMPLEMENTED):
        reasons["packed"] = f"its attention uses {', '.join(unimplemented)}, which the pair attention does not implement"
    if (implementation := attention.own_implementation(base.config)) not in attention.READS_4D_MASK:
        reasons["rows"] = f"its attention implementation {implementation!r} does not read a 4-D mask"
    return reasons


def choose(layout: str, models: list, known: dict[str, str] | None = None) -> tuple[str, str | None]:
    """(the fastest layout exact for every model, why it is not `layout`, or None when it is `layout`);
    `known`: {layout: why it is not exact} for the inputs (vision.Collates.not_exact)."""
    if layout == "padded":
        return layout, None
    reasons = dict(known or {})
    for model in models:
        for name, reason in survey(model).items():
            reasons.setdefault(name, reason)
    if layout not in reasons:
        return layout, None
    return next(name for name in ORDER if name not in reasons), reasons[layout]


def compute_dtype(model, mixed_precision: str = "no") -> torch.dtype:
    """The dtype the forward computes in: autocast's (Accelerate's mixed precision), else the weights'."""
    if mixed_precision in ("bf16", "fp16"):
        return torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return next(unwrapped(model).parameters()).dtype


@torch.no_grad()
def first_batch_difference(model, pairs: list[dict], layout: str, pad_token_id: int, device,
                           collates: dict = COLLATES) -> tuple[float, str | None]:
    """(max relative difference of the pairs' log-probs in `layout` from padded's, the error if `layout` fails)."""
    move = partial(send_to_device, device=device)  # a batch with images holds a mapping of their inputs
    with evaluating(model):
        try:
            got = forward_sums(model, move(collates[layout](pairs, pad_token_id)))["logps"]
        except Exception as e:  # noqa: BLE001 (whatever fails, padded is the way on)
            return float("inf"), f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        expected = forward_sums(model, move(collates["padded"](pairs, pad_token_id)))["logps"]
    return float(((got - expected).abs() / expected.abs().clamp(min=1.0)).max()), None


def decide(accelerator, layout: str, models: list, train_set, batch_size: int, pad_token_id: int, check: bool,
           log, collates: dict = COLLATES) -> str:
    """The layout the run uses: `choose`, then (with `check`) the first-batch check on the policy
    (models[0]), the same answer on every process. Each change is said in one line. A compiled policy
    runs both eagerly (compiling them would cost more than they do). `collates`: collate.COLLATES, or with
    images vision.Collates (its `not_exact` known before any survey)."""
    with torch.compiler.set_stance("force_eager"):
        for model in models:
            check_head(model)  # the trainer says it when the policy keeps its head
        chosen, reason = choose(layout, models, getattr(collates, "not_exact", None))
        if reason:
            log(f"train.layout {layout}: {reason}; using the {chosen} layout (the same numbers)")
        if not check or chosen == "padded":
            return chosen
        pairs = [train_set[i] for i in range(min(len(train_set), batch_size))]
        difference, error = first_batch_difference(models[0], pairs, chosen, pad_token_id, accelerator.device,
                                                   collates)
    tolerance = TOLERANCE.get(compute_dtype(models[0], str(accelerator.mixed_precision)), 2e-2)
    if not engines.on_any_process(accelerator, error is not None or difference > tolerance):
        return chosen
    why = (f"scoring the first batch in it fails ({error})" if error else
           f"the first batch's log-probs differ from the padded layout's by {difference:.1e} (relative; tolerance "
           f"{tolerance:.0e})" if difference > tolerance else "another process found a difference")
    log(f"train.layout {chosen}: {why}; using the padded layout (train.layout_check: false skips this check)")
    return "padded"
