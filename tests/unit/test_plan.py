"""The pure plan: workers, bundles, strategy, paths, batch arithmetic and placement checks, in milliseconds."""

from __future__ import annotations

import json
import sys

import pytest

from orchestrator.config import validate_config
from orchestrator.plan import (
    derive_run_name,
    make_plan,
    make_schedule,
    placement_problems,
    storage_problems,
    with_absolute_paths,
)
from tests.helpers import DEMO_DATA


@pytest.fixture
def cfg_of(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")

    def build(**extra):
        raw = {"model_name_or_path": str(model), "dataset": "loom_demo_sft", "dataset_dir": str(DEMO_DATA)}
        return validate_config({**raw, **extra})

    return build


def test_plan_module_imports_no_ray_or_torch():
    import subprocess

    code = "import orchestrator.plan, sys; print(any(m.split('.')[0] in ('ray', 'torch') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


@pytest.mark.parametrize(
    ("workers", "resources", "strategy", "gpu"),
    [
        (1, {"GPU": 1}, "PACK", True),
        (2, {"CPU": 1}, "PACK", False),
        (4, '{"CPU": 2, "GPU": 1}', "SPREAD", True),
        (3, {"CPU": 0.5, "memory": 1e9}, "STRICT_SPREAD", False),
        (8, {"GPU": 1, "accelerator_type:H100": 0.001}, "STRICT_PACK", True),
    ],
)
def test_plan_for_worker_resource_strategy_combinations(cfg_of, workers, resources, strategy, gpu):
    cfg = cfg_of(ray_num_workers=workers, resources_per_worker=resources, placement_strategy=strategy,
                 per_device_train_batch_size=4, gradient_accumulation_steps=2)  # fmt: skip
    plan = make_plan(cfg, base_dir="/base")
    expected = json.loads(resources) if isinstance(resources, str) else resources
    assert plan.num_workers == workers
    assert plan.resources_per_worker == {k: float(v) for k, v in expected.items()}
    assert plan.placement_strategy == strategy
    assert plan.use_gpu is gpu
    assert plan.global_batch_size == 4 * 2 * workers
    text = plan.describe()
    assert f"{workers} x " in text and strategy in text and f"= {4 * 2 * workers} examples per step" in text


def test_default_bundle_is_one_gpu_as_in_the_seed(cfg_of):
    plan = make_plan(cfg_of(), base_dir="/b")
    assert plan.resources_per_worker == {"GPU": 1.0} and plan.use_gpu


def test_paths_and_derived_run_name_are_stable(cfg_of):
    cfg = cfg_of(ray_storage_path="./saves", lora_rank=4)
    plan = make_plan(cfg, base_dir="/work/x")
    assert plan.storage_path == "/work/x/saves"
    assert plan.run_dir == f"/work/x/saves/{plan.run_name}"
    assert plan.output_dir == f"{plan.run_dir}/output"
    assert plan.run_name.startswith("loom-sft-lora-")
    assert derive_run_name(cfg_of(ray_storage_path="./saves", lora_rank=4)) == plan.run_name
    assert derive_run_name(cfg_of(ray_storage_path="./saves", lora_rank=8, logging_steps=3)) != plan.run_name
    assert derive_run_name(cfg_of(ray_storage_path="./saves", lora_rank=4, logging_steps=3)) == plan.run_name
    assert make_plan(cfg_of(ray_run_name="mine"), base_dir="/b").run_name == "mine"
    uri = make_plan(cfg_of(ray_storage_path="s3://bucket/runs/", output_dir="/nfs/model"), base_dir="/b")
    assert uri.run_dir.startswith("s3://bucket/runs/") and uri.output_dir == "/nfs/model"


def test_schedule_arithmetic(cfg_of):
    cfg = cfg_of(ray_num_workers=2, per_device_train_batch_size=4, gradient_accumulation_steps=3, num_train_epochs=2.5,
                 warmup_ratio=0.1, logging_steps=0.25, save_steps=4, eval_strategy="steps", eval_steps=5, val_size=0.1)  # fmt: skip
    s = make_schedule(cfg, train_rows=101)  # 50 rows per worker -> 13 micro-batches -> 5 steps per epoch
    assert (s.rows_per_worker, s.micro_batches_per_epoch, s.steps_per_epoch) == (50, 13, 5)
    assert s.total_steps == 13 and s.warmup_steps == 2
    assert (s.logging_every, s.save_every, s.eval_every) == (4, 4, 5)
    assert make_schedule(cfg_of(max_steps=7), 1000).total_steps == 7
    assert make_schedule(cfg_of(save_strategy="epoch", per_device_train_batch_size=10), 100).save_every == 10
    assert make_schedule(cfg_of(save_strategy="no"), 100).save_every is None


def test_absolute_paths_leave_hub_ids(cfg_of, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = with_absolute_paths(cfg_of(ray_storage_path="runs", output_dir="out", tokenized_path="cache/tok"),
                              str(tmp_path))  # fmt: skip
    assert cfg.ray_storage_path == str(tmp_path / "runs") and cfg.output_dir == str(tmp_path / "out")
    assert cfg.tokenized_path == str(tmp_path / "cache" / "tok")  # written by Ray tasks, whose cwd differs
    hub = cfg.model_copy(update={"model_name_or_path": "org/model"})
    assert with_absolute_paths(hub, str(tmp_path)).model_name_or_path == "org/model"


def node(**resources):
    return {k: float(v) for k, v in resources.items()}


@pytest.mark.parametrize(
    ("workers", "bundle", "strategy", "nodes", "phrase"),
    [
        (
            3,
            {"GPU": 1},
            "PACK",
            [node(CPU=8, GPU=2)],
            "3 bundles of {GPU: 1} requested: needs 3 GPU, cluster has 2 GPU on 1 node",
        ),
        (2, {"GPU": 1}, "PACK", [node(CPU=2)], "cluster has 0 GPU"),
        (2, {"CPU": 4}, "PACK", [node(CPU=3), node(CPU=3), node(CPU=3)], "no single node can hold one bundle"),
        (2, {"CPU": 2}, "STRICT_PACK", [node(CPU=2), node(CPU=2)], "STRICT_PACK: the largest node holds 1"),
        (3, {"CPU": 1}, "STRICT_SPREAD", [node(CPU=4), node(CPU=4)], "only 2 node(s) can hold a bundle"),
        (3, {"CPU": 2}, "SPREAD", [node(CPU=3), node(CPU=3)], "hold only 2 whole bundles"),
    ],
)
def test_placement_problems_say_what_is_missing(cfg_of, workers, bundle, strategy, nodes, phrase):
    plan = make_plan(cfg_of(ray_num_workers=workers, resources_per_worker=bundle, placement_strategy=strategy), "/b")
    found = placement_problems(plan, nodes)
    assert found and phrase in found[0], found


@pytest.mark.parametrize(
    ("workers", "bundle", "strategy", "nodes"),
    [
        (2, {"CPU": 1}, "PACK", [node(CPU=2)]),
        (2, {"CPU": 1}, "STRICT_SPREAD", [node(CPU=1), node(CPU=1)]),
        (4, {"GPU": 1, "CPU": 1}, "STRICT_PACK", [node(CPU=16, GPU=8), node(CPU=4)]),
        (16, {"GPU": 1}, "SPREAD", [node(GPU=8), node(GPU=8), node(CPU=4)]),
    ],
)
def test_placeable_plans_pass(cfg_of, workers, bundle, strategy, nodes):
    plan = make_plan(cfg_of(ray_num_workers=workers, resources_per_worker=bundle, placement_strategy=strategy), "/b")
    assert placement_problems(plan, nodes) == []


@pytest.mark.parametrize(
    ("storage", "shared", "bundle", "nodes", "driver", "spanned"),
    [
        ("/data/runs", False, {"CPU": 1}, [node(CPU=4), node(CPU=4)], 0, 2),  # two nodes can hold a worker
        ("file:///data/runs", False, {"CPU": 1}, [node(CPU=4), node(CPU=4), node(CPU=4)], 0, 3),  # file:// is local
        ("/data/runs", False, {"GPU": 1}, [node(CPU=0), node(GPU=8)], 0, 2),  # the driver's node holds no worker
        ("/data/runs", False, {"GPU": 1}, [node(CPU=0), node(GPU=8)], None, None),  # driver node unknown: 1 host
        ("/data/runs", False, {"GPU": 1}, [node(CPU=8, GPU=8), node(CPU=8)], 0, None),  # one node does it all
        ("/data/runs", True, {"CPU": 1}, [node(CPU=4), node(CPU=4)], 0, None),  # declared shared (NFS)
        ("s3://bucket/runs", False, {"CPU": 1}, [node(CPU=4), node(CPU=4)], 0, None),
        ("/data/runs", False, {"CPU": 1}, [node(CPU=4)], 0, None),  # one machine
    ],
)
def test_local_storage_on_several_nodes_must_be_declared_shared(cfg_of, storage, shared, bundle, nodes, driver,
                                                                spanned):  # fmt: skip
    cfg = cfg_of(ray_storage_path=storage, ray_storage_shared=shared, resources_per_worker=bundle, output_dir="/o")
    plan = make_plan(cfg, "/b")
    found = storage_problems(plan, nodes, None if driver is None else nodes[driver])
    if spanned is None:
        assert found == []
        return
    assert len(found) == 1, found
    for phrase in (
        "ray_storage_path",
        repr(plan.storage_path),
        f"spans {spanned} nodes",
        "s3://",
        "ray_storage_shared: true",
    ):
        assert phrase in found[0], found[0]


def test_declaring_storage_shared_keeps_the_derived_run_name(cfg_of):
    assert derive_run_name(cfg_of()) == derive_run_name(cfg_of(ray_storage_shared=True))
    assert make_plan(cfg_of(ray_storage_shared=True), "/b").storage_shared is True
    assert make_plan(cfg_of(), "/b").storage_shared is False
    built = cfg_of(ray_storage_filesystem="pyarrow.fs:LocalFileSystem", ray_storage_path="bucket/runs")
    assert make_plan(built, "/b").storage_shared is True  # a filesystem the user builds is not this node's disk


def test_elastic_plan_keeps_the_global_batch_and_starts_with_the_minimum(cfg_of):
    from orchestrator.errors import ConfigError
    from workers.checkpoint import TrainState

    cfg = cfg_of(ray_num_workers=3, ray_min_workers=1, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                 resources_per_worker={"CPU": 1}, ray_resize_interval_s=5)  # fmt: skip
    plan = make_plan(cfg)
    assert plan.elastic and (plan.min_workers, plan.num_workers, plan.global_batch_size) == (1, 3, 12)
    assert [plan.accumulation_at(n) for n in (1, 2, 3)] == [6, 3, 2]  # 12 examples per step at every size
    assert "elastic       1-3 workers; examples per step: 1 x 6 acc = 12, 2 x 3 acc = 12, 3 x 2 acc = 12" in (
        plan.describe()
    )
    one_node = [{"CPU": 1.0}]  # room for the minimum: the run may start; the fixed run may not
    assert placement_problems(plan, one_node) == []
    assert placement_problems(make_plan(cfg_of(ray_num_workers=3, resources_per_worker={"CPU": 1})), one_node)
    assert not make_plan(cfg_of(ray_num_workers=3, ray_min_workers=3, resources_per_worker={"CPU": 1})).elastic
    # a data position written by 3 ranks is the same number of examples for 2
    assert TrainState(batches_in_epoch=4, world_size=3).rescaled_to(2).batches_in_epoch == 6
    with pytest.raises(ConfigError, match="more than ray_num_workers"):
        cfg_of(ray_num_workers=2, ray_min_workers=3, resources_per_worker={"CPU": 1})
    with pytest.raises(ConfigError, match="ZeRO saves its optimizer partitions per rank"):
        cfg_of(ray_num_workers=2, ray_min_workers=1, resources_per_worker={"CPU": 1}, deepspeed={})


def test_plan_names_the_sharding_strategy(cfg_of):
    cpu = {"resources_per_worker": {"CPU": 1}}
    assert make_plan(cfg_of(**cpu)).sharding.startswith("DDP")
    zero3 = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    assert make_plan(cfg_of(deepspeed=zero3, **cpu)).sharding == "DeepSpeed ZeRO-3, offload optimizer to cpu"
    fsdp = make_plan(cfg_of(fsdp="shard_grad_op auto_wrap", **cpu))
    assert "sharding      FSDP2 shard_grad_op, per layer" in fsdp.describe()


def test_the_plan_names_each_stage_s_models_and_its_loss_unit(cfg_of):
    """From the stage registry: what each worker holds and what the loss is averaged over."""
    sft = make_plan(cfg_of(), base_dir="/b").describe()
    assert "stage         sft: loss averaged over tokens; models: policy\n" in sft
    dpo = make_plan(cfg_of(stage="dpo", dataset="loom_demo_pref", precompute_ref_logps=True), base_dir="/b")
    assert dpo.models == ("policy", "reference (precomputed)") and "loss averaged over pairs" in dpo.describe()
    orpo = make_plan(cfg_of(stage="dpo", dataset="loom_demo_pref", pref_loss="orpo"), base_dir="/b")
    assert orpo.models == ("policy",)  # reference-free
    ppo = make_plan(
        cfg_of(stage="ppo", reward_model="http://127.0.0.1:1/score", reward_model_type="api"), base_dir="/b"
    )
    assert ppo.models == ("policy + value head", "reference", "reward (api)")
