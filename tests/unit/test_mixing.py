"""Dataset mixing (pure): how many rows of each dataset, in which mixed positions."""

from __future__ import annotations

import numpy as np

from orchestrator.data.mixing import mixed_positions, probability_problems


def test_concat_places_datasets_one_after_another():
    first, second = mixed_positions([3, 2], None, 0, "concat")
    assert first.tolist() == [0, 1, 2] and second.tolist() == [3, 4]


def test_round_robin_under_stops_at_the_shortest_and_over_cycles_to_the_longest():
    under = mixed_positions([5, 2], None, 0, "interleave_under")
    assert [p.tolist() for p in under] == [[0, 2], [1, 3]]
    over = mixed_positions([5, 2], None, 0, "interleave_over")
    assert [len(p) for p in over] == [5, 5]  # the short dataset repeats its 2 rows until the long one is done
    assert sorted(np.concatenate(over).tolist()) == list(range(10))


def test_sampled_interleaving_follows_the_probabilities_and_is_seeded():
    positions = mixed_positions([1000, 1000], [0.8, 0.2], 7, "interleave_under")
    taken = [len(p) for p in positions]
    assert taken[0] == 1000 and 150 < taken[1] < 350  # stops when the first (favoured) dataset runs out
    again = mixed_positions([1000, 1000], [0.8, 0.2], 7, "interleave_under")
    assert all((a == b).all() for a, b in zip(positions, again, strict=True))
    merged = np.sort(np.concatenate(positions))
    assert (merged == np.arange(len(merged))).all()


def test_sampled_oversampling_runs_until_every_dataset_was_seen_whole():
    small, large = mixed_positions([3, 50], [0.5, 0.5], 1, "interleave_over")
    assert len(large) >= 50 and len(small) >= 3


def test_probability_problems():
    assert probability_problems(None, 2, "concat") == []
    assert "needs mix_strategy" in probability_problems("0.5,0.5", 2, "concat")[0]
    assert any("2 values for 3 datasets" in p for p in probability_problems("0.5,0.5", 3, "interleave_under"))
    assert any("sum to 1" in p for p in probability_problems("0.5,0.6", 2, "interleave_under"))
    assert "comma-separated numbers" in probability_problems("a,b", 2, "interleave_over")[0]


def test_an_empty_dataset_contributes_nothing_even_when_oversampling():
    assert [len(p) for p in mixed_positions([0, 3], None, 0, "interleave_over")] == [0, 3]
    assert [len(p) for p in mixed_positions([0, 3], None, 0, "interleave_under")] == [0, 0]
    assert [len(p) for p in mixed_positions([0, 3], [0.5, 0.5], 0, "interleave_over")] == [0, 3]
