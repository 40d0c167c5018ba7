"""Several Ray nodes on one machine: where each rank runs per placement strategy, data shards that are disjoint
and cover the dataset, local storage refused unless declared shared, and a node lost mid-run (an elastic run
going on with fewer workers).

The module adds three nodes to the session's cluster, each its own raylet (`ray start --address`): `big`
({loom_worker: 2}), `small` and `spare` ({loom_worker: 1} each), all with 0 CPUs. The runs here ask for workers
of {loom_worker: 1}, so workers land only on those nodes while the driver, the Ray Train controller and Ray
Data's CPU tasks stay on the head: a removed node takes training workers with it, never a dataset block.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass

import numpy as np
import psutil
import pytest

from orchestrator.config import validate_config
from orchestrator.errors import PlanError
from orchestrator.launch import check_placement, train
from orchestrator.plan import make_plan
from tests.conftest import VENV_BIN, free_port, with_venv_path
from tests.ray.test_cli_runs import (
    committed_step,
    kill_and_time_recovery,
    start_slow_run,
    steps_logged,
    wait_past_a_committed_checkpoint,
    write_yaml,
)

pytestmark = pytest.mark.ray

WORKER = {"loom_worker": 1}  # only the added nodes have this resource


def _log_monitors(gcs_address: str) -> set[int]:
    """This cluster's log monitors (one per node), told apart from other clusters' by their GCS port."""
    port = gcs_address.rsplit(":", 1)[1]
    return {
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if any("log_monitor.py" in part for part in p.info["cmdline"] or [])
        and any(part.startswith("--gcs-address=") and part.endswith(f":{port}") for part in p.info["cmdline"])
    }


def _alive(node_id: str) -> bool:
    import ray

    return any(node["NodeID"] == node_id and node["Alive"] for node in ray.nodes())


@dataclass
class AddedNode:
    """One `ray start --address` node: its raylet (and everything the raylet started) plus its log monitor."""

    name: str
    node_id: str
    raylet: psutil.Process
    log_monitors: set[int]

    def _processes(self) -> list[psutil.Process]:
        found = [self.raylet]
        try:
            found += self.raylet.children(recursive=True)
        except psutil.NoSuchProcess:
            pass
        for pid in self.log_monitors:
            try:
                found.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                pass
        return found

    def kill(self) -> None:
        """The node fails: every process of it SIGKILLed at once (the cluster notices only by missed heartbeats)."""
        for process in self._processes():
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass

    def stop(self, timeout: float = 60) -> None:
        """Leave the cluster cleanly: SIGTERM makes the raylet tell the GCS at once, then the rest is killed."""
        processes = self._processes()
        try:
            self.raylet.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
        deadline = time.time() + timeout
        while _alive(self.node_id) and time.time() < deadline:
            time.sleep(0.2)
        for process in processes:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        assert not _alive(self.node_id), f"node {self.name} still alive after {timeout} s"


def add_node(gcs_address: str, name: str, resources: dict[str, float]) -> AddedNode:
    import ray

    port, monitors = free_port(), _log_monitors(gcs_address)
    subprocess.run(
        [str(VENV_BIN / "ray"), "start", f"--address={gcs_address}", "--num-cpus=0",
         f"--resources={json.dumps(resources)}", f"--node-manager-port={port}", "--object-store-memory=100000000",
         "--disable-usage-stats"],
        check=True, capture_output=True, text=True, timeout=180, env=with_venv_path(os.environ),
    )  # fmt: skip
    deadline = time.time() + 60
    while not (found := [n for n in ray.nodes() if n["NodeManagerPort"] == port and n["Alive"]]):
        assert time.time() < deadline, f"node {name} did not register"
        time.sleep(0.2)
    node_id = found[0]["NodeID"]
    raylet = [p for p in psutil.process_iter(["cmdline"]) if f"--node_id={node_id}" in (p.info["cmdline"] or [])]
    assert len(raylet) == 1, raylet
    return AddedNode(name, node_id, raylet[0], _log_monitors(gcs_address) - monitors)


def settled(condition, timeout_s: float = 90) -> None:
    """Until Ray's resource view agrees (nodes removed by an earlier module leave it with a delay): an elastic run
    sizes itself by that view."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the cluster's resource view did not settle"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def nodes(ray_cluster) -> dict[str, AddedNode]:
    import ray

    added: dict[str, AddedNode] = {}
    try:
        added["big"] = add_node(ray_cluster.gcs_address, "big", {"loom_worker": 2})
        added["small"] = add_node(ray_cluster.gcs_address, "small", {"loom_worker": 1})
        added["spare"] = add_node(ray_cluster.gcs_address, "spare", {"loom_worker": 1})
        settled(lambda: ray.cluster_resources().get("loom_worker") == ray.available_resources().get("loom_worker") == 4)
        yield added
    finally:
        for node in added.values():
            node.stop()  # the later modules see the head alone again


def run(raw: dict, ray_cluster):
    return train(validate_config(raw), source="test", address=ray_cluster.gcs_address)


def ranks_on(output_dir: str, nodes: dict[str, AddedNode]) -> list[str]:
    """The node name each rank ran on, from the `workers` list the run writes into loom_run.json."""
    names = {node.node_id: name for name, node in nodes.items()}
    with open(os.path.join(output_dir, "loom_run.json")) as handle:
        workers = json.load(handle)["workers"]
    assert [w["rank"] for w in workers] == list(range(len(workers)))
    return [names.get(w["node_id"], w["node_id"]) for w in workers]


def test_spread_puts_ranks_on_two_nodes_and_one_epoch_sees_every_token_once(ray_cluster, nodes, train_config):
    raw = train_config(resources_per_worker=WORKER, ray_storage_shared=True, placement_strategy="SPREAD",
                       max_steps=-1, num_train_epochs=1, save_steps=1000)  # fmt: skip
    outcome = run(raw, ray_cluster)
    placed = ranks_on(outcome.output_dir, nodes)
    assert len(set(placed)) == 2 and set(placed) <= set(nodes), placed
    # 128 rows split equally over 2 ranks: one epoch is 16 steps of 4 rows per rank. tokens_seen is summed over
    # the ranks, so after exactly one epoch it equals the dataset's tokens: no row missed, none read twice.
    assert outcome.plan.schedule.total_steps == 16 and outcome.data_summary["train_examples"] == 128
    with open(os.path.join(outcome.output_dir, "trainer_log.jsonl")) as handle:
        last = [json.loads(line) for line in handle][-1]
    assert last["step"] == 16 and last["tokens_seen"] == outcome.data_summary["train_tokens"]


def test_split_shards_read_on_two_nodes_are_disjoint_and_cover_the_dataset(ray_cluster, nodes, train_config):
    """The split Ray Train makes for its workers (`streaming_split(n, equal=True)` with the workers' nodes as
    locality hints: the default DataConfig, which Loom uses) of the dataset Loom prepares, read on two nodes."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from orchestrator.data.prepare import prepare_data
    from orchestrator.preflight import data_problems

    cfg = validate_config(train_config())
    specs, problems = data_problems(cfg)
    assert not problems
    data = prepare_data(cfg, specs)  # as `loom train` prepares it: tokenized, materialized in the object store
    digest = lambda ids: hashlib.sha1(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()  # noqa: E731

    @ray.remote(num_cpus=0, resources=WORKER)
    def read(shard) -> tuple[str, list[str]]:
        rows = [digest(ids) for batch in shard.iter_batches(batch_size=4, batch_format="numpy")
                for ids in batch["input_ids"]]  # fmt: skip
        return ray.get_runtime_context().get_node_id(), rows

    hosts = [nodes["big"].node_id, nodes["small"].node_id]
    shards = data.train.streaming_split(2, equal=True, locality_hints=hosts)
    results = ray.get([
        read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(host, soft=False)).remote(shard)
        for host, shard in zip(hosts, shards, strict=True)
    ])  # fmt: skip
    assert [node for node, _ in results] == hosts
    first, second = (collections.Counter(rows) for _, rows in results)
    everything = collections.Counter(digest(row["input_ids"]) for row in data.train.take_all())
    assert sum(first.values()) == sum(second.values()) == 64
    assert first + second == everything  # as multisets: every row in exactly one shard


def test_strict_strategies_are_checked_against_the_nodes(ray_cluster, nodes, train_config):
    raw = train_config(resources_per_worker=WORKER, ray_storage_shared=True)
    plan = lambda **extra: make_plan(validate_config({**raw, **extra}))  # noqa: E731
    with pytest.raises(PlanError, match="STRICT_SPREAD: only 3 node"):
        check_placement(plan(placement_strategy="STRICT_SPREAD", ray_num_workers=4))
    with pytest.raises(PlanError, match="STRICT_PACK: the largest node holds 2"):
        check_placement(plan(placement_strategy="STRICT_PACK", ray_num_workers=3))
    check_placement(plan(placement_strategy="STRICT_PACK", ray_num_workers=2))
    check_placement(plan(placement_strategy="STRICT_SPREAD", ray_num_workers=3))


def test_local_storage_is_refused_on_several_nodes_unless_declared_shared(ray_cluster, nodes, train_config):
    raw = train_config(resources_per_worker=WORKER)
    with pytest.raises(PlanError) as refused:
        run(raw, ray_cluster)
    message = str(refused.value)
    for phrase in (f"ray_storage_path {raw['ray_storage_path']!r} is a local path", "spans 4 nodes",
                   "3 can hold a worker, plus the driver's", "s3://", "ray_storage_shared: true"):  # fmt: skip
        assert phrase in message, message
    check_placement(make_plan(validate_config({**raw, "ray_storage_shared": True})))  # declared: accepted
    check_placement(make_plan(validate_config({**raw, "ray_storage_path": "s3://bucket/runs"})))  # a URI: accepted


@pytest.mark.slow  # about 2-2.5 minutes here: a run, a node lost, a restart
def test_a_node_lost_mid_run_restarts_an_elastic_run_smaller_from_the_committed_checkpoint(
    ray_cluster, nodes, train_config, tmp_path
):
    """An elastic run of 1-3 workers starts with 3: PACK puts two ranks on `big` and one on `small` or `spare`.
    Killing `big` (its raylet and every process it started) mid-run fails the worker group; with ray_max_failures: 1
    it restarts with the 2 workers the nodes left can hold, from the latest committed checkpoint, keeping 12
    examples per step (2 per worker x 3 accumulation instead of x 2). Runs last in this module: `big` stays dead."""
    raw = train_config(resources_per_worker=WORKER, ray_storage_shared=True, placement_strategy="PACK",
                       max_steps=8, save_steps=2, ray_max_failures=1, ray_run_name="node-lost", ray_num_workers=3,
                       ray_min_workers=1, per_device_train_batch_size=2, gradient_accumulation_steps=2)  # fmt: skip
    config = write_yaml(tmp_path / "project", raw)
    run_dir, output_dir, log = os.path.join(raw["ray_storage_path"], "node-lost"), raw["output_dir"], tmp_path / "r.log"
    # Ray's first decision after the kill still counts the dying node: that group waits out the start timeout
    env = {**ray_cluster.env(), "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "25"}  # 60 s by default (docs/SCALE.md)
    started, proc = time.monotonic(), start_slow_run(config, env, log, delay_s=1.0)
    try:
        wait_past_a_committed_checkpoint(proc, run_dir, output_dir, 3, log)
        first_group = ranks_on(output_dir, nodes)
        assert first_group[:2] == ["big", "big"] and first_group[2] in ("small", "spare"), first_group
        committed_at_kill = committed_step(run_dir)
        logged_at_kill = max(steps_logged(output_dir))
        node_dead = {"node dead": lambda: not _alive(nodes["big"].node_id)}
        into_run = time.monotonic() - started
        seen = kill_and_time_recovery(nodes["big"].kill, proc, log, output_dir, committed_at_kill, also=node_dead)
        assert proc.wait(timeout=30) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = log.read_text()
    # each line shows up once per node: the nodes' log monitors all read the one machine's log folder
    resumed = {int(step) for step in re.findall(r"resumed from step (\d+)", output)}
    assert len(resumed) == 1 and committed_at_kill <= min(resumed) <= logged_at_kill, (resumed, committed_at_kill)
    assert steps_logged(output_dir) == list(range(1, 9))  # steps redone after the restart appear once
    assert sorted(ranks_on(output_dir, nodes)) == ["small", "spare"]  # the restarted group, on the nodes left
    assert "elastic: 3 workers x 2 x 2 accumulation = 12 examples per step" in output
    assert "elastic: the checkpoint was written by 3 workers, this attempt has 2" in output
    assert "elastic: 2 workers x 2 x 3 accumulation = 12 examples per step" in output
    timings = json.dumps(seen)
    print(f"\nnode lost {into_run:.1f} s into the run at step {logged_at_kill} (committed {committed_at_kill}),"
          f" resumed from {min(resumed)}; seconds after the kill: {timings}")  # fmt: skip
