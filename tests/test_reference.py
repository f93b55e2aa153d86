import pytest
import torch

from dpo_train.models import load_policy_and_reference
from dpo_train.reference import cache_key, weights_digest
from dpo_train.trainer import train
from test_trainer import read_metrics, tiny_config

RUN = ["train.max_steps=4", "train.eval_every=2", "train.eval_max_new_tokens=0"]


@pytest.mark.parametrize("extra", [[], ["model.lora.r=4"]], ids=["full", "lora"])
def test_precomputed_reference_gives_the_same_losses_as_a_live_one(tmp_path, tiny_model_dir, tiny_data,
                                                                   monkeypatch, capsys, extra):
    monkeypatch.setenv("DPO_TRAIN_CACHE", str(tmp_path / "cache"))
    run = RUN + extra  # with LoRA the reference is the policy with its adapter off
    live = train(tiny_config(tmp_path, tiny_model_dir, tiny_data, *run, f"train.output_dir={tmp_path / 'live'}"))
    cached = train(tiny_config(tmp_path, tiny_model_dir, tiny_data, *run, "model.precompute_reference=true",
                               f"train.output_dir={tmp_path / 'pre'}"))
    assert capsys.readouterr().out.count("computed and cached") == 2  # train and eval sets
    live_records, cached_records = read_metrics(tmp_path / "live"), read_metrics(tmp_path / "pre")
    assert [r["step"] for r in live_records] == [r["step"] for r in cached_records]
    for a, b in zip(live_records, cached_records):
        for key in a:
            if key.split("/")[-1] in ("loss", "chosen", "rejected", "margins"):
                assert abs(a[key] - b[key]) < 1e-5, (a["step"], key)
    assert abs(live["policy"]["loss"] - cached["policy"]["loss"]) < 1e-5
    assert "reference" not in cached  # freed after the precompute pass

    train(tiny_config(tmp_path, tiny_model_dir, tiny_data, *run, "model.precompute_reference=true",
                      f"train.output_dir={tmp_path / 'again'}"))
    out = capsys.readouterr().out
    assert out.count("read from") == 2 and "computed and cached" not in out  # a rerun reuses the cache


def test_cache_key_changes_with_weights_data_and_settings(tiny_model_dir):
    from datasets import Dataset
    _, reference = load_policy_and_reference(str(tiny_model_dir), None, "float32")
    data = Dataset.from_dict({"prompt_ids": [[1, 2]], "chosen_ids": [[3]], "rejected_ids": [[4]]})
    weights = weights_digest(reference)
    key = cache_key(weights, data, "s")
    assert cache_key(weights_digest(reference), data, "s") == key
    assert cache_key(weights, data, "t") != key
    assert cache_key(weights, Dataset.from_dict({**data.to_dict(), "chosen_ids": [[5]]}), "s") != key
    with torch.no_grad():
        reference.lm_head.weight[0, 0] += 1
    assert cache_key(weights_digest(reference), data, "s") != key
