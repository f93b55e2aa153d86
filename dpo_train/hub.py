"""`train.push_to_hub`: upload the saved final/ (model, tokenizer, model card) to a hub repo."""

from __future__ import annotations

import re
from pathlib import Path

EXIT_CODE = 3  # the run is complete and saved locally; only the upload failed


def is_repo_id(text: str) -> bool:
    """OWNER/NAME or NAME, as the hub allows them (letters, digits, '-', '_', '.')."""
    return bool(re.fullmatch(r"(?:[\w.-]{1,96}/)?[\w.-]{1,96}", text)) and ".." not in text and \
        not text.startswith(("-", ".")) and not text.endswith(".")


class HubError(RuntimeError):
    """The upload failed after the local save was complete, explained in one line."""


def push(folder: Path, repo_id: str, private: bool = False) -> str:
    """Create `repo_id` (a model repo; an existing one is reused, its visibility unchanged) and
    upload `folder` to it in one commit. Returns the commit's URL. Any failure (offline, no token,
    no permission, no network) raises HubError naming what to run once it is fixed."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=folder, repo_id=repo.repo_id, repo_type="model",
                                   commit_message="Upload a DPO-trained model (dpo-train)")
    except Exception as e:  # offline, auth, HTTP and network errors alike: the local save stands, say so in one line
        detail = (str(e).strip().splitlines() or ["no details"])[0]
        raise HubError(f"train.push_to_hub: uploading {folder} to {repo_id} failed ({type(e).__name__}: {detail}); "
                       f"the model is saved in {folder}; upload it later with: hf upload {repo_id} {folder}") from None
    return commit.commit_url
