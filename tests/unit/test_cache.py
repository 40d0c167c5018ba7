"""The tokenized cache's manifest (no Ray): fingerprints, stale refusal, and publishing builds side by side."""

from __future__ import annotations

import json

import pytest

from orchestrator.data.cache import MANIFEST, TokenizedCache
from orchestrator.errors import DataError


def test_last_published_build_wins_and_earlier_builds_stay_readable(tmp_path):
    cache = TokenizedCache(str(tmp_path / "cache"))
    first, second = cache.new_build(), cache.new_build()
    for build in (first, second):  # two runs that built the same data at once
        (tmp_path / "cache" / build / "train").mkdir(parents=True)
    cache.publish(first, {"cutoff_len": 64}, ["train"], {"train_examples": 1}, replace=False)
    cache.publish(second, {"cutoff_len": 64}, ["train"], {"train_examples": 1}, replace=False)
    manifest = json.loads((tmp_path / "cache" / MANIFEST).read_text())
    assert manifest["build"] == second and (tmp_path / "cache" / first).is_dir()
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")] == []  # no staging left
    assert cache.usable({"cutoff_len": 64}, overwrite=False)["build"] == second
    assert cache.usable({"cutoff_len": 64}, overwrite=True) is None


def test_a_stale_cache_names_what_changed(tmp_path):
    cache = TokenizedCache(str(tmp_path))
    cache.publish(cache.new_build(), {"cutoff_len": 64, "template": "qwen"}, ["train"], {}, replace=False)
    with pytest.raises(DataError, match=r"template: cached 'qwen', now 'llama3'.*overwrite_cache"):
        cache.usable({"cutoff_len": 64, "template": "llama3"}, overwrite=False)


def test_a_rebuild_removes_the_build_it_replaces(tmp_path):
    cache = TokenizedCache(str(tmp_path))
    old, new = cache.new_build(), cache.new_build()
    (tmp_path / old / "train").mkdir(parents=True)
    (tmp_path / old / "train" / "part.parquet").write_bytes(b"x")
    cache.publish(old, {}, ["train"], {}, replace=False)
    (tmp_path / new / "train").mkdir(parents=True)
    cache.publish(new, {}, ["train"], {}, replace=True)
    assert not (tmp_path / old).exists() and (tmp_path / new).is_dir()
