"""SwanLab experiment tracking options (the tracker itself: orchestrator/trackers.py, workers/trackers.py)."""

from typing import Literal

from pydantic import BaseModel

from orchestrator.config.fields import param


class TrackingArgs(BaseModel):
    use_swanlab: bool = param(False, "Log the run to SwanLab (as report_to: swanlab does), from rank 0.")
    swanlab_project: str = param("llamafactory", "SwanLab project name.")
    swanlab_workspace: str | None = param(None, "SwanLab workspace name (default: your own).")
    swanlab_run_name: str | None = param(None, "SwanLab experiment name (default: the run name).")
    swanlab_mode: Literal["cloud", "local"] = param(
        "cloud", "SwanLab mode: cloud (needs an API key) or local (files under output_dir/swanlog)."
    )
    swanlab_api_key: str | None = param(None, "SwanLab API key (or SWANLAB_API_KEY).", secret=True)
