"""Triton kernels of emokern.ops.triton_kernels against the fp64 reference.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (fp32/fp16 only: the interpreter has no bf16
arithmetic), so shapes stay small. The interpreter flag must be in the environment before any @triton.jit
decorator runs, i.e. before the kernel module is imported.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton", reason="triton is not importable; the Triton kernels cannot be tested")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from emokern.ops import triton_kernels  # noqa: E402
from emokern.ops.reference import project_and_steer_ref  # noqa: E402
from emokern.ops.triton_kernels import (  # noqa: E402
    SPLIT_MAX_N,
    _fused_config,
    _k_chunks,
    _select_path,
    _split_project_config,
    _split_update_config,
    project_and_steer_triton_,
    project_triton,
)

if not torch.cuda.is_available():
    from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

    if not isinstance(triton_kernels._fused_kernel, InterpretedFunction):
        # Another module imported the kernels first, without the flag: they were compiled for a GPU that is absent.
        pytest.fail(
            "emokern.ops.triton_kernels was imported before TRITON_INTERPRET=1 was set and there is no CUDA device; "
            "set TRITON_INTERPRET=1 in the environment (or in a conftest.py) before anything imports it",
            pytrace=False,
        )

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
PATHS = ["fused", "split"]
MODES = ["add", "ablate", "set", "scale", "clamp", "mixed"]
INF = float("inf")

Ns = [1, 2, 7, 64, 130]
Ds = [1, 17, 123, 200]
Ks = [1, 8, 19, 171]
SHAPES = [(n, d, k) for n in Ns for d in Ds for k in Ks]


def _tables(mode, R, K, gen):
    """(a, b, lo, hi), each (R, K) fp32 on DEVICE, with every row following ``mode``.

    ``mixed`` gives row r the r-th mode of add/ablate/set/scale/clamp (cycling), and its last row a per-k mix.
    """

    def one(m, shape):
        rnd = torch.randn(shape, generator=gen)
        zero, one_ = torch.zeros(shape), torch.ones(shape)
        lo, hi = torch.full(shape, -INF), torch.full(shape, INF)
        if m == "add":
            return rnd, one_, lo, hi
        if m == "ablate":
            return zero, zero, lo, hi
        if m == "set":
            return rnd, zero, lo, hi
        if m == "scale":
            return zero, 2 * rnd, lo, hi
        # clamp: narrow finite bounds so that most projections are actually clipped.
        lo = -0.3 * torch.rand(shape, generator=gen)
        return zero, one_, lo, lo + 0.5 * torch.rand(shape, generator=gen)

    if mode != "mixed":
        return tuple(t.to(DEVICE) for t in one(mode, (R, K)))
    rows = [one(MODES[r % 5], (1, K)) for r in range(R - 1)]
    per_k = [one(MODES[k % 5], (1, 1)) for k in range(K)]
    rows.append(tuple(torch.cat([p[i] for p in per_k], dim=1) for i in range(4)))
    return tuple(torch.cat([r[i] for r in rows], dim=0).to(DEVICE) for i in range(4))


def _make_case(N, d, K, dtype, mode="mixed", seed=0, R=6, strided=True, unsteered_frac=0.3):
    """Inputs for one call. h and P_out are strided views into wider buffers whose extra columns hold sentinels."""
    gen = torch.Generator().manual_seed(seed)
    pad = 5 if strided else 0
    h_buf = torch.randn(N, d + pad, generator=gen).to(dtype).to(DEVICE)
    # V rows of norm ~1 keep projections O(1), so fp16 never overflows.
    V = (torch.randn(K, d, generator=gen) / max(d, 1) ** 0.5).to(dtype).to(DEVICE)
    row = torch.randint(0, R, (N,), generator=gen, dtype=torch.int32)
    row[torch.rand(N, generator=gen) < unsteered_frac] = -1
    if N >= 2:
        row[0] = -1
        row[-1] = max(int(row[-1]), 0)
    a, b, lo, hi = _tables(mode, R, K, gen)
    P_buf = torch.full((N, K + (3 if strided else 0)), 12345.0, device=DEVICE)
    return h_buf, h_buf[:, :d], V, row.to(DEVICE), a, b, lo, hi, P_buf, P_buf[:, :K]


def _check(h_in, h_out, V, row, a, b, lo, hi, P_out):
    """Kernel error <= 2x plain-PyTorch-at-h.dtype error + a small magnitude-scaled atol (max norms, vs fp64)."""
    dtype = h_in.dtype
    h64, P64 = project_and_steer_ref(h_in.double(), V.double(), row, a, b, lo, hi)
    h_t, P_t = project_and_steer_ref(h_in, V, row, a, b, lo, hi, upcast=dtype)
    eps = torch.finfo(dtype).eps
    steered = row >= 0

    hd, Vd = h_in.double(), V.double()
    atol_P = 4 * eps * (hd.abs() @ Vd.abs().T).max().item()
    err_P = (P_out.double() - P64.double()).abs().max().item()
    err_P_t = (P_t.double() - P64.double()).abs().max().item()
    assert err_P <= 2 * err_P_t + atol_P, f"P: error {err_P:.3g} vs torch {err_P_t:.3g} (atol {atol_P:.3g})"

    assert torch.equal(h_out[~steered], h_in[~steered]), "unsteered rows of h changed"
    if steered.any():
        # Scale of the intermediate h + sum_k |delta_k| |V_k|, which bounds any fp rounding of the update.
        r = row.clamp(min=0).long()
        P = hd @ Vd.T
        delta = (a.double()[r] + b.double()[r] * P).clamp(lo.double()[r], hi.double()[r]) - P
        scale = (hd.abs() + delta.abs() @ Vd.abs())[steered].max().item()
        atol_h = 4 * eps * scale
        err_h = (h_out[steered].double() - h64[steered]).abs().max().item()
        err_h_t = (h_t[steered].double() - h64[steered]).abs().max().item()
        assert err_h <= 2 * err_h_t + atol_h, f"h: error {err_h:.3g} vs torch {err_h_t:.3g} (atol {atol_h:.3g})"


def _run_and_check(N, d, K, dtype, path, **case_kw):
    h_buf, h, V, row, a, b, lo, hi, P_buf, P_out = _make_case(N, d, K, dtype, **case_kw)
    h_buf_in = h_buf.clone()
    h_in = h_buf_in[:, :d]
    project_and_steer_triton_(h, V, row, a, b, lo, hi, P_out, path=path)
    _check(h_in, h, V, row, a, b, lo, hi, P_out)
    # Padding columns of the strided buffers are outside the op and must not be touched.
    assert torch.equal(h_buf[:, d:], h_buf_in[:, d:])
    assert bool((P_buf[:, K:] == 12345.0).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("N,d,K", SHAPES)
def test_shapes_mixed_modes(N, d, K, path, dtype):
    _run_and_check(N, d, K, dtype, path, seed=N * 1000 + d * 10 + K)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", MODES)
def test_each_mode(mode, path, dtype):
    _run_and_check(70, 40, 19, dtype, path, mode=mode, R=3, seed=7)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", PATHS)
def test_contiguous_and_all_steered(path, dtype):
    _run_and_check(33, 64, 32, dtype, path, strided=False, unsteered_frac=0.0, seed=3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", PATHS)
def test_no_token_steered(path, dtype):
    """All rows -1 (the tile-skip branch): h is bit-identical and P is still written."""
    h_buf, h, V, row, a, b, lo, hi, _, P_out = _make_case(70, 50, 19, dtype, seed=11)
    row.fill_(-1)
    h_in = h.clone()
    project_and_steer_triton_(h, V, row, a, b, lo, hi, P_out, path=path)
    assert torch.equal(h, h_in)
    _check(h_in, h, V, row, a, b, lo, hi, P_out)


@pytest.mark.parametrize("path", PATHS)
def test_row_at_or_beyond_R_is_unsteered(path):
    """A row >= R never comes from a validated caller; the kernels must still not read the tables there."""
    h_buf, h, V, row, a, b, lo, hi, _, P_out = _make_case(9, 30, 8, torch.float32, R=2, seed=5)
    row[:] = torch.tensor([0, 2, 1, 1000, -1, 1, 2, 0, 7], dtype=torch.int32, device=DEVICE)
    h_in = h.clone()
    project_and_steer_triton_(h, V, row, a, b, lo, hi, P_out, path=path)
    beyond = row >= 2
    assert torch.equal(h[beyond], h_in[beyond])
    row_clean = torch.where(beyond, torch.full_like(row, -1), row)
    _check(h_in, h, V, row_clean, a, b, lo, hi, P_out)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("N,d,K", [(1, 17, 171), (7, 1, 8), (130, 123, 19), (64, 200, 1)])
def test_project_only(N, d, K, path, dtype):
    h_buf, h, V, row, a, b, lo, hi, P_buf, P_out = _make_case(N, d, K, dtype, seed=13)
    h_buf_in = h_buf.clone()
    project_triton(h, V, P_out, path=path)
    assert torch.equal(h_buf, h_buf_in)
    assert bool((P_buf[:, K:] == 12345.0).all())
    no_rows = torch.full_like(row, -1)
    _check(h_buf_in[:, :d], h, V, no_rows, a, b, lo, hi, P_out)


@pytest.mark.parametrize("path", PATHS)
def test_empty_dimensions(path):
    # d = 0: P is an empty sum (zeros) and h has nothing to update.
    h = torch.empty(3, 0, device=DEVICE)
    V = torch.empty(4, 0, device=DEVICE)
    row = torch.tensor([0, -1, 0], dtype=torch.int32, device=DEVICE)
    tables = [torch.ones(1, 4, device=DEVICE) for _ in range(4)]
    P_out = torch.full((3, 4), 5.0, device=DEVICE)
    project_and_steer_triton_(h, V, row, *tables, P_out, path=path)
    assert torch.equal(P_out, torch.zeros_like(P_out))
    P_out.fill_(5.0)
    project_triton(h, V, P_out, path=path)
    assert torch.equal(P_out, torch.zeros_like(P_out))
    # N = 0: nothing to do, and nothing may be launched on empty tensors.
    h = torch.empty(0, 8, device=DEVICE)
    V = torch.ones(4, 8, device=DEVICE)
    P_out = torch.empty(0, 4, device=DEVICE)
    project_and_steer_triton_(h, V, row[:0], *tables, P_out, path=path)
    project_triton(h, V, P_out, path=path)


def test_k_chunks():
    assert _k_chunks(171) == (128, 64)
    assert _k_chunks(1) == (16, 0)
    assert _k_chunks(16) == (16, 0)
    assert _k_chunks(17) == (16, 16)
    assert _k_chunks(19) == (16, 16)
    assert _k_chunks(256) == (256, 0)
    assert _k_chunks(300) == (256, 64)


def _is_dot_dim(n):
    return n >= 16 and n & (n - 1) == 0


@pytest.mark.parametrize("K", [1, 8, 19, 64, 171, 256, 300, 512])
@pytest.mark.parametrize("N", [1, 17, 64, 65, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_configs_fit_tl_dot(N, K, dtype):
    """Every block dimension that feeds tl.dot is a power of two >= 16, and token tiles never grow far past N."""
    precision = "ieee" if dtype == torch.float32 else "tf32"
    for c in (_fused_config(N, K, dtype), _split_update_config(N, K, dtype)):
        assert _is_dot_dim(c["K_A"]) and _is_dot_dim(c["BLOCK_N"]) and _is_dot_dim(c["BLOCK_D"]), c
        assert c["K_B"] == 0 or _is_dot_dim(c["K_B"]), c
        assert c["K_A"] + c["K_B"] >= K
        assert c["BLOCK_N"] <= max(16, triton.next_power_of_2(N))
        assert c["DOT_PRECISION"] == precision
    for d in (1, 17, 200, 4096):
        for num_sms in (4, 132):
            c = _split_project_config(N, K, d, dtype, num_sms)
            assert _is_dot_dim(c["BLOCK_N"]) and _is_dot_dim(c["BLOCK_K"]) and _is_dot_dim(c["BLOCK_D"]), c
            # The splits tile [0, d) exactly: aligned to BLOCK_D, none empty, none missing.
            assert c["D_PER_SPLIT"] % c["BLOCK_D"] == 0
            assert (c["splits"] - 1) * c["D_PER_SPLIT"] < d <= c["splits"] * c["D_PER_SPLIT"]


def test_path_selection():
    assert _select_path(1, None) == "split"
    assert _select_path(SPLIT_MAX_N, None) == "split"
    assert _select_path(SPLIT_MAX_N + 1, None) == "fused"
    assert _select_path(1, "fused") == "fused"
    assert _select_path(1000, "split") == "split"
    with pytest.raises(ValueError, match="path"):
        _select_path(8, "tiled")


@settings(max_examples=30, deadline=None)
@given(
    N=st.integers(1, 140),
    d=st.integers(1, 96),
    K=st.integers(1, 200),
    dtype=st.sampled_from(DTYPES),
    path=st.sampled_from(PATHS + [None]),
    mode=st.sampled_from(MODES),
    strided=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_matches_reference(N, d, K, dtype, path, mode, strided, seed):
    _run_and_check(N, d, K, dtype, path, mode=mode, strided=strided, seed=seed)
