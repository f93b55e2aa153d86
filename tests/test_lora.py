"""LoRA: the reference is the policy with its adapter off (one copy of the weights), only the
adapter trains, and final/ holds the adapter (and optionally a merged plain model)."""

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from dpo_train.models import load_model, load_policy_and_reference
from dpo_train.trainer import train
from test_trainer import tiny_config

LORA = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["all-linear"]}
IDS = torch.tensor([[5, 6, 7, 8, 9, 10]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_reference_is_the_base_model_with_the_adapter_off(tiny_model_dir):
    policy, reference = load_policy_and_reference(str(tiny_model_dir), None, "float32", lora=LORA)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert torch.equal(logits(policy), logits(base))  # lora_B starts at zero
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert "lm_head" not in " ".join(trainable)  # all-linear leaves the output head alone
    for name, p in policy.named_parameters():  # as if trained: the adapter now changes the output
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    assert not torch.allclose(logits(policy), logits(base))
    assert torch.equal(logits(reference), logits(base))
    # one copy of the weights: every reference tensor is a policy tensor
    policy_storage = {p.data_ptr() for p in policy.parameters()}
    assert all(p.data_ptr() in policy_storage for p in reference.parameters())


def test_a_lora_run_saves_the_adapter_and_a_merged_model(tmp_path, tiny_model_dir, tiny_data):
    config = tiny_config(tmp_path, tiny_model_dir, tiny_data, "model.lora.r=4", "model.lora.save_merged=true",
                         "train.max_steps=3", "train.eval_max_new_tokens=0")
    train(config)
    final = tmp_path / "run" / "final"
    assert (final / "adapter_model.safetensors").is_file() and (final / "adapter_config.json").is_file()
    assert not (final / "model.safetensors").exists()  # the adapter alone, not a copy of the base weights
    assert "LoRA adapter (rank 4" in (final / "README.md").read_text()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), final)
    merged = AutoModelForCausalLM.from_pretrained(final / "merged")
    assert not torch.allclose(logits(adapted), logits(base), atol=1e-6)  # training moved the adapter
    assert torch.allclose(logits(adapted), logits(merged), atol=1e-5)
    # transformers loads an adapter directory on its own when peft is installed
    assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(final)), logits(merged), atol=1e-5)
    # and so does dpo-train (for `dpo-train eval --model final`, or to train on from it)
    assert torch.allclose(logits(load_model(str(final), "float32")), logits(merged), atol=1e-5)
