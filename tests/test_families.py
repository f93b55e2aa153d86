"""Every layout is exact on every model family it is used for (tests/families.py: a tiny model per
family, built locally, initializer_range 0.2 so that a leak between spans shows): step-0 log-probs
equal a naive forward of each sequence alone to 1e-5 relative in fp32, one step's gradients equal the
padded layout's to 1e-5, and a layout that is not exact for a family is never chosen for it."""

import math
from types import SimpleNamespace

import pytest
import torch

from conftest import make_tokenizer
from families import (FAMILIES, USED, gradient_difference, layout_gradients, layout_logps, make_family_model,
                      naive_logps, relative_difference, tokenized_pairs)
from dpo_train import layouts

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
TOKENIZER = make_tokenizer()
FAST = ("mistral", "gemma3_text", "gemma2", "gpt_oss", "lfm2")  # a window, mixed windows, softcap, sinks + MoE, a mixer


def exact_where_used(family: str):
    """The family's decisions for each layout asked for, and their log-probs against the naive forward."""
    model = make_family_model(family, len(TOKENIZER))
    pairs = tokenized_pairs(TOKENIZER)
    with torch.no_grad():
        naive = naive_logps(model, pairs)
    used = {asked: layouts.choose(asked, [model]) for asked in layouts.ORDER}
    assert used["packed"][0] == USED[family], used["packed"][1]
    assert used["padded"] == ("padded", None)
    for layout in {layout for layout, _ in used.values()}:
        with torch.no_grad():
            difference = relative_difference(layout_logps(model, pairs, layout), naive)
        assert difference < 1e-5, (family, layout, difference)
    return model, pairs, {layout for layout, _ in used.values()}


@pytest.mark.parametrize("family", FAST)
def test_the_layouts_a_family_is_given_give_its_naive_log_probs(family):
    exact_where_used(family)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(set(FAMILIES) - set(FAST)))
def test_every_family_every_layout_exact_or_not_used(family):
    exact_where_used(family)


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in FAMILIES if USED[f] != "padded"])
def test_one_steps_gradients_equal_the_padded_layouts(family):
    model, pairs, used = exact_where_used(family)
    padded = layout_gradients(model, pairs, "padded")
    for layout in used - {"padded"}:
        assert gradient_difference(layout_gradients(model, pairs, layout), padded) < 1e-5, layout


def test_the_first_batch_check_catches_what_the_survey_missed(monkeypatch):
    """A mixer the survey is made blind to (LFM2's convolution, survey patched to find nothing): the first
    batch scored packed and padded differ, and the run switches to padded, saying so in one line."""
    model = make_family_model("lfm2", len(TOKENIZER))
    monkeypatch.setattr(layouts, "survey", lambda model: {})
    said = []
    accelerator = SimpleNamespace(device=torch.device("cpu"), mixed_precision="no", num_processes=1)
    pairs = tokenized_pairs(TOKENIZER)
    layout = layouts.decide(accelerator, "packed", [model], pairs, 4, 1, True, said.append)
    assert layout == "padded" and len(said) == 1
    assert "first batch's log-probs differ from the padded layout's by" in said[0] and "layout_check" in said[0]
    assert layouts.decide(accelerator, "packed", [model], pairs, 4, 1, False, said.append) == "packed"  # off


def test_the_first_batch_check_passes_an_exact_layout():
    model = make_family_model("gemma3_text", len(TOKENIZER))
    difference, error = layouts.first_batch_difference(model, tokenized_pairs(TOKENIZER), "rows", 1,
                                                       torch.device("cpu"))
    assert error is None and difference < 1e-5


def test_a_logit_transform_no_config_field_names_is_measured(monkeypatch):
    """Gemma 2 caps its logits (final_logit_softcapping). Were that field missing from logps'
    LOGIT_TRANSFORMS, the chunked head outside the forward would score without the cap: check_head compares
    the model's logits with its head applied to its hidden states and keeps the head inside. (Falcon-H1's
    lm_head_multiplier, applied to the head's output, scales the hidden states the same: it needs nothing.)"""
    import dpo_train.logps as logps
    monkeypatch.setattr(logps, "LOGIT_TRANSFORMS", tuple(n for n in logps.LOGIT_TRANSFORMS if n != "final_logit_softcapping"))
    model = make_family_model("gemma2", len(TOKENIZER))
    pairs = tokenized_pairs(TOKENIZER)
    with torch.no_grad():
        naive = naive_logps(model, pairs)
        assert logps.separable_head(model) is not None and relative_difference(
            layout_logps(model, pairs, "padded"), naive) > 1e-3  # scored without the cap
        assert layouts.check_head(model) is not None
        assert "measured" in logps.head_inside(model) and logps.separable_head(model) is None
        assert relative_difference(layout_logps(model, pairs, "padded"), naive) < 1e-5
        falcon = make_family_model("falcon_h1", len(TOKENIZER))
        falcon.model.lm_head_multiplier = 0.5
        assert layouts.check_head(falcon) is None and layouts.check_head(make_family_model("llama", len(TOKENIZER))) is None
        assert relative_difference(layout_logps(falcon, pairs, "padded"), naive_logps(falcon, pairs)) < 1e-5


def test_a_hybrid_model_trains_in_padded_and_says_why_in_one_line(tmp_path, tiny_data, capsys):
    """train.layout: packed on LFM2 (convolution layers): the run says once why it uses padded, and trains."""
    from dpo_train.trainer import train
    from test_trainer import read_metrics, tiny_config
    make_family_model("lfm2", len(TOKENIZER)).save_pretrained(tmp_path / "lfm2")
    TOKENIZER.save_pretrained(tmp_path / "lfm2")
    train(tiny_config(tmp_path, tmp_path / "lfm2", tiny_data, "train.max_steps=2", "data.eval=null",
                      "train.eval_max_new_tokens=0"))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("train.layout")]
    assert lines == ["train.layout packed: tokens mix outside its attention (Lfm2ShortConv), which would read across "
                     "pairs and answers; using the padded layout (the same numbers)"]
    assert abs(read_metrics(tmp_path / "run")[0]["loss"] - math.log(2)) < 1e-6
