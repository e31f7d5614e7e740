"""The reference op is the spec: check each documented mode does what the table in reference.py says."""

import math

import pytest
import torch

from emokern.ops import SteeringTable, orthonormalize
from emokern.ops.reference import project_and_steer_ref, project_ref


def _orthonormal(K, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return orthonormalize(torch.randn(K, d, generator=g, dtype=torch.float64))


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("identity", lambda P: P),
        ("add", lambda P: P + 1.5),
        ("ablate", lambda P: torch.zeros_like(P)),
        ("set", lambda P: torch.full_like(P, -2.0)),
        ("scale", lambda P: 3.0 * P),
        ("clamp", lambda P: P.clamp(-0.25, 0.5)),
    ],
)
def test_modes_move_the_projection_as_documented(mode, expected):
    V = _orthonormal(4, 32)
    h = torch.randn(6, 32, dtype=torch.float64)
    table = SteeringTable(1, 4)
    k = [0, 2]
    {"identity": lambda: table.identity(0, k), "add": lambda: table.add(0, k, 1.5),
     "ablate": lambda: table.ablate(0, k), "set": lambda: table.set(0, k, -2.0),
     "scale": lambda: table.scale(0, k, 3.0), "clamp": lambda: table.clamp(0, k, -0.25, 0.5)}[mode]()
    row = torch.zeros(6, dtype=torch.int32)
    h_out, P = project_and_steer_ref(h, V, row, *table)
    P_after = h_out @ V.T
    torch.testing.assert_close(P_after[:, k], expected(h @ V.T)[:, k])
    torch.testing.assert_close(P_after[:, [1, 3]], (h @ V.T)[:, [1, 3]])  # untouched vectors keep their projection
    torch.testing.assert_close(P, (h @ V.T).float())


def test_unsteered_rows_and_monitor_only_leave_h_alone():
    V = torch.randn(3, 8)
    h = torch.randn(4, 8)
    out, P = project_and_steer_ref(h, V)
    assert torch.equal(out, h) and P.shape == (4, 3)
    row = torch.tensor([-1, 0, -1, 0], dtype=torch.int32)
    out, _ = project_and_steer_ref(h, V, row, *SteeringTable(1, 3).add(0, 0, 5.0))
    assert torch.equal(out[[0, 2]], h[[0, 2]]) and not torch.equal(out[1], h[1])


def test_updates_are_simultaneous_from_the_same_projection():
    # Two correlated unit vectors, both ablated: the simultaneous update does not zero both projections...
    v1 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    v2 = torch.tensor([math.sqrt(0.5), math.sqrt(0.5)], dtype=torch.float64)
    V = torch.stack([v1, v2])
    h = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    table = SteeringTable(1, 2).ablate(0, [0, 1])
    out, _ = project_and_steer_ref(h, V, torch.zeros(1, dtype=torch.int32), *table)
    expected = h - (h @ V.T) @ V
    torch.testing.assert_close(out, expected)
    assert float((out @ V.T).abs().max()) > 0.1
    # ...while an orthonormal basis of the same span does.
    Q = orthonormalize(V)
    out_q, _ = project_and_steer_ref(h, Q, torch.zeros(1, dtype=torch.int32), *table)
    torch.testing.assert_close(out_q @ Q.T, torch.zeros(1, 2, dtype=torch.float64), atol=1e-12, rtol=0)


def test_orthonormalize_keeps_first_direction_and_rejects_dependent_rows():
    V = torch.randn(5, 16, dtype=torch.float64)
    Q = orthonormalize(V)
    torch.testing.assert_close(Q @ Q.T, torch.eye(5, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(Q[0], V[0] / V[0].norm())
    with pytest.raises(ValueError, match="linearly dependent rows"):
        orthonormalize(torch.stack([V[0], V[1], V[0] + V[1]]))
    with pytest.raises(ValueError, match="more vectors than dimensions"):
        orthonormalize(torch.randn(5, 3))


def test_project_ref_accumulates_in_the_requested_precision():
    h = torch.randn(3, 10, dtype=torch.float16)
    V = torch.randn(2, 10, dtype=torch.float16)
    torch.testing.assert_close(project_ref(h, V), (h.double() @ V.double().T).float())


def test_steering_table_rejects_bad_parameters():
    t = SteeringTable(2, 3)
    with pytest.raises(ValueError, match="'a' must be finite"):
        t.add(0, 0, float("nan"))
    with pytest.raises(ValueError, match="lo <= hi"):
        t.clamp(0, 0, 1.0, -1.0)
    with pytest.raises(ValueError, match="R and K must be >= 1"):
        SteeringTable(0, 3)
