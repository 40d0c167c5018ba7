"""docs/FEATURES.md matches the code; the CLI prints plans and reports config errors with exit code 2."""

from __future__ import annotations

import json
import re

import yaml

from orchestrator.cli import main
from orchestrator.config.fields import Support
from orchestrator.config.schema import LoomConfig
from orchestrator.features import features_markdown
from tests.helpers import DEMO_DATA, REPO


def test_features_doc_is_current():
    doc = (REPO / "docs" / "FEATURES.md").read_text()
    assert doc == features_markdown(), "regenerate with: loom features > docs/FEATURES.md"


def test_every_field_has_a_doc_and_a_status():
    for name, field in LoomConfig.model_fields.items():
        assert field.description, name
        extra = field.json_schema_extra or {}
        assert extra.get("support") in {s.value for s in Support}, name
        assert f"`{name}`" in features_markdown()


def write_cfg(tmp_path, **extra) -> str:
    model = tmp_path / "m"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    raw = {"model_name_or_path": str(model), "dataset": "loom_demo_sft", "dataset_dir": str(DEMO_DATA), **extra}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_plan_command_text_and_json(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    path = write_cfg(
        tmp_path, ray_num_workers=4, resources_per_worker={"CPU": 2, "GPU": 1}, placement_strategy="SPREAD"
    )
    assert main(["plan", path, "per_device_train_batch_size=2", "ray_run_name=demo"]) == 0
    text = capsys.readouterr().out
    assert "run name      demo" in text
    assert 'workers       4 x {"CPU": 2.0, "GPU": 1.0}  strategy SPREAD  (GPU training)' in text
    assert "= 8 examples per step" in text
    assert main(["plan", path, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["num_workers"] == 4 and plan["placement_strategy"] == "SPREAD" and plan["use_gpu"] is True


def test_config_errors_exit_2_with_one_message(tmp_path, capsys):
    path = write_cfg(tmp_path, lora_rnak=8, stage="sfft")
    assert main(["plan", path]) == 2
    err = capsys.readouterr().err
    assert "2 problems in" in err and "did you mean 'lora_rank'" in err and "did you mean 'sft'" in err
    assert "Traceback" not in err


def test_every_environment_variable_of_the_surface_is_listed_and_each_working_one_is_read_where_it_says():
    from orchestrator.environment import ENVIRONMENT

    names = [var.name for var in ENVIRONMENT]
    assert len(names) == len(set(names))
    surface = REPO.parent / "shared" / "reference" / "PARAMETERS.md"
    if surface.is_file():  # the seed's table of variables: rows "| `NAME` | scope | ..." after its heading
        table = surface.read_text(encoding="utf-8").split("environment variables", 1)[1]
        seed = re.findall(r"^\| `([A-Z_0-9]+)` \|", table, flags=re.M)
        assert seed and sorted(seed) == sorted(names)
    for var in ENVIRONMENT:
        if var.support.value == "works" and var.read_by:
            assert var.name in (REPO / var.read_by).read_text(encoding="utf-8"), var
        elif var.support.value == "works":
            assert "Ray" in var.doc, var  # honoured by Ray itself, and the doc says so
    doc = (REPO / "docs" / "FEATURES.md").read_text()
    assert all(f"| `{name}` |" in doc for name in names)
