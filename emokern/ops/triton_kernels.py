"""Triton kernels for ``project`` and ``project_and_steer_`` (semantics: :mod:`emokern.ops.reference`).

Two execution paths:

* **fused** (large N): one program per tile of ``BLOCK_N`` tokens. A first loop over ``d`` computes
  ``P = h @ V.T`` for the tile with ``tl.dot`` (fp32 accumulation) and writes it to ``P_out``; the program then
  computes ``delta = clamp(a + b*P, lo, hi) - P`` for its steered tokens and a second loop over ``d`` applies
  ``h += delta @ V`` and stores only steered rows. ``h`` and ``V`` are read twice, ``P`` never leaves registers
  between the two phases.
* **split** (decode-sized N): ``V`` is the large operand, so the projection is spread over
  ``(K blocks x d splits x N tiles)`` programs that each stream a slab of ``V`` and add their partial ``P`` into
  ``P_out`` with atomics; an update kernel over ``(d chunks x N tiles)`` then re-reads the small ``P``, recomputes
  ``delta`` and updates its columns of ``h``.

K is covered by at most two static power-of-two chunks: ``K_A`` = the largest power of two <= K (at least 16) and
``K_B`` = the next power of two >= the remainder (at least 16; 0 when there is no remainder). K = 171 therefore
costs 128 + 64 = 192 columns instead of 256.

Arguments are assumed validated by the caller (shapes, dtypes, devices, ``row`` in [-1, R)); the kernels still
treat any ``row >= R`` as unsteered so that they never read the tables out of bounds.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["project_and_steer_triton_", "project_triton"]

# N at or below this uses the split path (decode); above it the fused path (prefill).
SPLIT_MAX_N = 64


# ----------------------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _load_v_t(V_ptr, offs_k, offs_d, K, d):
    """(BLOCK_D, KC) tile of V transposed; out-of-range entries are 0 so they add nothing to a dot."""
    mask = (offs_k[None, :] < K) & (offs_d[:, None] < d)
    return tl.load(V_ptr + offs_k[None, :] * d + offs_d[:, None], mask=mask, other=0.0)


@triton.jit
def _load_v(V_ptr, offs_k, offs_d, K, d):
    """(KC, BLOCK_D) tile of V; out-of-range entries are 0 so they add nothing to a dot."""
    mask = (offs_k[:, None] < K) & (offs_d[None, :] < d)
    return tl.load(V_ptr + offs_k[:, None] * d + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _steered_rows(row_ptr, offs_n, N, R):
    """Table row of each token (0 where unsteered, so it is always a safe index) and the steered mask."""
    rows = tl.load(row_ptr + offs_n, mask=offs_n < N, other=-1)
    # row >= R cannot come from a validated caller, but treating it as -1 keeps every table read in bounds.
    steered = (rows >= 0) & (rows < R)
    return tl.where(steered, rows, 0), steered


@triton.jit
def _steer_delta(P, rows, steered, offs_k, K, a_ptr, b_ptr, lo_ptr, hi_ptr):
    """delta = clamp(a[r] + b[r] * P, lo[r], hi[r]) - P for a (BLOCK_N, KC) chunk of P, in fp32.

    Entries of unsteered tokens and of padded k are exactly 0, so they contribute nothing to ``delta @ V`` even
    when P there is inf/NaN.
    """
    mask = steered[:, None] & (offs_k[None, :] < K)
    idx = rows[:, None] * K + offs_k[None, :]
    a = tl.load(a_ptr + idx, mask=mask, other=0.0)
    b = tl.load(b_ptr + idx, mask=mask, other=0.0)
    lo = tl.load(lo_ptr + idx, mask=mask, other=0.0)
    hi = tl.load(hi_ptr + idx, mask=mask, other=0.0)
    q = tl.minimum(tl.maximum(a + b * P, lo), hi)
    return tl.where(mask, q - P, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# Fused path
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _fused_kernel(
    h_ptr, V_ptr, row_ptr, a_ptr, b_ptr, lo_ptr, hi_ptr, P_ptr,
    N, d, K, R, stride_h, stride_p,
    STEER: tl.constexpr, K_A: tl.constexpr, K_B: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    # int64 row offsets: N * stride can exceed 2**31 for long prefills with a large hidden size.
    h_rows = h_ptr + offs_n.to(tl.int64)[:, None] * stride_h
    p_rows = P_ptr + offs_n.to(tl.int64)[:, None] * stride_p
    offs_ka = tl.arange(0, K_A)
    acc_a = tl.zeros((BLOCK_N, K_A), dtype=tl.float32)
    if K_B > 0:
        offs_kb = K_A + tl.arange(0, K_B)
        acc_b = tl.zeros((BLOCK_N, K_B), dtype=tl.float32)

    # Phase 1: P = h @ V.T from the input h, one pass over d for both K chunks.
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(h_rows + offs_d[None, :], mask=mask_n[:, None] & (offs_d[None, :] < d), other=0.0)
        acc_a = tl.dot(x, _load_v_t(V_ptr, offs_ka, offs_d, K, d), acc_a, input_precision=DOT_PRECISION)
        if K_B > 0:
            acc_b = tl.dot(x, _load_v_t(V_ptr, offs_kb, offs_d, K, d), acc_b, input_precision=DOT_PRECISION)
    tl.store(p_rows + offs_ka[None, :], acc_a, mask=mask_n[:, None] & (offs_ka[None, :] < K))
    if K_B > 0:
        tl.store(p_rows + offs_kb[None, :], acc_b, mask=mask_n[:, None] & (offs_kb[None, :] < K))

    if STEER:
        rows, steered = _steered_rows(row_ptr, offs_n, N, R)
        # A tile without steered tokens (monitor-only traffic) skips the second pass over h and V entirely.
        if tl.max(steered.to(tl.int32), axis=0) > 0:
            # delta is rounded to h's dtype so the update dot runs on tensor cores for 16-bit inputs; plain
            # PyTorch at that dtype rounds delta the same way, and the sum is still accumulated in fp32.
            delta_a = _steer_delta(acc_a, rows, steered, offs_ka, K, a_ptr, b_ptr, lo_ptr, hi_ptr)
            delta_a = delta_a.to(h_ptr.dtype.element_ty)
            if K_B > 0:
                delta_b = _steer_delta(acc_b, rows, steered, offs_kb, K, a_ptr, b_ptr, lo_ptr, hi_ptr)
                delta_b = delta_b.to(h_ptr.dtype.element_ty)
            # Phase 2: h += delta @ V, stored only on steered rows (unsteered rows are never written).
            for d0 in range(0, d, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                mask = steered[:, None] & (offs_d[None, :] < d)
                x = tl.load(h_rows + offs_d[None, :], mask=mask, other=0.0)
                upd = tl.dot(delta_a, _load_v(V_ptr, offs_ka, offs_d, K, d), input_precision=DOT_PRECISION)
                if K_B > 0:
                    upd = tl.dot(delta_b, _load_v(V_ptr, offs_kb, offs_d, K, d), upd, input_precision=DOT_PRECISION)
                tl.store(h_rows + offs_d[None, :], (x.to(tl.float32) + upd).to(x.dtype), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Split path
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _split_project_kernel(
    h_ptr, V_ptr, P_ptr,
    N, d, K, stride_h, stride_p, D_PER_SPLIT,
    ATOMIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_n = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    h_rows = h_ptr + offs_n.to(tl.int64)[:, None] * stride_h
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    # D_PER_SPLIT is a multiple of BLOCK_D, so only the global end d needs masking.
    d_start = pid_s * D_PER_SPLIT
    for d0 in range(d_start, tl.minimum(d_start + D_PER_SPLIT, d), BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(h_rows + offs_d[None, :], mask=mask_n[:, None] & (offs_d[None, :] < d), other=0.0)
        acc = tl.dot(x, _load_v_t(V_ptr, offs_k, offs_d, K, d), acc, input_precision=DOT_PRECISION)
    p_ptrs = P_ptr + offs_n.to(tl.int64)[:, None] * stride_p + offs_k[None, :]
    mask = mask_n[:, None] & (offs_k[None, :] < K)
    if ATOMIC:
        # Kernel boundaries order these adds before the update kernel reads P, so relaxed atomics suffice.
        tl.atomic_add(p_ptrs, acc, mask=mask, sem="relaxed")
    else:
        tl.store(p_ptrs, acc, mask=mask)


@triton.jit
def _split_update_kernel(
    h_ptr, V_ptr, row_ptr, a_ptr, b_ptr, lo_ptr, hi_ptr, P_ptr,
    N, d, K, R, stride_h, stride_p,
    K_A: tl.constexpr, K_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_d = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows, steered = _steered_rows(row_ptr, offs_n, N, R)
    if tl.max(steered.to(tl.int32), axis=0) > 0:
        h_rows = h_ptr + offs_n.to(tl.int64)[:, None] * stride_h
        p_rows = P_ptr + offs_n.to(tl.int64)[:, None] * stride_p
        # Every program recomputes delta for all tokens of its tile: P is only (BLOCK_N, K), far cheaper to
        # re-read than a third kernel or a grid-wide barrier.
        offs_ka = tl.arange(0, K_A)
        P_a = tl.load(p_rows + offs_ka[None, :], mask=steered[:, None] & (offs_ka[None, :] < K), other=0.0)
        delta_a = _steer_delta(P_a, rows, steered, offs_ka, K, a_ptr, b_ptr, lo_ptr, hi_ptr)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        # Same rounding of delta as the fused path, so both paths agree on 16-bit inputs.
        upd = tl.dot(delta_a.to(h_ptr.dtype.element_ty), _load_v(V_ptr, offs_ka, offs_d, K, d),
                     input_precision=DOT_PRECISION)
        if K_B > 0:
            offs_kb = K_A + tl.arange(0, K_B)
            P_b = tl.load(p_rows + offs_kb[None, :], mask=steered[:, None] & (offs_kb[None, :] < K), other=0.0)
            delta_b = _steer_delta(P_b, rows, steered, offs_kb, K, a_ptr, b_ptr, lo_ptr, hi_ptr)
            upd = tl.dot(delta_b.to(h_ptr.dtype.element_ty), _load_v(V_ptr, offs_kb, offs_d, K, d), upd,
                         input_precision=DOT_PRECISION)
        mask = steered[:, None] & (offs_d[None, :] < d)
        x = tl.load(h_rows + offs_d[None, :], mask=mask, other=0.0)
        tl.store(h_rows + offs_d[None, :], (x.to(tl.float32) + upd).to(x.dtype), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Host-side heuristics and launchers
# ----------------------------------------------------------------------------------------------------------------


def _k_chunks(K: int) -> Tuple[int, int]:
    """(K_A, K_B): K_A = largest power of two <= K (min 16); K_B covers the rest (min 16, 0 if nothing is left)."""
    k_a = max(16, 1 << (K.bit_length() - 1))
    rest = K - k_a
    k_b = max(16, triton.next_power_of_2(rest)) if rest > 0 else 0
    return k_a, k_b


def _dot_precision(dtype: torch.dtype) -> str:
    # Plain PyTorch fp32 matmul does not use TF32 and our tolerance is relative to it, so fp32 dots must be IEEE.
    # The flag only affects fp32 operands; for 16-bit operands "tf32" is simply Triton's default (tensor cores).
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    # Interpreter (CPU tensors): a small fake SM count still exercises several d splits on test-sized inputs.
    return 4


def _on_device(device: torch.device):
    # Triton launches on the *current* CUDA device and stream, not on the tensors' device.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _select_path(N: int, path: Optional[str]) -> str:
    if path is None:
        return "split" if N <= SPLIT_MAX_N else "fused"
    if path not in ("fused", "split"):
        raise ValueError(f"path must be 'fused', 'split' or None; got {path!r}")
    return path


# All kernels step through d 32 columns at a time: wider steps spilled registers in sm_90 compiles, and at decode
# narrow steps are what gives the split kernels enough programs (d/32 = 128 for d = 4096) to occupy every SM.
BLOCK_D = 32


def _fused_config(N: int, K: int, dtype: torch.dtype) -> dict:
    """Meta-parameters of :func:`_fused_kernel` (no autotuning)."""
    k_a, k_b = _k_chunks(K)
    k_total = k_a + k_b
    # P (BLOCK_N x (K_A + K_B), fp32) and then delta stay in registers across both phases, next to the V tiles'
    # pointers. Sizes chosen from sm_90 compiles (cuobjdump register/stack usage), not from timings: no spills up
    # to K = 64, a small one (136 B/thread at 16-bit, 184 B at fp32) for K = 171, where halving BLOCK_N would
    # remove it but double the re-reads of V (once per tile and phase, from L2). Tiles are never much taller than
    # N (tl.dot needs at least 16 rows).
    block_n = 128 if k_total <= 32 else (64 if k_total <= 192 else 32)
    block_n = min(block_n, max(16, triton.next_power_of_2(N)))
    return dict(
        K_A=k_a,
        K_B=k_b,
        BLOCK_N=block_n,
        BLOCK_D=BLOCK_D,
        DOT_PRECISION=_dot_precision(dtype),
        num_warps=8 if block_n * k_total >= 2048 else 4,
        num_stages=2 if dtype == torch.float32 else 3,
    )


def _split_project_config(N: int, K: int, d: int, dtype: torch.dtype, num_sms: int) -> dict:
    """Meta-parameters of :func:`_split_project_kernel`, plus its grid (``splits``) and ``D_PER_SPLIT``."""
    block_n = min(64, max(16, triton.next_power_of_2(N)))
    block_k = min(64, max(16, triton.next_power_of_2(K)))
    k_blocks = triton.cdiv(K, block_k)
    d_chunks = triton.cdiv(d, BLOCK_D)
    # Aim for about two programs per SM so that V (the bulk of the traffic at decode) streams from every SM.
    splits = min(d_chunks, max(1, triton.cdiv(2 * num_sms, k_blocks)))
    d_per_split = triton.cdiv(d_chunks, splits) * BLOCK_D
    return dict(
        splits=triton.cdiv(d, d_per_split),
        D_PER_SPLIT=d_per_split,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        BLOCK_D=BLOCK_D,
        DOT_PRECISION=_dot_precision(dtype),
        num_warps=4,
        num_stages=3,
    )


def _split_update_config(N: int, K: int, dtype: torch.dtype) -> dict:
    """Meta-parameters of :func:`_split_update_kernel` (no autotuning)."""
    k_a, k_b = _k_chunks(K)
    k_total = k_a + k_b
    # Each program holds delta for a whole token tile (BLOCK_N x (K_A + K_B)). The tile heights are the largest
    # that compiled without spills for sm_90 (the IEEE fp32 dot needs far more registers than the 16-bit MMA); the
    # extra token tiles only re-read V's d-slab from L2.
    if dtype == torch.float32:
        block_n = 32 if k_total <= 32 else 16
    else:
        block_n = 64 if k_total <= 192 else 32
    block_n = min(block_n, max(16, triton.next_power_of_2(N)))
    return dict(
        K_A=k_a,
        K_B=k_b,
        BLOCK_N=block_n,
        BLOCK_D=BLOCK_D,
        DOT_PRECISION=_dot_precision(dtype),
        num_warps=8,
        num_stages=1,
    )


def _launch_fused(h, V, row, a, b, lo, hi, P_out, steer: bool) -> None:
    N, d = h.shape
    K = V.shape[0]
    config = _fused_config(N, K, h.dtype)
    R = a.shape[0] if steer else 0
    grid = (triton.cdiv(N, config["BLOCK_N"]),)
    _fused_kernel[grid](
        h, V, row, a, b, lo, hi, P_out,
        N, d, K, R, h.stride(0), P_out.stride(0),
        STEER=steer, **config,
    )  # fmt: skip


def _launch_split_project(h, V, P_out) -> None:
    N, d = h.shape
    K = V.shape[0]
    config = _split_project_config(N, K, d, h.dtype, _num_sms(h.device))
    splits = config.pop("splits")
    atomic = splits > 1
    if atomic:
        P_out.zero_()
    grid = (triton.cdiv(K, config["BLOCK_K"]), splits, triton.cdiv(N, config["BLOCK_N"]))
    _split_project_kernel[grid](
        h, V, P_out,
        N, d, K, h.stride(0), P_out.stride(0),
        ATOMIC=atomic, **config,
    )  # fmt: skip


def _launch_split_update(h, V, row, a, b, lo, hi, P_out) -> None:
    N, d = h.shape
    K = V.shape[0]
    config = _split_update_config(N, K, h.dtype)
    grid = (triton.cdiv(d, BLOCK_D), triton.cdiv(N, config["BLOCK_N"]))
    _split_update_kernel[grid](
        h, V, row, a, b, lo, hi, P_out,
        N, d, K, a.shape[0], h.stride(0), P_out.stride(0),
        **config,
    )  # fmt: skip


def project_triton(h: torch.Tensor, V: torch.Tensor, P_out: torch.Tensor, *, path: Optional[str] = None) -> None:
    """Write ``P_out = h @ V.T`` (fp32 accumulation). ``h`` is only read.

    Args:
        h: (N, d) fp32 / fp16 / bf16, ``h.stride(1) == 1``, any row stride.
        V: (K, d) contiguous, same dtype and device as ``h``.
        P_out: (N, K) fp32, ``P_out.stride(1) == 1``, any row stride. Overwritten entirely.
        path: ``"fused"``, ``"split"`` or ``None`` (split for N <= 64, fused otherwise).
    """
    path = _select_path(h.shape[0], path)
    if h.shape[0] == 0:
        return
    if h.shape[1] == 0:
        P_out.zero_()
        return
    with _on_device(h.device):
        if path == "fused":
            # The steering tables are never read when STEER is off; h stands in for them as a valid pointer.
            _launch_fused(h, V, h, h, h, h, h, P_out, steer=False)
        else:
            _launch_split_project(h, V, P_out)


def project_and_steer_triton_(
    h: torch.Tensor,
    V: torch.Tensor,
    row: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    P_out: torch.Tensor,
    *,
    path: Optional[str] = None,
) -> None:
    """Project every token on ``V`` and steer the tokens with ``row >= 0``, in place.

    Writes ``P_out = h @ V.T`` (fp32 accumulation, from the input ``h``) for all N tokens; then, for each token n
    with ``0 <= r = row[n] < R``, ``h[n] += sum_k (clamp(a[r,k] + b[r,k]*P[n,k], lo[r,k], hi[r,k]) - P[n,k]) V[k]``
    accumulated in fp32 and rounded once to ``h.dtype``. Rows of unsteered tokens (``row[n] == -1``, or
    ``row[n] >= R``, which a validated caller never passes) are never written.

    Args:
        h: (N, d) fp32 / fp16 / bf16, ``h.stride(1) == 1``, any row stride. Modified in place (steered rows only).
        V: (K, d) contiguous, same dtype and device as ``h``.
        row: (N,) int32 contiguous, values in [-1, R).
        a, b, lo, hi: (R, K) fp32 contiguous; ``lo``/``hi`` may be +-inf.
        P_out: (N, K) fp32, ``P_out.stride(1) == 1``, any row stride. Overwritten entirely.
        path: ``"fused"``, ``"split"`` or ``None`` (split for N <= 64, fused otherwise).

    The split path adds partial projections with atomics when it splits d, so its ``P_out`` (and hence ``h``) can
    differ between runs in the last bits; the fused path is deterministic.
    """
    path = _select_path(h.shape[0], path)
    if h.shape[0] == 0:
        return
    if h.shape[1] == 0:
        # Empty dot products: P = 0 and the update h[n, :] is empty.
        P_out.zero_()
        return
    with _on_device(h.device):
        if path == "fused":
            _launch_fused(h, V, row, a, b, lo, hi, P_out, steer=True)
        else:
            _launch_split_project(h, V, P_out)
            _launch_split_update(h, V, row, a, b, lo, hi, P_out)
