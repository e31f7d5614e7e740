"""The ops as torch.library custom ops: opcheck, torch.compile without graph breaks or copies of h."""

import pytest
import torch

from emokern.ops import SteeringTable, project, project_and_steer_
from tests.op_cases import make_case, require_backend

OPS = [
    ("cpu", "project"),
    ("cpu", "project_and_steer_"),
    ("triton", "project_triton"),
    ("triton", "project_and_steer_triton_"),
]


def _op_args(name, N=9, d=24, K=5, active=None):
    case = make_case(N, d, K, torch.float32, seed=1, strided=True, active=active)
    P = torch.empty(N, K)
    if name.startswith("project_and_steer"):
        return (case.h, case.V, case.row, *case.tables, P)
    return (case.h, case.V, P)


@pytest.mark.parametrize("backend, name", OPS)
@pytest.mark.parametrize("K, active", [(5, None), (171, 2)], ids=["all-modes", "2-of-171-steered"])
def test_opcheck(backend, name, K, active):
    require_backend(backend, "cpu")
    op = getattr(torch.ops.emokern, name).default
    torch.library.opcheck(op, _op_args(name, K=K, active=active))


def _steer(h, V, row, a, b, lo, hi, P):
    project_and_steer_(h, V, row, a, b, lo, hi, P_out=P, validate=False)
    return P.sum()


@pytest.mark.parametrize("K, active", [(6, None), (171, 2)], ids=["all-modes", "2-of-171-steered"])
def test_compile_fullgraph_matches_eager_and_does_not_copy_h(K, active):
    require_backend("cpu", "cpu")
    from torch._inductor.utils import run_and_get_code

    case = make_case(16, 40, K, torch.float32, seed=4, active=active)
    eager_h = case.h.clone()
    eager_P = torch.empty(16, K)
    _steer(eager_h, case.V, case.row, *case.tables, eager_P)

    h = case.h.clone()
    ptr = h.data_ptr()
    P = torch.empty(16, K)
    compiled = torch.compile(_steer, fullgraph=True, dynamic=False)
    _, codes = run_and_get_code(compiled, h, case.V, case.row, *case.tables, P)
    assert torch.equal(h, eager_h) and torch.equal(P, eager_P)
    assert h.data_ptr() == ptr
    code = "\n".join(codes)
    assert "emokern.project_and_steer_" in code
    assert "copy_" not in code and "clone" not in code, "the compiled graph copies a mutated input:\n" + code


def test_compile_monitor_only_in_a_model_like_function():
    require_backend("cpu", "cpu")
    V = torch.randn(3, 32)
    lin = torch.nn.Linear(32, 32)

    def block(x, P):
        y = lin(x)
        project(y, V, P_out=P, validate=False)
        return torch.relu(y)

    x = torch.randn(4, 32)
    P_eager, P_comp = torch.empty(4, 3), torch.empty(4, 3)
    with torch.no_grad():
        out_eager = block(x, P_eager)
        out_comp = torch.compile(block, fullgraph=True)(x, P_comp)
    torch.testing.assert_close(out_comp, out_eager)
    torch.testing.assert_close(P_comp, P_eager)


def test_compile_with_steering_table_and_dynamic_tokens():
    require_backend("cpu", "cpu")
    V = torch.randn(2, 16)
    table = SteeringTable(1, 2).add(0, 0, 1.0)

    def f(h, row):
        project_and_steer_(h, V, row, *table, validate=False)
        return h * 2

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    for n in (3, 5, 8):
        h = torch.randn(n, 16)
        row = torch.zeros(n, dtype=torch.int32)
        expected = (h + V[0]) * 2
        torch.testing.assert_close(compiled(h.clone(), row), expected, rtol=1e-5, atol=1e-5)
