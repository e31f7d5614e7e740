"""CUDA-graph capture and replay of the op (CUDA and Triton backends) and of a patched model (GPU only)."""

import pytest
import torch

import emokern
from emokern.ops import project_and_steer_
from emokern.ops.reference import project_and_steer_ref
from tests.op_cases import make_case, require_backend
from emokern.testing.families import tiny_bank, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def _capture(fn):
    """Warm ``fn`` up on a side stream, then capture one call of it in a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("N", [1, 8, 64, 300])
def test_op_replays_with_new_inputs(backend, N):
    require_backend(backend, "cuda")
    case = make_case(N, 4096, 171, torch.bfloat16, seed=N, device="cuda")
    source = case.h.clone()  # the graph reads its input from here
    h = torch.empty_like(source)
    P = torch.empty(N, 171, device="cuda")

    def step():
        h.copy_(source)
        project_and_steer_(h, case.V, case.row, *case.tables, P_out=P, backend=backend, validate=False)

    graph = _capture(step)
    fresh = make_case(N, 4096, 171, torch.bfloat16, seed=N + 1000, device="cuda").h
    source.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    ref_h, ref_P = project_and_steer_ref(fresh.cpu(), case.V.cpu(), case.row.cpu(), *(t.cpu() for t in case.tables))
    torch.testing.assert_close(P.cpu(), ref_P, rtol=2e-2, atol=2e-2 * float(ref_P.abs().max()))
    torch.testing.assert_close(h.cpu().float(), ref_h.float(), rtol=2e-2, atol=2e-2 * float(ref_h.abs().max()))


def test_patched_model_forward_replays_with_new_tokens():
    model = tiny_model("llama").cuda()
    bank = tiny_bank(model)
    handle = emokern.patch(model, bank, batch=2, tokens=16)
    handle.steer({"emotion1": 0.5, "emotion2": -0.5})
    ids = torch.randint(1, 90, (2, 8), device="cuda")
    logits = torch.empty(2, 8, model.config.vocab_size, device="cuda")

    def step():
        with torch.no_grad():
            logits.copy_(model(ids, use_cache=False).logits)

    graph = _capture(step)
    new_ids = torch.randint(1, 90, (2, 8), device="cuda")
    ids.copy_(new_ids)
    graph.replay()
    torch.cuda.synchronize()
    replayed, replayed_P = logits.clone(), handle.state.P.clone()
    with torch.no_grad():
        eager = model(new_ids, use_cache=False).logits
    torch.testing.assert_close(replayed, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(replayed_P, handle.state.P, rtol=1e-4, atol=1e-4, equal_nan=True)
    handle.remove()
