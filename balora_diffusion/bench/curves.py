"""Statistics of loss-gap curves: arrays of shape (steps + 1, seeds), row t = gap after t steps.

A diverged run's gaps are NaN; they count as +inf (worse than any finite gap),
so a learning rate where most seeds diverge can never win the selection.
"""
from __future__ import annotations

import numpy as np


def as_worst(curves: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(curves), np.inf, curves)


def median_band(curves: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-step median and inter-quartile band (25th, 75th percentile) over seeds."""
    c = as_worst(curves)
    with np.errstate(invalid="ignore"):  # inf - inf inside the interpolation gives NaN: a band we cannot draw
        q25, q75 = np.percentile(c, [25, 75], axis=1)
    return np.median(c, axis=1), q25, q75


def steps_to_reach(curves: np.ndarray, threshold: float) -> np.ndarray:
    """Per seed, the first step count whose gap is <= threshold (inf if never)."""
    hit = as_worst(curves) <= threshold
    first = np.argmax(hit, axis=0).astype(float)
    first[~hit.any(axis=0)] = np.inf
    return first


def median_steps_to_reach(curves: np.ndarray, threshold: float) -> float:
    """Median over seeds of `steps_to_reach`; inf ("never") when at least half the seeds never get there."""
    return float(np.median(steps_to_reach(curves, threshold)))


def select_lr(final_gaps: np.ndarray) -> int:
    """Index of the learning rate with the smallest median final gap; final_gaps is (lrs, seeds).

    Ties go to the smaller learning rate (the first in the grid).
    """
    return int(np.argmin(np.median(as_worst(final_gaps), axis=1)))
