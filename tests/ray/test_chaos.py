"""Several faults in one run, and the run still ends exactly where an uninterrupted one does.

One `loom train` of 20 steps (2 workers on nodes added to the session's cluster, a checkpoint every 2 steps) meets,
in order: a worker process SIGKILLed three times at different steps, a storage write failing during a checkpoint
upload (retried), the checkpoint writer killed while it writes, the node of a worker removed, and the driver killed
and the same command run again. The run must finish at its configured step with every step logged once, every
checkpoint Ray committed complete (never a partial one restored), and weights equal to an uninterrupted run of the
same config (exact resumption: workers/order.py). It prints the recovery time of each fault.

Marked slow (about 5-6 minutes on 2 cores): `pytest -m slow tests/ray/test_chaos.py -s`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field

import pytest

from orchestrator.preflight import latest_committed_checkpoint
from tests.conftest import VENV_BIN
from tests.flaky_fs import CHAOS_FAIL_ENV, CHAOS_SLOW_ENV, FLAKY_LOG_ENV
from tests.helpers import REPO
from tests.ray.test_cli_runs import committed_step, final_weights, start_slow_run, steps_logged, write_yaml
from tests.ray.test_multinode import WORKER, AddedNode, add_node, ranks_on, settled
from workers.checkpoint import verify_checkpoint

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STEPS = 20


@dataclass
class Chaos:
    """The run under test and what the faults need to reach it."""

    config: str
    env: dict
    run_dir: str
    output_dir: str
    log_dir: object
    nodes: dict[str, AddedNode]
    proc: subprocess.Popen | None = None
    attempts: int = 0
    recovery: list[tuple[str, int, float]] = field(default_factory=list)  # fault, step, seconds to train again

    def start(self) -> None:
        self.attempts += 1
        self.proc = start_slow_run(self.config, self.env, self.log_dir / f"driver-{self.attempts}.log", delay_s=1.0)

    def output(self) -> str:
        return "".join((self.log_dir / f"driver-{n}.log").read_text() for n in range(1, self.attempts + 1))

    def wait_for(self, condition, what: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"the run ended while waiting for {what}:\n{self.output()[-4000:]}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.output()[-4000:]}"
            time.sleep(0.2)

    def logged_step(self) -> int:
        return max(steps_logged(self.output_dir), default=0)

    def inject(self, name: str, at_step: int, fault) -> None:
        """Once `at_step` is logged: the fault, then until a step past the committed checkpoint is logged again."""
        self.wait_for(lambda: self.logged_step() >= at_step, f"step {at_step}")
        log = os.path.join(self.output_dir, "trainer_log.jsonl")
        self.wait_for(lambda: latest_committed_checkpoint(self.run_dir), "a committed checkpoint")
        inode, committed = os.stat(log).st_ino, committed_step(self.run_dir)
        started = time.monotonic()
        fault()
        self.wait_for(lambda: os.path.exists(log) and os.stat(log).st_ino != inode and self.logged_step() > committed,
                      f"training again after {name}")  # fmt: skip
        self.recovery.append((name, at_step, round(time.monotonic() - started, 1)))

    def kill_a_worker(self) -> None:
        workers = subprocess.run(["pgrep", "-f", "RayTrainWorker"], capture_output=True, text=True).stdout.split()
        assert workers, "no Ray Train worker process"
        os.kill(int(workers[-1]), signal.SIGKILL)

    def kill_the_checkpoint_writer(self) -> None:
        flaky = self.env[FLAKY_LOG_ENV]
        self.wait_for(lambda: os.path.exists(flaky) and " slow " in open(flaky).read(), "the slowed checkpoint write")
        pid = int(re.search(r" (\d+) slow ", open(flaky).read()).group(1))
        os.kill(pid, signal.SIGKILL)  # mid-upload: that checkpoint folder stays partial and is never committed

    def remove_the_node_of_rank_1(self) -> None:
        self.nodes[ranks_on(self.output_dir, self.nodes)[1]].kill()

    def kill_the_driver_and_rerun(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # the driver and everything it started
        self.proc.wait()
        self.start()


@pytest.fixture(scope="module")
def chaos_nodes(ray_cluster):
    added: dict[str, AddedNode] = {}
    try:
        for name in ("one", "two", "three"):  # two hold the workers; the third takes over from a removed one
            added[name] = add_node(ray_cluster.gcs_address, name, WORKER)
        yield added
    finally:
        import ray

        for node in added.values():
            node.stop()
        settled(lambda: not ray.cluster_resources().get("loom_worker"))  # the next module starts from a clean view


def test_a_run_through_seven_faults_ends_on_the_uninterrupted_run_s_weights(
    ray_cluster, chaos_nodes, train_config, tmp_path
):
    raw = train_config(resources_per_worker=WORKER, ray_storage_shared=True, max_steps=STEPS, save_steps=2,
                       ray_max_failures=8, ray_run_name="chaos", ray_upload_retries=2,
                       ray_storage_filesystem="tests.flaky_fs:chaos_storage")  # fmt: skip
    env = {**ray_cluster.env(), "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "25",  # a lost node's group: docs/SCALE.md
           "PYTHONPATH": str(REPO),  # the driver imports the storage factory from tests/
           FLAKY_LOG_ENV: str(tmp_path / "storage.log"), CHAOS_FAIL_ENV: "/checkpoint-000006/",
           CHAOS_SLOW_ENV: "/checkpoint-000010/"}  # fmt: skip
    chaos = Chaos(write_yaml(tmp_path / "project", raw), env, os.path.join(raw["ray_storage_path"], "chaos"),
                  raw["output_dir"], tmp_path, chaos_nodes)  # fmt: skip
    chaos.start()
    try:
        chaos.inject("worker SIGKILL 1", 3, chaos.kill_a_worker)
        chaos.inject("worker SIGKILL 2", 5, chaos.kill_a_worker)
        chaos.wait_for(lambda: latest_committed_checkpoint(chaos.run_dir) and committed_step(chaos.run_dir) >= 6,
                       "checkpoint 6 through a failed write")  # fmt: skip
        chaos.inject("worker SIGKILL 3", 7, chaos.kill_a_worker)
        chaos.inject("checkpoint writer killed mid-write", 9, chaos.kill_the_checkpoint_writer)
        chaos.inject("node removed", 13, chaos.remove_the_node_of_rank_1)
        chaos.inject("driver killed, command rerun", 16, chaos.kill_the_driver_and_rerun)
        assert chaos.proc.wait(timeout=300) == 0, chaos.output()[-4000:]
    finally:
        if chaos.proc.poll() is None:
            os.killpg(chaos.proc.pid, signal.SIGKILL)
    storage_log = (tmp_path / "storage.log").read_text()
    failed_write = re.search(r"^([\d.]+) injected failure 1 opening (\S+)", storage_log, re.MULTILINE)
    assert failed_write and "/checkpoint-000006/" in failed_write.group(2), storage_log
    print("\nrecovery, seconds from the fault to a step past the committed checkpoint logged again:")
    for name, step, seconds in chaos.recovery:
        print(f"  {name:<36} at step {step:>2}: {seconds:6.1f} s")

    assert steps_logged(raw["output_dir"]) == list(range(1, STEPS + 1))  # every step once, none lost
    with open(os.path.join(chaos.run_dir, "checkpoint_manager_snapshot.json")) as handle:
        snapshot = json.load(handle)
    committed = re.findall(r"checkpoint-\d{6}", json.dumps(snapshot))
    assert committed and all(verify_checkpoint(os.path.join(chaos.run_dir, name)) for name in set(committed))
    resumed = {int(s) for s in re.findall(r"resumed from step (\d+)", chaos.output())}
    assert len(resumed) >= 5, resumed  # each fault restarted from a checkpoint (the failed write did not)
    for step in resumed:  # every restore came from a complete checkpoint (the workers verify before reading)
        verify_checkpoint(os.path.join(chaos.run_dir, f"checkpoint-{step:06d}"))

    straight = {**raw, "ray_run_name": "straight", "output_dir": str(tmp_path / "straight"),
                "ray_storage_filesystem": None}  # fmt: skip
    done = subprocess.run([str(VENV_BIN / "loom"), "train", write_yaml(tmp_path / "straight-project", straight)],
                          env={**ray_cluster.env(), "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    through_faults, uninterrupted = final_weights(raw["output_dir"]), final_weights(straight["output_dir"])
    worst = max(float((through_faults[k] - uninterrupted[k]).abs().max()) for k in uninterrupted)
    print(f"largest weight difference from the uninterrupted run: {worst}")
    assert worst < 1e-5
