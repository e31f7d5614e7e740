"""Emotion vectors from per-story activations: the recipe's steps 2-4 (PAPER_NOTES §1), used by
:func:`emokern.extraction.extract.extract_bank` on all stories and by :mod:`emokern.extraction.quality` on the
training part of each held-out split.

2. **Vectors.** Per layer: mean over each emotion's stories, minus the equal-weight mean of the K emotion means.
3. **Denoising.** Per layer: project out the top principal components of the neutral texts' activations that
   together explain ``variance`` (default 50%) of their variance, over per-text mean activations (one row per
   neutral text, centred).
4. **Normalisation.** Every vector is unit length.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from emokern.util.names import close_names
from emokern.util.stats import unit_rows

__all__ = ["EmotionVectors", "check_activations", "emotion_membership", "emotion_vectors"]


class EmotionVectors(NamedTuple):
    """What :func:`emotion_vectors` returns."""

    raw: torch.Tensor  # (L, K, d) float32, unit rows: emotion mean minus the mean over emotions
    denoised: torch.Tensor  # (L, K, d) float32, unit rows: raw with the neutral principal components projected out
    n_pcs_removed: torch.Tensor  # (L,) int64
    center: torch.Tensor  # (L, d) float32: the equal-weight mean of the K emotion means


def check_activations(argument: str, acts, L: Optional[int] = None, d: Optional[int] = None) -> torch.Tensor:
    """``acts`` itself when it is a finite (n, L, d) tensor (with the given ``L`` and ``d`` when they are given);
    ``ValueError`` naming ``argument`` otherwise."""
    if not isinstance(acts, torch.Tensor) or acts.dim() != 3:
        shape = tuple(acts.shape) if isinstance(acts, torch.Tensor) else type(acts).__name__
        raise ValueError(f"{argument}: expected a tensor of shape (n, L, d); got {shape}")
    if (L is not None and acts.shape[1] != L) or (d is not None and acts.shape[2] != d):
        raise ValueError(f"{argument}: expected shape (n, {L}, {d}) to match acts; got {tuple(acts.shape)}")
    if not bool(torch.isfinite(acts).all()):
        raise ValueError(f"{argument}: must not contain NaN or Inf")
    return acts


def emotion_membership(labels, names, n: int) -> Tuple[List[str], torch.Tensor]:
    """Checked names and, per story, the index of its emotion in ``names`` (-1: not among ``names``), int64.

    ``ValueError`` unless there are ``n`` labels, at least 2 unique names and at least one story of each name (the
    message then names the labels that look like the missing names)."""
    labels = list(labels)
    if len(labels) != n:
        raise ValueError(f"labels: expected one label per text/activation row ({n}); got {len(labels)}")
    names = list(names)
    if len(names) < 2:
        raise ValueError(f"names: expected at least 2 emotions (vectors are differences from the mean over "
                         f"emotions); got {names}")
    if len(set(names)) != len(names):
        dupes = sorted({x for x in names if names.count(x) > 1})
        raise ValueError(f"names: expected unique names; duplicated: {dupes}")
    index = {name: k for k, name in enumerate(names)}
    member = torch.tensor([index.get(label, -1) for label in labels], dtype=torch.int64)
    counts = torch.bincount(member[member >= 0], minlength=len(names))
    missing = [names[k] for k in range(len(names)) if counts[k] == 0]
    if missing:
        unused = sorted(set(labels) - set(names))
        close = sorted({c for m in missing for c in close_names(m, unused, n=3)})
        hint = f" (labels not in names that look close: {close})" if close else ""
        raise ValueError(f"names: expected at least one story per emotion; {missing} have none{hint}")
    return names, member


def _neutral_bases(neutral_acts: torch.Tensor, variance: float) -> List[torch.Tensor]:
    """Per layer, the (d, k) orthonormal top principal directions of the centred rows explaining ``variance``."""
    if neutral_acts.shape[0] < 2:
        raise ValueError(f"neutral_acts: expected at least 2 neutral texts for the PCA; got {neutral_acts.shape[0]}")
    bases = []
    for layer in range(neutral_acts.shape[1]):
        x = neutral_acts[:, layer].double()
        x = x - x.mean(0)
        _, s, vh = torch.linalg.svd(x, full_matrices=False)
        var = s.square()
        total = float(var.sum())
        if variance == 0.0 or total == 0.0:
            k = 0
        else:
            # Smallest k whose top-k components explain at least `variance` (tolerant of rounding at the boundary).
            k = int((torch.cumsum(var, 0) / total < variance - 1e-12).sum()) + 1
        bases.append(vh[:k].T)
    return bases


def _unit(v: torch.Tensor, what: str, names: List[str]) -> torch.Tensor:
    """``v`` (L, K, d) with unit rows; ``ValueError`` naming the emotion and layer slot of a zero row (norm <= 1e-12),
    which has no direction to normalise."""
    bad = (v.norm(dim=-1) <= 1e-12).nonzero().tolist()
    if bad:
        slot, k = bad[0]
        raise ValueError(f"acts: the {what} vector of emotion {names[k]!r} at layer slot {slot} is zero; expected "
                         f"its stories' mean to differ from the mean over emotions (after denoising, outside the "
                         f"removed neutral subspace)")
    return unit_rows(v)


def emotion_vectors(acts: torch.Tensor, labels: Sequence[str], names: Sequence[str], neutral_acts: torch.Tensor, *,
                    variance: float = 0.5) -> EmotionVectors:
    """Emotion vectors from per-story activations, raw and denoised, per layer.

    Args:
        acts: (n, L, d) per-story mean activations (:func:`story_activations`); any float dtype and device.
        labels: n emotion names, one per row of ``acts``. Rows whose label is not in ``names`` are ignored.
        names: the K >= 2 emotions, in the order of the result's K axis; each needs at least one story.
        neutral_acts: (m, L, d) per-text mean activations of m >= 2 emotionally neutral texts.
        variance: fraction in [0, 1) of the neutral variance whose top principal components are removed (0: none).

    Returns:
        :class:`EmotionVectors`: ``raw`` and ``denoised`` (L, K, d) float32 unit vectors, ``n_pcs_removed`` (L,)
        int64 and ``center`` (L, d) float32, on the device of ``acts``. Per layer: ``raw_k ∝ μ_k − mean_j μ_j``
        (μ_k: the mean of emotion k's rows; every emotion weighs the same in the centre).
        ``denoised_k ∝ (I − U Uᵀ)(μ_k − mean_j μ_j)``, where U holds the top principal directions of the centred
        rows of ``neutral_acts`` (one row per neutral text) that together explain at least ``variance`` of their
        total variance. Computed in float64.
    """
    acts = check_activations("acts", acts)
    n, L, d = acts.shape
    neutral_acts = check_activations("neutral_acts", neutral_acts, L, d)
    if not 0.0 <= variance < 1.0:
        raise ValueError(f"variance: expected a fraction in [0, 1); got {variance}")
    names, member = emotion_membership(labels, names, n)
    K = len(names)
    keep = (member >= 0).nonzero().squeeze(1).to(acts.device)
    member = member.to(acts.device)[keep]
    sums = torch.zeros(K, L, d, dtype=torch.float64, device=acts.device).index_add_(0, member, acts[keep].double())
    means = (sums / torch.bincount(member, minlength=K).double()[:, None, None]).transpose(0, 1)  # (L, K, d)
    center = means.mean(1)
    raw = means - center[:, None]
    bases = _neutral_bases(neutral_acts.to(acts.device), variance)
    denoised = torch.stack([r - (r @ u) @ u.T for r, u in zip(raw, bases)])
    return EmotionVectors(
        raw=_unit(raw, "raw", names).float(), denoised=_unit(denoised, "denoised", names).float(),
        n_pcs_removed=torch.tensor([u.shape[1] for u in bases], dtype=torch.int64), center=center.float(),
    )
