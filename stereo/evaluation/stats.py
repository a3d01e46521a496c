"""Confidence intervals over training seeds × attack restarts, and paired method differences, by bootstrap.

The data of one method is an array `values[seed, restart, ...]`: e.g. a cell's ASR for every training
seed and every restart of the attack (trailing axes: attacks, shapes, ...; an attack without restarts
is repeated along the restart axis, which adds no restart variance). Prompts are the same fixed set
for every seed, restart and method, so they are not resampled: an interval says how much the number
would move with other training seeds and other attack restarts, for these prompts.

Resampling is hierarchical (two-stage; Davison & Hinkley 1997, §3.8; Saravanan et al. 2020): draw S
seeds with replacement, then within each drawn seed R restarts with replacement, and recompute the
statistic. Restarts of one seed attack the *same* trained model, so they are not independent draws of
the experiment: a flat resampling of all S·R values would treat them as such and understate the
interval whenever models differ more than restarts do (the usual case: a seed's model either resists
an attack or does not). The two-stage bootstrap keeps the seed as the unit of replication and is, if
anything, slightly conservative (restart variance is counted at both stages). `hierarchical=False`
gives the flat bootstrap (every (seed, restart) value an independent unit) for comparison.

A paired difference resamples the *same* seeds and restarts for both methods (they share seeds,
prompts and restart indices), so what the methods have in common (a hard seed, an easy prompt set)
cancels: identical inputs give exactly [0, 0], a constant shift gives exactly the shift.

Intervals are percentile intervals of `n_boot` resamples drawn from `numpy.random.default_rng(seed)`:
deterministic for a given seed. With few seeds (5) a bootstrap interval is too narrow rather than too
wide (it cannot see variation the sample does not hold); read it as a lower bound on the uncertainty.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Statistic = Callable[[np.ndarray], np.ndarray]  # (B, S, R, ...) -> (B,): one value per resample


@dataclass(frozen=True)
class Interval:
    """A statistic with its bootstrap confidence interval."""

    estimate: float  # the statistic of the data itself
    low: float
    high: float
    level: float  # e.g. 0.95
    n_boot: int
    n_seeds: int
    n_restarts: int

    def excludes(self, value: float = 0.0) -> bool:
        """True when `value` lies outside the interval (e.g. a difference that is not 0)."""
        return value < self.low or value > self.high

    def scaled(self, factor: float) -> Interval:
        """The same interval in other units (e.g. x100 for percent)."""
        return Interval(self.estimate * factor, self.low * factor, self.high * factor, self.level, self.n_boot,
                        self.n_seeds, self.n_restarts)


def mean(x: np.ndarray) -> np.ndarray:
    """The mean over seeds, restarts and every trailing axis: (B, S, R, ...) -> (B,)."""
    return x.reshape(x.shape[0], -1).mean(axis=1)


def worst_of_means(x: np.ndarray) -> np.ndarray:
    """(B, S, R, K) -> (B,): the largest, over the K columns (e.g. attacks), of the mean over seeds x restarts.
    The worst attack is chosen again in every resample, so the interval includes that choice."""
    return x.mean(axis=(1, 2)).reshape(x.shape[0], -1).max(axis=1)


def least_of_means(x: np.ndarray) -> np.ndarray:
    """(B, S, R, K) -> (B,): the smallest column mean (e.g. the other shape that kept least of its rate)."""
    return x.mean(axis=(1, 2)).reshape(x.shape[0], -1).min(axis=1)


def as_seeds_restarts(values) -> np.ndarray:
    """`values` as a float array with axes (seed, restart, ...): a 1-D input is one value per seed."""
    array = np.asarray(values, dtype=float)
    if array.ndim == 0 or array.size == 0:
        raise ValueError(f"bootstrap needs at least one value per seed, got an array of shape {array.shape}")
    if array.ndim == 1:
        array = array[:, None]
    if not np.isfinite(array).all():
        raise ValueError("bootstrap values must be finite (a missing cell is not a number: fill or drop it)")
    return array


def resample_indices(n_seeds: int, n_restarts: int, n_boot: int, seed: int,
                     hierarchical: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(seed index (B, S, R), restart index (B, S, R)) of `n_boot` resamples.

    Hierarchical: S seeds with replacement, then R restarts with replacement within each drawn seed.
    Flat: S·R (seed, restart) pairs with replacement from all of them.
    """
    rng = np.random.default_rng(seed)
    if hierarchical:
        seeds = rng.integers(n_seeds, size=(n_boot, n_seeds))
        restarts = rng.integers(n_restarts, size=(n_boot, n_seeds, n_restarts))
        return np.broadcast_to(seeds[:, :, None], restarts.shape), restarts
    flat = rng.integers(n_seeds * n_restarts, size=(n_boot, n_seeds, n_restarts))
    return flat // n_restarts, flat % n_restarts


def _interval(estimate: float, draws: np.ndarray, level: float, n_boot: int, shape: tuple) -> Interval:
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1), e.g. 0.95")
    tail = (1 - level) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return Interval(float(estimate), float(low), float(high), level, n_boot, shape[0], shape[1])


def bootstrap_ci(values, statistic: Statistic = mean, *, level: float = 0.95, n_boot: int = 10_000,
                 seed: int = 0, hierarchical: bool = True) -> Interval:
    """The statistic of `values[seed, restart, ...]` with its bootstrap percentile interval.

    `statistic` maps a batch of resampled arrays (B, S, R, ...) to (B,) (`mean`, `worst_of_means`, ...).
    """
    data = as_seeds_restarts(values)
    seeds, restarts = resample_indices(data.shape[0], data.shape[1], n_boot, seed, hierarchical)
    estimate = float(statistic(data[None])[0])
    return _interval(estimate, statistic(data[seeds, restarts]), level, n_boot, data.shape)


def paired_difference(a, b, statistic: Statistic = mean, *, level: float = 0.95, n_boot: int = 10_000,
                      seed: int = 0, hierarchical: bool = True) -> Interval:
    """statistic(a) - statistic(b) with a bootstrap interval that resamples the same seeds and restarts of both.

    `a` and `b` are two methods' values on the same seeds, prompts and restart indices (same shape).
    """
    a, b = as_seeds_restarts(a), as_seeds_restarts(b)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same seeds and restarts: shapes {a.shape} and {b.shape} differ")
    seeds, restarts = resample_indices(a.shape[0], a.shape[1], n_boot, seed, hierarchical)
    estimate = float(statistic(a[None])[0] - statistic(b[None])[0])
    draws = statistic(a[seeds, restarts]) - statistic(b[seeds, restarts])
    return _interval(estimate, draws, level, n_boot, a.shape)
