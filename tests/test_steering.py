"""The steering-spec language (:mod:`emokern.core.steering`) and the op layer's table helpers it builds on: mode ->
coefficients, the identity tables, the compile of a request into table entries, and the engines' use of them (the
Hugging Face patch's tables and snapshots, the vLLM spec)."""

import math

import pytest
import torch

import emokern
from emokern.core import steering
from emokern.core.steering import TableEntry, compile_entries, identity_tables, reset_to_identity, steer_params
from emokern.engines.vllm import spec as vllm_spec
from emokern.ops import SteeringTable, project, project_and_steer_
from emokern.ops.api import IDENTITY, mode_coefficients
from emokern.testing.families import VOCAB, tiny_bank, tiny_model

INF = math.inf
NAMES = [f"emotion{i}" for i in range(6)]  # the tiny banks' names


def test_mode_coefficients_per_mode():
    assert mode_coefficients("add", 0.25) == (0.25, 1.0, -INF, INF)
    assert mode_coefficients("ablate") == (0.0, 0.0, -INF, INF)
    assert mode_coefficients("ablate", 7.0) == (0.0, 0.0, -INF, INF)  # the value is unused
    assert mode_coefficients("set", -1.5) == (-1.5, 0.0, -INF, INF)
    assert mode_coefficients("scale", 3) == (0.0, 3.0, -INF, INF)
    assert mode_coefficients("clamp", (-0.5, 2)) == (0.0, 1.0, -0.5, 2.0)
    assert all(type(x) is float for x in mode_coefficients("scale", 3))
    assert IDENTITY == (0.0, 1.0, -INF, INF)
    assert steering.MODES == ("add", "ablate", "set", "scale", "clamp")
    with pytest.raises(ValueError, match="'mode' must be one of"):
        mode_coefficients("boost", 1.0)


def test_steer_params_scales_by_the_unit_except_scale_factors():
    unit = 2.0
    assert steer_params("calm", "add", 0.25, unit) == (0.5, 1.0, -INF, INF)
    assert steer_params("calm", "set", -1.0, unit) == (-2.0, 0.0, -INF, INF)
    assert steer_params("calm", "scale", 3.0, unit) == (0.0, 3.0, -INF, INF)  # unitless
    assert steer_params("calm", "ablate", None, unit) == (0.0, 0.0, -INF, INF)
    assert steer_params("calm", "clamp", (-0.5, 1.0), unit) == (0.0, 1.0, -1.0, 2.0)
    assert steer_params("calm", "clamp", (None, 1.0), unit) == (0.0, 1.0, -INF, 2.0)
    assert steer_params("calm", "clamp", (0.25, None), unit) == (0.0, 1.0, 0.5, INF)


@pytest.mark.parametrize("mode, value, error, match", [
    ("boost", 1.0, ValueError, "'mode' must be one of"),
    ("add", None, ValueError, "needs a strength for 'calm'"),
    ("add", "a lot", TypeError, "strength for 'calm' must be a number"),
    ("set", math.nan, ValueError, "target for 'calm' must be finite"),
    ("scale", INF, ValueError, "scale factor for 'calm' must be finite"),
    ("clamp", 0.5, TypeError, r"needs \(lo, hi\) for 'calm'"),
    ("clamp", (1.0, -1.0), ValueError, "lo <= hi"),
])
def test_steer_params_refuses_bad_modes_and_strengths(mode, value, error, match):
    with pytest.raises(error, match=match):
        steer_params("calm", mode, value, 1.0)


def test_steering_table_methods_write_the_same_coefficients():
    table = SteeringTable(R=5, K=3).add(0, 1, 2.5).ablate(1, [0, 2]).set(2, 0, -0.7).scale(3, 2, 1.5)
    table.clamp(4, 1, lo=-0.5, hi=0.25)
    want = [(0, 1, ("add", 2.5)), (1, 0, ("ablate", None)), (1, 2, ("ablate", None)), (2, 0, ("set", -0.7)),
            (3, 2, ("scale", 1.5)), (4, 1, ("clamp", (-0.5, 0.25)))]
    a, b, lo, hi = table
    steered = set()
    for r, k, (mode, value) in want:
        got = (float(a[r, k]), float(b[r, k]), float(lo[r, k]), float(hi[r, k]))
        assert got == tuple(torch.tensor(mode_coefficients(mode, value)).tolist()), (r, k, mode)
        steered.add((r, k))
    for r in range(5):  # everything else stays the identity
        for k in range(3):
            if (r, k) not in steered:
                assert (float(a[r, k]), float(b[r, k]), float(lo[r, k]), float(hi[r, k])) == IDENTITY
    table.identity(0, 1)
    assert (float(a[0, 1]), float(b[0, 1]), float(lo[0, 1]), float(hi[0, 1])) == IDENTITY


def test_identity_tables_and_reset():
    a, b, lo, hi = identity_tables(2, 3, 4)
    for t, value in zip((a, b, lo, hi), IDENTITY):
        assert t.shape == (2, 3, 4) and t.dtype == torch.float32 and bool((t == value).all())
    a[:, 1] = 5.0
    b[:, 1] = 0.0
    lo[:, 1], hi[:, 1] = -1.0, 1.0
    reset_to_identity((a, b, lo, hi), (slice(None), 1))
    for t, value in zip((a, b, lo, hi), IDENTITY):
        assert bool((t == value).all())


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_table_leaves_h_unchanged_through_the_op(backend, dtype):
    if backend == "cpu" and not _has_cpu_kernels():
        pytest.skip("emokern._C with CPU kernels is not built")
    g = torch.Generator().manual_seed(0)
    h = torch.randn(9, 64, generator=g).to(dtype)
    V = torch.randn(5, 64, generator=g)
    V = (V / V.norm(dim=1, keepdim=True)).to(dtype)
    row = torch.tensor([0, 1, 0, -1, 1, 0, 1, 1, 0], dtype=torch.int32)  # every token steered but one
    h_out, P = h.clone(), torch.empty(9, 5)
    project_and_steer_(h_out, V, row, *identity_tables(2, 5), P_out=P, backend=backend)
    assert torch.equal(h_out, h)  # bit for bit
    assert torch.equal(P, project(h, V, backend=backend))


def _has_cpu_kernels() -> bool:
    from emokern.ops.extension import HAS_CPU_KERNELS

    return HAS_CPU_KERNELS


def test_compile_entries_of_a_multi_emotion_multi_layer_spec_equal_a_hand_built_table():
    index = {name: k for k, name in enumerate(NAMES)}.__getitem__
    norms = [2.0, 3.0, 5.0]  # per site
    items = steering.steer_items({"emotion1": 0.1, "emotion4": -0.2})
    entries = compile_entries(items, "add", index=index, sites=[0, 2], norms=norms)
    assert entries == [TableEntry(0, 1, 0.1 * 2.0, 1.0, -INF, INF), TableEntry(2, 1, 0.1 * 5.0, 1.0, -INF, INF),
                       TableEntry(0, 4, -0.2 * 2.0, 1.0, -INF, INF), TableEntry(2, 4, -0.2 * 5.0, 1.0, -INF, INF)]
    clamp = compile_entries([("emotion2", (None, 0.5))], "clamp", index=index, sites=[1], norms=norms,
                            relative=False)
    assert clamp == [TableEntry(1, 2, 0.0, 1.0, -INF, 0.5)]  # absolute: no unit

    # written into per-site tables, as the engines do, they equal tables built by hand with SteeringTable
    tables = identity_tables(3, len(NAMES))
    for e in entries + clamp:
        for t, value in zip(tables, e[2:]):
            t[e.site, e.k] = value
    by_hand = [SteeringTable(1, len(NAMES)).add(0, [1], 0.2).add(0, 4, -0.4),
               SteeringTable(1, len(NAMES)).clamp(0, 2, hi=0.5),
               SteeringTable(1, len(NAMES)).add(0, 1, 0.5).add(0, 4, -1.0)]
    for site, table in enumerate(by_hand):
        for got, want in zip(tables, table):
            assert torch.equal(got[site], want[0]), site


def test_compile_entries_errors_and_check_hook():
    index = {name: k for k, name in enumerate(NAMES)}.__getitem__
    with pytest.raises(KeyError):
        compile_entries([("nope", 0.1)], "add", index=index, sites=[0], norms=[1.0])
    with pytest.raises(ValueError, match="'mode' must be one of"):
        compile_entries([("emotion0", 0.1)], "boost", index=index, sites=[0], norms=[1.0])
    seen = []

    def check(name, value, entry):
        seen.append((name, value, entry.site))
        if abs(entry.a) > 1.0:
            raise ValueError(f"too strong: {name}")

    assert len(compile_entries([("emotion0", 0.1)], "add", index=index, sites=[0, 1], norms=[1.0, 2.0],
                               check=check)) == 2
    assert seen == [("emotion0", 0.1, 0), ("emotion0", 0.1, 1)]
    with pytest.raises(ValueError, match="too strong: emotion3"):
        compile_entries([("emotion3", 0.8)], "add", index=index, sites=[0, 1], norms=[1.0, 2.0], check=check)


# ---------------------------------------------------------------------------------------------- in the engines
def _patched():
    model = tiny_model("llama")
    bank = tiny_bank(model, norm=2.0)
    return model, bank, emokern.patch(model, bank, layers=[0, 2])


def _tables(handle):
    st = handle.state
    return [t.clone() for t in (st.a, st.b, st.lo, st.hi, st.a_all, st.b_all, st.lo_all, st.hi_all, st.Vs,
                                st.seq_row, st.scope)]


def test_patch_tables_are_the_compiled_entries_and_errors_name_the_problem():
    model, bank, handle = _patched()
    with handle:
        handle.steer({"emotion1": 0.1, "emotion4": 0.2}, layers=[2])
        handle.steer({"emotion4": (-0.05, 0.05)}, mode="clamp", layers=[2])  # the same vectors again:
        handle.steer("emotion1", 0.3, layers=[2])  # the later setting wins
        st = handle.state
        k_full = {"emotion1": 1, "emotion4": 4}
        want = {1: (0.3 * 2.0, 1.0, -INF, INF), 4: (0.0, 1.0, -0.05 * 2.0, 0.05 * 2.0)}
        for name, k in k_full.items():
            got = tuple(float(t[1, 0, k]) for t in (st.a_all, st.b_all, st.lo_all, st.hi_all))  # site 1 = layer 2
            assert got == tuple(torch.tensor(want[k]).tolist()), name
            assert tuple(float(t[0, 0, k]) for t in (st.a_all, st.b_all, st.lo_all, st.hi_all)) == IDENTITY
        with pytest.raises(KeyError, match="emotion1"):  # close matches named
            handle.steer("emotoin1", 0.1)
        with pytest.raises(ValueError, match="'mode' must be one of"):
            handle.steer("emotion1", 0.1, mode="boost")
        with pytest.raises(ValueError, match=r"layers \[1\] are not patched"):
            handle.steer("emotion1", 0.1, layers=[1])


def test_steering_state_restores_the_tables_bit_for_bit():
    model, bank, handle = _patched()
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    with handle:
        handle.steer({"emotion0": 0.2}, sequences=1, scope="generated")
        handle.steer("emotion3", mode="ablate")
        handle.prepare(ids)
        before = _tables(handle)
        with torch.no_grad():
            logits_before = model(ids).logits
        state = handle.steering_state()
        handle.steer({"emotion5": 0.4, "emotion2": -0.1}, mode="set")  # five vectors now: the slots grow
        handle.steer("emotion0", 1.0, sequences=0, scope="prompt")
        assert any(not torch.equal(x, y) for x, y in zip(_tables(handle)[:4], before[:4]))
        assert handle.restore_steering(state) is handle
        after = _tables(handle)
        for x, y in zip(after[:4] + after[9:], before[:4] + before[9:]):  # slot tables: widths may differ
            assert torch.equal(x[..., :y.shape[-1]], y)
        for x, y in zip(after[4:8], before[4:8]):  # full-width tables: identical
            assert torch.equal(x, y)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, logits_before)
        handle.clear_steering()
        handle.restore_steering(state)  # a snapshot can be restored again
        assert all(torch.equal(x, y) for x, y in zip(_tables(handle)[4:8], before[4:8]))
        with pytest.raises(TypeError, match="SteeringState"):
            handle.restore_steering({})
    other_model = tiny_model("llama")
    with emokern.patch(other_model, tiny_bank(other_model), layers=[1]) as other:
        with pytest.raises(ValueError, match="other sites or another bank"):
            other.restore_steering(state)


def test_vllm_spec_compiles_with_the_same_entries_and_refuses_unknown_names():
    model = tiny_model("llama")
    bank = tiny_bank(model, norm=2.0)

    class Loaded:  # what spec.parse reads of the worker's loaded bank
        pass

    loaded = Loaded()
    loaded.bank, loaded.layers, loaded.residual_norm = bank, [0, 2], [2.0, 3.0]
    loaded.neutral_mean, loaded.names = None, list(bank.names)
    spec = vllm_spec.parse({"steer": [{"emotions": {"emotion1": 0.1, "emotion4": -0.2}},
                                      {"emotions": "emotion1", "strength": 0.3, "layers": [2]}]}, loaded)
    items = steering.steer_items({"emotion1": 0.1, "emotion4": -0.2})
    first = compile_entries(items, "add", index=bank.index, sites=[0, 1], norms=loaded.residual_norm)
    # the later item replaces emotion1 at layer 2 (site 1), in place
    want = [first[0], TableEntry(1, 1, 0.3 * 3.0, 1.0, -INF, INF), first[2], first[3]]
    assert spec.entries == want
    for bad, match in [({"emotions": "nope"}, r"\['emotions'\]"), ({"emotions": "emotion1", "mode": "boost"},
                                                                     "'mode' must be one of"),
                       ({"emotions": "emotion1", "layers": [1]}, "installed layers")]:
        with pytest.raises(vllm_spec.SpecError, match=match):
            vllm_spec.parse({"steer": bad}, loaded)
