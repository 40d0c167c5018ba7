"""How several datasets mix (pure): which rows of each, how many times, and where they land in the mixed order.

Follows `datasets.interleave_datasets` on map-style data: without probabilities it takes one row from each
dataset in turn; with probabilities it draws the next dataset at random (seeded). `interleave_under` stops when
the first dataset runs out, `interleave_over` when every dataset has run out at least once, restarting exhausted
datasets from their first row meanwhile.
"""

from __future__ import annotations

import numpy as np

STRATEGIES = ("concat", "interleave_under", "interleave_over")


def mixed_positions(sizes: list[int], probs: list[float] | None, seed: int, strategy: str) -> list[np.ndarray]:
    """For each dataset, the mixed-order position of its j-th contribution (row j % size of that dataset)."""
    if strategy == "concat":
        offsets = np.cumsum([0, *sizes[:-1]])
        return [np.arange(size) + offset for size, offset in zip(sizes, offsets, strict=True)]
    oversample = strategy == "interleave_over"
    if probs is None:
        rounds = max(sizes) if oversample else min(sizes)
        # an empty dataset has nothing to repeat: it contributes no rows (and leaves gaps the sort closes)
        return [np.arange(rounds if size else 0) * len(sizes) + index for index, size in enumerate(sizes)]
    return _sampled_positions(sizes, probs, seed, oversample)


def _sampled_positions(sizes: list[int], probs: list[float], seed: int, oversample: bool) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    taken = [0] * len(sizes)
    exhausted = [size == 0 for size in sizes]
    positions: list[list[int]] = [[] for _ in sizes]
    position = 0
    while not (all(exhausted) if oversample else any(exhausted)):
        for source in rng.choice(len(sizes), size=1000, p=probs):
            if all(exhausted) if oversample else any(exhausted):
                break
            if not sizes[source]:
                continue
            positions[source].append(position)
            position += 1
            taken[source] += 1
            if taken[source] % sizes[source] == 0:
                exhausted[source] = True
    return [np.asarray(p, dtype=np.int64) for p in positions]


def probability_problems(raw: str | None, datasets: int, strategy: str) -> list[str]:
    """What is wrong with interleave_probs for this many datasets and this strategy (empty when fine)."""
    if raw is None:
        return []
    if strategy == "concat":
        return ["interleave_probs needs mix_strategy interleave_under or interleave_over (given concat)"]
    try:
        probs = [float(p) for p in raw.split(",")]
    except ValueError:
        return [f"interleave_probs must be comma-separated numbers, given {raw!r}"]
    problems = []
    if len(probs) != datasets:
        problems.append(f"interleave_probs has {len(probs)} values for {datasets} datasets")
    if any(p < 0 for p in probs) or abs(sum(probs) - 1) > 1e-6:
        problems.append(f"interleave_probs must be non-negative and sum to 1, given {raw!r}")
    return problems
