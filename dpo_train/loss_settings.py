"""The loss section's rules: which loss types read which settings, the settings' per-type defaults, and
the check that refuses a setting no listed type reads and resolves the ones left null (for a config and
for `dpo-train eval`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import LossConfig, ModelConfig

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
    check(l.router_aux_coef is None or l.router_aux_coef >= 0, "loss.router_aux_coef", "must be >= 0 or null",
          l.router_aux_coef)
