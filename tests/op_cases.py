"""Random inputs for the project-and-steer op and the tolerance rule every backend is held to.

Tolerance (flash-attention's rule): a backend's max error against the fp64 reference must be at most twice the max
error of plain PyTorch at the same precision, plus a small per-dtype absolute tolerance scaled by magnitude.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from emokern.ops.reference import project_and_steer_ref
from emokern.ops.api import identity_tables, reset_to_identity

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
MODES = ("add", "ablate", "set", "scale", "clamp", "identity")


@dataclass
class OpCase:
    h: torch.Tensor  # (N, d); a column slice of a wider tensor when strided
    V: torch.Tensor  # (K, d)
    row: Optional[torch.Tensor]  # (N,) int32 or None (monitor only)
    a: Optional[torch.Tensor]
    b: Optional[torch.Tensor]
    lo: Optional[torch.Tensor]
    hi: Optional[torch.Tensor]

    @property
    def tables(self):
        return (self.a, self.b, self.lo, self.hi)


def make_case(N, d, K, dtype, *, seed=0, R=3, strided=False, monitor_only=False, modes=MODES,
              unsteered_fraction=0.3, active=None, device="cpu") -> OpCase:
    """Hidden states with a realistic spread, non-orthogonal vectors (a shared component) and mixed modes.

    ``active``: when given, only that many vectors (chosen at random) get a mode; the other columns of the tables
    are the identity, as when the patch monitors all K vectors and steers a few in one call (the CPU kernel then
    updates h from those vectors only).
    """
    g = torch.Generator().manual_seed(seed)
    width = d + 5 if strided else d
    big = (torch.randn(N, width, generator=g) * 2.0).to(dtype)
    h = big[:, :d] if strided else big
    shared = torch.randn(1, d, generator=g)
    V = torch.randn(K, d, generator=g) + 0.5 * shared
    V = (V / V.norm(dim=1, keepdim=True)).to(dtype)
    if monitor_only:
        return OpCase(h.to(device), V.to(device), None, None, None, None, None)
    P_scale = 2.0
    a, b, lo, hi = identity_tables(R, K)
    choice = torch.randint(0, len(modes), (R, K), generator=g)
    for r in range(R):
        for k in range(K):
            mode = modes[int(choice[r, k])]
            x = float(torch.randn(1, generator=g)) * P_scale
            if mode == "add":
                a[r, k] = x
            elif mode == "ablate":
                b[r, k] = 0.0
            elif mode == "set":
                a[r, k], b[r, k] = x, 0.0
            elif mode == "scale":
                b[r, k] = x / P_scale
            elif mode == "clamp":
                lo[r, k], hi[r, k] = -abs(x) - 0.1, abs(x) * 0.5
    if active is not None:
        idle = torch.randperm(K, generator=g)[min(active, K):]
        reset_to_identity((a, b, lo, hi), (slice(None), idle))
    row = torch.randint(0, R, (N,), generator=g, dtype=torch.int32)
    row[torch.rand(N, generator=g) < unsteered_fraction] = -1
    t = lambda x: x.to(device)  # noqa: E731
    return OpCase(t(h), t(V), t(row), t(a), t(b), t(lo), t(hi))


def plain_torch(case: OpCase):
    """The op written with unfused PyTorch at the inputs' precision: the error yardstick."""
    h, V, dtype = case.h, case.V, case.h.dtype
    P = h @ V.T
    if case.row is None:
        return h.clone(), P
    row = case.row.long()
    r = row.clamp(min=0)
    a, b, lo, hi = (t.to(dtype)[r] for t in case.tables)
    q = torch.minimum(torch.maximum(a + b * P, lo), hi)
    delta = torch.where((row >= 0)[:, None], q - P, torch.zeros_like(P))
    return torch.where((row >= 0)[:, None], torch.addmm(h, delta, V), h), P


def assert_matches_reference(case: OpCase, h_in: torch.Tensor, h_out: torch.Tensor, P: torch.Tensor) -> None:
    """h_out / P from a backend against the fp64 reference under the 2x-PyTorch rule; unsteered rows bit-exact."""
    h_in, h_out, P = h_in.cpu(), h_out.cpu(), P.cpu()
    cpu_case = OpCase(h_in, case.V.cpu(), *(None if t is None else t.cpu() for t in (case.row, *case.tables)))
    exact_h, exact_P = _exact(cpu_case, h_in)
    dtype = h_in.dtype
    scale_h = max(1.0, float(exact_h.abs().max())) if exact_h.numel() else 1.0
    scale_P = max(1.0, float(exact_P.abs().max())) if exact_P.numel() else 1.0
    # P is accumulated in fp32 by every backend: compare with fp32-accumulated PyTorch.
    P32 = (h_in.float() @ cpu_case.V.float().T)
    err_P = _maxerr(P, exact_P)
    bound_P = 2 * _maxerr(P32, exact_P) + ATOL[torch.float32] * scale_P * max(1, h_in.shape[1]) ** 0.5
    assert err_P <= bound_P, f"P error {err_P:.3e} exceeds bound {bound_P:.3e} (N, d, K = {tuple(h_in.shape)}, {cpu_case.V.shape[0]}, {dtype})"
    pt_h, _ = plain_torch(cpu_case)
    err_h = _maxerr(h_out, exact_h)
    bound_h = 2 * _maxerr(pt_h, exact_h) + ATOL[dtype] * scale_h
    assert err_h <= bound_h, f"h error {err_h:.3e} exceeds bound {bound_h:.3e} ({tuple(h_in.shape)}, K={cpu_case.V.shape[0]}, {dtype})"
    if cpu_case.row is None:
        assert torch.equal(h_out, h_in), "monitor-only call changed h"
    else:
        untouched = cpu_case.row < 0
        assert torch.equal(h_out[untouched], h_in[untouched]), "an unsteered row of h changed"


def _exact(case: OpCase, h_in: torch.Tensor):
    """The reference run entirely in fp64, so the final rounding to the dtype counts as error for everyone."""
    h64, V64 = h_in.double(), case.V.double()
    exact_h, _ = project_and_steer_ref(h64, V64, case.row, *case.tables)
    return exact_h, h64 @ V64.T


def _maxerr(x: torch.Tensor, exact: torch.Tensor) -> float:
    if x.numel() == 0:
        return 0.0
    return float((x.double() - exact).abs().max())


def require_backend(backend: str, device: str) -> None:
    """Skip the calling test, with the reason, when ``backend`` cannot run on ``device`` here."""
    from emokern.ops import extension
    from emokern.ops.api import TRITON_INSTALLED

    reason = None
    if device == "cuda" and not torch.cuda.is_available():
        reason = "no CUDA device on this machine"
    elif backend == "cpu" and not extension.HAS_CPU_KERNELS:
        reason = f"emokern._C not built: {extension.load_error()}"
    elif backend == "cuda" and not extension.HAS_CUDA_KERNELS:
        reason = "emokern._C was built without CUDA kernels"
    elif backend == "triton" and not TRITON_INSTALLED:
        reason = "triton is not installed"
    if reason:
        pytest.skip(f"{backend} on {device}: {reason}")
