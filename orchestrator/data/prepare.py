"""Which way a run's data is prepared: read back from the tokenized cache when it matches, else on the driver
(small local datasets: local.py) or through Ray Data (pipeline.py); then the reference log-probs when asked, and
the cache written when `tokenized_path` is set."""

from __future__ import annotations

from typing import Any

import ray

from .cache import TokenizedCache, cached_manifest, fingerprint
from .local import on_driver, prepare_on_driver
from .pipeline import PreparedData, build_datasets, files_node_args
from .registry import DatasetSpec


def _read_cached(cfg: Any, cache: TokenizedCache, manifest: dict) -> PreparedData:
    node_args = {} if cache.is_remote else files_node_args(cfg)
    splits = {name: ray.data.read_parquet(cache.split_path(manifest, name), filesystem=cache.fs,
                                          ray_remote_args=node_args)
              for name in manifest["splits"]}  # fmt: skip
    train = splits.pop("train")
    summary = {**manifest["summary"], "cache": f"reused {cache.uri} ({manifest['build']})"}
    return PreparedData(train, splits, summary)


def _write_cache(cfg: Any, data: PreparedData, expected: dict) -> None:
    cache = TokenizedCache(cfg.tokenized_path)
    build = cache.new_build()
    splits = {"train": data.train, **data.evals}
    node_args = {} if cache.is_remote else files_node_args(cfg)
    for name, ds in splits.items():
        ds.write_parquet(cache.split_path({"build": build}, name), filesystem=cache.fs, ray_remote_args=node_args)
    data.summary["cache"] = f"wrote {cache.uri} ({build})"
    cache.publish(build, expected, list(splits), data.summary, replace=cfg.overwrite_cache)


def prepare_data(cfg: Any, specs: list[DatasetSpec], eval_specs: list[DatasetSpec] | None = None) -> PreparedData:
    """Prepared datasets: from the tokenized cache when it matches, else built (and cached when asked)."""
    eval_specs = eval_specs or []
    manifest = cached_manifest(cfg, specs, eval_specs)
    if manifest is not None:
        return _read_cached(cfg, TokenizedCache(cfg.tokenized_path), manifest)
    data = prepare_on_driver(cfg, specs, eval_specs) if on_driver(cfg, specs, eval_specs) else None
    if data is None:
        data = build_datasets(cfg, specs, eval_specs)
    if cfg.precompute_ref_logps:
        from .reference import with_reference_logps

        data.train = with_reference_logps(data.train, cfg)
        data.evals = {name: with_reference_logps(ds, cfg) for name, ds in data.evals.items()}
        data.summary["reference"] = "precomputed log-probabilities (the workers load no reference model)"
    if cfg.tokenized_path:
        _write_cache(cfg, data, fingerprint(cfg, specs, eval_specs))
    return data
