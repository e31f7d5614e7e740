"""The executable specification of the fused project-and-steer op.

Every backend (C++ CPU, Triton, CUDA) is tested against :func:`project_and_steer_ref`. It is written for clarity,
not speed, and computes in a wide dtype (fp64 by default) so that it can serve as the "exact" answer in tolerance
checks.

Semantics
---------
Given hidden states ``h`` (N, d), vectors ``V`` (K, d), a per-token routing index ``row`` (N,) and four per-row
parameter tables ``a``, ``b``, ``lo``, ``hi`` (R, K) in fp32::

    P[n, k] = sum_j h[n, j] * V[k, j]                          # projections of the *input* h, fp32 or wider
    for every token n with row[n] = r >= 0 (a "steered" token):
        q[n, k] = clamp(a[r, k] + b[r, k] * P[n, k], lo[r, k], hi[r, k])
        h[n, :] = h[n, :] + sum_k (q[n, k] - P[n, k]) * V[k, :]   # all k at once, from the same P
    tokens with row[n] = -1 keep h[n, :] bit-for-bit (they are projected, never written).

So for a unit-norm ``v_k`` orthogonal to the others, steering moves the component of ``h`` along ``v_k`` from
``P_k`` to ``q_k``. The parameter patterns:

=========  ==================  ============================  =========================================
mode       a                   b            lo / hi           effect on the k-th projection
=========  ==================  ============================  =========================================
identity   0                   1            -inf / +inf       unchanged (no update)
add        c                   1            -inf / +inf       P + c
ablate     0                   0            -inf / +inf       0
set        t                   0            -inf / +inf       t
scale      0                   s            -inf / +inf       s * P
clamp      0                   1            lo / hi           clamp(P, lo, hi)
=========  ==================  ============================  =========================================

Because all K updates are computed from the same ``P``, non-orthogonal vectors interact: ablating two correlated
vectors at once does not leave both projections at zero. :func:`emokern.ops.orthonormalize` turns a set of
vectors into an orthonormal basis of the same span for users who want each vector's effect to be independent.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["project_and_steer_ref", "project_ref"]


def project_ref(h: torch.Tensor, V: torch.Tensor, *, upcast: torch.dtype = torch.float64) -> torch.Tensor:
    """Projections ``P = h @ V.T`` computed in ``upcast`` precision, returned as fp32.

    Args:
        h: (N, d) hidden states, any float dtype.
        V: (K, d) vectors, any float dtype.
        upcast: dtype of the arithmetic (fp64 for the exact answer, fp32 to mimic fp32 accumulation).

    Returns:
        (N, K) fp32 tensor.
    """
    return (h.to(upcast) @ V.to(upcast).T).to(torch.float32)


def project_and_steer_ref(
    h: torch.Tensor,
    V: torch.Tensor,
    row: Optional[torch.Tensor] = None,
    a: Optional[torch.Tensor] = None,
    b: Optional[torch.Tensor] = None,
    lo: Optional[torch.Tensor] = None,
    hi: Optional[torch.Tensor] = None,
    *,
    upcast: torch.dtype = torch.float64,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Out-of-place reference of ``project_and_steer_``.

    Args:
        h: (N, d) hidden states (fp32 / fp16 / bf16). Not modified.
        V: (K, d) vectors; need not be orthogonal or normalised.
        row: (N,) integer routing index into the tables; -1 means "do not steer this token".
            ``None`` means monitor only (no token is steered).
        a, b, lo, hi: (R, K) fp32 parameter tables (required when ``row`` is given).
        upcast: dtype of every intermediate (fp64 gives the exact answer).

    Returns:
        ``(h_out, P)``: ``h_out`` (N, d) in ``h.dtype`` (rounded once, from ``upcast``), and ``P`` (N, K) fp32, the
        projections of the *input* ``h``.
    """
    hw = h.to(upcast)
    Vw = V.to(upcast)
    P = hw @ Vw.T
    if row is None:
        return h.clone(), P.to(torch.float32)
    row = row.long()
    steered = row >= 0
    r = row.clamp(min=0)
    q = (a.to(upcast)[r] + b.to(upcast)[r] * P).clamp(lo.to(upcast)[r], hi.to(upcast)[r])
    delta = torch.where(steered[:, None], q - P, torch.zeros_like(P))
    h_new = (hw + delta @ Vw).to(h.dtype)
    h_out = torch.where(steered[:, None], h_new, h)
    return h_out, P.to(torch.float32)
