"""The tokenized-dataset cache at `tokenized_path`: Parquet on any pyarrow filesystem, published atomically.

Layout: `<tokenized_path>/build-<id>/<split>/*.parquet` plus `loom_cache.json`, written last, naming the build
and the fingerprint of everything that decided the tokens. A build is only ever read through the manifest, so a
half-written build is invisible; two runs building at once each write their own build folder, and whichever
manifest lands last wins, both being complete. A run whose inputs differ from the manifest's is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import Any

import pyarrow.fs as pafs

from ..errors import DataError
from .registry import DatasetSpec

MANIFEST = "loom_cache.json"
FORMAT_VERSION = 1
# Keys whose values decide the tokens; a change in any of them makes a cache stale.
DATA_KEYS = (
    "stage", "template", "tool_format", "default_system", "cutoff_len", "train_on_prompt", "mask_history",
    "packing", "neat_packing", "max_samples", "val_size", "mix_strategy", "interleave_probs",
    "eval_on_each_dataset", "disable_shuffling", "seed", "data_seed", "new_special_tokens", "split_special_tokens",
)  # fmt: skip
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "vocab.txt", "chat_template.jinja")  # fmt: skip


def _file_digest(path: str, sample: int = 1 << 16) -> str:
    """Size, modification time and the first and last 64 KiB: cheap, and catches edits of any file size."""
    stat = os.stat(path)
    digest = hashlib.blake2b(f"{stat.st_size}:{stat.st_mtime_ns}".encode(), digest_size=12)
    with open(path, "rb") as handle:
        digest.update(handle.read(sample))
        if stat.st_size > sample:
            handle.seek(max(sample, stat.st_size - sample))
            digest.update(handle.read(sample))
    return digest.hexdigest()


def _folder_digest(folder: str, names: Any) -> str:
    """The named files of a model folder that exist, in that order (a hub id: by its name)."""
    if not os.path.isdir(folder):
        return f"hub:{folder}"
    files = [os.path.join(folder, name) for name in names if os.path.isfile(os.path.join(folder, name))]
    return hashlib.blake2b("".join(_file_digest(f) for f in files).encode(), digest_size=12).hexdigest()


def _tokenizer_digest(model: str) -> str:
    return _folder_digest(model, TOKENIZER_FILES)


def _weights_digest(folder: str) -> str:
    names = (
        sorted(n for n in os.listdir(folder) if n.endswith((".safetensors", ".bin"))) if os.path.isdir(folder) else []
    )
    return _folder_digest(folder, names)


def _dataset_entry(spec: DatasetSpec) -> dict:
    return {"name": spec.name, "formatting": spec.formatting, "columns": spec.columns,
            "files": {os.path.basename(f): _file_digest(f) for f in spec.files}}  # fmt: skip


def fingerprint(cfg: Any, specs: list[DatasetSpec], eval_specs: list[DatasetSpec]) -> dict:
    """Everything that decides the prepared tokens, as a flat dict (so a mismatch can be named key by key)."""
    values = {key: getattr(cfg, key, None) for key in DATA_KEYS}
    values["packing"] = cfg.uses_packing()
    values["tokenizer"] = _tokenizer_digest(cfg.model_name_or_path)
    values["datasets"] = [_dataset_entry(spec) for spec in specs]
    values["eval_datasets"] = [_dataset_entry(spec) for spec in eval_specs]
    if getattr(cfg, "precompute_ref_logps", False):  # the reference's log-probs are cached with the tokens
        from ..stages import reference_source

        path, adapters = reference_source(cfg)
        values["reference"] = {"model": _weights_digest(path), "adapters": [_weights_digest(a) for a in
                                                                             (adapters or "").split(",") if a]}  # fmt: skip
    values["format_version"] = FORMAT_VERSION
    return json.loads(json.dumps(values, default=str))


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


class TokenizedCache:
    def __init__(self, path: str):
        self.uri = path
        self.fs, self.root = _filesystem(path)

    @property
    def is_remote(self) -> bool:
        """An object store or other URI every node reaches, unlike a local path."""
        return "://" in self.uri and not self.uri.startswith("file://")

    def _join(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def manifest(self) -> dict | None:
        try:
            with self.fs.open_input_stream(self._join(MANIFEST)) as handle:
                return json.loads(handle.read().decode())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as error:
            raise DataError(f"tokenized_path {self.uri!r}: cannot read {MANIFEST}: {error}") from error

    def usable(self, expected: dict, overwrite: bool) -> dict | None:
        """The manifest when it matches `expected`; None when there is none or a rebuild was asked for."""
        manifest = self.manifest()
        if manifest is None or overwrite:
            return None
        stale = sorted(k for k in expected.keys() | manifest["fingerprint"].keys()
                       if expected.get(k) != manifest["fingerprint"].get(k))  # fmt: skip
        if stale:
            details = "; ".join(f"{k}: cached {manifest['fingerprint'].get(k)!r}, now {expected.get(k)!r}"
                                for k in stale[:5])  # fmt: skip
            raise DataError(
                f"tokenized_path {self.uri!r} holds data prepared from different inputs ({details}). "
                "Set overwrite_cache: true to rebuild it, or point tokenized_path elsewhere."
            )
        return manifest

    def split_path(self, manifest: dict, split: str) -> str:
        return self._join(manifest["build"], split)

    def new_build(self) -> str:
        return f"build-{uuid.uuid4().hex[:12]}"

    def publish(self, build: str, expected: dict, splits: list[str], summary: dict, replace: bool) -> None:
        """Write the manifest last, atomically where the filesystem allows (rename on local disks; object stores
        make a single PUT visible all at once). `replace` (overwrite_cache) deletes the build it supersedes;
        otherwise a superseded build is left alone, as a concurrent run may still be reading it."""
        previous = self.manifest()
        body = json.dumps({"build": build, "splits": splits, "fingerprint": expected, "summary": summary}, indent=1)
        target = self._join(MANIFEST)
        staging = target if "://" in self.uri else self._join(f".{MANIFEST}.{uuid.uuid4().hex[:8]}")
        with self.fs.open_output_stream(staging) as handle:
            handle.write(body.encode())
        if staging != target:
            self.fs.move(staging, target)
        if replace and previous and previous.get("build") not in (None, build):
            self.fs.delete_dir_contents(self._join(previous["build"]), missing_dir_ok=True)
            self.fs.delete_dir(self._join(previous["build"]))


def cached_manifest(cfg: Any, specs: list[DatasetSpec], eval_specs: list[DatasetSpec]) -> dict | None:
    """The usable tokenized cache's manifest, None when there is none (or a rebuild is asked for); a stale cache
    raises DataError. Runs on the driver before Ray starts, so a stale cache stops the run early."""
    if not cfg.tokenized_path:
        return None
    return TokenizedCache(cfg.tokenized_path).usable(fingerprint(cfg, specs, eval_specs), cfg.overwrite_cache)
