"""Trackers for real, offline: TensorBoard event files, a wandb offline run and an mlflow file store
receive the same records as metrics.jsonl; a tracker (or other optional package) that is missing
stops the run before anything loads."""

import glob
import json
import struct

import pytest
from typer.testing import CliRunner

from dpo_train import extras
from dpo_train.cli import app
from dpo_train.config import ConfigError
from dpo_train.tracking import flat
from dpo_train.trainer import train
from test_trainer import read_metrics, tiny_config

RUN = ["train.max_steps=3", "train.eval_every=0", "train.eval_max_new_tokens=0", "train.grad_accum_steps=1"]


def tensorboard_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} from the TFRecord event files under `directory` (length, crc, event, crc)."""
    from tensorboardX.proto import event_pb2

    found = {}
    for path in glob.glob(f"{directory}/**/events.out.tfevents.*", recursive=True):
        data, pos = open(path, "rb").read(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                found.setdefault(value.tag, []).append((event.step, value.simple_value))
    return found


def wandb_records(path):
    """The records of a wandb offline run file: LevelDB's log format (32 KiB blocks of records, each
    a 4-byte checksum, 2-byte length, 1-byte type: full, first, middle, last) after a 7-byte header."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending = open(path, "rb").read(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's last bytes, too few for a record header, are padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, or the last piece of one
            yield wandb_internal_pb2.Record.FromString(pending)
            pending = b""


@pytest.fixture
def offline_trackers(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    monkeypatch.delenv("WANDB_DIR", raising=False)  # so the run's files go under {output_dir}/tracking
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CACHE_DIR": tmp_path / "wandb-cache",
                        "WANDB_CONFIG_DIR": tmp_path / "wandb-config", "WANDB_DATA_DIR": tmp_path / "wandb-data",
                        "MLFLOW_TRACKING_URI": f"file:{tmp_path / 'mlruns'}", "MLFLOW_ALLOW_FILE_STORE": "true"}.items():
        monkeypatch.setenv(name, str(value))
    return tmp_path / "mlruns"


def test_tensorboard_wandb_and_mlflow_receive_every_record(tmp_path, tiny_model_dir, tiny_data, offline_trackers):
    config = tiny_config(tmp_path, tiny_model_dir, tiny_data, *RUN, "train.report_to=[tensorboard, wandb, mlflow]",
                         "train.project=dpo-tests", "train.run_name=run-1")
    train(config)
    run = tmp_path / "run"
    expected = {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}
    assert sorted(expected) == [0, 1, 2]

    assert dict(tensorboard_scalars(run / "tracking" / "dpo-tests")["loss"]) == pytest.approx(expected)

    [wandb_file] = glob.glob(str(run / "tracking" / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = list(wandb_records(wandb_file))
    [info] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (info.project, info.display_name) == ("dpo-tests", "run-1")
    history = [{item.nested_key[0]: json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert {h["_step"]: h["loss"] for h in history if "loss" in h} == pytest.approx(expected)  # not the eval record
    config_keys = {u.key for r in records if r.WhichOneof("record_type") == "config" for u in r.config.update}
    assert {"train.seed", "data.train", "loss.beta"} <= config_keys

    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"file:{offline_trackers}")
    [experiment] = [e for e in client.search_experiments() if e.name == "dpo-tests"]
    [logged] = client.search_runs([experiment.experiment_id])
    assert logged.info.run_name == "run-1" and logged.data.params["train.seed"] == "0"
    assert {m.step: m.value for m in client.get_metric_history(logged.info.run_id, "loss")} == pytest.approx(expected)


def test_flat_config_holds_only_what_trackers_accept():
    assert flat({"data": {"train": [{"path": "a"}], "eval": None}, "train": {"seed": 1, "report_to": ["wandb"]}}) == \
        {"data.train": "[{'path': 'a'}]", "data.eval": "null", "train.seed": 1, "train.report_to": "['wandb']"}


def loading_forbidden(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("something loaded before the missing package was reported")
    monkeypatch.setattr("dpo_train.trainer.load_tokenizer", forbidden)
    monkeypatch.setattr("dpo_train.trainer.load_policy_and_reference", forbidden)


def test_a_missing_tracker_package_stops_the_run_before_anything_loads(tmp_path, tiny_model_dir, tiny_data, monkeypatch):
    loading_forbidden(monkeypatch)
    monkeypatch.setattr("accelerate.utils.is_wandb_available", lambda: False)
    config = tiny_config(tmp_path, tiny_model_dir, tiny_data, "train.report_to=[tensorboard, wandb]")
    with pytest.raises(ConfigError) as e:
        train(config)
    assert str(e.value) == "train.report_to: wandb needs the wandb package (pip install wandb)"
    result = CliRunner().invoke(app, ["--config", str(tmp_path / "tiny.yaml"), "train.report_to=wandb"])
    assert result.exit_code == 2 and result.stderr.strip().splitlines() == [
        "error: train.report_to: wandb needs the wandb package (pip install wandb)"]


def test_other_missing_packages_are_named_together(tmp_path, tiny_model_dir, tiny_data, monkeypatch):
    loading_forbidden(monkeypatch)
    monkeypatch.setattr(extras, "installed", lambda module: module not in ("peft", "deepspeed", "sqlalchemy"))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` sets for a DeepSpeed config
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    config = tiny_config(tmp_path, tiny_model_dir, tiny_data, "model.lora.r=4", "train.report_to=mlflow")
    with pytest.raises(ConfigError) as e:
        train(config)
    assert str(e.value) == (
        f"train.report_to: mlflow: its tracking store sqlite:///{tmp_path / 'mlflow.db'} needs sqlalchemy (pip install "
        "mlflow), or set MLFLOW_TRACKING_URI to a server, or to file:DIR with MLFLOW_ALLOW_FILE_STORE=true; "
        "model.lora.r: LoRA needs the peft package (pip install peft); the Accelerate config's engine is DeepSpeed, "
        "which needs the deepspeed package (pip install deepspeed)")
