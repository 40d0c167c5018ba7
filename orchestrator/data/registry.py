"""dataset_info.json -> DatasetSpec: where a dataset's rows come from and which columns and tags mean what.

The entry schema is LLaMA-Factory's: file_name (a file or a folder of files), hf_hub_url / ms_hub_url / om_hub_url,
formatting (alpaca, sharegpt, openai), ranking, columns, tags, split, subset, folder, num_samples. As in
LLaMA-Factory, an entry that gives `columns` (or `tags`) leaves every role it does not name unset.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from ..environment import enabled
from ..errors import Problem
from ..stages import STAGES
from ..suggest import did_you_mean

FORMATTINGS = ("alpaca", "sharegpt", "openai")
COLUMN_ROLES = ("prompt", "query", "response", "history", "messages", "system", "tools",
                "images", "videos", "audios", "chosen", "rejected", "kto_tag")  # fmt: skip
MEDIA_ROLES = ("images", "videos", "audios")
ENTRY_KEYS = ("file_name", "hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name", "formatting",
              "ranking", "subset", "split", "folder", "num_samples", "columns", "tags")  # fmt: skip
TAG_NAMES = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")
DEFAULT_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "messages": "conversations"}
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}  # fmt: skip
# LLaMA-Factory has no defaults of its own for openai (its entries name the tags); these are the OpenAI roles.
OPENAI_TAGS = {**SHAREGPT_TAGS, "role_tag": "role", "content_tag": "content", "user_tag": "user",
               "assistant_tag": "assistant", "observation_tag": "tool"}  # fmt: skip
DEFAULT_TAGS = {"alpaca": SHAREGPT_TAGS, "sharegpt": SHAREGPT_TAGS, "openai": OPENAI_TAGS}
FILE_TYPES = {".json": "json", ".jsonl": "json", ".txt": "text", ".csv": "csv", ".parquet": "parquet",
              ".arrow": "arrow"}  # fmt: skip
ROW_COLUMN = "_loom_row"  # JSON datasets are read as one column of JSON text per row (see readers.py)
# A JSON row that stands for a file that could not be read: the reading task reports it as data instead of failing,
# so the driver states the reason once, without a worker's traceback (see readers.column_names).
READ_ERROR = "\x00loom-read-error: "


@dataclass(frozen=True)
class HubSource:
    """A dataset on a hub, loaded with `datasets` (or ModelScope / openMind) on a Ray worker."""

    load_from: str  # hf_hub | ms_hub | om_hub
    path: str
    subset: str | None = None
    split: str = "train"
    folder: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset, resolved: its files (or hub source), format, column mapping and tags."""

    name: str
    files: tuple[str, ...]
    file_type: str  # json | text | csv | parquet | arrow | hub
    formatting: str = "alpaca"
    columns: dict = field(default_factory=dict)  # role -> column name (None: unset); a role not here: its default
    tags: dict = field(default_factory=dict)  # tag -> value (None: unset); a tag not here: the format's default
    ranking: bool = False
    num_samples: int | None = None
    seed: int = 42
    hub: HubSource | None = None

    def column(self, role: str) -> str | None:
        return self.columns[role] if role in self.columns else DEFAULT_COLUMNS.get(role)

    def tag(self, name: str) -> str | None:
        return self.tags[name] if name in self.tags else DEFAULT_TAGS[self.formatting][name]

    @property
    def source(self) -> str:
        return f"{self.hub.load_from} {self.hub.path}" if self.hub else (self.files[0] if self.files else self.name)


def load_registry(dataset_dir: str) -> tuple[dict, list[Problem]]:
    path = os.path.join(dataset_dir, "dataset_info.json")
    if not os.path.isfile(path):
        return {}, []
    try:
        with open(path, encoding="utf-8") as handle:
            registry = json.load(handle)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        return {}, [Problem("dataset_dir", f"cannot read {path}: {error}")]
    if not isinstance(registry, dict):
        return {}, [Problem("dataset_dir", f"{path} must hold a JSON object of dataset entries")]
    return registry, []


def resolve_datasets(
    names: list[str], dataset_dir: str, key: str = "dataset", stage: str | None = None, seed: int = 42
) -> tuple[list[DatasetSpec], list[Problem]]:
    """Specs for every name, or the problems that stop the run (unknown name, missing file, unsupported entry).

    A name is an entry of dataset_dir/dataset_info.json, or else a file or folder in dataset_dir. With `stage`,
    ranking datasets are checked against it; `seed` drives num_samples."""
    if not os.path.isdir(dataset_dir):
        return [], [Problem("dataset_dir", f"folder {dataset_dir!r} does not exist")]
    registry, problems = load_registry(dataset_dir)
    if problems:  # an unreadable registry: which names it holds is unknown, so none is reported as missing
        return [], problems
    specs = []
    for name in names:
        if name in registry:
            spec, entry_problems = _from_entry(name, registry[name], dataset_dir, key, seed)
        else:
            spec, entry_problems = _from_name(name, dataset_dir, registry, key)
        if spec and stage:
            entry_problems += _stage_problems(spec, stage, key)
        problems += entry_problems
        if spec and not entry_problems:
            specs.append(spec)
    return specs, problems


def _from_entry(name: str, entry: object, dataset_dir: str, key: str, seed: int) -> tuple[DatasetSpec | None, list]:
    where = f"{key} ({name!r} in {os.path.join(dataset_dir, 'dataset_info.json')})"
    if not isinstance(entry, dict):
        return None, [Problem(where, "the entry must be a JSON object")]
    messages = _entry_problems(entry)
    hub = _hub_source(entry)
    if hub:
        files, file_type = (), "hub"
        problem = None if messages else hub_problem(hub)  # (a network call: only for an entry otherwise fine)
        messages += [problem] if problem else []
    elif "script_url" in entry or "cloud_file_name" in entry:
        kind = "script_url" if "script_url" in entry else "cloud_file_name"
        messages.append(f"{kind} datasets are not supported; download the data and point file_name at it")
        files, file_type = (), ""
    elif "file_name" not in entry:
        messages.append("the entry has no file_name (nor hf_hub_url / ms_hub_url / om_hub_url)")
        files, file_type = (), ""
    else:
        files, file_type, message = _local_files(str(entry["file_name"]), dataset_dir)
        messages += [message] if message else []
        if entry.get("split", "train") != "train":
            messages.append(f"split {entry['split']!r}: local files hold one split, 'train'")
    if messages:
        return None, [Problem(where, m) for m in messages]
    return _spec(name, files, file_type, entry, seed, hub), []


def _spec(name: str, files: tuple, file_type: str, entry: dict, seed: int, hub: HubSource | None) -> DatasetSpec:
    formatting = entry.get("formatting", "alpaca")
    if "columns" in entry:
        columns = {role: entry["columns"].get(role) for role in COLUMN_ROLES}
    else:
        columns = {"prompt": "text", "query": None, "response": None} if file_type == "text" else {}
    tags = {tag: entry["tags"].get(tag) for tag in TAG_NAMES} if "tags" in entry else {}
    return DatasetSpec(name, files, file_type, formatting, columns, tags, bool(entry.get("ranking", False)),
                       entry.get("num_samples"), seed, hub)  # fmt: skip


def _entry_problems(entry: dict) -> list[str]:
    """What is wrong with an entry's formatting, ranking, columns, tags and num_samples."""
    messages = [f"unknown key {name!r}{did_you_mean(name, ENTRY_KEYS) or '; known: ' + ', '.join(ENTRY_KEYS)}"
                for name in entry if name not in ENTRY_KEYS]  # fmt: skip
    for part, known in (("columns", COLUMN_ROLES), ("tags", TAG_NAMES)):
        value = entry.get(part)
        if isinstance(value, dict):
            messages += [f"{part}: unknown name {name!r}{did_you_mean(name, known) or '; known: ' + ', '.join(known)}"
                         for name in value if name not in known]  # fmt: skip
    formatting = entry.get("formatting", "alpaca")
    if formatting not in FORMATTINGS:
        messages.append(f"formatting {formatting!r} is not one of {', '.join(FORMATTINGS)}")
    if not isinstance(entry.get("ranking", False), bool):
        messages.append(f"ranking must be true or false, not {entry['ranking']!r}")
    for part in ("columns", "tags"):
        value = entry.get(part, {})
        if not isinstance(value, dict) or not all(v is None or isinstance(v, str) for v in value.values()):
            messages.append(f"{part} must be an object of names (strings), not {value!r}")
    num_samples = entry.get("num_samples")
    if num_samples is not None and (type(num_samples) is not int or num_samples < 1):
        messages.append(f"num_samples must be a positive integer, not {num_samples!r}")
    return messages or _column_problems(entry, formatting)


def _column_problems(entry: dict, formatting: str) -> list[str]:
    columns = entry.get("columns", {})
    messages = [
        f"column {role!r} ({columns[role]!r}) holds {role}: multimodal datasets are not supported yet, so this "
        "dataset is refused rather than trained without its media"
        for role in MEDIA_ROLES
        if columns.get(role)
    ]
    if entry.get("ranking") and not (columns.get("chosen") and columns.get("rejected")):
        messages.append("a ranking dataset needs its chosen and rejected columns named under columns")
    if formatting != "alpaca" and "columns" in entry and not columns.get("messages"):
        messages.append(f"a {formatting} dataset needs its messages column named under columns")
    return messages


def _stage_problems(spec: DatasetSpec, stage: str, key: str) -> list[Problem]:
    wanted = STAGES[stage]
    if spec.ranking and not wanted.ranking:
        ranking = " or ".join(name for name, s in STAGES.items() if s.ranking)
        return [Problem(key, f"{spec.name!r} is a ranking (chosen/rejected) dataset, for stage {ranking}, not {stage}")]
    if not spec.ranking and wanted.ranking:
        return [Problem(key, f'stage {stage} needs ranking datasets ("ranking": true); {spec.name!r} is not one')]
    missing = [role for role in wanted.needs_columns if not spec.column(role)]
    if missing:
        return [Problem(key, f"stage {stage} needs a {missing[0]} column; {spec.name!r} names none under columns")]
    return []


def _hub_source(entry: dict) -> HubSource | None:
    """The hub an entry loads from, chosen as LLaMA-Factory does (USE_MODELSCOPE_HUB / USE_OPENMIND_HUB)."""
    hf, ms, om = (entry.get(k) for k in ("hf_hub_url", "ms_hub_url", "om_hub_url"))
    if ms and (enabled(os.environ, "USE_MODELSCOPE_HUB") or not hf):
        load_from, path = "ms_hub", ms
    elif om and (enabled(os.environ, "USE_OPENMIND_HUB") or not hf):
        load_from, path = "om_hub", om
    elif hf:
        load_from, path = "hf_hub", hf
    else:
        return None
    return HubSource(load_from, str(path), entry.get("subset"), entry.get("split", "train"), entry.get("folder"))


def hub_problem(hub: HubSource) -> str | None:
    """Why a hub dataset cannot be loaded from here (offline and not cached, unreachable, package missing)."""
    if hub.load_from != "hf_hub":
        package = "modelscope" if hub.load_from == "ms_hub" else "openmind"
        import importlib.util

        if importlib.util.find_spec(package) is None:
            return f"{hub.load_from} dataset {hub.path!r} needs the {package} package, which is not installed"
        return None
    if os.path.isdir(hub.path):
        return None
    if enabled(os.environ, "HF_HUB_OFFLINE") or enabled(os.environ, "HF_DATASETS_OFFLINE"):
        return None if _hf_cached(hub.path) else (
            f"hf_hub_url {hub.path!r} cannot be downloaded: offline mode (HF_HUB_OFFLINE=1) and it is not in the "
            "local Hugging Face cache; download it where there is network, or point file_name at local files"
        )  # fmt: skip
    try:
        from huggingface_hub import HfApi

        HfApi().dataset_info(hub.path, timeout=10)
    except Exception as error:  # network down, no such repo, gated: say which, in one line
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return f"hf_hub_url {hub.path!r} cannot be reached on the Hugging Face Hub: {first_line}"
    return None


def _hf_cached(path: str) -> bool:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(path, repo_type="dataset", local_files_only=True)
    except Exception:  # not in the cache (or a broken cache): load_dataset would fail offline too
        return False
    return True


def _local_files(file_name: str, dataset_dir: str) -> tuple[tuple[str, ...], str, str | None]:
    """A file, or a folder's files (hidden ones skipped), all of one supported type."""
    path = os.path.abspath(os.path.join(dataset_dir, file_name))
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if not f.startswith("."))
    elif os.path.isfile(path):
        files = [path]
    else:
        return (), "", f"file_name {file_name!r} does not exist in {dataset_dir!r}"
    if not files:
        return (), "", f"folder {path!r} has no files"
    types = {FILE_TYPES.get(os.path.splitext(f)[1].lower()) for f in files}
    if None in types or len(types) != 1:
        exts = sorted({os.path.splitext(f)[1] or os.path.basename(f) for f in files})
        supported = ", ".join(FILE_TYPES)
        return (), "", f"file types {exts} are not supported (supported: {supported}; one type per dataset)"
    return tuple(files), types.pop(), None


def _from_name(name: str, dataset_dir: str, registry: dict, key: str) -> tuple[DatasetSpec | None, list[Problem]]:
    """A name that is not a registry entry: a file or folder in dataset_dir, read as alpaca (or text)."""
    path = os.path.join(dataset_dir, name)
    if not os.path.exists(path):
        hint = did_you_mean(name, list(registry) + _listdir(dataset_dir))
        known = ", ".join(sorted(registry)) or "none"
        message = f"{name!r} is neither an entry of dataset_info.json (known: {known}) nor a file in {dataset_dir!r}"
        return None, [Problem(key, message + hint)]
    files, file_type, message = _local_files(name, dataset_dir)
    if message:
        return None, [Problem(key, message)]
    return _spec(name, files, file_type, {}, 42, None), []


def _listdir(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []
