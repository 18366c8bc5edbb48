"""`--push-to-hub REPO`: upload a model directory (model card included) to the Hugging Face Hub.

`check_hub` runs before any work so that an offline machine or a missing login fails in one line at once, not after
training; `push_folder` creates the repository (if needed) and uploads the directory in one commit.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import CaptuneError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_hub(repo_id: str) -> str:
    """Check that `repo_id` is a repository id and that the Hub answers with a logged-in user; return the user name.

    Raises:
        CaptuneError: a malformed id, HF_HUB_OFFLINE set, no token, or the Hub unreachable.
    """
    if not _REPO_ID.match(repo_id):
        raise CaptuneError(f"--push-to-hub {repo_id}: expected a Hub repository id, owner/name")
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise CaptuneError(f"--push-to-hub {repo_id}: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it or "
                           "drop --push-to-hub (push later with `captune export RUN --output DIR --push-to-hub REPO`)")
    try:
        user = HfApi().whoami()
    except Exception as exc:  # no token, a bad token, no network: all end the same way for the user
        raise CaptuneError(f"--push-to-hub {repo_id}: the Hugging Face Hub cannot be used from here "
                           f"({_first_line(exc)}); log in with `hf auth login` (or set HF_TOKEN) on a networked "
                           "machine, or drop --push-to-hub") from exc
    return user.get("name", "") if isinstance(user, dict) else ""


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False, message: str = "captune upload") -> str:
    """Create `repo_id` (kept if it exists) and upload `folder` to it in one commit; returns the repository URL.

    Raises:
        CaptuneError: the folder is missing or the upload fails.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
        raise CaptuneError(f"--push-to-hub: {folder} holds no model (no config.json or adapter_config.json)")
    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=message)
    except Exception as exc:
        raise CaptuneError(f"--push-to-hub {repo_id}: upload failed ({_first_line(exc)}); the model is in {folder}: "
                           f"retry with `captune export {folder} --output DIR --push-to-hub {repo_id}`") from exc
    return str(url)
