"""Emotion vectors inside a training loop: a loss on the projections, and steering during fine-tuning only.

Both work on a patch made with ``emokern.patch(model, bank, train=True)`` (:func:`emokern.engines.hf`), whose forward
with grad enabled keeps every patched site's projections in the autograd graph and steers through the
differentiable op; a forward under ``torch.no_grad()`` runs the inference path unchanged.

::

    handle = emokern.patch(model, bank, layers=[19], train=True)
    with preventative_steering(handle, {"desperate": 0.05}):        # removed again on leaving the block
        out = model(input_ids, attention_mask=mask, labels=labels)
        loss = out.loss + 0.1 * projection_penalty(handle, ["desperate"], mask=reply_mask)
        loss.backward()

* :func:`projection_penalty`: the mean squared z-score of chosen emotions' projections at chosen layers and tokens,
  against the bank's neutral-text statistics: "keep desperate near where it sits on neutral text".
* :func:`preventative_steering`: steering toward an unwanted emotion during fine-tuning (the persona-vectors
  recipe): the steering supplies the push the data asks for, so the weights need not learn it; leaving the block
  restores the earlier steering, and inference runs without it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import torch

__all__ = ["projection_penalty", "preventative_steering"]


def projection_penalty(handle, emotions: Union[str, Sequence[str]], *, layers: Union[None, int, Sequence[int]] = None,
                       site: str = "residual", mask: Optional[torch.Tensor] = None,
                       target: float = 0.0) -> torch.Tensor:
    """The mean of ``(z - target)**2`` over the chosen emotions, layers and tokens of the last forward.

    ``z = (P - neutral_mean) / neutral_std`` is an emotion's projection (:meth:`PatchHandle.projections`) as a
    z-score against the bank's neutral-text statistics at that layer, so ``target = 0`` (default) pulls it toward
    its typical value on neutral text, and ``target = -1`` one standard deviation below it.

    Args:
        handle: a patch made with ``train=True``, after a forward with grad enabled.
        emotions: a name or names in the bank.
        layers: patched layers (default: all patched layers).
        site: the patched site (``"residual"`` unless the patch has others).
        mask: (B, S) bool or 0/1 tensor of the tokens that count (e.g. the assistant's reply); default every token.
            Padding should be masked out.
        target: the z-score the penalty pulls toward.

    Returns a scalar tensor in the graph (fp32). Raises ValueError for a bank without neutral statistics, an
    unknown emotion or layer, a mask of the wrong shape or with no token selected.
    """
    bank = handle.bank
    if bank.neutral_mean is None or bank.neutral_std is None:
        raise ValueError("projection_penalty: the bank has no neutral-text statistics (neutral_mean/neutral_std); "
                         "extract it with neutral texts (emokern extract does)")
    names = [emotions] if isinstance(emotions, str) else list(emotions)
    if not names:
        raise ValueError("projection_penalty: 'emotions' is empty")
    ks = [bank.index(name) for name in names]
    layer_list = handle.layers if layers is None else ([layers] if isinstance(layers, int) else list(layers))
    unknown = [x for x in layer_list if x not in handle.layers]
    if unknown:
        raise ValueError(f"projection_penalty: layers {unknown} are not patched (patched layers: {handle.layers})")
    terms = []
    weight = None
    for layer in layer_list:
        P = handle.projections(layer, site)  # (B, S, K)
        if weight is None:
            weight = _mask_weights(mask, P.shape[:2], P.device)
        slot = bank.layer_slot(layer)
        mean = bank.neutral_mean[slot, ks].to(P.device, torch.float32)
        std = bank.neutral_std[slot, ks].to(P.device, torch.float32).clamp(min=1e-6)
        z = (P[..., ks] - mean) / std  # (B, S, E)
        terms.append(((z - target) ** 2 * weight[..., None]).sum() / (weight.sum() * len(ks)))
    return torch.stack(terms).mean()


def _mask_weights(mask: Optional[torch.Tensor], shape, device) -> torch.Tensor:
    if mask is None:
        return torch.ones(shape, device=device)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(shape):
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"projection_penalty: 'mask' must be a (batch, tokens) = {tuple(shape)} tensor; got {got}")
    weight = mask.to(device=device, dtype=torch.float32)
    if not bool(weight.sum() > 0):
        raise ValueError("projection_penalty: 'mask' selects no token")
    return weight


@contextlib.contextmanager
def preventative_steering(handle, emotions: Union[str, Sequence[str], Mapping[str, Any]], strength: Any = None,
                          **steer_options) -> Iterator[Any]:
    """Steer with ``handle.steer(emotions, strength, **steer_options)`` inside the block only.

    Meant around the training steps of a fine-tune (with ``train=True`` the steering is differentiable, so the
    gradient sees the steered model); on leaving the block, normally or by an exception, the handle's steering is
    what it was before (usually none), so evaluation and inference run the model as fine-tuned, unsteered
    (:meth:`PatchHandle.steering_state` before, :meth:`PatchHandle.restore_steering` after). Yields the handle.
    """
    saved = handle.steering_state()
    handle.steer(emotions, strength, **steer_options)
    try:
        yield handle
    finally:
        handle.restore_steering(saved)
