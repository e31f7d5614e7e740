"""The analytic backward of project_and_steer: gradcheck in fp64, and the kernel path against autograd."""

import math

import pytest
import torch

from emokern.ops import SteeringTable, project_and_steer
from emokern.ops.reference import project_and_steer_ref
from tests.op_cases import require_backend


def _inputs(dtype, N=6, d=5, K=3, R=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g, dtype=torch.float64)
    V = torch.randn(K, d, generator=g, dtype=torch.float64)
    table = SteeringTable(R, K)
    table.add(0, 0, 0.7).scale(0, 1, 1.8).clamp(0, 2, -0.6, 0.4).set(1, 0, -1.2).ablate(1, 1).clamp(1, 2, -0.2, 0.3)
    a, b = table.a + 0.1 * torch.randn(R, K, generator=g), table.b + 0.1 * torch.randn(R, K, generator=g)
    lo, hi = table.lo.clone(), table.hi.clone()
    row = torch.tensor([0, 1, -1, 0, 1, 1] * N, dtype=torch.int32)[:N]
    cast = lambda t: t.to(dtype).requires_grad_()  # noqa: E731
    return cast(h), cast(V), row, cast(a), cast(b), lo.to(dtype), hi.to(dtype)


def test_gradcheck_fp64_all_differentiable_inputs():
    h, V, row, a, b, lo, hi = _inputs(torch.float64)
    # finite bounds must be differentiable too; infinite ones are constants
    lo_f = lo.clone().requires_grad_()
    hi_f = hi.clone().requires_grad_()

    def f(h, V, a, b, lo, hi):
        h_out, P = project_and_steer(h, V, row, a, b, lo, hi)
        return h_out, P

    assert torch.autograd.gradcheck(f, (h, V, a, b, lo_f, hi_f), eps=1e-6, atol=1e-5, check_undefined_grad=False)


def test_clamp_bounds_receive_gradient_only_where_active():
    h, V, row, a, b, lo, hi = _inputs(torch.float64)
    lo.requires_grad_()
    hi.requires_grad_()
    h_out, _ = project_and_steer(h, V, row, a, b, lo, hi)
    h_out.sum().backward()
    unclamped = torch.isinf(lo.detach())
    assert torch.all(lo.grad[unclamped] == 0) and torch.all(hi.grad[unclamped] == 0)
    assert lo.grad.abs().sum() + hi.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_fp32_kernel_forward_with_analytic_backward_matches_autograd_of_reference(backend):
    if backend == "cpu":
        require_backend("cpu", "cpu")
    h64, V64, row, a64, b64, lo, hi = _inputs(torch.float64, N=9, d=17, K=4, R=2, seed=3)
    leaves = [t.detach().float().requires_grad_() for t in (h64, V64, a64, b64)]
    h, V, a, b = leaves
    h_out, P = project_and_steer(h, V, row, a, b, lo.float(), hi.float(), backend=backend)
    w_h, w_P = torch.randn_like(h_out), torch.randn_like(P)
    ((h_out * w_h).sum() + (P * w_P).sum()).backward()
    ref_leaves = [t.detach().double().requires_grad_() for t in (h64, V64, a64, b64)]
    ref_h, ref_P = project_and_steer_ref(ref_leaves[0], ref_leaves[1], row, ref_leaves[2], ref_leaves[3],
                                         lo.double(), hi.double())
    # the reference returns P in fp32; rebuild it in fp64 so its gradient path stays exact
    ref_P = ref_leaves[0] @ ref_leaves[1].T
    ((ref_h * w_h.double()).sum() + (ref_P * w_P.double()).sum()).backward()
    for mine, ref, name in zip(leaves, ref_leaves, "h V a b".split()):
        torch.testing.assert_close(mine.grad.double(), ref.grad, rtol=1e-4, atol=1e-4, msg=f"grad of {name}")
    assert math.isfinite(float(h_out.detach().sum()))
