"""Scores from paired comparisons: Bradley–Terry strengths fitted by Newton's method (:func:`fit_bradley_terry`) and
their Elo points (:func:`elo_from_theta`, :func:`soft_and_hard_elo`), as the preferences experiment uses them
(:mod:`emokern.experiments.preferences`: soft outcomes σ(logit diff) give "Elo", win/loss outcomes "Hard Elo")."""

from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch

__all__ = ["BT_PRIOR", "ELO_SCALE", "elo_from_theta", "fit_bradley_terry", "hard_outcome", "sigmoid",
           "soft_and_hard_elo"]

BT_PRIOR = 1e-2
"""Precision of the zero-mean Gaussian prior on Bradley–Terry strengths (sd 10 in θ, about 1,700 Elo points):
negligible next to the data except for an item that wins (or loses) every comparison, whose score it keeps
finite."""
ELO_SCALE = 400.0 / math.log(10.0)  # Elo points per unit of θ: a 400-point gap is 10:1 odds


def fit_bradley_terry(n: int, pairs: Sequence[Tuple[int, int]], outcomes: Sequence[float], *,
                      prior: float = BT_PRIOR, max_steps: int = 300, tol: float = 1e-10) -> torch.Tensor:
    """Bradley–Terry strengths θ (n,) float64, mean 0, maximising
    ``Σ_k [p_k log σ(θ_a − θ_b) + (1 − p_k) log σ(θ_b − θ_a)] − prior/2 · Σ θ²`` over comparisons ``pairs[k] =
    (a, b)`` with outcome ``p_k = outcomes[k]`` ∈ [0, 1] (the probability, or 0/1 indicator, that a beats b).

    Newton's method with step halving (the objective is concave); stops when the largest gradient entry is below
    ``tol`` or after ``max_steps`` steps. ``prior`` 0 is allowed when no activity wins or loses everything.
    """
    if len(pairs) != len(outcomes):
        raise ValueError(f"fit_bradley_terry: {len(pairs)} pairs but {len(outcomes)} outcomes")
    p = torch.as_tensor(list(outcomes), dtype=torch.float64)
    if p.numel() and (p.min() < 0 or p.max() > 1 or torch.isnan(p).any()):
        raise ValueError("fit_bradley_terry: outcomes must lie in [0, 1]")
    idx = torch.as_tensor(list(pairs), dtype=torch.long).reshape(-1, 2)
    a, b = idx[:, 0], idx[:, 1]
    ones = torch.ones(n, n, dtype=torch.float64) / n  # fixes the free common shift when prior is 0

    def objective(theta):
        z = theta[a] - theta[b]
        return float((p * torch.nn.functional.logsigmoid(z) + (1 - p) * torch.nn.functional.logsigmoid(-z)).sum()
                     - prior / 2 * (theta * theta).sum())

    theta = torch.zeros(n, dtype=torch.float64)
    value = objective(theta)
    for _ in range(max_steps):
        s = torch.sigmoid(theta[a] - theta[b])
        r = p - s
        grad = torch.zeros(n, dtype=torch.float64).index_add_(0, a, r).index_add_(0, b, -r) - prior * theta
        if float(grad.abs().max()) < tol:
            break
        w = s * (1 - s)
        H = torch.zeros(n, n, dtype=torch.float64)
        H.index_put_((a, a), w, accumulate=True)
        H.index_put_((b, b), w, accumulate=True)
        H.index_put_((a, b), -w, accumulate=True)
        H.index_put_((b, a), -w, accumulate=True)
        step = torch.linalg.solve(H + prior * torch.eye(n, dtype=torch.float64) + ones, grad)
        t = 1.0
        while t > 1e-8:
            candidate = theta + t * step
            new = objective(candidate)
            if new >= value:
                theta, value = candidate, new
                break
            t /= 2
        else:
            break
    return theta - theta.mean()


def elo_from_theta(theta: torch.Tensor) -> List[float]:
    """Elo points: ``1500 + 400/ln 10 · (θ − mean θ)``."""
    return (1500.0 + ELO_SCALE * (theta - theta.mean())).tolist()


def hard_outcome(diff: float) -> float:
    """The paper's "Hard Elo" outcome of a logit diff: 1 if positive, 0 if negative, ½ if zero."""
    return 1.0 if diff > 0 else 0.0 if diff < 0 else 0.5


def sigmoid(x: float) -> float:
    """σ(x) = 1 / (1 + e^−x) of a Python float, without overflow for large |x|."""
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def soft_and_hard_elo(n: int, diffs: Dict[Tuple[int, int], float]) -> Tuple[List[float], List[float]]:
    """(soft Elo, hard Elo) of ``n`` items from ``{(a, b): logit diff}``: Bradley–Terry fits (prior
    :data:`BT_PRIOR`) to the outcomes ``sigmoid(diff)`` and ``hard_outcome(diff)``, as Elo points."""
    pairs = list(diffs)
    soft = fit_bradley_terry(n, pairs, [sigmoid(diffs[k]) for k in pairs])
    hard = fit_bradley_terry(n, pairs, [hard_outcome(diffs[k]) for k in pairs])
    return elo_from_theta(soft), elo_from_theta(hard)
