"""The bench suite's harness, in its seconds-long smoke mode, so it cannot rot: Loom (on the session's cluster) and
the plain Trainer baseline train the tiny model a few steps, and the suite writes a well-formed JSON, Markdown table
and PNG chart. No timing is asserted: only that every figure was measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIGURES = ("tokens_per_s", "step_s", "first_step_s", "wall_s", "driver_peak_mb", "checkpoint_s", "data_rows_per_s")


@pytest.mark.ray
def test_the_smoke_suite_writes_every_figure_for_loom_and_the_plain_trainer(ray_cluster, tmp_path):
    command = [sys.executable, str(REPO / "bench" / "suite.py"), "--smoke", "--out", str(tmp_path)]
    done = subprocess.run(command, env=ray_cluster.env(), capture_output=True, text=True, timeout=280, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (result,) = tmp_path.glob("suite-*.json")
    report = json.loads(result.read_text())
    assert report["peak_gflops"] > 0 and report["command"].startswith("python bench/suite.py --smoke")
    assert report["ray_floor"]["empty_fit_s"] > 0, report["ray_floor"]
    assert [run.get("error") for run in report["runs"]] == [None, None]
    rows = {row["side"]: row for row in report["summary"]}
    assert set(rows) == {"loom", "plain"}
    for side, row in rows.items():
        assert (row["model"], row["case"], row["runs"]) == ("tiny", "sft_lora", 1)
        missing = [figure for figure in FIGURES if not row[figure] or row[figure] <= 0]
        assert not missing, f"{side} lacks {missing}: {row}"
        assert 0 < row["mfu"] < 1 and 0 < row["padding_fraction"] < 1
        assert row["x_plain_tokens_per_s"] == pytest.approx(row["tokens_per_s"] / rows["plain"]["tokens_per_s"], 0.01)
    # Loom's workers report their own peak memory, one figure per rank; the baseline is one process
    assert len(rows["loom"]["worker_peak_mb"]) == 2 and rows["plain"]["worker_peak_mb"] is None
    table = result.with_suffix(".md").read_text()
    assert "| tiny | sft_lora | loom |" in table and "| tiny | sft_lora | plain |" in table
    assert result.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
