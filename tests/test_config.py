import typing
from pathlib import Path

import pytest
from accelerate.tracking import LOGGER_TYPE_TO_CLASS

from dpo_train.config import SHIPPED_TEMPLATES, ConfigError, LossType, Source, Tracker, load_config, save_config
from dpo_train.loss_settings import REFERENCE_FREE_TYPES
from dpo_train.losses import LOSSES, REFERENCE_FREE
from dpo_train.templates import SHIPPED

GOOD = """
model: {name_or_path: some/model}
data: {train: train.jsonl}
loss: {beta: 0.1}
train: {output_dir: out, learning_rate: 5e-7, max_steps: 10}
"""


def write(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def error(tmp_path, text, overrides=()):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text), list(overrides))
    message = str(e.value)
    assert "\n" not in message and "config.yaml" in message  # one line that names the file
    return message


def test_good_config_parses_with_types(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.model.name_or_path == "some/model" and cfg.model.ref_name_or_path is None
    assert cfg.train.learning_rate == 5e-7 and isinstance(cfg.train.learning_rate, float)  # YAML reads 5e-7 as str
    assert cfg.train.max_steps == 10 and cfg.loss.type == ["sigmoid"] and cfg.loss.reference_free is False


def test_overrides_are_typed_like_the_field(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), ["train.max_steps=20", "loss.beta=0.2", "loss.reference_free=true",
                                              "data.eval=eval.jsonl", "train.learning_rate=1e-5"])
    assert cfg.train.max_steps == 20 and cfg.loss.beta == 0.2 and cfg.loss.reference_free is True
    assert cfg.data.eval == "eval.jsonl" and cfg.train.learning_rate == 1e-5
    assert load_config(write(tmp_path, GOOD), ["train.max_steps=null"]).train.max_steps is None


@pytest.mark.parametrize("text, overrides, names", [
    (GOOD + "extra: {a: 1}\n", [], "extra"),
    (GOOD, ["train.lerning_rate=0.1"], "train.lerning_rate"),
    (GOOD, ["train.max_steps=ten"], "train.max_steps"),
    (GOOD, ["train.max_steps=2.5"], "train.max_steps"),
    (GOOD, ["loss.reference_free=maybe"], "loss.reference_free"),
    (GOOD, ["loss.beta=0"], "loss.beta"),
    (GOOD, ["loss.beta=-1"], "loss.beta"),
    (GOOD, ["train.learning_rate=-1e-5"], "train.learning_rate"),
    (GOOD, ["train.per_device_batch_size=0"], "train.per_device_batch_size"),
    (GOOD, ["train.grad_accum_steps=0"], "train.grad_accum_steps"),
    (GOOD, ["loss.type=kto"], "loss.type"),
    (GOOD, ["model.dtype=int8"], "model.dtype"),
    (GOOD, ["data.max_length=100", "data.max_prompt_length=100"], "data.max_length"),
    (GOOD, ["train.output_dir="], "train.output_dir"),
    (GOOD, ["nodot=1"], "nodot"),
    ("model: [1, 2]\n", [], "model"),
    (GOOD, ["loss.label_smoothing=0.1"], "loss.label_smoothing"),  # only robust, exo_pair and aot read it
    (GOOD, ["loss.type=robust", "loss.label_smoothing=0.5"], "loss.label_smoothing"),
    (GOOD, ["loss.type=exo_pair", "loss.label_smoothing=0"], "loss.label_smoothing"),  # EXO needs eps > 0
    (GOOD, ["loss.gamma=1"], "loss.gamma"),  # only simpo uses it
    (GOOD, ["loss.type=[sigmoid, kto]"], "loss.type[1]"),
    (GOOD, ["loss.type=[]"], "loss.type"),
    (GOOD, ["loss.type=[sigmoid, sft]", "loss.weights=[1.0]"], "loss.weights"),
    (GOOD, ["loss.weights=[-1]"], "loss.weights"),
    (GOOD, ["loss.discopop_tau=0.1"], "loss.discopop_tau"),  # only discopop
    (GOOD, ["loss.type=discopop", "loss.discopop_tau=0"], "loss.discopop_tau"),
    (GOOD, ["loss.f_divergence=kl"], "loss.f_divergence"),
    (GOOD, ["loss.f_alpha=0.3"], "loss.f_alpha"),  # only alpha_divergence
    (GOOD, ["loss.type=bco_pair", "loss.f_divergence=forward_kl"], "loss.f_divergence"),  # TRL's rule
    (GOOD, ["loss.type=aot", "loss.use_weighting=true"], "loss.use_weighting"),
    (GOOD, ["loss.ld_alpha=1.5"], "loss.ld_alpha"),
    (GOOD, ["loss.type=simpo", "loss.ld_alpha=0.5"], "loss.ld_alpha"),  # reads no log-ratios
    (GOOD, ["loss.ld_alpha=0.5", "model.precompute_reference=true"], "loss.ld_alpha"),
    (GOOD, ["loss.sft_weight=-1"], "loss.sft_weight"),
    (GOOD, ["model.lora.r=-1"], "model.lora.r"),
    (GOOD, ["model.lora.rank=8"], "model.lora.rank"),
    (GOOD, ["model.lora.target_modules=[[q_proj]]"], "model.lora.target_modules[0]"),
    (GOOD, ["model.lora.save_merged=true"], "model.lora.save_merged"),
    (GOOD, ["model.lora.r=8", "model.ref_name_or_path=other/model"], "model.ref_name_or_path"),
    (GOOD, ["model.lora=3", "model.lora.r=8"], "model.lora"),
    (GOOD, ["data.train=[]"], "data.train"),
    (GOOD, ["data.train=[a.jsonl, {path: b.jsonl, tak: 3}]"], "unknown key data.train[1].tak"),
    (GOOD, ["data.train=[{split: test}]"], "data.train[0].path"),
    (GOOD, ["data.train=[{path: a, take: 0}]"], "data.train[0].take"),
    (GOOD, ["data.train=[{path: a, take: 1.5}]"], "data.train[0].take"),
    (GOOD, ["data.train=[{path: a, take: many}]"], "data.train[0].take"),
    (GOOD, ["data.train=[{path: a, columns: {prompt: q, answer: a}}]"], "unknown key data.train[0].columns.answer"),
    (GOOD, ["data.eval=[{path: a, rows: 0}]"], "data.eval[0].rows"),
    (GOOD, ["data.train=[[a.jsonl]]"], "data.train[0]"),
    (GOOD, ["data.columns.promt=q"], "unknown key data.columns.promt"),
    (GOOD, ["data.chat_template=no-such-template"], "data.chat_template"),
    (GOOD, ["data.chat_template=none", "data.system_prompt=Be brief."], "data.system_prompt"),
    (GOOD, ["data.num_proc=0"], "data.num_proc"),
    (GOOD, ["train.report_to=tensorbord"], "train.report_to"),
    (GOOD, ["train.report_to=[wandb, mlfow]"], "train.report_to[1]"),
    (GOOD, ["train.report_to=[none, wandb]"], "train.report_to"),
    (GOOD, ["train.push_to_hub=not a repo"], "train.push_to_hub"),
    (GOOD, ["train.push_to_hub=a/b/c"], "train.push_to_hub"),
    (GOOD, ["train.hub_private=maybe"], "train.hub_private"),
])
def test_errors_name_the_key_and_file(tmp_path, text, overrides, names):
    assert names in error(tmp_path, text, overrides)


@pytest.mark.parametrize("override, suggestion", [
    ("train.max_step=3", "did you mean train.max_steps?"),
    ("data.columns.promt=q", "did you mean data.columns.prompt?"),
    ("model.lora.rank=8", "known: r, alpha"),  # nothing close: no guess, the known keys
])
def test_an_unknown_key_suggests_the_closest_known_one(tmp_path, override, suggestion):
    message = error(tmp_path, GOOD, [override])
    assert suggestion in message and ("did you mean" in suggestion) == ("did you mean" in message)


def test_not_yaml_or_not_a_mapping(tmp_path):
    assert "not valid YAML" in error(tmp_path, "model: {name_or_path: [unclosed\n")
    assert "mapping" in error(tmp_path, "- just\n- a list\n")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_missing_required_values(tmp_path):
    assert "data.train" in error(tmp_path, "train: {output_dir: out}\n")


def test_loss_types_match_the_loss_table():
    assert set(typing.get_args(LossType)) == set(LOSSES)
    assert set(REFERENCE_FREE_TYPES) == REFERENCE_FREE


def test_a_list_of_loss_types_with_weights(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), ["loss.type=[sigmoid, bco_pair, sft]", "loss.weights=[0.8, 0.2, 1]"])
    assert cfg.loss.type == ["sigmoid", "bco_pair", "sft"] and cfg.loss.weights == [0.8, 0.2, 1.0]
    cfg = load_config(write(tmp_path, GOOD), ["loss.type=[sigmoid, sft]"])
    assert cfg.loss.weights == [1.0, 1.0]  # null: all 1.0, shown in the saved config
    options = load_config(write(tmp_path, GOOD), ["loss.f_divergence=alpha_divergence", "loss.use_weighting=true",
                                                  "loss.ld_alpha=0.5"]).loss
    assert (options.f_alpha, options.use_weighting, options.ld_alpha) == (0.5, True, 0.5)


def test_nested_lora_settings_from_yaml_and_one_override(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), ["model.lora.r=16"])
    assert cfg.model.lora.r == 16 and cfg.model.lora.target_modules == ["all-linear"] and cfg.model.lora.alpha == 32.0
    text = GOOD.replace("model: {name_or_path: some/model}",
                        "model: {name_or_path: some/model, lora: {r: 4, target_modules: [q_proj, v_proj], alpha: 8}}")
    cfg = load_config(write(tmp_path, text), ["model.lora.target_modules=o_proj"])
    assert cfg.model.lora.r == 4 and cfg.model.lora.alpha == 8.0 and cfg.model.lora.target_modules == ["o_proj"]


def test_mappings_passed_on_as_given_from_yaml_and_overrides(tmp_path):
    """model.init_kwargs and data.chat_template_kwargs are mappings handed to from_pretrained and the chat
    template as they are; an override reaches inside them; model.dtype is not set there."""
    text = GOOD.replace("model: {name_or_path: some/model}",
                        "model: {name_or_path: some/model, init_kwargs: {attn_implementation: eager, revision: v2}}")
    cfg = load_config(write(tmp_path, text), ["data.chat_template_kwargs.enable_thinking=false",
                                              "model.init_kwargs.trust_remote_code=true", "loss.router_aux_coef=0.01",
                                              "data.trl_tokenization=true", "train.layout_check=false"])
    assert cfg.model.init_kwargs == {"attn_implementation": "eager", "revision": "v2", "trust_remote_code": True}
    assert cfg.data.chat_template_kwargs == {"enable_thinking": False} and cfg.data.trl_tokenization is True
    assert cfg.loss.router_aux_coef == 0.01 and cfg.train.layout_check is False
    defaults = load_config(write(tmp_path, GOOD))
    assert defaults.model.init_kwargs == {} == defaults.data.chat_template_kwargs and defaults.train.layout_check
    assert defaults.loss.router_aux_coef is None and defaults.data.trl_tokenization is False
    assert "model.init_kwargs.dtype: is set by model.dtype" in error(tmp_path, GOOD, ["model.init_kwargs.dtype=bfloat16"])
    assert "data.chat_template_kwargs: expected mapping" in error(tmp_path, GOOD, ["data.chat_template_kwargs=3"])


def test_loss_hyperparameters_for_their_own_loss(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), ["loss.type=robust", "loss.label_smoothing=0.2", "loss.sft_weight=1"])
    assert cfg.loss.label_smoothing == 0.2 and cfg.loss.sft_weight == 1.0
    assert load_config(write(tmp_path, GOOD), ["loss.type=simpo", "loss.gamma=0.5"]).loss.gamma == 0.5


def test_loss_settings_left_null_take_the_loss_types_defaults(tmp_path):
    dpo = load_config(write(tmp_path, GOOD.replace("loss: {beta: 0.1}", "loss: {}"))).loss
    assert (dpo.beta, dpo.label_smoothing, dpo.gamma) == (0.1, 0.0, 0.0)
    simpo = load_config(write(tmp_path, GOOD.replace("loss: {beta: 0.1}", "loss: {}")), ["loss.type=simpo"]).loss
    assert (simpo.beta, simpo.gamma) == (2.0, 1.0)
    robust = load_config(write(tmp_path, GOOD), ["loss.type=robust"]).loss
    assert (robust.beta, robust.label_smoothing) == (0.1, 0.1)  # an explicit beta stays
    exo = load_config(write(tmp_path, GOOD), ["loss.type=[sigmoid, exo_pair, discopop]"]).loss
    assert (exo.label_smoothing, exo.discopop_tau) == (1e-3, 0.05)  # the first listed type with a default
    assert load_config(write(tmp_path, GOOD)).loss.discopop_tau is None  # a setting no listed type reads stays null


@pytest.mark.parametrize("loss_type", typing.get_args(LossType))
def test_the_quickstart_switches_to_every_loss_type_with_one_override(loss_type):
    config = load_config(Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml",
                         [f"loss.type={loss_type}"])
    assert config.loss.type == [loss_type]


def test_a_saved_config_loads_again(tmp_path):
    """What the trainer writes beside a checkpoint (settings resolved, unused ones null or 0) is a valid config."""
    config = load_config(write(tmp_path, GOOD), ["loss.type=[exo_pair, discopop]", "loss.f_divergence=alpha_divergence"])
    save_config(config, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == config


def test_trackers_and_templates_match_their_tables():
    assert set(typing.get_args(Tracker)) - {"none"} == set(LOGGER_TYPE_TO_CLASS)  # what Accelerate knows
    assert set(SHIPPED_TEMPLATES) == set(SHIPPED)


def test_a_source_is_a_string_or_a_list_of_strings_and_mappings(tmp_path):
    assert load_config(write(tmp_path, GOOD)).data.train == "train.jsonl"  # one source stays a string
    text = GOOD.replace("data: {train: train.jsonl}", """data:
  train:
    - a.jsonl
    - {path: org/set, split: "train_prefs[:10%]", columns: {prompt: question}, take: 0.5}
    - {path: c.parquet, take: 100}
  columns: {chosen: response_j, rejected: response_k}""")
    cfg = load_config(write(tmp_path, text))
    a, b, c = cfg.data.train
    assert a == Source(path="a.jsonl")  # a string item becomes a full mapping, so the run can record its rows
    assert (b.path, b.split, b.columns.prompt, b.columns.chosen, b.take) == ("org/set", "train_prefs[:10%]", "question",
                                                                            None, 0.5)
    assert (c.take, type(c.take)) == (100, int) and (cfg.data.columns.chosen, cfg.data.columns.prompt) == ("response_j", None)
    # a single mapping is a one-item mixture; an override gives a list
    assert load_config(write(tmp_path, GOOD), ["data.train={path: x.jsonl, take: 5}"]).data.train == [Source("x.jsonl", take=5)]
    assert [s.path for s in load_config(write(tmp_path, GOOD), ["data.eval=[e1.jsonl, e2.jsonl]"]).data.eval] == \
        ["e1.jsonl", "e2.jsonl"]
    save_config(cfg, tmp_path / "saved.yaml")  # what a run saves loads back the same
    assert load_config(tmp_path / "saved.yaml").to_dict() == cfg.to_dict()


def test_report_to_is_one_tracker_or_a_list(tmp_path):
    assert load_config(write(tmp_path, GOOD)).train.report_to == "none"
    assert load_config(write(tmp_path, GOOD), ["train.report_to=wandb"]).train.report_to == "wandb"
    cfg = load_config(write(tmp_path, GOOD), ["train.report_to=[tensorboard, mlflow]", "train.run_name=r1",
                                              "train.push_to_hub=me/model", "train.hub_private=true"])
    assert cfg.train.report_to == ["tensorboard", "mlflow"] and cfg.train.run_name == "r1"
    assert (cfg.train.push_to_hub, cfg.train.hub_private, cfg.train.project) == ("me/model", True, "dpo-train")


def test_chat_template_names_a_shipped_template_or_a_file(tmp_path):
    assert load_config(write(tmp_path, GOOD), ["data.chat_template=chatml"]).data.chat_template == "chatml"
    (tmp_path / "t.jinja").write_text("{{ messages }}")
    assert load_config(write(tmp_path, GOOD), [f"data.chat_template={tmp_path / 't.jinja'}"]).data.chat_template == \
        str(tmp_path / "t.jinja")
    assert load_config(write(tmp_path, GOOD), ["data.system_prompt=Be brief."]).data.system_prompt == "Be brief."


def test_a_key_given_twice_is_an_error_naming_both_lines(tmp_path):
    """PyYAML keeps the last of two equal keys without a word: a whole second `loss:` section would replace the
    first. The loader refuses it, at any depth, with the line of each."""
    twice = GOOD + "loss: {beta: 0.5}\n"  # the second loss section is on line 6, the first on line 4
    assert error(tmp_path, twice) == (f"{tmp_path / 'config.yaml'}: not valid YAML at line 6, column 1: duplicate key "
                                      "'loss' (first given at line 4); give each key once")
    nested = "train:\n  output_dir: out\n  seed: 1\n  max_steps: 3\n  seed: 2\n"
    assert "line 5, column 3: duplicate key 'seed' (first given at line 3)" in error(tmp_path, nested)
    anchors = "base: &b {beta: 0.1}\nloss:\n  <<: *b\n  beta: 0.2\n"  # a merge key's values may be overridden
    assert "duplicate" not in error(tmp_path, anchors)  # (refused only for the unknown section `base`)


def test_yaml_errors_keep_their_line_and_column(tmp_path):
    tab = "model: {name_or_path: x}\ntrain:\n\toutput_dir: out\n"  # a tab cannot indent YAML
    assert error(tmp_path, tab) == (f"{tmp_path / 'config.yaml'}: not valid YAML at line 3, column 1: found character "
                                    "'\\t' that cannot start any token")
    assert error(tmp_path, "model: {name_or_path: [unclosed\n").endswith(
        "not valid YAML at line 2, column 1: expected ',' or ']', but got '<stream end>' (while parsing a flow sequence "
        "at line 1, column 23)")


def numeric_keys(cls=None, prefix=""):
    """(dotted key, 'int' or 'float') of every number of the config tree outside lists."""
    import dataclasses

    from dpo_train.config import Config
    cls = cls or Config
    for f, hint in zip(dataclasses.fields(cls), typing.get_type_hints(cls).values()):
        args = set(typing.get_args(hint)) or {hint}
        if dataclasses.is_dataclass(hint):
            yield from numeric_keys(hint, f"{prefix}{f.name}.")
        elif args & {int, float} and not args & {str, bool}:
            yield f"{prefix}{f.name}", "float" if float in args else "int"


# Settings read only with another setting: given with it, so that the range check (not that rule) answers
CONTEXT = {"loss.gamma": ["loss.type=simpo"], "loss.label_smoothing": ["loss.type=robust"],
           "loss.discopop_tau": ["loss.type=discopop"], "loss.f_alpha": ["loss.f_divergence=alpha_divergence"]}
NEGATIVE_ALLOWED = {"loss.gamma", "loss.f_alpha"}  # a target margin and an alpha may be below 0


@pytest.mark.parametrize("key, kind", list(numeric_keys()))
def test_every_number_is_range_checked(tmp_path, key, kind):
    """-1 (where no negative value means anything), NaN and infinity are one-line errors naming the key, never a
    traceback later in the run (train.seed=-1 once reached NumPy)."""
    bad = ([] if key in NEGATIVE_ALLOWED else ["-1"]) + ([".nan", ".inf", "-.inf"] if kind == "float" else [])
    for value in bad:
        assert f": {key}: " in error(tmp_path, GOOD, [*CONTEXT.get(key, []), f"{key}={value}"]), value
    assert load_config(write(tmp_path, GOOD), CONTEXT.get(key, [])) is not None  # the context alone is fine


@pytest.mark.parametrize("override, names", [("train.seed=4294967296", "train.seed: must be in [0, 2**32)"),
                                             ("train.collective_timeout=1000000000000", "train.collective_timeout"),
                                             ("loss.weights=[1, .nan]", "loss.weights"),
                                             ("train.learning_rate=.inf", "train.learning_rate: must be a finite")])
def test_upper_bounds_and_list_items(tmp_path, override, names):
    assert names in error(tmp_path, GOOD, [override])
    assert load_config(write(tmp_path, GOOD), ["train.seed=4294967295"]).train.seed == 2**32 - 1
