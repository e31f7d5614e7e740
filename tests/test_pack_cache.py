"""The CPU kernel's cache of packed vector matrices (csrc/cpu/pack_cache.h): it is used, and it can never hand a
call the packing of a different or modified V.

Calls with more than 16 tokens take the tiled path, which reads V packed; each test counts hits and misses with
``emokern::pack_cache_stats`` = [entries, bytes, hits, misses, uncacheable].
"""

from __future__ import annotations

import gc

import pytest
import torch

import emokern  # noqa: F401  (loads the ops)
from emokern.ops.extension import HAS_CPU_KERNELS

pytestmark = pytest.mark.skipif(not HAS_CPU_KERNELS, reason="emokern._C with CPU kernels is not built")

N = 40  # above the direct path's 16 tokens


def stats():
    entries, nbytes, hits, misses, uncacheable = torch.ops.emokern.pack_cache_stats()
    return {"entries": entries, "bytes": nbytes, "hits": hits, "misses": misses, "uncacheable": uncacheable}


def project(h, V):
    P = torch.empty(h.shape[0], V.shape[0])
    torch.ops.emokern.project(h, V, P)
    return P


def expected(h, V):
    return (h.double() @ V.double().T).float()


@pytest.fixture(autouse=True)
def empty_cache():
    torch.ops.emokern.clear_pack_cache()
    yield
    torch.ops.emokern.clear_pack_cache()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_second_call_reuses_the_packing(dtype):
    h, V = torch.randn(N, 64).to(dtype), torch.randn(9, 64).to(dtype)
    project(h, V)
    first = stats()
    assert first["misses"] >= 1 and first["entries"] >= 1
    P = project(h, V)
    second = stats()
    assert second["misses"] == first["misses"]
    assert second["hits"] > first["hits"]
    torch.testing.assert_close(P, expected(h, V), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_in_place_writes_invalidate(dtype):
    h = torch.randn(N, 64).to(dtype)
    base = torch.randn(3, 9, 64).to(dtype)
    V = base[1]  # a view: written through the base below
    project(h, V)
    misses = stats()["misses"]
    for write in (lambda: V.mul_(-2), lambda: base.copy_(torch.randn(3, 9, 64)), lambda: V.__setitem__(0, 5.0)):
        write()
        P = project(h, V)
        assert stats()["misses"] > misses, "a write through PyTorch must force a new packing"
        misses = stats()["misses"]
        torch.testing.assert_close(P, expected(h, V), atol=1e-2, rtol=1e-2)
    # Older packings of a modified V are dropped, not kept until evicted.
    assert stats()["entries"] <= 2


def test_a_freed_tensor_is_never_aliased():
    """An entry pins V's storage, so a new tensor cannot take the old address while the old packing is cached:
    whatever the allocator does, each new V gets its own packing."""
    h = torch.randn(N, 32)
    for i in range(20):
        V = torch.full((5, 32), float(i))
        P = project(h, V)
        torch.testing.assert_close(P, expected(h, V), rtol=1e-4, atol=1e-4)
        del V
        gc.collect()
    assert stats()["misses"] >= 20


def test_inference_tensors_are_not_cached():
    h = torch.randn(N, 32)
    with torch.inference_mode():
        V = torch.randn(5, 32)
        P = project(h, V)
        V.mul_(3)  # no version counter to see this: such tensors are packed on every call
        P2 = project(h, V)
    assert stats()["uncacheable"] >= 2 and stats()["entries"] == 0
    torch.testing.assert_close(P2, expected(h, V))
    torch.testing.assert_close(P2, 3 * P, rtol=1e-5, atol=1e-4)


def test_clear_empties_it():
    project(torch.randn(N, 32), torch.randn(5, 32))
    assert stats()["entries"] >= 1 and stats()["bytes"] > 0
    torch.ops.emokern.clear_pack_cache()
    assert stats()["entries"] == 0 and stats()["bytes"] == 0


def test_steering_after_vectors_change_uses_the_new_vectors():
    """The patch rewrites its steering vectors in place when the steered emotions change: the steering GEMM must
    see the new ones."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(N, 48, generator=gen).to(torch.bfloat16)
    V = torch.empty(2, 48, dtype=torch.bfloat16)
    row = torch.zeros(N, dtype=torch.int32)
    a, b = torch.zeros(1, 2), torch.zeros(1, 2)  # ablate both
    lo, hi = torch.full((1, 2), -float("inf")), torch.full((1, 2), float("inf"))
    for _ in range(2):
        V.copy_(torch.linalg.qr(torch.randn(48, 2, generator=gen))[0].T)  # orthonormal: ablation zeroes both
        x = h.clone()
        torch.ops.emokern.project_and_steer_(x, V, row, a, b, lo, hi, torch.empty(N, 2))
        after = project(x, V)
        assert after.abs().max().item() < 0.05 * expected(h, V).abs().max().item()
