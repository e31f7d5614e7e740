"""The public fused project-and-steer op: argument checks, backend choice, and autograd.

(About 650 lines on purpose: argument checks, backend choice, autograd and the table type are the op's one public
surface; the kernels and the reference live beside it.)

The semantics are defined once, in :mod:`emokern.ops.reference`. This module validates arguments (errors name
the argument, what was expected and what was given), picks a backend and calls one of the registered ops:

* ``emokern::project`` / ``emokern::project_and_steer_`` — compiled kernels (C++ on CPU, CUDA on GPU), from
  ``emokern._C``;
* ``emokern::project_triton`` / ``emokern::project_and_steer_triton_`` — the Triton kernels
  (:mod:`emokern.ops.triton_kernels`), registered here as custom ops.

Backends: ``"cpu"`` (C++), ``"cuda"`` (hand-written CUDA), ``"triton"``, ``"reference"`` (the spec, in place) and
``"auto"``: CPU tensors use ``"cpu"``; CUDA tensors use ``"cuda"`` for decode-sized inputs (N <= 64) and
``"triton"`` above that, falling back to whichever of the two is available. The keyword ``backend=`` wins over the
environment variable ``EMOKERN_BACKEND`` (read once, at import), which wins over ``"auto"``.
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Iterator, Optional, Sequence, Tuple, Union

import torch

from emokern.ops.extension import HAS_CUDA_KERNELS, require_extension
from emokern.ops.reference import project_and_steer_ref

__all__ = [
    "BACKENDS",
    "project",
    "project_and_steer_",
    "project_and_steer",
    "IDENTITY",
    "STEERING_MODES",
    "SteeringTable",
    "TABLE_NAMES",
    "identity_tables",
    "mode_coefficients",
    "orthonormalize",
    "reset_to_identity",
    "resolve_backend",
]

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")
DECODE_MAX_TOKENS = 64
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_ENV_BACKEND = os.environ.get("EMOKERN_BACKEND", "auto").strip().lower() or "auto"


# --------------------------------------------------------------------------------------------------------------
# Triton kernels as custom ops. The kernel module (and triton itself) is imported on first use only, so that
# `import emokern` stays cheap and never touches CUDA.
# --------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("emokern::project_triton", mutates_args=("P_out",))
def _project_triton(h: torch.Tensor, V: torch.Tensor, P_out: torch.Tensor) -> None:
    from emokern.ops.triton_kernels import project_triton

    project_triton(h, V, P_out)


@_project_triton.register_fake
def _(h, V, P_out):
    return None


@torch.library.custom_op("emokern::project_and_steer_triton_", mutates_args=("h", "P_out"))
def _project_and_steer_triton_(
    h: torch.Tensor,
    V: torch.Tensor,
    row: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    P_out: torch.Tensor,
) -> None:
    from emokern.ops.triton_kernels import project_and_steer_triton_

    project_and_steer_triton_(h, V, row, a, b, lo, hi, P_out)


@_project_and_steer_triton_.register_fake
def _(h, V, row, a, b, lo, hi, P_out):
    return None


# --------------------------------------------------------------------------------------------------------------
# Backend choice
# --------------------------------------------------------------------------------------------------------------
# Read once, at import: torch.compile traces the wrapper below, and environment and module look-ups inside it
# would be graph breaks. find_spec does not import triton, which keeps `import emokern` cheap.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _triton_usable_on(device: torch.device) -> bool:
    if device.type == "cpu" and not _TRITON_INTERPRET:
        return False
    return TRITON_INSTALLED


def resolve_backend(backend: Optional[str], device: torch.device, num_tokens: int) -> str:
    """The concrete backend (``"cpu"``, ``"cuda"``, ``"triton"`` or ``"reference"``) for a call.

    Args:
        backend: ``None`` (use ``EMOKERN_BACKEND`` or ``"auto"``) or one of :data:`BACKENDS`.
        device: device of the hidden states.
        num_tokens: N, the number of token rows (decides between the CUDA and Triton kernels under ``"auto"``).
    """
    choice = (backend or _ENV_BACKEND).lower()
    if choice not in BACKENDS:
        source = "argument 'backend'" if backend else "environment variable EMOKERN_BACKEND"
        raise ValueError(f"{source} must be one of {BACKENDS}; got {choice!r}")
    if choice == "auto":
        if device.type == "cpu":
            return "cpu"
        if device.type != "cuda":
            raise ValueError(f"emokern ops run on CPU or CUDA tensors; got a tensor on {device}")
        has_cuda = HAS_CUDA_KERNELS
        has_triton = _triton_usable_on(device)
        if not has_cuda and not has_triton:
            require_extension()
            raise RuntimeError(
                "no emokern backend can run on CUDA tensors: emokern._C was built without CUDA kernels "
                "(rebuild with EMOKERN_BUILD_CUDA=1) and triton is not installed (pip install triton)"
            )
        if has_cuda and (num_tokens <= DECODE_MAX_TOKENS or not has_triton):
            return "cuda"
        return "triton"
    if choice == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' needs CPU tensors; got tensors on {device}")
    if choice == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend 'cuda' needs CUDA tensors; got tensors on {device}")
        require_extension()
        if not HAS_CUDA_KERNELS:
            raise RuntimeError(
                "backend 'cuda' requested but emokern._C was built without CUDA kernels: rebuild with "
                "EMOKERN_BUILD_CUDA=1 pip install --no-build-isolation -e ."
            )
    if choice == "triton" and not _triton_usable_on(device):
        if device.type == "cpu":
            raise ValueError(
                "backend 'triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 before "
                "importing triton"
            )
        raise RuntimeError("backend 'triton' requested but triton is not installed (pip install triton)")
    return choice


# --------------------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------------------
def _skip_value_checks() -> bool:
    # Value checks read device memory (a host sync): impossible inside CUDA-graph capture, and a graph break under
    # torch.compile. Callers that build their own arguments (the model patch) pass validate=False instead.
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _as_tokens(op: str, h: torch.Tensor) -> torch.Tensor:
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"{op}: argument 'h' must be a torch.Tensor; got {type(h).__name__}")
    if h.dim() < 1:
        raise ValueError(f"{op}: argument 'h' must have shape (..., d); got a 0-d tensor")
    if h.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{op}: argument 'h' must be float32, float16 or bfloat16; got {h.dtype}")
    if h.shape[-1] > 1 and h.stride(-1) != 1:
        raise ValueError(
            f"{op}: argument 'h' must have unit stride in its last dimension (the op works in place and will not "
            f"copy h); got shape {tuple(h.shape)} with strides {h.stride()}"
        )
    try:
        h2 = h.view(-1, h.shape[-1])
    except RuntimeError:
        raise ValueError(
            f"{op}: argument 'h' must be viewable as (N, d) without a copy (the op works in place); got shape "
            f"{tuple(h.shape)} with strides {h.stride()}. Pass a 2-D slice, or make h contiguous first."
        ) from None
    if h2.shape[0] > 1 and h2.shape[1] > 0 and h2.stride(0) < h2.shape[1]:
        raise ValueError(
            f"{op}: the rows of argument 'h' overlap in memory (row stride {h2.stride(0)} < d = {h2.shape[1]}, e.g. "
            f"an expanded tensor); an in-place update would race. Pass a tensor with distinct rows."
        )
    return h2


def _check_vectors(op: str, h2: torch.Tensor, V: torch.Tensor) -> None:
    if not isinstance(V, torch.Tensor):
        raise TypeError(f"{op}: argument 'V' must be a torch.Tensor; got {type(V).__name__}")
    d = h2.shape[1]
    if V.dim() != 2 or V.shape[1] != d:
        raise ValueError(f"{op}: argument 'V' must have shape (K, d) with d = {d} (h.shape[-1]); got {tuple(V.shape)}")
    if V.shape[0] == 0:
        raise ValueError(f"{op}: argument 'V' must hold at least one vector (K >= 1); got shape {tuple(V.shape)}")
    if V.dtype != h2.dtype:
        raise TypeError(f"{op}: argument 'V' must have h's dtype {h2.dtype}; got {V.dtype}")
    if V.device != h2.device:
        raise ValueError(f"{op}: argument 'V' must be on h's device {h2.device}; got {V.device}")


def _check_finite(op: str, name: str, t: torch.Tensor, *, allow_inf: bool = False) -> None:
    bad = torch.isnan(t) if allow_inf else ~torch.isfinite(t)
    if bool(bad.any()):
        count = int(bad.sum())
        what = "NaN" if allow_inf else "NaN or Inf"
        raise ValueError(f"{op}: argument '{name}' must not contain {what}; got {count} such value(s)")


def _prepare_P_out(op: str, h2: torch.Tensor, K: int, P_out: Optional[torch.Tensor]) -> torch.Tensor:
    N = h2.shape[0]
    if P_out is None:
        return torch.empty(N, K, dtype=torch.float32, device=h2.device)
    if not isinstance(P_out, torch.Tensor):
        raise TypeError(f"{op}: argument 'P_out' must be a torch.Tensor or None; got {type(P_out).__name__}")
    if P_out.dtype != torch.float32:
        raise TypeError(f"{op}: argument 'P_out' must be float32; got {P_out.dtype}")
    if P_out.device != h2.device:
        raise ValueError(f"{op}: argument 'P_out' must be on h's device {h2.device}; got {P_out.device}")
    if P_out.dim() < 1 or P_out.shape[-1] != K or P_out.numel() != N * K:
        raise ValueError(f"{op}: argument 'P_out' must have shape (N, K) = ({N}, {K}); got {tuple(P_out.shape)}")
    try:
        return P_out.view(N, K)
    except RuntimeError:
        raise ValueError(
            f"{op}: argument 'P_out' must be viewable as (N, K) = ({N}, {K}) without a copy; got shape "
            f"{tuple(P_out.shape)} with strides {P_out.stride()}"
        ) from None


def _prepare_steering(
    op: str,
    h2: torch.Tensor,
    K: int,
    row: Optional[torch.Tensor],
    tables: Sequence[Optional[torch.Tensor]],
    validate: bool,
) -> Tuple[torch.Tensor, ...]:
    names = ("a", "b", "lo", "hi")
    missing = [n for n, t in zip(names, tables) if t is None]
    if missing:
        raise ValueError(
            f"{op}: steering needs all four tables a, b, lo, hi of shape (R, K); missing {', '.join(missing)} "
            f"(use emokern.ops.SteeringTable to build them, or pass row=None to only project)"
        )
    a = tables[0]
    for name, t in zip(names, tables):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: argument '{name}' must be a torch.Tensor; got {type(t).__name__}")
        if t.dim() != 2 or t.shape[1] != K or t.shape[0] < 1:
            raise ValueError(f"{op}: argument '{name}' must have shape (R, K) with R >= 1, K = {K}; got {tuple(t.shape)}")
        if t.shape != a.shape:
            raise ValueError(f"{op}: argument '{name}' must have the shape of 'a' {tuple(a.shape)}; got {tuple(t.shape)}")
        if t.dtype != torch.float32:
            raise TypeError(f"{op}: argument '{name}' must be float32; got {t.dtype}")
        if t.device != h2.device:
            raise ValueError(f"{op}: argument '{name}' must be on h's device {h2.device}; got {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"{op}: argument '{name}' must be contiguous; got strides {t.stride()}")
    N, R = h2.shape[0], a.shape[0]
    if row is None:
        row = torch.zeros(N, dtype=torch.int32, device=h2.device)
    else:
        if not isinstance(row, torch.Tensor):
            raise TypeError(f"{op}: argument 'row' must be a torch.Tensor or None; got {type(row).__name__}")
        if row.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{op}: argument 'row' must be int32 (or int64, converted); got {row.dtype}")
        if row.numel() != N:
            raise ValueError(f"{op}: argument 'row' must have one entry per token, shape ({N},); got {tuple(row.shape)}")
        if row.device != h2.device:
            raise ValueError(f"{op}: argument 'row' must be on h's device {h2.device}; got {row.device}")
        row = row.reshape(N).to(torch.int32).contiguous()
    lo, hi = tables[2], tables[3]
    if validate and not _skip_value_checks():
        if N:
            mn, mx = int(row.min()), int(row.max())
            if mn < -1 or mx >= R:
                raise ValueError(
                    f"{op}: argument 'row' must hold values in [-1, R) = [-1, {R}) (R = rows of the tables); "
                    f"got min {mn}, max {mx}"
                )
        _check_finite(op, "a", a)
        _check_finite(op, "b", tables[1])
        _check_finite(op, "lo", lo, allow_inf=True)
        _check_finite(op, "hi", hi, allow_inf=True)
        bad = lo > hi
        if bool(bad.any()):
            r, k = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"{op}: arguments 'lo' and 'hi' must satisfy lo <= hi; got lo[{r}, {k}] = {float(lo[r, k])} > "
                f"hi[{r}, {k}] = {float(hi[r, k])}"
            )
    return (row,) + tuple(tables)


# --------------------------------------------------------------------------------------------------------------
# Public ops
# --------------------------------------------------------------------------------------------------------------
def project(
    h: torch.Tensor,
    V: torch.Tensor,
    *,
    P_out: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
    validate: bool = True,
) -> torch.Tensor:
    """Projections ``P = h @ V.T`` with fp32 accumulation (monitoring). ``h`` is read once and never written.

    Args:
        h: (..., d) hidden states, fp32 / fp16 / bf16, unit stride in the last dimension.
        V: (K, d) vectors in ``h.dtype``.
        P_out: optional (..., K) fp32 buffer viewable as (N, K) (row stride free) that receives P; allocated if
            ``None``.
        backend: see :func:`resolve_backend`.
        validate: check ``V`` for NaN/Inf (one host sync). The model patch validates once and passes ``False``.

    Returns:
        P as a (..., K) fp32 tensor (``P_out`` itself when given).
    """
    op = "project"
    h2 = _as_tokens(op, h)
    _check_vectors(op, h2, V)
    if validate and not _skip_value_checks():
        _check_finite(op, "V", V)
    K = V.shape[0]
    P2 = _prepare_P_out(op, h2, K, P_out)
    which = resolve_backend(backend, h2.device, h2.shape[0])
    V = V.contiguous()
    if which == "reference":
        P2.copy_(project_and_steer_ref(h2, V, upcast=torch.float32)[1])
    elif which == "triton":
        torch.ops.emokern.project_triton(h2, V, P2)
    else:
        require_extension()
        torch.ops.emokern.project(h2, V, P2)
    return P_out if P_out is not None else P2.view(*h.shape[:-1], K)


def project_and_steer_(
    h: torch.Tensor,
    V: torch.Tensor,
    row: Optional[torch.Tensor] = None,
    a: Optional[torch.Tensor] = None,
    b: Optional[torch.Tensor] = None,
    lo: Optional[torch.Tensor] = None,
    hi: Optional[torch.Tensor] = None,
    *,
    P_out: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
    validate: bool = True,
) -> torch.Tensor:
    """Project ``h`` onto ``V`` and steer it, in place, in one pass (semantics: :mod:`emokern.ops.reference`).

    ``P = h @ V.T`` (fp32 accumulation) from the input ``h``; for each token ``n`` with ``row[n] = r >= 0`` and
    each ``k``: ``q = clamp(a[r, k] + b[r, k] * P[n, k], lo[r, k], hi[r, k])``, then
    ``h[n] += sum_k (q - P[n, k]) * V[k]`` (all k at once, fp32, rounded once to ``h.dtype``). Tokens with
    ``row[n] = -1`` are projected and never written.

    Args:
        h: (..., d) hidden states, fp32 / fp16 / bf16, unit stride in the last dimension and viewable as (N, d);
            **modified in place** (only the rows of steered tokens are written).
        V: (K, d) vectors in ``h.dtype``; not assumed orthogonal (see :func:`orthonormalize`).
        row: (N,) or ``h.shape[:-1]`` int32 routing index into the tables, -1 = not steered. int64 is accepted and
            converted (a small copy). ``None`` with tables given steers every token with table row 0; ``None``
            without tables only projects (``h`` is not written at all).
        a, b, lo, hi: (R, K) fp32 tables; ``lo``/``hi`` may be -inf/+inf (no clamp). A :class:`SteeringTable`
            unpacks into these four (``project_and_steer_(h, V, row, *table)``).
        P_out: optional fp32 buffer viewable as (N, K) (row stride free) that receives ``P``.
        backend: see :func:`resolve_backend`.
        validate: check values (row range, NaN/Inf in V and tables, lo <= hi): one host sync. Skipped
            automatically under torch.compile and CUDA-graph capture.

    Returns:
        ``P``, the (..., K) fp32 projections of the input ``h`` (``P_out`` itself when given).

    Raises:
        ValueError / TypeError naming the argument, the expectation and what was given.
        RuntimeError if autograd would need to track the in-place update (use :func:`project_and_steer`).
    """
    op = "project_and_steer_"
    tables = (a, b, lo, hi)
    if row is None and all(t is None for t in tables):
        return project(h, V, P_out=P_out, backend=backend, validate=validate)
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in (h, V, *tables)):
        raise RuntimeError(
            "project_and_steer_: an input requires grad; the in-place op does not record autograd history. Use "
            "emokern.ops.project_and_steer (out of place, differentiable) or run under torch.no_grad()."
        )
    h2 = _as_tokens(op, h)
    _check_vectors(op, h2, V)
    K = V.shape[0]
    row, a, b, lo, hi = _prepare_steering(op, h2, K, row, tables, validate)
    if validate and not _skip_value_checks():
        _check_finite(op, "V", V)
    P2 = _prepare_P_out(op, h2, K, P_out)
    which = resolve_backend(backend, h2.device, h2.shape[0])
    V = V.contiguous()
    if which == "reference":
        h_new, P = project_and_steer_ref(h2, V, row, a, b, lo, hi, upcast=torch.float32)
        P2.copy_(P)
        steered = row >= 0
        h2[steered] = h_new[steered]
    elif which == "triton":
        torch.ops.emokern.project_and_steer_triton_(h2, V, row, a, b, lo, hi, P2)
    else:
        require_extension()
        torch.ops.emokern.project_and_steer_(h2, V, row, a, b, lo, hi, P2)
    return P_out if P_out is not None else P2.view(*h.shape[:-1], K)


class _ProjectAndSteerFn(torch.autograd.Function):
    """Out-of-place project-and-steer with an analytic backward (see :func:`project_and_steer`)."""

    @staticmethod
    def forward(ctx, h2, V, row, a, b, lo, hi, backend):
        if h2.dtype == torch.float64:
            h_out, _ = project_and_steer_ref(h2, V, row, a, b, lo, hi, upcast=torch.float64)
            P = h2 @ V.T  # kept in fp64 so that gradcheck's finite differences are exact
        else:
            h_out = h2.clone()
            P = torch.empty(h2.shape[0], V.shape[0], dtype=torch.float32, device=h2.device)
            with torch.no_grad():
                project_and_steer_(h_out, V, row, a, b, lo, hi, P_out=P, backend=backend, validate=False)
        ctx.save_for_backward(h2, V, row, a, b, lo, hi, P)
        ctx.mark_non_differentiable(row)
        return h_out, P

    @staticmethod
    def backward(ctx, g_h, g_P):
        h2, V, row, a, b, lo, hi, P = ctx.saved_tensors
        work = torch.float64 if h2.dtype == torch.float64 else torch.float32
        hw, Vw, Pw = h2.to(work), V.to(work), P.to(work)
        steered = (row >= 0)[:, None]
        r = row.long().clamp(min=0)
        A, B, LO, HI = (t.to(work)[r] for t in (a, b, lo, hi))
        z = A + B * Pw
        q = torch.minimum(torch.maximum(z, LO), HI)
        delta = torch.where(steered, q - Pw, torch.zeros_like(Pw))
        G = torch.zeros_like(hw) if g_h is None else g_h.to(work)
        g_delta = torch.where(steered, G @ Vw.T, torch.zeros_like(Pw))  # dL/dq on steered tokens
        inside = (z >= LO) & (z <= HI)  # torch.clamp's convention: the bounds pass the gradient through
        g_z = torch.where(inside, g_delta, torch.zeros_like(g_delta))
        g_P_total = g_z * B - g_delta
        if g_P is not None:
            g_P_total = g_P_total + g_P.to(work)
        grads = [None] * 8
        if ctx.needs_input_grad[0]:
            grads[0] = (G + g_P_total @ Vw).to(h2.dtype)
        if ctx.needs_input_grad[1]:
            grads[1] = (delta.T @ G + g_P_total.T @ hw).to(V.dtype)
        sel = steered[:, 0]
        rs = r[sel]

        def table_grad(values, like):
            out = torch.zeros(like.shape, dtype=work, device=like.device)
            return out.index_add_(0, rs, values[sel]).to(like.dtype)

        if ctx.needs_input_grad[3]:
            grads[3] = table_grad(g_z, a)
        if ctx.needs_input_grad[4]:
            grads[4] = table_grad(g_z * Pw, b)
        if ctx.needs_input_grad[5]:
            grads[5] = table_grad(torch.where(z < LO, g_delta, torch.zeros_like(g_delta)), lo)
        if ctx.needs_input_grad[6]:
            grads[6] = table_grad(torch.where(z > HI, g_delta, torch.zeros_like(g_delta)), hi)
        return tuple(grads)


def project_and_steer(
    h: torch.Tensor,
    V: torch.Tensor,
    row: Optional[torch.Tensor],
    a: torch.Tensor,
    b: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    *,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Differentiable, out-of-place :func:`project_and_steer_` for training code.

    Returns ``(h_out, P)`` with ``h_out`` (..., d) in ``h.dtype`` and ``P`` (..., K) fp32. Gradients flow to
    ``h``, ``V`` and the four tables (``a``, ``b`` through the unclamped entries; ``lo``/``hi`` where the clamp is
    active; torch.clamp's convention at the bounds). ``row`` is not differentiable. fp64 inputs run the reference
    (for ``gradcheck``); other dtypes run the kernels forward and an fp32 PyTorch backward.
    """
    op = "project_and_steer"
    if not isinstance(h, torch.Tensor) or h.dtype != torch.float64:
        h2 = _as_tokens(op, h)
    else:
        h2 = h.reshape(-1, h.shape[-1])
    if V.dim() != 2 or V.shape[-1] != h2.shape[1] or V.dtype != h2.dtype:
        _check_vectors(op, h2, V)
    K = V.shape[0]
    if h2.dtype == torch.float64:
        row_t = torch.zeros(h2.shape[0], dtype=torch.int32, device=h2.device) if row is None else row.reshape(-1)
        tables = (a, b, lo, hi)
    else:
        row_t, *tables = _prepare_steering(op, h2, K, row, (a, b, lo, hi), validate=True)
    h_out, P = _ProjectAndSteerFn.apply(h2, V, row_t, *tables, backend)
    return h_out.view(h.shape), P.view(*h.shape[:-1], K)


# --------------------------------------------------------------------------------------------------------------
# Helpers for building arguments: the steering tables
# --------------------------------------------------------------------------------------------------------------
# The four tables, in the order the op takes them.
TABLE_NAMES = ("a", "b", "lo", "hi")
# The entry that leaves a projection unchanged: q = clamp(0 + 1 * P, -inf, +inf) = P.
IDENTITY = (0.0, 1.0, -math.inf, math.inf)
# The steering modes, each one row of mode_coefficients. emokern.core.steering's spec language uses the same names.
STEERING_MODES = ("add", "ablate", "set", "scale", "clamp")


def mode_coefficients(mode: str, value=None) -> Tuple[float, float, float, float]:
    """The op's table entry ``(a, b, lo, hi)`` for one steering mode, ``q = clamp(a + b * P, lo, hi)``:

    =========  ===========================  =============================
    mode       ``value``                    ``(a, b, lo, hi)``
    =========  ===========================  =============================
    add        c                            (c, 1, -inf, +inf)
    ablate     unused                       (0, 0, -inf, +inf)
    set        t                            (t, 0, -inf, +inf)
    scale      s                            (0, s, -inf, +inf)
    clamp      (lo, hi)                     (0, 1, lo, hi)
    =========  ===========================  =============================

    ``value`` is taken as given, in the projection's units (the caller scales and validates it: see
    :class:`SteeringTable` and :func:`emokern.core.steering.steer_params`); numbers are returned as ``float``.
    Raises ValueError for a mode not in :data:`STEERING_MODES`.
    """
    if mode == "add":
        return float(value), 1.0, -math.inf, math.inf
    if mode == "ablate":
        return 0.0, 0.0, -math.inf, math.inf
    if mode == "set":
        return float(value), 0.0, -math.inf, math.inf
    if mode == "scale":
        return 0.0, float(value), -math.inf, math.inf
    if mode == "clamp":
        lo, hi = value
        return 0.0, 1.0, float(lo), float(hi)
    raise ValueError(f"mode_coefficients: 'mode' must be one of {STEERING_MODES}; got {mode!r}")


def identity_tables(*shape: int, device: Union[str, torch.device, None] = None) -> Tuple[torch.Tensor, ...]:
    """Four new fp32 tensors ``(a, b, lo, hi)`` of ``shape`` filled with :data:`IDENTITY` (0, 1, -inf, +inf): tables
    that steer nothing. ``shape`` is (R, K) for the op; engines keep more leading dimensions (site, sequence)."""
    return tuple(torch.full(shape, value, dtype=torch.float32, device=device) for value in IDENTITY)


def reset_to_identity(tables: Sequence[torch.Tensor], index) -> None:
    """Write :data:`IDENTITY` into ``tables[i][index]`` for each of the four tables ``(a, b, lo, hi)``, in place."""
    for table, value in zip(tables, IDENTITY):
        table[index] = value


_Index = Union[int, slice, Sequence[int], torch.Tensor]


class SteeringTable:
    """Per-row steering parameters ``a, b, lo, hi`` (R, K) fp32, starting as the identity (no change).

    Each method sets the parameters of rows ``r`` and vectors ``k`` (int, slice, list or index tensor) to the entry
    of :func:`mode_coefficients` and returns ``self`` so calls chain. The table unpacks into the four tensors the op
    takes::

        table = SteeringTable(R=2, K=V.shape[0]).add(0, k=3, c=4.0).ablate(1, k=[0, 5])
        project_and_steer_(h, V, row, *table)
    """

    def __init__(self, R: int, K: int, *, device: Union[str, torch.device, None] = None):
        if R < 1 or K < 1:
            raise ValueError(f"SteeringTable: R and K must be >= 1; got R = {R}, K = {K}")
        self.a, self.b, self.lo, self.hi = identity_tables(R, K, device=device)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.a, self.b, self.lo, self.hi))

    def _set(self, r: _Index, k: _Index, entry: Tuple[float, float, float, float]) -> "SteeringTable":
        a, b, lo, hi = entry
        for name, value in (("a", a), ("b", b)):
            if not math.isfinite(value):
                raise ValueError(f"SteeringTable: '{name}' must be finite; got {value}")
        if math.isnan(lo) or math.isnan(hi) or lo > hi:
            raise ValueError(f"SteeringTable: clamp bounds must satisfy lo <= hi (not NaN); got lo = {lo}, hi = {hi}")
        self.a[r, k], self.b[r, k], self.lo[r, k], self.hi[r, k] = a, b, lo, hi
        return self

    def identity(self, r: _Index = slice(None), k: _Index = slice(None)) -> "SteeringTable":
        """Leave the projections unchanged (a = 0, b = 1, no clamp)."""
        return self._set(r, k, IDENTITY)

    def add(self, r: _Index, k: _Index, c: float) -> "SteeringTable":
        """Add ``c`` to the projection: ``q = P + c`` (for a unit vector, ``h += c * v``)."""
        return self._set(r, k, mode_coefficients("add", c))

    def ablate(self, r: _Index, k: _Index) -> "SteeringTable":
        """Remove the component along the vector: ``q = 0``."""
        return self._set(r, k, mode_coefficients("ablate"))

    def set(self, r: _Index, k: _Index, target: float) -> "SteeringTable":
        """Set the projection to ``target``: ``q = target``."""
        return self._set(r, k, mode_coefficients("set", target))

    def scale(self, r: _Index, k: _Index, s: float) -> "SteeringTable":
        """Scale the projection: ``q = s * P``."""
        return self._set(r, k, mode_coefficients("scale", s))

    def clamp(self, r: _Index, k: _Index, lo: float = -math.inf, hi: float = math.inf) -> "SteeringTable":
        """Clamp the projection into ``[lo, hi]``."""
        return self._set(r, k, mode_coefficients("clamp", (lo, hi)))


def orthonormalize(V: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the span of ``V``'s rows, in order (Gram–Schmidt through a QR in fp64).

    Row ``k`` of the result is the unit component of ``V[k]`` orthogonal to ``V[0..k-1]``, so row 0 keeps its
    direction. With orthonormal vectors the op's per-vector effects are independent: ablating rows i and j leaves
    both projections at exactly zero, which is not true of correlated raw vectors (where the simultaneous update
    from one ``P`` over- or under-shoots). Note that the projection onto basis row ``k > 0`` is no longer the
    projection onto the raw emotion vector ``k``.

    Args:
        V: (K, d) with K <= d and linearly independent rows.

    Returns:
        (K, d) tensor in ``V.dtype`` with orthonormal rows.
    """
    if V.dim() != 2 or V.shape[0] < 1:
        raise ValueError(f"orthonormalize: argument 'V' must have shape (K, d) with K >= 1; got {tuple(V.shape)}")
    K, d = V.shape
    if K > d:
        raise ValueError(f"orthonormalize: argument 'V' has more vectors than dimensions (K = {K} > d = {d})")
    Q, R = torch.linalg.qr(V.to(torch.float64).T)
    diag = torch.diagonal(R)
    scale = V.to(torch.float64).norm(dim=1).clamp(min=torch.finfo(torch.float64).tiny)
    dependent = (diag.abs() / scale) < 1e-10
    if bool(dependent.any()):
        k = int(dependent.nonzero()[0])
        raise ValueError(f"orthonormalize: argument 'V' has linearly dependent rows (row {k} lies in the span of rows 0..{k - 1})")
    Q = Q * torch.sign(diag)[None, :]
    return Q.T.contiguous().to(V.dtype)
