import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_train.config import load_config
from dpo_train.trainer import lr_lambda, train

KEYS = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
        "logps/rejected", "grad_norm", "lr", "tokens/s", "skipped_steps", "memory/peak_mb"}


def tiny_config(tmp_path, tiny_model_dir, tiny_data, *overrides):
    train_path, eval_path = tiny_data
    path = tmp_path / "tiny.yaml"
    path.write_text(f"""
model: {{name_or_path: {tiny_model_dir}}}
data: {{train: {train_path}, eval: {eval_path}, max_length: 64, max_prompt_length: 32}}
loss: {{beta: 0.1}}
train: {{output_dir: {tmp_path / 'run'}, per_device_batch_size: 4, grad_accum_steps: 2, learning_rate: 1e-3,
         max_steps: 8, eval_every: 4, eval_max_new_tokens: 3, seed: 0}}
""")
    return load_config(path, list(overrides))


def final_weights(run):
    """The trained weights in run/final: the model's, or a LoRA run's adapter."""
    final = run / "final"
    return load_file(final / "model.safetensors" if (final / "model.safetensors").exists()
                     else final / "adapter_model.safetensors")


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_end_to_end_on_a_tiny_model(tmp_path, tiny_model_dir, tiny_data):
    config = tiny_config(tmp_path, tiny_model_dir, tiny_data)
    results = train(config)
    run = tmp_path / "run"
    records = read_metrics(run)
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(8))
    assert all(KEYS <= set(r) for r in train_records)
    assert abs(train_records[0]["loss"] - math.log(2)) < 1e-6  # policy == reference at step 0
    assert train_records[0]["rewards/margins"] == 0.0
    eval_records = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in eval_records] == [4, 8] and all(k.startswith("eval/") for k in eval_records[0] if k != "step")
    assert results["reference"]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert results["policy"]["loss"] < math.log(2)  # the policy moved toward the chosen answers
    assert 0.0 <= results["policy"]["exact_answer_accuracy"] <= 1.0
    assert json.loads((run / "eval_results.json").read_text())["policy"]["loss"] == results["policy"]["loss"]
    assert load_config(run / "config.yaml").to_dict() == config.to_dict()

    model = AutoModelForCausalLM.from_pretrained(run / "final")
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    assert "dpo_pairs" not in (run / "final" / "config.json").read_text()  # the layout's attention stays ours
    assert model.config._attn_implementation == "sdpa"
    assert not torch.equal(model.lm_head.weight, AutoModelForCausalLM.from_pretrained(tiny_model_dir).lm_head.weight)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "1+2="}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]


def test_same_seed_same_weights(tmp_path, tiny_model_dir, tiny_data):
    weights = []
    for name in ("a", "b"):
        config = tiny_config(tmp_path, tiny_model_dir, tiny_data, f"train.output_dir={tmp_path / name}",
                             "train.max_steps=3", "data.eval=null")
        train(config)
        weights.append(AutoModelForCausalLM.from_pretrained(tmp_path / name / "final").state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_reference_free_runs_without_a_reference(tmp_path, tiny_model_dir, tiny_data):
    config = tiny_config(tmp_path, tiny_model_dir, tiny_data, "loss.reference_free=true", "train.max_steps=2")
    results = train(config)
    assert set(results) == {"policy"}
    first = read_metrics(tmp_path / "run")[0]
    assert first["rewards/chosen"] == pytest.approx(0.1 * first["logps/chosen"])  # reference log-probs are 0


def test_lr_schedule_warms_up_then_decays_to_zero():
    values = [lr_lambda(s, warmup_steps=4, total_steps=20) for s in range(21)]
    assert values[:4] == [0.2, 0.4, 0.6, 0.8] and values[4] == 1.0
    assert all(a >= b for a, b in zip(values[4:], values[5:])) and values[20] == 0.0


# Every objective end to end: overrides, and the step-0 training loss worked by hand where it
# does not depend on the random model (policy == reference, so every log-ratio margin h is 0).
OBJECTIVES = {
    "ipo": (["loss.type=ipo"], 25.0),  # (0 - 1 / (2 * 0.1))^2
    "hinge": (["loss.type=hinge"], 1.0),  # max(0, 1 - 0.1 * 0)
    "robust": (["loss.type=robust", "loss.label_smoothing=0.1"], math.log(2)),  # (0.9 - 0.1) ln 2 / 0.8
    "simpo": (["loss.type=simpo", "loss.beta=2", "loss.gamma=0.5"], None),  # reference-free: depends on the model
    "rpo": (["loss.sft_weight=1"], None),  # ln 2 + the chosen per-token NLL
    "lora": (["model.lora.r=4"], math.log(2)),  # lora_B starts at zero: the policy is the base model
    "lora-simpo": (["model.lora.r=4", "loss.type=simpo", "loss.beta=2", "loss.gamma=0.5"], None),
    "orpo": (["loss.type=orpo"], None),  # reference-free: the chosen NLL plus the odds-ratio term
    # a weighted list with every option that asks logps for more (WPO, LD-DPO) and an f-divergence
    "options": (["loss.type=[sigmoid, sft]", "loss.weights=[1, 0.1]", "loss.use_weighting=true", "loss.ld_alpha=0.5",
                 "loss.f_divergence=js_divergence"], None),
}


@pytest.mark.parametrize("name", OBJECTIVES)
def test_every_objective_trains_end_to_end(tmp_path, tiny_model_dir, tiny_data, name):
    overrides, step0_loss = OBJECTIVES[name]
    results = train(tiny_config(tmp_path, tiny_model_dir, tiny_data, *overrides, "train.eval_max_new_tokens=0"))
    records = read_metrics(tmp_path / "run")
    first = records[0]
    if step0_loss is not None:
        assert first["loss"] == pytest.approx(step0_loss, abs=1e-5)
    if name == "rpo":
        assert first["loss"] > math.log(2) + 1.0  # a random model's NLL per token is about ln(vocab) = 4.6
    eval_losses = [r["eval/loss"] for r in records if "eval/loss" in r]
    if name == "options":  # WPO's weights grow as the policy grows surer: losses are not comparable across steps
        assert results["policy"]["rewards/margins"] > 0 and results["policy"]["rewards/accuracies"] > 0.5
    else:
        assert eval_losses[-1] < eval_losses[0]  # held-out loss falls between step 4 and step 8
    if "simpo" in name or name == "orpo":  # no reference model at all
        assert set(results) == {"policy"}
    else:
        assert name == "options" or results["policy"]["loss"] < results["reference"]["loss"]
        assert results["reference"]["rewards/margins"] == 0.0


def reset_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate fixes mixed precision once per process: start and leave a test with a fresh state."""
    reset_accelerate_state()
    yield
    reset_accelerate_state()


@pytest.mark.parametrize("layout", ["packed", "rows", "padded"])
def test_bf16_mixed_precision_trains_in_every_layout_with_the_fp32_numbers(tmp_path, tiny_model_dir, tiny_data,
                                                                           layout, monkeypatch, fresh_accelerate_state):
    """Accelerate's bf16 mixed precision (what every shipped Accelerate config sets) is autocast; on CPU it
    runs here. Per step, the loss agrees with the fp32 run's within one bf16 step at ln 2 (2^-9), and the
    summed log-probs to bf16's relative precision (2^-8); they are not identical, so autocast was on."""
    runs = {}
    for precision in ("no", "bf16"):
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", precision)
        reset_accelerate_state()  # between the two runs as well
        train(tiny_config(tmp_path, tiny_model_dir, tiny_data, f"train.layout={layout}", "train.max_steps=6",
                          "data.eval=null", f"train.output_dir={tmp_path / precision}"))
        runs[precision] = [r for r in read_metrics(tmp_path / precision) if "loss" in r]
    fp32, bf16 = runs["no"], runs["bf16"]
    assert [r["step"] for r in bf16] == list(range(6))
    assert all(abs(a["loss"] - b["loss"]) < 2**-9 for a, b in zip(fp32, bf16))
    for key in ("logps/chosen", "logps/rejected"):
        assert all(abs(a[key] - b[key]) <= 2**-8 * abs(a[key]) for a, b in zip(fp32, bf16)), key
    assert any(a["logps/chosen"] != b["logps/chosen"] for a, b in zip(fp32, bf16))
