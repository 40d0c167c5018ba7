"""pissa_convert, adapter_folder and push_to_hub on the real tiny model (torch, no Ray)."""

from __future__ import annotations

import os

import pytest
import torch

from orchestrator.errors import ConfigError
from orchestrator.hub import hub_problems, push_output
from tests.conftest import free_port
from tests.helpers import tiny_config
from workers.model import build_model
from workers.pissa import CONVERTED, INITIAL, PissaInitial


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_pissa_convert_gives_a_lora_adapter_that_makes_the_original_base_the_trained_model(tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(tiny_model, pissa_init=True, pissa_iter=-1, pissa_convert=True, lora_rank=4)
    model = build_model(cfg)
    initial = PissaInitial.capture(model, None)
    torch.manual_seed(0)
    ids = torch.randint(5, 500, (2, 16))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = logits(model, ids)
    converted = initial.convert(model, str(tmp_path))
    assert os.path.isfile(os.path.join(tmp_path, INITIAL, "adapter_model.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert not torch.allclose(logits(base, ids), trained, atol=1e-3)  # training (and PiSSA's residual) moved it
    on_base = PeftModel.from_pretrained(base, converted)
    assert on_base.peft_config["default"].r == 8  # twice the rank: trained minus initial
    assert torch.allclose(logits(on_base, ids), trained, atol=1e-4)
    assert os.path.basename(converted) == CONVERTED


def test_adapter_folder_loads_each_adapter_from_its_subfolder(tiny_model, tmp_path):
    first = build_model(tiny_config(tiny_model, lora_rank=4))
    first.save_pretrained(tmp_path / "run" / "adapter")
    model = build_model(tiny_config(tiny_model, adapter_name_or_path=str(tmp_path / "run"), adapter_folder="adapter"))
    assert model.peft_config["default"].r == 4  # the saved adapter, continued (the config's rank is 8)
    with pytest.raises(ConfigError) as error:
        tiny_config(tiny_model, adapter_name_or_path=str(tmp_path / "run"), adapter_folder="nope")
    assert "'" + str(tmp_path / "run" / "nope") in str(error.value)
    with pytest.raises(ConfigError) as error:
        tiny_config(tiny_model, adapter_folder="adapter")
    assert "adapter_name_or_path names no adapters" in str(error.value)


def test_push_to_hub_is_refused_at_the_driver_offline_without_a_token_or_a_hub(tiny_model, monkeypatch, tmp_path):
    with pytest.raises(ConfigError) as error:  # the suite runs with HF_HUB_OFFLINE=1
        tiny_config(tiny_model, push_to_hub=True)
    assert "push_to_hub" in str(error.value) and "HF_HUB_OFFLINE is on" in str(error.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # no stored login
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    found = {(p.key, p.message.split(":")[0]) for p in hub_problems(tiny_config(tiny_model))}
    assert not found  # push_to_hub off: nothing to check
    cfg = tiny_config(tiny_model).model_copy(update={"push_to_hub": True, "hub_model_id": "me/bad id"})
    messages = [p.message for p in hub_problems(cfg)]
    assert any("needs a Hub token" in m for m in messages)
    assert any("cannot reach the Hub at http://127.0.0.1" in m for m in messages)
    assert any("a Hub repository id" in m for m in messages)
    with pytest.raises(ConfigError) as error:
        tiny_config(tiny_model, hub_model_id="me/model")
    assert "push_to_hub is false" in str(error.value)


class RecordingHub:
    """The Hub's API at the network boundary: records what Loom asks of it."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, exist_ok):
        from huggingface_hub import RepoUrl

        self.calls.append(("create_repo", repo_id, exist_ok))
        return RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else 'me/' + repo_id}")  # the token's user

    def upload_folder(self, repo_id, folder_path, commit_message):
        self.calls.append(("upload_folder", repo_id, sorted(os.listdir(folder_path)), commit_message))


def test_push_output_creates_the_repository_and_uploads_output_dir_in_one_commit(tiny_model, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "adapter_model.safetensors").write_bytes(b"x")
    hub = RecordingHub()
    cfg = tiny_config(tiny_model).model_copy(update={"hub_model_id": "me/my-model"})
    url = push_output(cfg, str(tmp_path / "out"), "Loom run r, step 8", api=hub)
    assert url == "https://huggingface.co/me/my-model"
    assert hub.calls == [("create_repo", "me/my-model", True),
                         ("upload_folder", "me/my-model", ["adapter_model.safetensors"], "Loom run r, step 8")]  # fmt: skip
    push_output(tiny_config(tiny_model), str(tmp_path / "out"), "m", api=hub)  # default: output_dir's name
    assert hub.calls[-2] == ("create_repo", "out", True)
