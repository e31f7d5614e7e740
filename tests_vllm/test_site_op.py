"""The in-graph site op against the reference op, without an engine: projections of the residual stream h + r,
steering of that sum written back into h at steered rows only, unsteered rows untouched bit for bit."""

import math

import pytest
import torch

from emokern.ops import SteeringTable, project_and_steer_ref
from emokern.engines.vllm import worker


def _case(N=7, d=64, K=5, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g).to(dtype)
    r = (4 * torch.randn(N, d, generator=g)).to(dtype)
    V = torch.randn(K, d, generator=g)
    V = (V / V.norm(dim=1, keepdim=True)).to(dtype)
    table = SteeringTable(R=3, K=K).add(0, k=1, c=2.5).ablate(1, k=[0, 3]).clamp(2, k=2, lo=-0.5, hi=0.25)
    row = torch.tensor([0, -1, 1, 2, -1, 1, 0] + [-1] * (N - 7), dtype=torch.int32)
    return h, r, V, row, table


@pytest.mark.parametrize("mode_rows", [[0], [1], [2], [0, 1, 2]])
def test_matches_reference(mode_rows):
    h, r, V, row, table = _case()
    row = torch.where(torch.isin(row, torch.tensor(mode_rows, dtype=torch.int32)), row, -1)
    s = h + r  # what the engine's next layer sees as its residual stream
    want_s, want_P = project_and_steer_ref(s, V, row, *table, upcast=torch.float64)
    worker._STEP_FLAGS["monitor"], worker._STEP_FLAGS["steer"] = True, [True]
    h_out, P = h.clone(), torch.full((16, V.shape[0]), math.nan)
    torch.ops.emokern_vllm.residual_site_(h_out, r, V, torch.cat([row, torch.full((9,), -1, dtype=torch.int32)]),
                                          *table, P, 0)
    torch.testing.assert_close(P[:7], want_P, rtol=1e-5, atol=1e-3)  # fp32 accumulation vs fp64
    assert torch.isnan(P[7:]).all()  # rows past N untouched
    steered = row >= 0
    assert torch.equal(h_out[~steered], h[~steered])  # never written
    # steered rows: (s' - r) + r is the steered residual stream, to bf16 rounding of the two additions
    got_s = (h_out.float() + r.float())[steered]
    tol = 2 * torch.finfo(torch.bfloat16).eps * s.float().abs().max()
    assert (got_s - want_s.float()[steered]).abs().max() <= tol


def test_projection_only_when_nothing_steered():
    h, r, V, row, table = _case()
    worker._STEP_FLAGS["monitor"], worker._STEP_FLAGS["steer"] = True, [False]
    h_out, P = h.clone(), torch.zeros(7, V.shape[0])
    torch.ops.emokern_vllm.residual_site_(h_out, r, V, row, *table, P, 0)
    assert torch.equal(h_out, h)
    torch.testing.assert_close(P, project_and_steer_ref(h + r, V)[1], rtol=1e-5, atol=1e-3)


def test_buffer_too_small_is_refused():
    h, r, V, row, table = _case()
    with pytest.raises(RuntimeError, match="exceeds the buffers"):
        torch.ops.emokern_vllm.residual_site_(h, r, V, row, *table, torch.zeros(3, V.shape[0]), 0)


@pytest.mark.parametrize("with_residual", [True, False])
def test_overflowing_row_is_left_unsteered_and_reported(with_residual):
    """A table entry whose result is not finite (only a table built around the spec's bounds can have one) leaves
    its rows as they were and reports them; the other steered rows are steered as usual."""
    h, r, V, row, table = _case()
    a, b, lo, hi = (t.clone() for t in table)
    a[1, 2] = math.inf  # table slot 1 (token rows 2 and 5) sets vector 2's component to infinity
    r = r if with_residual else None
    worker._STEP_FLAGS["monitor"], worker._STEP_FLAGS["steer"], worker._STEP_FLAGS["bad_rows"] = True, [True], []
    h_out, P = h.clone(), torch.zeros(7, V.shape[0])
    torch.ops.emokern_vllm.residual_site_(h_out, r, V, row, a, b, lo, hi, P, 0)
    assert sorted(worker._STEP_FLAGS["bad_rows"]) == [2, 5]
    assert torch.isfinite(h_out).all()
    assert torch.equal(h_out[[2, 5]], h[[2, 5]])  # left as they were
    assert not torch.equal(h_out[[0, 3, 6]], h[[0, 3, 6]])  # the other steered rows were steered
    assert torch.equal(h_out[[1, 4]], h[[1, 4]])
