"""The steering-spec language, defined once for every engine (the Hugging Face patch and the vLLM plugin).

A steering request names emotions, a mode and a strength, and a scope of token positions::

    {"calm": 0.05}                          # add 0.05 of the layer's mean residual norm along "calm"
    ["desperate", "angry"], mode="ablate"   # remove both components
    {"desperate": (None, 0.0)}, mode="clamp"

Each (emotion, mode, strength) becomes one row of the fused op's parameter tables (``a, b, lo, hi``; see
:mod:`emokern.ops.reference`): ``q = clamp(a + b * P, lo, hi)`` replaces the projection ``P`` of a steered token.
Strengths in residual-norm units are multiplied by the layer's ``bank.residual_norm`` here (``unit``), so the
same spec means the same thing at every layer and in every engine.

=========  =======================================  ==============================================
mode       strength                                 (a, b, lo, hi)
=========  =======================================  ==============================================
add        c (a number)                             (c * unit, 1, -inf, +inf)
ablate     unused (may be None)                     (0, 0, -inf, +inf)
set        t (a number)                             (t * unit, 0, -inf, +inf)
scale      s (a number, unitless)                   (0, s, -inf, +inf)
clamp      (lo, hi), either None for no bound       (0, 1, lo * unit, hi * unit)
=========  =======================================  ==============================================
"""

from __future__ import annotations

import math
from typing import Any, List, Mapping, Sequence, Tuple, Union

__all__ = ["MODES", "SCOPES", "check_mode", "check_scope", "number", "steer_items", "steer_params"]

MODES = ("add", "ablate", "set", "scale", "clamp")
# The named scopes. The Hugging Face patch also takes (start, end) prompt spans and {"text": ...}; see check_scope.
SCOPES = ("all", "prompt", "generated")


def check_mode(mode) -> str:
    """``mode`` itself when it is one of :data:`MODES`; else ValueError naming the choices."""
    if mode not in MODES:
        raise ValueError(f"steer: 'mode' must be one of {MODES}; got {mode!r}")
    return mode


def steer_items(emotions: Union[str, Sequence[str], Mapping[str, Any]], strength: Any = None) -> List[Tuple[str, Any]]:
    """``[(emotion, strength), ...]`` from a name, a list of names (all with ``strength``) or ``{name: strength}``.

    Raises ValueError when the mapping form is combined with ``strength`` or when nothing is named, and TypeError
    when a name is not a string.
    """
    if isinstance(emotions, str):
        items = [(emotions, strength)]
    elif isinstance(emotions, Mapping):
        if strength is not None:
            raise ValueError("steer: give strengths either in the {emotion: strength} mapping or as 'strength', "
                             "not both")
        items = list(emotions.items())
    else:
        try:
            items = [(e, strength) for e in emotions]
        except TypeError:
            raise TypeError(f"steer: 'emotions' must be a name, a list of names or {{name: strength}}; got "
                            f"{type(emotions).__name__}") from None
    if not items:
        raise ValueError("steer: 'emotions' is empty")
    for name, _ in items:
        if not isinstance(name, str):
            raise TypeError(f"steer: emotion names must be strings; got {name!r}")
    return items


def number(name: str, value, what: str) -> float:
    """``float(value)``, refusing non-numbers (TypeError) and NaN/infinity (ValueError) with the emotion's name."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"steer: {what} for {name!r} must be a number; got {value!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"steer: {what} for {name!r} must be finite; got {value!r}")
    return x


def steer_params(name: str, mode: str, value, unit: float) -> Tuple[float, float, float, float]:
    """The op's ``(a, b, lo, hi)`` for steering emotion ``name`` in ``mode`` with strength ``value``.

    ``unit`` multiplies additive amounts, targets and clamp bounds (the layer's residual norm for relative
    strengths, 1.0 for absolute ones); scale factors are unitless. See the module docstring for the table.
    """
    check_mode(mode)
    if mode == "ablate":
        return 0.0, 0.0, -math.inf, math.inf
    if value is None:
        raise ValueError(f"steer: mode {mode!r} needs a strength for {name!r}")
    if mode == "add":
        return number(name, value, "strength") * unit, 1.0, -math.inf, math.inf
    if mode == "set":
        return number(name, value, "target") * unit, 0.0, -math.inf, math.inf
    if mode == "scale":
        return 0.0, number(name, value, "scale factor"), -math.inf, math.inf
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise TypeError(f"steer: mode 'clamp' needs (lo, hi) for {name!r}; got {value!r}") from None
    lo_v = -math.inf if lo is None else number(name, lo, "clamp lo") * unit
    hi_v = math.inf if hi is None else number(name, hi, "clamp hi") * unit
    if lo_v > hi_v:
        raise ValueError(f"steer: clamp bounds for {name!r} must satisfy lo <= hi; got ({lo}, {hi})")
    return 0.0, 1.0, lo_v, hi_v


def check_scope(scope) -> None:
    """Refuse anything but ``"all"``, ``"prompt"``, ``"generated"``, a list of ``(start, end)`` prompt-token spans
    with ``0 <= start < end``, or ``{"text": "a non-empty substring"}`` (ValueError naming what was given)."""
    if isinstance(scope, str):
        if scope not in SCOPES:
            raise ValueError(f"steer: 'scope' must be 'all', 'prompt', 'generated', a list of (start, end) or "
                             f"{{'text': ...}}; got {scope!r}")
    elif isinstance(scope, Mapping):
        if set(scope) != {"text"} or not isinstance(scope["text"], str) or not scope["text"]:
            raise ValueError(f"steer: a text scope is {{'text': 'a non-empty substring of the prompt'}}; got {scope!r}")
    else:
        try:
            spans = [(int(s), int(e)) for s, e in scope]
        except (TypeError, ValueError):
            raise ValueError(f"steer: 'scope' spans must be (start, end) pairs; got {scope!r}") from None
        for s, e in spans:
            if not 0 <= s < e:
                raise ValueError(f"steer: a scope span needs 0 <= start < end; got ({s}, {e})")
