"""Steering conditions and where they apply: a :class:`Condition` (emotions and strengths), the sweep of conditions an
experiment compares (:func:`sweep_conditions`), the layers named by a spec (:func:`resolve_layers`), and setting a
batch's per-sequence steering on a patch handle (:func:`apply_conditions`).

**Steering units.** As in the paper, a strength is a fraction of the layer's mean residual-stream norm
(``bank.residual_norm``); a :class:`Condition` maps emotions to such strengths, applied at every steered layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

__all__ = ["UNSTEERED", "Condition", "apply_conditions", "resolve_layers", "sweep_conditions"]


@dataclass(frozen=True)
class Condition:
    """A steering condition: ``{emotion: strength}`` (fractions of the layer's mean residual norm); empty means
    unsteered. ``name`` is what results and plots call it, e.g. ``"desperate+0.05"``."""

    name: str
    steer: Tuple[Tuple[str, float], ...] = ()

    @property
    def emotion(self) -> Optional[str]:
        return self.steer[0][0] if len(self.steer) == 1 else None

    @property
    def strength(self) -> float:
        return self.steer[0][1] if len(self.steer) == 1 else 0.0

    def to_dict(self) -> dict:
        return {"name": self.name, "steer": dict(self.steer)}


UNSTEERED = Condition("unsteered")


def sweep_conditions(emotions: Sequence[str], strengths: Sequence[float], bank=None) -> List[Condition]:
    """``unsteered`` plus one condition per (emotion, non-zero strength), in the order given.

    Unknown emotions (when ``bank`` is given) raise KeyError with close matches; non-finite strengths ValueError.
    """
    for s in strengths:
        if not isinstance(s, (int, float)) or not math.isfinite(s):
            raise ValueError(f"strengths: expected finite numbers; got {s!r}")
    if bank is not None:
        for e in emotions:
            bank.index(e)
    out = [UNSTEERED]
    for e in emotions:
        for s in strengths:
            if s != 0:
                out.append(Condition(f"{e}{s:+g}", ((e, float(s)),)))
    return out


def resolve_layers(spec: Union[None, str, int, Sequence[int]], bank, num_layers: int) -> List[int]:
    """Layers to steer or read, from ``spec``:

    * ``"two_thirds"`` (default): the bank layer at about two thirds of the depth
      (:meth:`VectorBank.two_thirds_layer`, the paper's mid-late layer; where the demo steers);
    * ``"default"``: the bank's readout layer (:meth:`VectorBank.default_layer`: chosen on held-out validation
      premises; where the demo and the experiments monitor);
    * ``"middle"``: the bank layers between 40% and 60% of the depth (at least one: the one nearest 50%);
    * an int or a list of ints, or a comma-separated string of them.

    Every layer must be in the bank (ValueError lists the bank's layers otherwise).
    """
    if spec is None or spec == "two_thirds":
        return [bank.two_thirds_layer()]
    if spec == "default":
        return [bank.default_layer()[0]]
    if spec == "middle":
        last = max(num_layers - 1, 1)
        chosen = [l for l in bank.layers if 0.4 <= l / last <= 0.6]
        return chosen or [min(bank.layers, key=lambda l: abs(l / last - 0.5))]
    if isinstance(spec, str):
        try:
            spec = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"layers: expected 'two_thirds', 'default', 'middle' or comma-separated layer indices; "
                             f"got {spec!r}") from None
    layers = [spec] if isinstance(spec, int) else list(spec)
    missing = [l for l in layers if l not in bank.layers]
    if not layers or missing:
        raise ValueError(f"layers: {missing or layers} not in the bank (its layers: {bank.layers})")
    return sorted(set(layers))


def apply_conditions(handle, conditions: Sequence[Condition], layers: Sequence[int]) -> None:
    """Per-sequence steering: sequence ``i`` of the next batch gets ``conditions[i]`` (at every token) at
    ``layers``; earlier settings are cleared."""
    handle.clear_steering()
    for i, c in enumerate(conditions):
        if c.steer:
            handle.steer(dict(c.steer), sequences=i, layers=list(layers))
