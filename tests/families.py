"""The model families people train, each as a tiny randomly initialised model built locally from
transformers' own config class (no downloads): 2 layers, hidden 64, 4 heads, 2 KV heads, sliding
windows of 8 tokens (so that they matter at test lengths), initializer_range 0.2 (tiny default
weights hide leaks between spans). tests/test_families.py runs every layout on each.

A family is added here, as one entry of FAMILIES, never as a branch in dpo_train.
"""

from __future__ import annotations

import torch
import transformers as T

WINDOW = 8  # tokens; every test pair is longer
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, max_position_embeddings=512, initializer_range=0.2, tie_word_embeddings=False)
MIXED = dict(layer_types=["sliding_attention", "full_attention"], sliding_window=WINDOW)
MOE = dict(num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
GEMMA = dict(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=16)

# family -> (config class, its settings beyond SHAPE); the table of docs/model-families.md follows it
FAMILIES = {
    "llama": (T.LlamaConfig, {}),
    "qwen2": (T.Qwen2Config, {}),
    "qwen3": (T.Qwen3Config, {}),
    "gemma": (T.GemmaConfig, {"hidden_activation": "gelu_pytorch_tanh"}),
    "phi3": (T.Phi3Config, {"pad_token_id": 1}),
    "olmo2": (T.Olmo2Config, {}),
    "granite": (T.GraniteConfig, {"logits_scaling": 2.0, "residual_multiplier": 0.5, "embedding_multiplier": 2.0}),
    "cohere": (T.CohereConfig, {"logit_scale": 0.5}),
    "starcoder2": (T.Starcoder2Config, {}),
    "smollm3": (T.SmolLM3Config, {"no_rope_layer_interval": 2}),
    "glm4": (T.Glm4Config, {}),
    "mistral": (T.MistralConfig, {"sliding_window": WINDOW}),
    "ministral": (T.MinistralConfig, MIXED),
    "gemma3_text": (T.Gemma3TextConfig, {**MIXED, **GEMMA}),
    "olmo3": (T.Olmo3Config, MIXED),
    "exaone4": (T.Exaone4Config, MIXED),
    "gemma2": (T.Gemma2Config, {**MIXED, **GEMMA, "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0}),
    "qwen3_moe": (T.Qwen3MoeConfig, MOE),
    "mixtral": (T.MixtralConfig, MOE),
    "gpt_oss": (T.GptOssConfig, {**MIXED, **MOE, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    "deepseek_v3": (T.DeepseekV3Config, {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                         "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "q_lora_rank": 32,
                                         "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
                                         "v_head_dim": 16, "num_key_value_heads": 4, "head_dim": 8}),
    "qwen3_next": (T.Qwen3NextConfig, {**MOE, "layer_types": ["linear_attention", "full_attention"],
                                       "linear_num_key_heads": 2, "linear_num_value_heads": 4,
                                       "linear_key_head_dim": 16, "linear_value_head_dim": 16}),
    "falcon_h1": (T.FalconH1Config, {"mamba_d_ssm": 64, "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 8,
                                     "mamba_chunk_size": 16}),
    "lfm2": (T.Lfm2Config, {"layer_types": ["conv", "full_attention"], "block_auto_adjust_ff_dim": False}),
    "mamba": (T.MambaConfig, {"state_size": 8, "expand": 2, "time_step_rank": 8}),
    # a vision-language model as AutoModelForCausalLM loads it (Gemma3ForConditionalGeneration), text only
    "gemma3_vlm": (T.Gemma3Config, {}),
}


def make_config(family: str, vocab_size: int):
    """The family's tiny config, token ids as tests/conftest.py's tokenizer has them."""
    config_class, settings = FAMILIES[family]
    ids = dict(vocab_size=vocab_size, pad_token_id=1, bos_token_id=2, eos_token_id=4)
    if family == "gemma3_vlm":  # a text tower (gemma3_text's) and a tiny vision tower it never uses here
        text = make_config("gemma3_text", vocab_size).to_dict()
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                      patch_size=14)
        return config_class(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=0,
                            boi_token_index=0, eoi_token_index=0, initializer_range=0.2, **ids)
    return config_class(**{**SHAPE, **ids, **settings})


def make_family_model(family: str, vocab_size: int, seed: int = 0) -> torch.nn.Module:
    """The family's tiny causal LM, fp32, dropout off, as dpo_train.models loads one."""
    from dpo_train.models import disable_dropout
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(make_config(family, vocab_size), dtype=torch.float32)
    disable_dropout(model)
    return model


PAIRS = [  # conversational, as a user's data is; every sequence is longer than WINDOW
    {"prompt": [{"role": "user", "content": "What is 2+3?"}], "chosen": [{"role": "assistant", "content": "It is 5."}],
     "rejected": [{"role": "assistant", "content": "It is 6, I believe."}]},
    {"prompt": [{"role": "user", "content": "Name a colour."}], "chosen": [{"role": "assistant", "content": "Blue."}],
     "rejected": [{"role": "assistant", "content": "A fish."}]},
    {"prompt": [{"role": "user", "content": "Say hi"}], "chosen": [{"role": "assistant", "content": "Hi there, friend!"}],
     "rejected": [{"role": "assistant", "content": "No."}]},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
     "chosen": [{"role": "assistant", "content": "Paris."}],
     "rejected": [{"role": "assistant", "content": "France has no capital city at all."}]},
]


def tokenized_pairs(tokenizer) -> list[dict]:
    from dpo_train.data import tokenize_pair
    return [tokenize_pair(row, tokenizer, 256, 128) for row in PAIRS]


def naive_logps(model, pairs: list[dict]) -> torch.Tensor:
    """(2B,) chosen then rejected: each sequence alone (no padding, no packing), log_softmax + gather."""
    sums, device = [], next(model.parameters()).device
    for side in ("chosen_ids", "rejected_ids"):
        for pair in pairs:
            ids = torch.tensor([pair["prompt_ids"] + pair[side]], device=device)
            logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            targets = ids[0, 1:]
            first = len(pair["prompt_ids"]) - 1  # the position predicting the completion's first token
            sums.append(logps[first:].gather(-1, targets[first:, None]).sum())
    return torch.stack(sums)


def layout_logps(model, pairs: list[dict], layout: str, pad_token_id: int = 1) -> torch.Tensor:
    """(2B,) chosen then rejected, scored in `layout` (the layout forced, whatever the decision would pick)."""
    from dpo_train.collate import COLLATES
    from dpo_train.logps import forward_sums
    device = next(model.parameters()).device
    return forward_sums(model, {k: v.to(device) for k, v in COLLATES[layout](pairs, pad_token_id).items()})["logps"]


def relative_difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.cpu(), expected.cpu()
    return float(((got - expected).abs() / expected.abs().clamp(min=1e-6)).max())


def dpo_gradients(model, logps: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of one DPO loss (against a fixed reference offset) on (2B,) chosen-then-rejected log-probs."""
    from dpo_train.losses import dpo_loss
    model.zero_grad()
    chosen, rejected = logps.chunk(2)
    losses, _, _ = dpo_loss(chosen, rejected, chosen.detach() + 0.3, rejected.detach() - 0.2, beta=0.1)
    losses.mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def layout_gradients(model, pairs: list[dict], layout: str) -> dict[str, torch.Tensor]:
    """Gradients of one DPO loss (against a fixed reference offset) scored in `layout`."""
    return dpo_gradients(model, layout_logps(model, pairs, layout))


def gradient_difference(got: dict, expected: dict) -> float:
    """max over parameters of max |got - expected| / max |expected| (a parameter's own scale)."""
    assert got.keys() == expected.keys()
    return max(float((got[k] - g).abs().max() / g.abs().max().clamp(min=1e-12)) for k, g in expected.items())

# the layout each family is scored in when `packed` is asked for: what layouts.choose decides from the model
USED = {family: "padded" if family in ("qwen3_next", "falcon_h1", "lfm2", "mamba") else "packed" for family in FAMILIES}
