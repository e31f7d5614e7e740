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

The column ``(a, b, lo, hi)`` is :func:`emokern.ops.api.mode_coefficients` applied to the scaled strength: the op
layer owns that mapping (its :class:`~emokern.ops.SteeringTable` uses it too) and this module adds names, units and
checks. The engines keep their tables as :func:`identity_tables` (steer nothing) and write into them the
:class:`TableEntry` list that :func:`compile_entries` makes from a request: the Hugging Face patch
(:meth:`emokern.PatchHandle.steer`), the vLLM plugin (:mod:`emokern.engines.vllm.spec`) and, through the patch,
:mod:`emokern.engines.training`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

from emokern.ops.api import IDENTITY, STEERING_MODES, TABLE_NAMES, identity_tables, mode_coefficients, \
    reset_to_identity

__all__ = ["IDENTITY", "MODES", "SCOPES", "TABLE_NAMES", "TableEntry", "check_mode", "check_scope",
           "compile_entries", "identity_tables", "number", "reset_to_identity", "steer_items", "steer_params"]

MODES = STEERING_MODES
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
    Raises ValueError for an unknown mode, a missing, NaN or infinite strength, or clamp bounds with lo > hi;
    TypeError for a strength that is not a number (or, for clamp, not a pair).
    """
    check_mode(mode)
    if mode == "ablate":
        return mode_coefficients("ablate")
    if value is None:
        raise ValueError(f"steer: mode {mode!r} needs a strength for {name!r}")
    if mode == "add":
        return mode_coefficients("add", number(name, value, "strength") * unit)
    if mode == "set":
        return mode_coefficients("set", number(name, value, "target") * unit)
    if mode == "scale":
        return mode_coefficients("scale", number(name, value, "scale factor"))
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise TypeError(f"steer: mode 'clamp' needs (lo, hi) for {name!r}; got {value!r}") from None
    lo_v = -math.inf if lo is None else number(name, lo, "clamp lo") * unit
    hi_v = math.inf if hi is None else number(name, hi, "clamp hi") * unit
    if lo_v > hi_v:
        raise ValueError(f"steer: clamp bounds for {name!r} must satisfy lo <= hi; got ({lo}, {hi})")
    return mode_coefficients("clamp", (lo_v, hi_v))


class TableEntry(NamedTuple):
    """One compiled setting: at steered site ``site`` (an engine's index into its list of patched sites), bank
    vector ``k`` gets the op's ``(a, b, lo, hi)``. A plain tuple, so it sorts, compares and serialises as
    ``(site, k, a, b, lo, hi)``."""

    site: int
    k: int
    a: float
    b: float
    lo: float
    hi: float


def compile_entries(items: Sequence[Tuple[str, Any]], mode: str, *, index: Callable[[str], int],
                    sites: Sequence[int], norms: Sequence[float], relative: bool = True,
                    check: Optional[Callable[[str, Any, TableEntry], None]] = None) -> List[TableEntry]:
    """The table entries of one steering request: for each ``(emotion, strength)`` of ``items`` (as
    :func:`steer_items` returns them), in order, and for each site of ``sites``, in order, the entry
    ``TableEntry(site, index(emotion), *steer_params(emotion, mode, strength, unit))`` with
    ``unit = norms[site]`` when ``relative`` (strengths are fractions of that site's residual norm) else 1.0.

    ``index`` maps an emotion name to its bank vector (e.g. :meth:`emokern.VectorBank.index`; its errors
    propagate). ``check``, if given, is called as ``check(emotion, strength, entry)`` before each entry is kept
    and may raise (the vLLM plugin bounds strengths there). Entries for the same ``(site, k)`` are all kept:
    where the engines write them into a table the later one wins. Raises what :func:`steer_params` raises.
    """
    entries = []
    for name, value in items:
        k = index(name)
        for site in sites:
            entry = TableEntry(site, k, *steer_params(name, mode, value, norms[site] if relative else 1.0))
            if check is not None:
                check(name, value, entry)
            entries.append(entry)
    return entries


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
