"""Percentile-bootstrap confidence intervals, resampling whole items (problems), the unit that was drawn."""

import random


def bootstrap_ci(values: list[float], counts: list[int] | None = None, samples: int = 1000, seed: int = 0) -> list[float]:
    """95% interval of sum(values) / sum(counts) over items resampled with replacement. `values[i]` is item i's total
    (e.g. its summed per-token gain) and `counts[i]` its size (e.g. its tokens); without counts every item counts 1, so
    the interval is that of the plain mean of `values`."""
    counts = counts if counts is not None else [1] * len(values)
    if len(counts) != len(values) or not values:
        raise ValueError(f"bootstrap_ci needs one count per value and at least one item, got {len(values)} values, {len(counts)} counts.")
    rng = random.Random(seed)
    indices = range(len(values))
    estimates = []
    for _ in range(samples):
        drawn = rng.choices(indices, k=len(values))
        estimates.append(sum(values[i] for i in drawn) / max(sum(counts[i] for i in drawn), 1))
    estimates.sort()
    return [estimates[int(0.025 * samples)], estimates[int(0.975 * samples) - 1]]


__all__ = ["bootstrap_ci"]
