"""Correlation and unit normalisation, each written once for the whole package."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["pearson", "unit_rows"]


def pearson(x: Sequence[float], y: Sequence[float], *, min_points: int = 3) -> Optional[float]:
    """Pearson's r of two equally long series, computed in float64; ``None`` when there are fewer than
    ``min_points`` points or either series is constant (r is undefined there, not 0)."""
    x = torch.as_tensor(list(x), dtype=torch.float64)
    y = torch.as_tensor(list(y), dtype=torch.float64)
    if x.shape != y.shape:
        raise ValueError(f"pearson: expected two series of one length; got {x.numel()} and {y.numel()} points")
    if x.numel() < min_points or bool((x == x[0]).all()) or bool((y == y[0]).all()):
        return None
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


def unit_rows(v: torch.Tensor, *, eps: float = 1e-12) -> torch.Tensor:
    """``v`` divided by the L2 norm of its last dimension, each norm clamped below at ``eps`` (a zero row stays
    zero instead of becoming NaN). Same dtype and device as ``v``; compute in float64 first where it matters."""
    return v / v.norm(dim=-1, keepdim=True).clamp(min=eps)
