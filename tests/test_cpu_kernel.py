"""Checks of the compiled CPU kernels against the fp64 reference.

The tolerance follows the project rule: the kernel's error against the fp64 reference may be at most twice the
error of plain, unfused PyTorch at the input's precision, plus a small absolute term scaled by the magnitude of
the answer. Rows with row == -1 must come back bit for bit, and no byte outside the steered rows of h (or
outside P_out's logical extent) may change.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_ops() -> bool:
    try:
        import emokern._C  # noqa: F401
    except Exception:  # the package's Python side may be mid-edit; the library alone is enough here
        for lib in glob.glob(os.path.join(ROOT, "emokern", "_C*.so")):
            torch.ops.load_library(lib)
            break
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("emokern::project_and_steer_", "CPU")
    except RuntimeError:  # the schema itself is not registered
        return False


def _load_reference():
    # By path, so that this test does not depend on the package's __init__ modules.
    spec = importlib.util.spec_from_file_location("emokern_reference", os.path.join(ROOT, "emokern", "ops", "reference.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.project_and_steer_ref


pytestmark = pytest.mark.skipif(not _load_ops(), reason="emokern._C with CPU kernels is not built")
project_and_steer_ref = _load_reference()

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
INF = float("inf")


def _tables(R, K, gen, steered=None):
    """Every mode of the reference's table, mixed per (row, vector). ``steered``: only that many vectors get a
    mode and the other columns are the identity (the patch's one call that monitors all K and steers a few; the
    kernel then updates h from the vectors with a nonzero delta only)."""
    mode = torch.randint(0, 6, (R, K), generator=gen)
    if steered is not None:
        mode[:, torch.randperm(K, generator=gen)[steered:]] = 5
    c = torch.randn(R, K, generator=gen)
    a, b = torch.zeros(R, K), torch.ones(R, K)
    lo, hi = torch.full((R, K), -INF), torch.full((R, K), INF)
    a[mode == 0] = c[mode == 0]  # add
    b[mode == 1] = 0.0  # ablate
    a[mode == 2], b[mode == 2] = c[mode == 2], 0.0  # set
    b[mode == 3] = 0.5 + c[mode == 3].abs()  # scale
    lo[mode == 4], hi[mode == 4] = -0.3, 0.2  # clamp with finite bounds
    # mode 5: identity
    return a, b, lo, hi


def _plain(h, V, row, a, b, lo, hi):
    """Unfused PyTorch at h's precision: the yardstick of the tolerance."""
    P = h @ V.T
    r = row.long().clamp(min=0)
    q = torch.clamp(a[r] + b[r] * P.float(), lo[r], hi[r])
    delta = ((q - P.float()) * (row >= 0)[:, None]).to(h.dtype)
    return h + delta @ V, P.float()


def _check_close(name, got, ref, plain, dtype):
    got, ref, plain = got.double(), ref.double(), plain.double()
    scale = max(ref.abs().max().item(), 1.0)
    err = (got - ref).abs().max().item()
    bound = 2 * (plain - ref).abs().max().item() + ATOL[dtype] * scale
    assert err <= bound, f"{name}: max |kernel - fp64 ref| = {err:.3g} > bound {bound:.3g}"


def _strided(rows, cols, dtype, gen, pad):
    """A (rows, cols) view with row stride cols + pad, inside a buffer whose spare columns hold sentinels."""
    big = torch.randn(rows, cols + pad, generator=gen).to(dtype)
    if pad:
        big[:, cols:] = -0.0
    return big, big[:, :cols]


def _bits(t):
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32).clone()


SHAPES = [  # (N, d, K): every N in {1, 2, 7, 64, 513}, d in {1, 123, 576, 4100}, K in {1, 8, 171, 256}
    (1, 1, 1),
    (1, 576, 171),  # one token: the row GEMV, all columns in registers
    (1, 4100, 256),  # one token, more columns than registers: the row GEMV in chunks
    (2, 123, 8),
    (7, 576, 171),
    (64, 4100, 256),
    (513, 576, 171),
    (513, 123, 256),
    (64, 1, 171),
    (7, 4100, 8),
    (2, 576, 1),
    (513, 4100, 171),
]


TABLES = {"mixed": None, "2-steered": 2}  # every vector in some mode; two vectors steered, the rest identity


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N,d,K", SHAPES)
@pytest.mark.parametrize("tables", list(TABLES))
def test_project_and_steer_matches_reference(N, d, K, dtype, tables):
    gen = torch.Generator().manual_seed(N * 1000003 + d * 1009 + K)
    R = 5
    big_h, h = _strided(N, d, dtype, gen, pad=3 if N % 2 else 0)
    V = (torch.randn(K, d, generator=gen) / max(d, 1) ** 0.5).to(dtype)
    row = torch.randint(-1, R, (N,), generator=gen, dtype=torch.int32)
    a, b, lo, hi = _tables(R, K, gen, TABLES[tables])
    big_P, P_out = _strided(N, K, torch.float32, gen, pad=5)
    h_in, big_h_bits, big_P_bits = h.clone(), _bits(big_h), _bits(big_P)

    torch.ops.emokern.project_and_steer_(h, V, row, a, b, lo, hi, P_out)

    h_ref, P_ref = project_and_steer_ref(h_in, V, row, a, b, lo, hi)
    h_plain, P_plain = _plain(h_in, V, row, a, b, lo, hi)
    _check_close("P", P_out, P_ref, P_plain, dtype)
    steered = row >= 0
    if steered.any():
        _check_close("h", h[steered], h_ref.to(torch.float64)[steered], h_plain[steered], dtype)
    # Unsteered rows, the spare columns of h's buffer and of P_out's buffer: not one bit changed.
    unsteered = ~steered
    assert torch.equal(_bits(big_h)[unsteered], big_h_bits[unsteered])
    assert torch.equal(_bits(big_h)[:, d:], big_h_bits[:, d:])
    assert torch.equal(_bits(big_P)[:, K:], big_P_bits[:, K:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N,d,K", [shape for shape in SHAPES if shape[0] <= 16])
@pytest.mark.parametrize("tables", list(TABLES))
def test_direct_path_matches_reference(N, d, K, dtype, tables):
    """Inference tensors have no version counter, so their packing is never cached and a few tokens take the
    direct path (which reads V in place) instead of the tiled one."""
    with torch.inference_mode():
        test_project_and_steer_matches_reference(N, d, K, dtype, tables)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N", [1, 16, 40])
@pytest.mark.parametrize("direct", [False, True], ids=["tiled", "direct"])
def test_identity_column_still_propagates_nan(N, dtype, direct):
    """The update skips vectors whose delta is exactly 0, but a non-finite projection on an identity column gives a
    NaN delta (inf - inf), which must still reach the steered row as in the reference."""
    if direct:
        with torch.inference_mode():
            return test_identity_column_still_propagates_nan(N, dtype, False)
    gen = torch.Generator().manual_seed(11)
    d, K = 64, 171
    h = torch.randn(N, d, generator=gen).to(dtype)
    V = (torch.randn(K, d, generator=gen) / d**0.5).to(dtype)
    V[100] = 0.0
    V[100, 3] = 1.0
    h[0, 3] = float("inf")  # P[0, 100] = +inf (and other columns of token 0 may be non-finite too)
    row = torch.zeros(N, dtype=torch.int32)
    row[1::2] = -1
    a, b, lo, hi = _tables(1, K, gen, steered=0)  # all identity ...
    a[0, 7] = 0.5  # ... but one vector: only token 0's row is non-finite
    h_in = h.clone()
    P = torch.empty(N, K)
    torch.ops.emokern.project_and_steer_(h, V, row, a, b, lo, hi, P)
    h_ref, _ = project_and_steer_ref(h_in, V, row, a, b, lo, hi)
    assert torch.isnan(h[0]).all() and torch.isnan(h_ref[0]).all()
    finite = torch.arange(N) > 0
    torch.testing.assert_close(h[finite].double(), h_ref[finite].double(), atol=ATOL[dtype] * 4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_all_zero_deltas_leave_h_and_write_nothing(dtype):
    """Steered tokens whose every delta is 0 (identity tables, or 'add 0'): h keeps its exact bits, -0.0 included."""
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(3, 80, generator=gen).to(dtype)
    h[:, 0] = -0.0
    before = _bits(h)
    V = torch.randn(20, 80, generator=gen).to(dtype)
    a, b, lo, hi = _tables(2, 20, gen, steered=0)
    torch.ops.emokern.project_and_steer_(h, V, torch.tensor([0, 1, 0], dtype=torch.int32), a, b, lo, hi,
                                         torch.empty(3, 20))
    assert torch.equal(_bits(h), before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_few_steered_vectors_never_widen_V(dtype):
    """Steering a few vectors at decode updates h from those rows of V in h's dtype: the K x d fp32 copy of a 16-bit
    V is made only when most of the vectors are steered (pack cache entries: 1, then 2)."""
    torch.ops.emokern.clear_pack_cache()
    gen = torch.Generator().manual_seed(2)
    K, d = 171, 576
    V = torch.randn(K, d, generator=gen).to(dtype)
    h = torch.randn(1, d, generator=gen).to(dtype)
    row = torch.zeros(1, dtype=torch.int32)
    P = torch.empty(1, K)
    torch.ops.emokern.project_and_steer_(h, V, row, *_tables(1, K, gen, steered=2), P)
    entries_few = torch.ops.emokern.pack_cache_stats()[0]
    torch.ops.emokern.project_and_steer_(h, V, row, *_tables(1, K, gen, steered=K), P)
    entries_all = torch.ops.emokern.pack_cache_stats()[0]
    torch.ops.emokern.clear_pack_cache()
    assert (entries_few, entries_all) == (1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N", [9, 96])
@pytest.mark.parametrize("direct", [False, True], ids=["tiled", "direct"])
def test_unsteered_rows_are_never_stored_to(N, dtype, direct):
    """-0.0 and NaN payloads would not survive a load/add/store round trip (-0 + 0 = +0, NaNs get quieted). With
    ``direct``, V is an inference tensor (never cached), so the 9-token case takes the direct path."""
    if direct:
        with torch.inference_mode():
            return test_unsteered_rows_are_never_stored_to(N, dtype, False)
    gen = torch.Generator().manual_seed(7)
    d, K, R = 130, 171, 3
    h = torch.randn(N, d, generator=gen).to(dtype)
    V = (torch.randn(K, d, generator=gen) / d**0.5).to(dtype)
    row = torch.randint(0, R, (N,), generator=gen, dtype=torch.int32)
    row[::3] = -1
    ints = h.view(torch.int16 if h.element_size() == 2 else torch.int32)
    signalling_nan = 0x7D01 if dtype == torch.float16 else (0x7F81 if dtype == torch.bfloat16 else 0x7F800001)
    ints[::3, 0::2] = -(1 << (ints.element_size() * 8 - 1))  # -0.0
    ints[::3, 1] = signalling_nan
    before = ints.clone()
    a, b, lo, hi = _tables(R, K, gen)
    P = torch.empty(N, K)
    torch.ops.emokern.project_and_steer_(h, V, row, a, b, lo, hi, P)
    assert torch.equal(ints[::3], before[::3])
    assert not torch.equal(ints[1::3], before[1::3])  # the steered rows did change


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_project_only(dtype):
    gen = torch.Generator().manual_seed(3)
    big_h, h = _strided(70, 300, dtype, gen, pad=4)
    V = (torch.randn(171, 300, generator=gen) / 300**0.5).to(dtype)
    bits = _bits(big_h)
    big_P, P_out = _strided(70, 171, torch.float32, gen, pad=2)
    torch.ops.emokern.project(h, V, P_out)
    _, P_ref = project_and_steer_ref(h, V)
    _check_close("P", P_out, P_ref, (h @ V.T).float(), dtype)
    assert torch.equal(_bits(big_h), bits)


def test_empty_and_row_errors():
    V = torch.randn(4, 8)
    a = torch.zeros(2, 4)
    torch.ops.emokern.project_and_steer_(torch.empty(0, 8), V, torch.empty(0, dtype=torch.int32), a, a, a, a,
                                         torch.empty(0, 4))
    h = torch.randn(3, 8)
    h0 = h.clone()
    for bad in (2, -2):
        row = torch.tensor([0, bad, -1], dtype=torch.int32)
        with pytest.raises(RuntimeError, match=rf"argument 'row' must hold values in \[-1, R\) = \[-1, 2\).*row\[1\] = {bad}"):
            torch.ops.emokern.project_and_steer_(h, V, row, a, a, a, a, torch.empty(3, 4))
    assert torch.equal(h, h0)


_PORTABLE = """
import torch, sys
sys.path.insert(0, {root!r})
from tests.test_cpu_kernel import test_project_and_steer_matches_reference as t
with torch.backends.mkldnn.flags(enabled={mkldnn}):
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        for shape in [(7, 576, 171), (513, 123, 256), (2, 1, 8)]:
            t(*shape, dt, "mixed")
            t(*shape, dt, "2-steered")
print("ok")
"""


@pytest.mark.parametrize("capability,mkldnn", [("default", True), ("avx2", True), ("avx512", False)])
def test_portable_paths(capability, mkldnn):
    """The scalar row kernels (ATEN_CPU_CAPABILITY=default), the AVX2 ones (chosen on an AVX-512 machine too when
    ATen is capped at avx2) and the fp32 engine for 16-bit h without AMX (oneDNN off). ATen reads the lower-case
    names; an unknown value is ignored with a warning."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    code = _PORTABLE.format(root=ROOT, mkldnn=mkldnn)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
