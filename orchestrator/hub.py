"""push_to_hub: the finished output_dir uploaded to a Hugging Face Hub repository by rank 0.

Whether the push can happen is decided at the driver before any worker starts (an offline machine, no token, a Hub
that does not answer): a run that would train for hours and then fail to upload is refused up front.
"""

from __future__ import annotations

import os
import re
import socket
from typing import Any
from urllib.parse import urlparse

from .errors import Problem

DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_TIMEOUT_S = 3.0
_REPO_ID = re.compile(r"^([\w.-]+/)?[\w.-]+$")


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT)


def repo_id(cfg: Any, output_dir: str) -> str:
    """hub_model_id, or (as transformers does) the name of output_dir under the token's own namespace."""
    return cfg.hub_model_id or os.path.basename(os.path.normpath(output_dir))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _token(cfg: Any) -> str | None:
    if cfg.hf_hub_token:
        return cfg.hf_hub_token
    from huggingface_hub import get_token

    return get_token()  # HF_TOKEN, or the file `hf auth login` wrote


def _answers(url: str) -> str | None:
    """None when the Hub's host accepts a TCP connection, else why not."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as error:
        return f"{parsed.hostname}:{port} does not answer ({error})"
    return None


def hub_problems(cfg: Any) -> list[Problem]:
    if not cfg.push_to_hub:
        return (
            [Problem("hub_model_id", f"given {cfg.hub_model_id!r}, but push_to_hub is false")]
            if cfg.hub_model_id
            else []
        )
    p = []
    if cfg.hub_model_id and not _REPO_ID.match(cfg.hub_model_id):
        p.append(Problem("hub_model_id", f"given {cfg.hub_model_id!r}; a Hub repository id: name or namespace/name"))
    if _offline():
        return p + [Problem("push_to_hub", "needs the Hugging Face Hub, but HF_HUB_OFFLINE is on: unset it, or "
                                           "leave push_to_hub false and upload output_dir later")]  # fmt: skip
    if not _token(cfg):
        p.append(Problem("push_to_hub", "needs a Hub token with write access: set hf_hub_token or HF_TOKEN, or run "
                                        "`hf auth login` on every node"))  # fmt: skip
    if reason := _answers(endpoint()):
        p.append(Problem("push_to_hub", f"cannot reach the Hub at {endpoint()}: {reason}"))
    return p


def push_output(cfg: Any, output_dir: str, message: str, api: Any = None) -> str:
    """Create the repository (if it is not there) and upload output_dir as one commit; the repository's URL."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(endpoint=endpoint(), token=cfg.hf_hub_token)
    url = api.create_repo(repo_id(cfg, output_dir), exist_ok=True)
    api.upload_folder(repo_id=url.repo_id, folder_path=output_dir, commit_message=message)
    return str(url)
