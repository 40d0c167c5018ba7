"""The driver's progress line, following a real trainer_log.jsonl that a thread writes as rank 0 does."""

from __future__ import annotations

import io
import time

from orchestrator.progress import Progress, ProgressFollower
from workers.trainlog import TrainerLog


def test_the_line_shows_step_loss_rates_epoch_and_eta():
    progress = Progress(total_steps=100)
    progress.add({"step": 10, "tokens_seen": 1000, "time": 100.0}, now=900.0)
    assert progress.line({"step": 10, "loss": 2.0}) == "step 10/100 (10%)  loss 2.0000"  # one point: no rate yet
    progress.add({"step": 20, "tokens_seen": 3000, "time": 105.0}, now=900.1)  # rank 0's clock, not when seen
    line = progress.line({"step": 20, "loss": 1.23456, "epoch": 0.5})
    assert line == "step 20/100 (20%)  loss 1.2346  400 tokens/s  epoch 0.50  ETA 0:00:40"


def follow(tmp_path, live: bool) -> str:
    """An earlier attempt's log (steps 1-5), then this attempt resuming after step 3: rank 0 rewrites the log from
    its checkpoint and appends steps 4-6 (and an eval-only line)."""
    log = TrainerLog(str(tmp_path / "trainer_log.jsonl"))
    for step in range(1, 6):
        log.append({"step": step, "loss": 1.0, "epoch": step / 6})
    out = io.StringIO()
    with ProgressFollower(log.path, total_steps=6, after_step=3, stream=out, interval_s=0.02, live=live):
        time.sleep(0.1)  # the earlier attempt's file is still there: nothing is news
        assert out.getvalue() == ""
        log.truncate_after(3)
        for step in range(4, 7):
            log.append({"step": step, "loss": 1.0 / step, "epoch": step / 6, "tokens_seen": 100 * step})
            time.sleep(0.06)
        log.append({"step": 6, "eval_loss": 0.5})
    return out.getvalue()


def test_plain_lines_show_each_step_of_this_attempt_once(tmp_path):
    lines = follow(tmp_path, live=False).splitlines()
    assert [line.split()[2] for line in lines] == ["4/6", "5/6", "6/6"]
    assert lines[-1].startswith("progress      step 6/6 (100%)  loss 0.1667")


def test_on_a_terminal_one_line_is_redrawn_in_place(tmp_path):
    text = follow(tmp_path, live=True)
    assert text.count("\r\x1b[K") == 3 and text.endswith("\n") and text.count("\n") == 1
    assert text.rsplit("\r\x1b[K", 1)[1].startswith("step 6/6 (100%)")
