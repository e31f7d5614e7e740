"""Every backend of project_and_steer_ against the fp64 reference, under the 2x-PyTorch tolerance rule."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from emokern.ops import SteeringTable, project, project_and_steer_
from tests.op_cases import assert_matches_reference, make_case, require_backend

# (backend, device, dtypes, max d): the Triton interpreter is slow and has no bf16 arithmetic on the CPU.
BACKENDS = [
    ("cpu", "cpu", (torch.float32, torch.float16, torch.bfloat16), 4100),
    ("reference", "cpu", (torch.float32, torch.float16, torch.bfloat16), 4100),
    ("triton", "cpu" if not torch.cuda.is_available() else "cuda", None, None),
    ("cuda", "cuda", (torch.float32, torch.float16, torch.bfloat16), 4100),
]
if torch.cuda.is_available():
    BACKENDS[2] = ("triton", "cuda", (torch.float32, torch.float16, torch.bfloat16), 4100)
else:
    BACKENDS[2] = ("triton", "cpu", (torch.float32, torch.float16), 200)

SHAPES = [(1, 123, 1), (2, 576, 8), (7, 4100, 171), (64, 576, 171), (513, 123, 256), (130, 640, 19)]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _run(case, backend, *, use_P_out):
    h = case.h
    h_in = h.clone()
    P_out = None
    if use_P_out:  # a strided buffer: every other row of a wider one, as the model patch uses
        P_out = torch.full((2 * h.shape[0], case.V.shape[0] + 3), float("nan"), device=h.device)[::2, 1:-2]
    P = project_and_steer_(h, case.V, case.row, *(case.tables if case.row is not None else ()), P_out=P_out,
                           backend=backend)
    if use_P_out:
        assert P is P_out
    return h_in, h, P


@pytest.mark.parametrize("backend, device, dtypes, max_d", BACKENDS, ids=[f"{b[0]}-{b[1]}" for b in BACKENDS])
@pytest.mark.parametrize("N, d, K", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("active", [None, 2], ids=["all-modes", "2-steered"])
def test_fixed_shapes(backend, device, dtypes, max_d, N, d, K, dtype, active):
    require_backend(backend, device)
    if dtype not in dtypes:
        pytest.skip(f"{backend} on {device} is not tested in {dtype} here (the Triton interpreter has no bf16)")
    if d > max_d:
        N, d = min(N, 9), max_d  # keep the interpreter's shapes small, still awkward
    case = make_case(N, d, K, dtype, seed=N * 7 + d, strided=(N % 2 == 1), active=active, device=device)
    h_in, h_out, P = _run(case, backend, use_P_out=(K % 2 == 1))
    assert_matches_reference(case, h_in, h_out, P)


@pytest.mark.parametrize("backend, device, dtypes, max_d", BACKENDS, ids=[f"{b[0]}-{b[1]}" for b in BACKENDS])
@settings(max_examples=40)
@given(
    N=st.sampled_from([1, 2, 3, 7, 16, 64, 65, 129]),
    d=st.integers(1, 300),
    K=st.sampled_from([1, 2, 8, 17, 171]),
    dtype_index=st.integers(0, 2),
    strided=st.booleans(),
    monitor_only=st.booleans(),
    unsteered=st.sampled_from([0.0, 0.3, 1.0]),
    active=st.sampled_from([None, 0, 1, 2, 5]),
    seed=st.integers(0, 2**16),
)
def test_property_based(backend, device, dtypes, max_d, N, d, K, dtype_index, strided,
                        monitor_only, unsteered, active, seed):
    require_backend(backend, device)
    dtype = dtypes[dtype_index % len(dtypes)]
    if backend == "triton" and device == "cpu":
        N, d, K = min(N, 65), min(d, 64), min(K, 17)
    case = make_case(N, min(d, max_d), K, dtype, seed=seed, strided=strided, monitor_only=monitor_only,
                     unsteered_fraction=unsteered, active=active, device=device)
    h_in, h_out, P = _run(case, backend, use_P_out=bool(seed % 2))
    assert_matches_reference(case, h_in, h_out, P)


@pytest.mark.parametrize("backend, device", [("cpu", "cpu"), ("reference", "cpu")])
def test_leading_dims_are_flattened_and_P_keeps_them(backend, device):
    require_backend(backend, device)
    h = torch.randn(2, 3, 16)
    V = torch.randn(4, 16)
    table = SteeringTable(1, 4).add(0, 1, 2.0)
    expected = h.clone()
    P = project_and_steer_(h, V, torch.zeros(2, 3, dtype=torch.int64), *table, backend=backend)
    assert P.shape == (2, 3, 4)
    torch.testing.assert_close(h, expected + 2.0 * V[1], rtol=1e-5, atol=1e-5)
    assert project(h, V, backend=backend).shape == (2, 3, 4)


def test_tables_without_row_steer_every_token():
    require_backend("cpu", "cpu")
    h = torch.randn(5, 8)
    V = torch.randn(2, 8)
    expected = h + 0.5 * V[0]
    project_and_steer_(h, V, None, *SteeringTable(1, 2).add(0, 0, 0.5))
    torch.testing.assert_close(h, expected)


def test_monitor_only_never_writes_h():
    require_backend("cpu", "cpu")
    h = torch.randn(33, 70)
    h[0, 0] = -0.0
    before = h.clone()
    version = h._version
    project_and_steer_(h, torch.randn(5, 70))
    assert h._version == version  # the monitor-only path uses the op that does not mutate h
    assert torch.equal(h, before) and torch.signbit(h[0, 0])
