"""train.push_to_hub through huggingface_hub's real client code: against a local stand-in for the
hub's HTTP API (the calls create_repo and upload_folder make, recorded), and without any hub
(offline mode, a refused connection), where the run ends complete locally with exit code 3. The
model card's front matter parses with huggingface_hub.ModelCard."""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import huggingface_hub.constants
import pytest
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from dpo_train.card import model_card
from dpo_train.cli import app
from dpo_train.config import Config
from dpo_train.hub import HubError, push


class FakeHub:
    """Answers the hub API calls create_repo and upload_folder make (create, validate-yaml, preupload,
    commit) and keeps what they sent. Every file is declared "regular", so its bytes travel inside
    the commit; the real hub sends large files through LFS/Xet storage instead, not covered here."""

    def __init__(self):
        self.calls, self.files, self.created = [], {}, None
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                path = self.path.split("?")[0]
                hub.calls.append(path)
                if path == "/api/repos/create":
                    hub.created = json.loads(body)
                    return self.reply({"url": f"{hub.url}/{hub.created['organization']}/{hub.created['name']}"})
                if path == "/api/validate-yaml":
                    ModelCard(json.loads(body)["content"])  # the hub validates the card's metadata here
                    return self.reply({"errors": [], "warnings": []})
                if "/preupload/" in path:
                    return self.reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                 for f in json.loads(body)["files"]]})
                if "/commit/" in path:
                    for item in map(json.loads, body.splitlines()):
                        if item["key"] == "file":
                            hub.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    repo = path.removeprefix("/api/models/").split("/commit/")[0]
                    return self.reply({"commitUrl": f"{hub.url}/{repo}/commit/{'0' * 40}", "commitOid": "0" * 40})
                self.send_error(404)

            def reply(self, payload):
                data = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def final_dir(tmp_path, tiny_model_dir):
    """A folder like a run's final/: a model, its tokenizer, a model card."""
    import shutil
    final = tmp_path / "final"
    shutil.copytree(tiny_model_dir, final)
    (final / "README.md").write_text(model_card(Config().to_dict() | {"data": {"train": "t.jsonl"}}, 3, {}, {}))
    return final


def test_push_creates_the_repo_and_uploads_every_file(final_dir, monkeypatch):
    hub = FakeHub()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    url = push(final_dir, "me/tiny-dpo", private=True)
    assert url == f"{hub.url}/me/tiny-dpo/commit/{'0' * 40}"
    assert hub.created == {"name": "tiny-dpo", "organization": "me", "visibility": "private", "type": "model"}
    assert hub.calls == ["/api/repos/create", "/api/validate-yaml", "/api/models/me/tiny-dpo/preupload/main",
                         "/api/models/me/tiny-dpo/commit/main"]
    assert hub.files == {p.name: p.read_bytes() for p in final_dir.iterdir()}  # every file, byte for byte


@pytest.mark.parametrize("no_hub", ["offline", "refused"])
def test_without_a_hub_push_fails_in_one_line(final_dir, monkeypatch, no_hub):
    if no_hub == "offline":
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    else:  # nothing listens on port 9 (discard): the connection is refused, as with no network
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(HubError) as e:
        push(final_dir, "me/tiny-dpo")
    message = str(e.value)
    cause = "OfflineModeIsEnabled: Cannot reach" if no_hub == "offline" else "ConnectError:"
    assert "\n" not in message and message.startswith(f"train.push_to_hub: uploading {final_dir} to me/tiny-dpo "
                                                      f"failed ({cause}")
    assert message.endswith(f"the model is saved in {final_dir}; upload it later with: hf upload me/tiny-dpo {final_dir}")


def test_training_offline_saves_final_then_exits_3(tmp_path, tiny_model_dir, tiny_data, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{name_or_path: {tiny_model_dir}}}\ndata: {{train: {tiny_data[0]}, max_length: 64, "
                      f"max_prompt_length: 32}}\ntrain: {{output_dir: {tmp_path / 'run'}, max_steps: 2, "
                      "push_to_hub: me/tiny-dpo, hub_private: true}\n")
    result = CliRunner().invoke(app, ["--config", str(config)])
    assert result.exit_code == 3, result.output
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: train.push_to_hub: uploading {tmp_path / 'run' / 'final'} to me/tiny-dpo failed")
    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")  # the local save is complete
    assert ModelCard.load(tmp_path / "run" / "final" / "README.md").data.tags == ["dpo", "dpo-train"]


def test_card_front_matter_follows_the_hubs_conventions():
    config = Config().to_dict()  # the embedded model
    config["data"] |= {"train": [{"path": "HuggingFaceH4/ultrafeedback_binarized"}, {"path": "data/local.jsonl"}],
                       "eval": "trl-lib/ultrafeedback_binarized"}
    card = ModelCard(model_card(config, 10, {}, {}))
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"  # the hub id, not the pkg:// path
    assert card.data.datasets == ["HuggingFaceH4/ultrafeedback_binarized", "trl-lib/ultrafeedback_binarized"]
    assert card.data.library_name == "transformers" and "dpo" in card.data.tags
    assert card.data.base_model_relation == "finetune"
    config["model"] |= {"name_or_path": "Qwen/Qwen2.5-0.5B", "lora": {"r": 16, "alpha": 32}}
    lora = ModelCard(model_card(config, 10, {}, {})).data
    assert (lora.base_model, lora.library_name, lora.base_model_relation) == ("Qwen/Qwen2.5-0.5B", "peft", "adapter")
    config["model"] |= {"name_or_path": "/models/local-checkpoint", "lora": {"r": 0}}
    config["data"] |= {"train": "data/train.jsonl", "eval": None}
    local = ModelCard(model_card(config, 10, {}, {})).data
    assert local.base_model is None and local.datasets is None  # local paths are not hub ids
