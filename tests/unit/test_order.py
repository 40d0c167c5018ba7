"""Each rank's rows as a pure function of (seed, epoch, rank, world size, position): workers/order.py."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from orchestrator.config import validate_config
from orchestrator.plan import make_schedule
from tests.helpers import DEMO_DATA
from workers.order import ArrowRows, StepLayout, epoch_order, step_indices


def steps(rows: int, world: int, batch: int, micro: int, start: int = 0, seed: int = 7, epoch: int = 0):
    """Per step: each rank's micro-batches (row ids)."""
    order = epoch_order(rows, seed, epoch, shuffle=True)
    per_rank = [list(step_indices(order, start, StepLayout(world, rank, batch, micro))) for rank in range(world)]
    assert len({len(s) for s in per_rank}) == 1, "every rank runs the same number of steps"
    return [[[part.tolist() for part in rank_steps[k]] for rank_steps in per_rank] for k in range(len(per_rank[0]))]


def flat(step) -> list[int]:
    return sorted(row for rank in step for part in rank for row in part)


@pytest.mark.parametrize(
    ("rows", "world", "batch", "micro"), [(101, 2, 4, 2), (64, 2, 4, 2), (37, 3, 2, 3), (9, 4, 1, 1)]
)
def test_an_epoch_uses_each_row_once_and_has_the_plan_s_step_count(rows, world, batch, micro, tmp_path):
    epoch = steps(rows, world, batch, micro)
    used = [row for step in epoch for row in flat(step)]
    assert len(used) == len(set(used)) and len(used) >= rows - (world - 1)  # the tail is cut to the world size
    for step in epoch:  # every rank the same number of micro-batches, none empty
        assert len({len(rank) for rank in step}) == 1 and all(part for rank in step for part in rank)
    (tmp_path / "config.json").write_text("{}")
    cfg = validate_config({"model_name_or_path": str(tmp_path), "dataset": "loom_demo_sft", "dataset_dir": str(DEMO_DATA),
                           "template": "default", "ray_num_workers": world, "per_device_train_batch_size": batch,
                           "gradient_accumulation_steps": micro})  # fmt: skip
    assert len(epoch) == make_schedule(cfg, train_rows=rows).steps_per_epoch


def test_resuming_at_any_step_replays_the_rest_of_the_epoch_exactly():
    whole = steps(101, 2, 4, 2)
    for done in range(len(whole)):
        assert steps(101, 2, 4, 2, start=done * 2 * 4 * 2) == whole[done:]


def test_an_elastic_resize_keeps_each_step_s_rows_regrouped():
    three = steps(96, 3, 2, 2)  # 12 rows per step
    two = steps(96, 2, 2, 3, start=2 * 12)  # resized after two steps: 2 workers x 3 micro-batches, 12 rows per step
    assert [flat(s) for s in two] == [flat(s) for s in three[2:]]


def test_the_order_depends_on_seed_and_epoch_only_and_shuffling_off_keeps_file_order():
    assert (epoch_order(50, 3, 1, True) == epoch_order(50, 3, 1, True)).all()
    assert not (epoch_order(50, 3, 1, True) == epoch_order(50, 3, 2, True)).all()
    assert not (epoch_order(50, 3, 1, True) == epoch_order(50, 4, 1, True)).all()
    assert epoch_order(5, 3, 1, False).tolist() == [0, 1, 2, 3, 4]


def test_rows_come_as_ray_data_s_numpy_batches_with_writable_arrays():
    rows = ArrowRows.from_rows([{"input_ids": [i, i + 1], "score": float(i)} for i in range(6)])
    batch = rows.take(np.array([4, 1]))
    ids = batch["input_ids"]
    assert ids.shape == (2,) and ids.dtype == object  # equally long rows stay a column of arrays
    assert [a.tolist() for a in ids] == [[4, 5], [1, 2]] and all(a.flags.writeable for a in ids)
    assert batch["score"].tolist() == [4.0, 1.0]
    split = ArrowRows([rows.table.slice(0, 2), rows.table.slice(2)])  # several blocks, as from the object store
    assert len(split) == 6 and split.take(np.array([5]))["input_ids"][0].tolist() == [5, 6]


def test_ray_data_tensor_columns_come_as_rows_not_as_their_storage():
    """A numpy `map_batches` (the precomputed reference pass) stores list columns as Ray's tensor extension types,
    whose storage is a struct of data and shape: the rows must come out as arrays all the same."""
    import pyarrow as pa
    from ray.data._internal.tensor_extensions.arrow import ArrowTensorArray

    varying = np.empty(3, dtype=object)
    varying[:] = [np.arange(2), np.arange(3), np.arange(1)]
    table = pa.table({"input_ids": ArrowTensorArray.from_numpy(varying),
                      "fixed": ArrowTensorArray.from_numpy(np.arange(6).reshape(3, 2)), "ref": [0.5, 1.5, 2.5]})  # fmt: skip
    batch = ArrowRows([table.slice(0, 1), table.slice(1)]).take(np.array([2, 1]))
    assert [a.tolist() for a in batch["input_ids"]] == [[0], [0, 1, 2]]
    assert batch["fixed"].shape == (2,) and [a.tolist() for a in batch["fixed"]] == [[4, 5], [2, 3]]
    assert batch["ref"].tolist() == [2.5, 1.5]


def test_small_sets_over_many_ranks_still_give_every_rank_rows():
    for rows, world in itertools.product((4, 5, 7), (2, 4)):
        epoch = steps(rows, world, 1, 1)
        assert epoch and all(len(rank) == 1 for step in epoch for rank in step)
