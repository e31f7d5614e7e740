"""Bad input gets a clear error naming the argument, the expectation and what was given."""

import math

import pytest
import torch

from emokern.ops import SteeringTable, project, project_and_steer, project_and_steer_
from tests.op_cases import require_backend


def _args(N=4, d=8, K=3, R=2):
    h = torch.randn(N, d)
    V = torch.randn(K, d)
    row = torch.tensor([0, -1, 1, 0][:N] + [0] * max(0, N - 4), dtype=torch.int32)
    return h, V, row, SteeringTable(R, K).add(0, 0, 1.0)


@pytest.mark.parametrize(
    "mutate, error, pattern",
    [
        (lambda h, V, row, t: (h, torch.randn(3, 9), row, t), ValueError,
         r"argument 'V' must have shape \(K, d\) with d = 8 \(h.shape\[-1\]\); got \(3, 9\)"),
        (lambda h, V, row, t: (h, torch.randn(0, 8), row, t), ValueError, r"K >= 1"),
        (lambda h, V, row, t: (h.double(), V.double(), row, t), TypeError,
         r"argument 'h' must be float32, float16 or bfloat16; got torch.float64"),
        (lambda h, V, row, t: (h, V.half(), row, t), TypeError, r"argument 'V' must have h's dtype torch.float32; got torch.float16"),
        (lambda h, V, row, t: (h, V, row.float(), t), TypeError, r"argument 'row' must be int32"),
        (lambda h, V, row, t: (h, V, row[:3], t), ValueError, r"argument 'row' must have one entry per token, shape \(4,\); got \(3,\)"),
        (lambda h, V, row, t: (h, V, torch.tensor([0, 2, -1, 0], dtype=torch.int32), t), ValueError,
         r"argument 'row' must hold values in \[-1, R\) = \[-1, 2\).*max 2"),
        (lambda h, V, row, t: (h, V, torch.tensor([0, -2, -1, 0], dtype=torch.int32), t), ValueError, r"got min -2"),
        (lambda h, V, row, t: (h, V.index_fill(1, torch.tensor([2]), math.nan), row, t), ValueError,
         r"argument 'V' must not contain NaN or Inf; got 3 such value"),
        (lambda h, V, row, t: (h, V.index_fill(1, torch.tensor([2]), math.inf), row, t), ValueError,
         r"argument 'V' must not contain NaN or Inf"),
        (lambda h, V, row, t: (h.T, V, row, t), ValueError, r"argument 'h' must have unit stride in its last dimension"),
    ],
)
def test_bad_arguments(mutate, error, pattern):
    h, V, row, table = mutate(*_args())
    with pytest.raises(error, match=pattern):
        project_and_steer_(h, V, row, *table, backend="reference")


def test_table_errors():
    h, V, row, table = _args()
    a, b, lo, hi = table
    with pytest.raises(ValueError, match=r"argument 'b' must not contain NaN or Inf"):
        project_and_steer_(h, V, row, a, b.index_fill(0, torch.tensor([1]), math.nan), lo, hi, backend="reference")
    with pytest.raises(ValueError, match=r"argument 'a' must not contain NaN or Inf"):
        project_and_steer_(h, V, row, a.index_fill(0, torch.tensor([1]), math.inf), b, lo, hi, backend="reference")
    with pytest.raises(ValueError, match=r"argument 'lo' must not contain NaN"):
        project_and_steer_(h, V, row, a, b, lo.index_fill(0, torch.tensor([1]), math.nan), hi, backend="reference")
    bad_lo = lo.clone()
    bad_lo[1, 2] = 1.0
    bad_hi = hi.clone()
    bad_hi[1, 2] = 0.5
    with pytest.raises(ValueError, match=r"lo <= hi; got lo\[1, 2\] = 1.0 > hi\[1, 2\] = 0.5"):
        project_and_steer_(h, V, row, a, b, bad_lo, bad_hi, backend="reference")
    with pytest.raises(ValueError, match=r"argument 'hi' must have the shape of 'a' \(2, 3\); got \(1, 3\)"):
        project_and_steer_(h, V, row, a, b, lo, hi[:1], backend="reference")
    with pytest.raises(TypeError, match=r"argument 'a' must be float32; got torch.float64"):
        project_and_steer_(h, V, row, a.double(), b, lo, hi, backend="reference")
    with pytest.raises(ValueError, match=r"missing lo, hi"):
        project_and_steer_(h, V, row, a, b, backend="reference")


def test_P_out_errors():
    h, V, row, table = _args()
    with pytest.raises(ValueError, match=r"argument 'P_out' must have shape \(N, K\) = \(4, 3\); got \(4, 4\)"):
        project(h, V, P_out=torch.empty(4, 4), backend="reference")
    with pytest.raises(TypeError, match=r"argument 'P_out' must be float32; got torch.float16"):
        project(h, V, P_out=torch.empty(4, 3, dtype=torch.float16), backend="reference")


def test_backend_errors(monkeypatch):
    h, V, row, table = _args()
    with pytest.raises(ValueError, match=r"argument 'backend' must be one of .*; got 'tpu'"):
        project(h, V, backend="tpu")
    with pytest.raises(ValueError, match=r"backend 'cuda' needs CUDA tensors"):
        project(h, V, backend="cuda")
    monkeypatch.setattr("emokern.ops.api._TRITON_INTERPRET", False)
    with pytest.raises(ValueError, match=r"TRITON_INTERPRET=1"):
        project(h, V, backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to put a tensor on another device")
def test_device_mismatch():
    h, V, row, table = _args()
    with pytest.raises(ValueError, match=r"argument 'V' must be on h's device"):
        project_and_steer_(h, V.cuda(), row, *table)


def test_device_mismatch_is_reported_before_any_kernel():
    h, V, row, table = _args()
    meta_V = V.to("meta")
    with pytest.raises(ValueError, match=r"argument 'V' must be on h's device cpu; got meta"):
        project_and_steer_(h, meta_V, row, *table, backend="reference")
    with pytest.raises(ValueError, match=r"argument 'row' must be on h's device cpu; got meta"):
        project_and_steer_(h, V, row.to("meta"), *table, backend="reference")


def test_in_place_op_refuses_autograd_inputs():
    h, V, row, table = _args()
    with pytest.raises(RuntimeError, match=r"use.*project_and_steer \(out of place, differentiable\)|Use emokern.ops.project_and_steer"):
        project_and_steer_(h.requires_grad_(), V, row, *table, backend="reference")
    h_out, P = project_and_steer(h, V, row, *table, backend="reference")
    assert h_out.requires_grad


def test_compiled_op_checks_metadata_without_the_python_wrapper():
    require_backend("cpu", "cpu")
    h, V, row, table = _args()
    P = torch.empty(4, 3)
    with pytest.raises(RuntimeError, match=r"argument 'V' must have shape \(K, d\) with d = 8"):
        torch.ops.emokern.project_and_steer_(h, torch.randn(3, 5), row, *table, P)
    with pytest.raises(RuntimeError, match=r"argument 'row' must be int32; got Long"):
        torch.ops.emokern.project_and_steer_(h, V, row.long(), *table, P)
    with pytest.raises(RuntimeError, match=r"argument 'P_out' must be float32"):
        torch.ops.emokern.project(h, V, P.half())
