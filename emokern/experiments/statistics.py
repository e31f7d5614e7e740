"""Confidence intervals for the experiments' rates (hack rate, blackmail rate, ...): :func:`wilson_interval`.
Correlation is :func:`emokern.util.stats.pearson`."""

from __future__ import annotations

import math
from typing import Tuple

__all__ = ["wilson_interval"]


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> Tuple[float, float]:
    """The Wilson score interval for ``k`` successes in ``n`` trials, 95% with the default ``z`` (the normal
    quantile), clipped to [0, 1]; ``(0, 1)`` when ``n == 0``."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
