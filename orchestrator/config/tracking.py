"""SwanLab experiment tracking options."""

from typing import Literal

from pydantic import BaseModel

from orchestrator.config.fields import not_yet

REASON = "SwanLab logging is not wired yet"


class TrackingArgs(BaseModel):
    use_swanlab: bool = not_yet(False, "Log the run to SwanLab.", REASON)
    swanlab_project: str = not_yet("llamafactory", "SwanLab project name.", REASON)
    swanlab_workspace: str | None = not_yet(None, "SwanLab workspace name.", REASON)
    swanlab_run_name: str | None = not_yet(None, "SwanLab experiment name.", REASON)
    swanlab_mode: Literal["cloud", "local"] = not_yet("cloud", "SwanLab mode: cloud or local.", REASON)
    swanlab_api_key: str | None = not_yet(None, "SwanLab API key.", REASON, secret=True)
