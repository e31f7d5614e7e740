"""Training through the patch (emokern.patch(..., train=True), emokern.engines.training): gradients against a reference
built from plain forward hooks and the reference op; the no-grad path unchanged; gradient checkpointing,
torch.compile and bf16 autocast; preventative steering restoring what was there."""

import copy
import math

import pytest
import torch

import emokern
from emokern.ops.reference import project_and_steer_ref
from emokern.engines.training import preventative_steering, projection_penalty
from emokern.testing.families import HIDDEN, LAYERS, VOCAB, tiny_model

K = 6
LAYERS_PATCHED = [1, 2]
STEER = 0.5  # of the residual norm 2.0: adds 1.0 along emotion1's unit vector
NORM = 2.0


def _bank(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    vectors = torch.randn(LAYERS, K, HIDDEN, generator=g)
    return emokern.VectorBank.from_tensors(
        vectors, [f"emotion{i}" for i in range(K)], residual_norm=torch.full((LAYERS,), NORM), model=model,
        neutral_mean=torch.randn(LAYERS, K, generator=g) * 0.1, neutral_std=torch.rand(LAYERS, K, generator=g) + 0.5)


def _batch(B=3, T=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    reply = torch.zeros(B, T, dtype=torch.bool)
    reply[:, T // 2:] = True
    return ids, mask, reply


def _unit(bank):
    return bank.vectors / bank.vectors.norm(dim=-1, keepdim=True)


def _reference_loss(model, bank, ids, mask, reply, emotions=("emotion0", "emotion2")):
    """The same loss with plain forward hooks and the reference op: monitor every patched layer's output, steer
    emotion1 by STEER * NORM, penalise the z-scores of ``emotions`` on the reply tokens."""
    unit = _unit(bank)
    recorded = {}
    hooks = []
    for layer in LAYERS_PATCHED:
        def hook(module, args, output, layer=layer):
            h = output[0] if isinstance(output, tuple) else output
            h2 = h.reshape(-1, h.shape[-1])
            V = unit[layer].to(h2.dtype)
            recorded[layer] = (h2.double() @ V.double().T).float().view(*h.shape[:-1], K)
            v1 = V[1:2]
            a = torch.tensor([[STEER * NORM]])
            h_new, _ = project_and_steer_ref(h2, v1, torch.zeros(h2.shape[0], dtype=torch.int32), a,
                                             torch.ones(1, 1), torch.full((1, 1), -math.inf),
                                             torch.full((1, 1), math.inf))
            h_new = h_new.view(h.shape)
            return (h_new,) + tuple(output[1:]) if isinstance(output, tuple) else h_new
        hooks.append(model.model.layers[layer].register_forward_hook(hook))
    try:
        out = model(ids, attention_mask=mask, labels=ids)
    finally:
        for hk in hooks:
            hk.remove()
    ks = [bank.index(e) for e in emotions]
    w = reply.float()
    terms = []
    for layer in LAYERS_PATCHED:
        z = (recorded[layer][..., ks] - bank.neutral_mean[layer, ks]) / bank.neutral_std[layer, ks]
        terms.append((z ** 2 * w[..., None]).sum() / (w.sum() * len(ks)))
    return out.loss, torch.stack(terms).mean()


def _patched_loss(model, handle, ids, mask, reply):
    out = model(ids, attention_mask=mask, labels=ids)
    return out.loss, projection_penalty(handle, ["emotion0", "emotion2"], mask=reply)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradients_through_the_patch_match_plain_hooks_and_the_reference_op():
    model = tiny_model("llama")
    reference = copy.deepcopy(model)
    bank = _bank(model)
    ids, mask, reply = _batch()

    lm_ref, pen_ref = _reference_loss(reference, bank, ids, mask, reply)
    (lm_ref + 0.3 * pen_ref).backward()
    with emokern.patch(model, bank, layers=LAYERS_PATCHED, train=True) as handle:
        handle.steer({"emotion1": STEER})
        lm, pen = _patched_loss(model, handle, ids, mask, reply)
        assert handle.projections(1).requires_grad and handle.projections(1).shape == (3, 8, K)
        (lm + 0.3 * pen).backward()
    torch.testing.assert_close(lm, lm_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pen, pen_ref, rtol=1e-5, atol=1e-6)
    got, want = _grads(model), _grads(reference)
    assert set(got) == set(want) and len(got) > 10
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    # the penalty alone reaches the layers below the patched ones, and not the LM head
    model.zero_grad()
    with emokern.patch(model, bank, layers=LAYERS_PATCHED, train=True) as handle:
        _, pen = _patched_loss(model, handle, ids, mask, reply)
        pen.backward()
    assert model.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
    assert model.lm_head.weight.grad is None or model.lm_head.weight.grad.abs().sum() == 0


def test_no_grad_forward_is_the_inference_path():
    model = tiny_model("llama")
    bank = _bank(model)
    ids, mask, _ = _batch()
    results = []
    for train in (False, True):
        with emokern.patch(model, bank, layers=LAYERS_PATCHED, train=train) as handle:
            handle.steer({"emotion1": STEER})
            with torch.no_grad():
                logits = model(ids, attention_mask=mask).logits
            results.append((logits, handle.state.P.clone()))
            if train:
                with pytest.raises(RuntimeError, match="no forward with grad enabled"):
                    handle.projections(1)
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=0, equal_nan=True)  # unwritten: NaN


def test_gradient_checkpointing_gives_the_same_gradients():
    ids, mask, reply = _batch()
    grads = []
    for checkpointing in (False, True):
        model = tiny_model("llama").train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with emokern.patch(model, _bank(model), layers=LAYERS_PATCHED, train=True) as handle:
            handle.steer({"emotion1": STEER})
            lm, pen = _patched_loss(model, handle, ids, mask, reply)
            (lm + pen).backward()
        grads.append(_grads(model))
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_bf16_autocast():
    model = tiny_model("llama")
    bank = _bank(model)
    ids, mask, reply = _batch()
    with emokern.patch(model, bank, layers=LAYERS_PATCHED, train=True) as handle:
        handle.steer({"emotion1": STEER})
        lm32, pen32 = _patched_loss(model, handle, ids, mask, reply)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lm16, pen16 = _patched_loss(model, handle, ids, mask, reply)
        (lm16 + pen16).backward()
    assert torch.isfinite(pen16) and abs(float(pen16) - float(pen32)) < 0.1 * float(pen32)
    assert abs(float(lm16) - float(lm32)) < 0.05 * float(lm32)
    grads = _grads(model)
    assert grads and all(torch.isfinite(g).all() for g in grads.values())


def test_torch_compile_matches_eager():
    ids, mask, reply = _batch()
    grads, losses = [], []
    for compiled in (False, True):
        model = tiny_model("llama")
        with emokern.patch(model, _bank(model), layers=LAYERS_PATCHED, train=True) as handle:
            handle.steer({"emotion1": STEER})
            run = torch.compile(model, dynamic=False) if compiled else model
            out = run(ids, attention_mask=mask, labels=ids)
            pen = projection_penalty(handle, ["emotion0", "emotion2"], mask=reply)
            (out.loss + pen).backward()
            losses.append((out.loss.detach(), pen.detach()))
        grads.append(_grads(model))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_preventative_steering_is_removed_on_leaving_the_block():
    model = tiny_model("llama")
    bank = _bank(model)
    ids, mask, _ = _batch()
    with emokern.patch(model, bank, layers=LAYERS_PATCHED, train=True) as handle:
        handle.steer({"emotion3": -0.2})
        with torch.no_grad():
            before = model(ids, attention_mask=mask).logits
            with preventative_steering(handle, {"emotion1": STEER}) as h:
                assert h is handle
                during = model(ids, attention_mask=mask).logits
            after = model(ids, attention_mask=mask).logits
            with pytest.raises(ZeroDivisionError):
                with preventative_steering(handle, {"emotion2": STEER}):
                    1 / 0
            after_error = model(ids, attention_mask=mask).logits
    assert not torch.allclose(during, before)
    assert torch.equal(after, before) and torch.equal(after_error, before)


def test_refusals():
    model = tiny_model("llama")
    bank = _bank(model)
    ids, mask, reply = _batch()
    with emokern.patch(model, bank, layers=LAYERS_PATCHED) as handle:
        with pytest.raises(RuntimeError, match="train=True"):
            handle.projections(1)
    with emokern.patch(model, bank, layers=LAYERS_PATCHED, train=True) as handle:
        model(ids, attention_mask=mask)
        with pytest.raises(ValueError, match="'mask' must be a"):
            projection_penalty(handle, "emotion0", mask=reply[:, :3])
        with pytest.raises(ValueError, match="selects no token"):
            projection_penalty(handle, "emotion0", mask=torch.zeros_like(reply))
        with pytest.raises(ValueError, match="not patched"):
            projection_penalty(handle, "emotion0", layers=0)
        with pytest.raises(KeyError):
            projection_penalty(handle, "emotionX")
    plain = emokern.VectorBank.from_tensors(bank.vectors, bank.names, residual_norm=bank.residual_norm, model=model)
    with emokern.patch(model, plain, layers=LAYERS_PATCHED, train=True) as handle:
        model(ids, attention_mask=mask)
        with pytest.raises(ValueError, match="neutral-text statistics"):
            projection_penalty(handle, "emotion0")
