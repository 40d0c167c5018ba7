"""Reading a dataset into Ray Data rows, in Ray tasks (the driver reads only small local datasets, with these
same readers: orchestrator/data/local.py).

Each file (JSON lines and text: each BYTES_PER_PART of a file, cut at line ends) is read by one task, which yields
Arrow tables of at most CHUNK_ROWS rows; each part's rows are then tokenized by their own tasks, so a big file is
tokenized in parallel too:
- json (.json arrays, .jsonl and JSON lines in .json): one column of JSON text per row (ROW_COLUMN), which
  convert() parses. Rows of a dataset may differ in structure (optional keys, a key null in some rows, text in one
  row and a list in another); as text they never need the common Arrow schema that Ray Data would otherwise have
  to unify across blocks, and cannot for structs that differ.
- text: one "text" column, lines split as `datasets` splits them (empty lines kept).
- csv (with pandas, as `datasets` reads it), parquet and arrow (IPC stream or file): their own columns.
A hub dataset is loaded by one Ray task with `datasets.load_dataset`; its table goes to the object store.
num_samples picks rows as LLaMA-Factory does (a seeded permutation, repeated rows once all are used).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import ray

from .formats import parse_row
from .registry import READ_ERROR, ROW_COLUMN, DatasetSpec, HubSource

CHUNK_ROWS = 4096
BYTES_PER_PART = 16 * 2**20  # reading and tokenizing work per Ray task, at most
MIN_PART_BYTES = 2**20
PARTS_PER_FILE = 8
SPLITTABLE = ("json", "text")  # types read in parts: JSON lines and text (a JSON array is read whole)
PART_COLUMN, LINE_COLUMN, POSITION_COLUMN = "_loom_part", "_loom_line", "_loom_position"


class DatasetReadError(ValueError):
    """A dataset that cannot be read (a missing or malformed file, a row that is not JSON, a hub failure)."""


def read_dataset(spec: DatasetSpec, remote_args: dict | None = None) -> ray.data.Dataset:
    """Raw rows of a dataset, num_samples applied; read lazily, in Ray tasks (with `remote_args`, e.g. pinned to
    the node that holds the files)."""
    if spec.hub:
        return ray.data.from_arrow_refs([_load_hub.remote(spec.hub, spec.num_samples, spec.seed)])
    parts = file_parts(spec)
    if spec.num_samples:
        indexed = _read_parts(parts, spec.file_type, indexed=True, remote_args=remote_args)
        return _sample(indexed, len(parts), spec.num_samples, spec.seed)
    return _read_parts(parts, spec.file_type, remote_args=remote_args)


def column_names(spec: DatasetSpec) -> list[str]:
    """The dataset's columns: its schema's, or for JSON the keys found in any row (as `datasets` unites them).

    Reads the whole dataset once for JSON (in Ray tasks), which also finds rows that are not JSON objects."""
    try:
        ds = read_dataset(dataclasses.replace(spec, num_samples=None))
        if spec.file_type != "json":
            schema = ds.schema()
            return list(schema.names) if schema is not None else []
        keys = ds.map_batches(_row_keys, batch_format="pyarrow").iter_batches(batch_format="pyarrow")
        found = set().union(*(batch.column("key").to_pylist() for batch in keys))
    except Exception as error:  # Ray wraps the task's error in its own; keep the reason, in one line
        raise DatasetReadError(_reason(error)) from None
    errors = sorted(key.removeprefix(READ_ERROR) for key in found if key.startswith(READ_ERROR))
    if errors:
        raise DatasetReadError(errors[0])
    return sorted(found)


def _row_keys(batch: pa.Table) -> pa.Table:
    """The keys of the rows; a row that is not a JSON object becomes a READ_ERROR key (the task does not fail, so
    no worker traceback reaches the user's console)."""
    keys: set[str] = set()
    for text in batch.column(ROW_COLUMN).to_pylist():
        try:
            keys.update(parse_row(text))
        except ValueError as error:
            keys.add(READ_ERROR + str(error))
            break
    return pa.table({"key": pa.array(sorted(keys), pa.string())})


def _reason(error: BaseException) -> str:
    """The first `SomeError: message` line of a (Ray-wrapped) error that is not Ray's own wrapper."""
    for line in str(error).splitlines():
        match = re.match(r"([\w.]+(?:Error|Exception)): (.+)", line)
        if match and not match.group(1).startswith("ray."):
            return match.group(2)
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


# ---- files --------------------------------------------------------------------------------------------------------


def part_size(file_bytes: int) -> int:
    """Bytes per reading task for a file: at most BYTES_PER_PART, and small enough that a mid-sized file still
    spreads over PARTS_PER_FILE tasks. It depends on the file alone, never on the cluster, so the same data always
    splits the same way (packing and KTO pairing work within batches, which must not move between clusters)."""
    return max(MIN_PART_BYTES, min(BYTES_PER_PART, -(-file_bytes // PARTS_PER_FILE)))


def file_parts(spec: DatasetSpec, part_bytes: int | None = None) -> list[dict]:
    """What each reading task reads: a whole file, or (JSON lines, text) a byte range [start, end) of one."""
    parts = []
    for path in spec.files:
        size = os.path.getsize(path) if spec.file_type in SPLITTABLE else 0
        step = part_bytes or part_size(size)
        if size <= step:
            parts.append({"path": path, "start": 0, "end": -1})
        else:
            parts += [{"path": path, "start": start, "end": start + step} for start in range(0, size, step)]
    return [{**part, "part": index} for index, part in enumerate(parts)]


class _FileParts(ray.data.Datasource):
    """One Ray Data read task per file part, so the parts are read, and then tokenized, in parallel. (Reading
    through `from_items(parts).map_batches(...)` let Ray fuse reading and tokenizing into one task for every part
    once the tokenizing step asked for batches larger than the number of parts: 100k rows on one core.)"""

    def __init__(self, parts: list[dict], file_type: str, indexed: bool):
        self._parts, self._file_type, self._indexed = parts, file_type, indexed

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: object = None) -> list[ray.data.ReadTask]:  # fmt: skip
        from ray.data.block import BlockMetadata

        return [ray.data.ReadTask(functools.partial(_read_part_tables, part, self._file_type, self._indexed),
                                  BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None,
                                                input_files=(part["path"],)),
                                  per_task_row_limit=per_task_row_limit)
                for part in self._parts]  # fmt: skip


def _read_parts(
    parts: list[dict], file_type: str, indexed: bool = False, remote_args: dict | None = None
) -> ray.data.Dataset:
    return ray.data.read_datasource(
        _FileParts(parts, file_type, indexed),
        override_num_blocks=len(parts),
        **(remote_args or {}),  # named task options, e.g. label_selector: pinned to the files' node
    )


def _read_part_tables(part: dict, file_type: str, indexed: bool) -> Iterator[pa.Table]:
    """Runs in a Ray task: the tables of one part; with `indexed`, each row's part and line number."""
    line = 0
    for table in FILE_READERS[file_type](part["path"], part["start"], part["end"]):
        if indexed:
            table = table.append_column(PART_COLUMN, pa.array(np.full(table.num_rows, part["part"], np.int64)))
            table = table.append_column(LINE_COLUMN, pa.array(np.arange(line, line + table.num_rows)))
        line += table.num_rows
        yield table


def read_part(path: str, start: int = 0, end: int = -1) -> bytes:
    """The lines that start in bytes [start, end) of a file (end -1: to the end), whole."""
    with open(path, "rb") as handle:
        if start:
            handle.seek(start - 1)
            handle.readline()  # the line under way at `start` belongs to the part before
        if end < 0:
            return handle.read()
        if handle.tell() >= end:
            return b""
        data = handle.read(end - handle.tell())
        return data if data.endswith(b"\n") else data + handle.readline()


def _strings(column: str, values: list[str]) -> Iterator[pa.Table]:
    for start in range(0, len(values), CHUNK_ROWS):
        yield pa.table({column: pa.array(values[start : start + CHUNK_ROWS], pa.string())})


def _slices(table: pa.Table) -> Iterator[pa.Table]:
    if table.num_rows == 0:
        yield table  # an empty file still tells its columns
    for start in range(0, table.num_rows, CHUNK_ROWS):
        yield table.slice(start, CHUNK_ROWS)


def json_tables(path: str, start: int = 0, end: int = -1) -> Iterator[pa.Table]:
    """A JSON array (parsed whole by the first part, each row back to JSON text) or JSON lines (each non-blank
    line as it is)."""
    if _is_json_array(path):
        if start == 0:
            try:
                rows = _json_array(read_part(path).decode("utf-8-sig"), path)
            except (DatasetReadError, UnicodeDecodeError) as error:
                yield from _strings(ROW_COLUMN, [READ_ERROR + str(error)])
                return
            yield from _strings(ROW_COLUMN, [json.dumps(row, ensure_ascii=False) for row in rows])
        return
    text = read_part(path, start, end).decode("utf-8-sig" if start == 0 else "utf-8")
    yield from _strings(ROW_COLUMN, [line for line in text.split("\n") if line.strip()])


def _is_json_array(path: str) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(4096).removeprefix(b"\xef\xbb\xbf")
        while head and not head.strip():
            head = handle.read(4096)
    return head.lstrip()[:1] == b"["


def _json_array(text: str, path: str) -> list[dict]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise DatasetReadError(f"{path} is not valid JSON: {error}") from None
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DatasetReadError(f"{path}: row {index} is not a JSON object")
    return rows


def text_tables(path: str, start: int = 0, end: int = -1) -> Iterator[pa.Table]:
    """One row per line; \\r\\n and \\r read as \\n, empty lines kept (as `datasets`' text loader does)."""
    text = read_part(path, start, end).decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    yield from _strings("text", lines)


def csv_tables(path: str, start: int = 0, end: int = -1) -> Iterator[pa.Table]:
    import pandas as pd

    yield from _slices(pa.Table.from_pandas(pd.read_csv(path), preserve_index=False))


def parquet_tables(path: str, start: int = 0, end: int = -1) -> Iterator[pa.Table]:
    import pyarrow.parquet as pq

    yield from _slices(pq.read_table(path))


def arrow_tables(path: str, start: int = 0, end: int = -1) -> Iterator[pa.Table]:
    """An Arrow IPC stream (what `datasets` writes) or IPC file."""
    with pa.OSFile(path) as source:
        try:
            table = pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            source.seek(0)
            table = pa.ipc.open_file(source).read_all()
    yield from _slices(table)


FILE_READERS = {"json": json_tables, "text": text_tables, "csv": csv_tables, "parquet": parquet_tables,
                "arrow": arrow_tables}  # fmt: skip


# ---- num_samples --------------------------------------------------------------------------------------------------


def sample_indexes(total: int, num_samples: int, seed: int) -> np.ndarray:
    """Row indexes as LLaMA-Factory picks them: a seeded permutation cut to num_samples, then (when num_samples
    exceeds the rows) random extra rows. Same numbers as LLaMA-Factory's numpy draws after set_seed(seed)."""
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.RandomState(seed)
    indexes = rng.permutation(total)[:num_samples]
    if num_samples > total:
        indexes = np.concatenate([indexes, rng.choice(total, num_samples - total)])
    return indexes.astype(np.int64)


def _sample(ds: ray.data.Dataset, parts: int, num_samples: int, seed: int) -> ray.data.Dataset:
    """The picked rows, in pick order: one pass counts each part's rows, one picks (and repeats) rows, a sort."""
    sizes = np.zeros(parts, dtype=np.int64)
    extents = ds.select_columns([PART_COLUMN, LINE_COLUMN]).map_batches(_part_extent, batch_format="pyarrow")
    for row in extents.iter_rows():
        sizes[row["part"]] = max(sizes[row["part"]], row["rows"])
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    picks = sample_indexes(int(sizes.sum()), num_samples, seed)
    order = np.argsort(picks, kind="stable")
    kwargs = {"offsets": offsets, "sorted_picks": picks[order], "positions": order.astype(np.int64)}
    picked = ds.map_batches(_pick, fn_kwargs=kwargs, batch_format="pyarrow")
    return picked.sort(POSITION_COLUMN).drop_columns([POSITION_COLUMN])


def _part_extent(batch: pa.Table) -> pa.Table:
    parts, lines = batch.column(PART_COLUMN).to_numpy(), batch.column(LINE_COLUMN).to_numpy()
    unique = np.unique(parts)
    return pa.table({"part": unique, "rows": [int(lines[parts == p].max()) + 1 for p in unique]})


def _pick(batch: pa.Table, *, offsets: np.ndarray, sorted_picks: np.ndarray, positions: np.ndarray) -> pa.Table:
    """Each row as many times as it was picked, with the position of each pick."""
    ids = offsets[batch.column(PART_COLUMN).to_numpy()] + batch.column(LINE_COLUMN).to_numpy()
    left = np.searchsorted(sorted_picks, ids, "left")
    counts = np.searchsorted(sorted_picks, ids, "right") - left
    rows = np.repeat(np.arange(len(ids)), counts)
    within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    picked = batch.drop_columns([PART_COLUMN, LINE_COLUMN]).take(pa.array(rows, pa.int64()))
    return picked.append_column(POSITION_COLUMN, pa.array(positions[np.repeat(left, counts) + within]))


# ---- hubs ---------------------------------------------------------------------------------------------------------


def load_hub_table(hub: HubSource) -> pa.Table:
    """The whole split of a hub dataset as one Arrow table (downloaded into the worker's cache)."""
    if hub.load_from == "ms_hub":
        from modelscope import MsDataset  # type: ignore[import-not-found]

        dataset = MsDataset.load(hub.path, subset_name=hub.subset, data_dir=hub.folder, split=hub.split)
        dataset = dataset.to_hf_dataset() if hasattr(dataset, "to_hf_dataset") else dataset
    elif hub.load_from == "om_hub":
        from openmind import OmDataset  # type: ignore[import-not-found]

        dataset = OmDataset.load_dataset(path=hub.path, name=hub.subset, data_dir=hub.folder, split=hub.split)
    else:
        from datasets import load_dataset

        dataset = load_dataset(hub.path, name=hub.subset, data_dir=hub.folder, split=hub.split)
    return dataset.with_format("arrow")[:]


@ray.remote
def _load_hub(hub: HubSource, num_samples: int | None, seed: int) -> pa.Table:
    table = load_hub_table(hub)
    return table.take(pa.array(sample_indexes(table.num_rows, num_samples, seed))) if num_samples else table
