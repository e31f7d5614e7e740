"""Correlation (with its p-value) and unit normalisation, each written once for the whole package. scipy is
imported only by :func:`pearson_p_value`."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["pearson", "pearson_p_value", "unit_rows"]


def pearson(x: Sequence[float], y: Sequence[float], *, min_points: int = 3) -> Optional[float]:
    """Pearson's r of two equally long series, computed in float64 and clipped to [-1, 1]; ``None`` when there
    are fewer than ``min_points`` points or either series is constant (r is undefined there, not 0)."""
    x = torch.as_tensor(list(x), dtype=torch.float64)
    y = torch.as_tensor(list(y), dtype=torch.float64)
    if x.shape != y.shape:
        raise ValueError(f"pearson: expected two series of one length; got {x.numel()} and {y.numel()} points")
    if x.numel() < min_points or bool((x == x[0]).all()) or bool((y == y[0]).all()):
        return None
    x, y = x - x.mean(), y - y.mean()
    r = float((x * y).sum() / (x.norm() * y.norm()))
    return max(-1.0, min(1.0, r))  # rounding can push a perfect correlation a hair past ±1


def pearson_p_value(r: float, n: int) -> float:
    """Two-sided p-value of a Pearson ``r`` over ``n`` >= 3 points, testing for no correlation: the exact
    distribution of r for independent normal series, ``(r + 1) / 2 ~ Beta(n/2 - 1, n/2 - 1)``, as
    :func:`scipy.stats.pearsonr` computes it; ``2 · P(|R| >= |r|)``."""
    from scipy.stats import beta

    if n < 3:
        raise ValueError(f"pearson_p_value: expected n >= 3 points; got {n}")
    shape = n / 2 - 1
    return float(2 * beta.sf(abs(r), shape, shape, loc=-1, scale=2))


def unit_rows(v: torch.Tensor, *, eps: float = 1e-12) -> torch.Tensor:
    """``v`` divided by the L2 norm of its last dimension, each norm clamped below at ``eps`` (a zero row stays
    zero instead of becoming NaN). Same dtype and device as ``v``; compute in float64 first where it matters."""
    return v / v.norm(dim=-1, keepdim=True).clamp(min=eps)
