"""Which rows each rank trains on, in which order: a pure function of (seed, epoch, rank, world size, position).

Ray Data's `streaming_split` hands blocks to whichever worker asks first, so the rows a rank sees depend on timing and
a resumed run cannot replay them. For a materialized training set each worker instead holds the whole tokenized table
(its blocks from the object store, zero-copy on the node that stores them) and picks its own rows:

- an epoch's global order is a permutation of all rows seeded by (data seed, epoch), or the file order when
  shuffling is off;
- optimizer step k of the epoch consumes the next `world * batch * micro_batches` rows of that order, wherever the
  epoch was entered; rank r takes every world-th row of them, in micro-batches of `batch`;
- the last, short window of an epoch is cut to a multiple of the world size (at most world - 1 rows are left out,
  as Ray's equal split does), so every rank runs the same number of micro-batches.

The position saved in a checkpoint is the number of rows of the epoch already consumed, so a resumed run continues
with exactly the rows the uninterrupted run would have used, and an elastic run resized to another number of workers
continues with the same rows, regrouped over its ranks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa


def epoch_order(rows: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The global order of an epoch's rows."""
    if not shuffle:
        return np.arange(rows)
    return np.random.default_rng([seed, epoch]).permutation(rows)


@dataclass(frozen=True)
class StepLayout:
    world: int
    rank: int
    batch: int  # rows per micro-batch on each rank
    micro_batches: int  # micro-batches per rank in one optimizer step

    @property
    def rows_per_step(self) -> int:
        return self.world * self.batch * self.micro_batches


def step_indices(order: np.ndarray, start: int, layout: StepLayout) -> Iterator[list[np.ndarray]]:
    """This rank's micro-batches (row indices) for each step of the epoch from row `start` of `order` on."""
    for begin in range(start, len(order), layout.rows_per_step):
        window = order[begin : begin + layout.rows_per_step]
        window = window[: len(window) - len(window) % layout.world]
        mine = window[layout.rank :: layout.world]
        if len(mine) == 0:
            return
        yield [mine[i : i + layout.batch] for i in range(0, len(mine), layout.batch)]


class ArrowRows:
    """Random access to a tokenized table, handed over in the columns Ray Data's numpy batches have (list columns as
    1-D object arrays of arrays), so stages collate them the same way."""

    def __init__(self, tables: Sequence[pa.Table]):
        self.table = pa.concat_tables(tables, promote_options="default") if len(tables) != 1 else tables[0]

    def __len__(self) -> int:
        return self.table.num_rows

    def take(self, indices: np.ndarray) -> dict[str, Any]:
        picked = self.table.take(pa.array(indices, type=pa.int64()))
        return {name: _numpy(picked.column(name)) for name in picked.column_names}

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]]) -> ArrowRows:
        return cls([pa.Table.from_pylist(rows)])


def _numpy(column: pa.ChunkedArray) -> np.ndarray:
    """Chunk by chunk, so that Ray Data's tensor extension columns (what a numpy `map_batches` writes) convert
    through their own `to_numpy` instead of as their storage structs."""
    parts = [_rows(chunk.to_numpy(zero_copy_only=False)) for chunk in column.chunks]
    if not parts:
        return np.empty(0, dtype=object)
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def _rows(values: np.ndarray) -> np.ndarray:
    if values.dtype != object and values.ndim == 1:
        return values
    out = np.empty(len(values), dtype=object)
    for index, value in enumerate(values):  # one by one: equally long rows must not become a 2-D array
        out[index] = np.array(value) if isinstance(value, np.ndarray) else value  # writable, for torch.as_tensor
    return out
