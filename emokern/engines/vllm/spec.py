"""The per-request spec, ``SamplingParams(extra_args={"emokern": SPEC})``, parsed once per process and request.

SPEC is a dict, or the same as a JSON string (what ``vllm_xargs`` carries over the OpenAI-compatible server)::

    {
      "steer": {"emotions": {"calm": 0.05}, "mode": "add", "scope": "generated", "layers": [19]},
      "monitor": {"emotions": ["desperate", "calm"], "layers": [19], "prompt": true},
      "alert": {"emotion": "desperate", "z": 3.0, "tokens": 8, "stop": false}
    }

* ``steer`` — one item or a list of items, each with the arguments of :meth:`emokern.PatchHandle.steer` and the
  same meaning (the shared parser :mod:`emokern.core.steering`): ``emotions`` (a name, a list of names, or
  ``{name: strength}``), ``strength``, ``mode`` (``add`` | ``ablate`` | ``set`` | ``scale`` | ``clamp``; default
  ``add``), ``scope`` (``all`` | ``prompt`` | ``generated``; default ``all``; as in the patch a request has one
  scope, the last item's), ``layers`` (installed layers; default all), ``relative`` (default true: strengths are
  fractions of the layer's mean residual-stream norm). Token spans and ``{"text": ...}`` scopes are refused:
  the engine does not keep the prompt text. Strengths are bounded (:data:`MAX_STRENGTH`): an added amount, a
  target or a clamp bound at most 100 residual norms in size (with ``relative: false``, 100 times the layer's
  residual norm in raw units), a scale factor at most 100 in size. Beyond that the steered residual stream
  overflows the model's dtype, and the request is refused with the limit in the message.
* ``monitor`` — ``true`` (every emotion, every installed layer, prompt included) or ``{"emotions": "all" | [...],
  "layers": [...], "prompt": true}``. ``prompt: false`` records generated positions only (and lets the prompt
  come from the prefix cache).
* ``alert`` — needs ``monitor`` and the bank's neutral statistics: fires at the first generated position where the
  z-score of ``emotion`` at ``layer`` (default: the first monitored layer) has been above ``z`` for ``tokens``
  consecutive generated tokens; ``stop: true`` then ends the request (its next token becomes end-of-sequence).

Vectors registered at run time (:mod:`emokern.engines.vllm.registry`) are named like the bank's emotions in
``steer``, ``monitor`` and ``alert`` lists (``"all"`` still means the bank's emotions only); ``alert`` refuses them
(they have no neutral statistics). A parsed spec records the version and slot of each registered name it used
(:attr:`RequestSpec.pins`), and the steered ones join the prefix-cache salt.

Errors are :class:`SpecError` (a ValueError) naming the field, what was expected and what was given.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from emokern.core import steering
from emokern.core.steering import TableEntry

__all__ = ["Alert", "MAX_STRENGTH", "RequestSpec", "SpecError", "parse", "KEY"]

KEY = "emokern"  # the extra_args key

# The largest steering strength a request may ask for, in residual norms (a scale factor: unitless). A useful push is
# a fraction of one norm; 100 norms already swamp every direction of the residual stream, and pushes of ~1e30 norms
# overflow fp32 inside the op (the worker used to die of it: one request took the whole engine down).
MAX_STRENGTH = 100.0


class SpecError(ValueError):
    """An ``extra_args["emokern"]`` spec that cannot be used."""


@dataclass(frozen=True)
class Alert:
    emotion: int  # index in the monitored emotions
    site: int  # index in the monitored sites
    z: float
    tokens: int
    stop: bool
    name: str
    layer: int


@dataclass
class RequestSpec:
    """A parsed spec against one bank and set of installed layers (sites = their positions in that list).

    ``entries``: the table entries ``(site, k, a, b, lo, hi)`` (:class:`~emokern.core.steering.TableEntry`), at most
    one per ``(site, k)`` (a later setting in the spec replaced an earlier one); ``scope``; ``monitor_k`` / ``monitor_sites`` (None: not monitored); ``monitor_prompt``;
    ``alert``; ``pins``: ``{name: (version, slot)}`` of the registered vectors the spec names (steered or
    monitored), ``steer_pins`` those it steers.
    """

    entries: List[TableEntry] = field(default_factory=list)
    scope: str = "all"
    monitor_k: Optional[List[int]] = None
    monitor_sites: Optional[List[int]] = None
    monitor_prompt: bool = True
    alert: Optional[Alert] = None
    pins: Dict[str, Tuple[int, int]] = field(default_factory=dict)
    steer_pins: Dict[str, Tuple[int, int]] = field(default_factory=dict)

    @property
    def steered_sites(self) -> List[int]:
        return sorted({entry.site for entry in self.entries})

    def cache_salt(self, prompt_len: int) -> Optional[str]:
        """A salt for vLLM's prefix cache: equal only for requests whose KV blocks hold the same steering state
        position by position (None: unsteered, which shares blocks with other unsteered requests only).

        A cached block is read by a later request only when the salts and every token up to the block's end are
        equal (vLLM chains block hashes from the first block, which carries the salt). The KV of a position depends
        on whether it and every position before it was steered, and how. Under ``scope="all"`` that is the spec
        alone. Under ``"prompt"`` and ``"generated"`` it also depends on where the prompt ends: a multi-turn
        conversation's second turn has the first turn's reply in its prompt, computed steered (``generated``) or
        unsteered (``prompt``) in the first turn and the other way round in the second, so ``prompt_len`` joins the
        salt. Cost: such requests share cached blocks only with requests that have the same prompt length (for
        equal tokens: the same prompt), not with earlier turns of their conversation.

        A registered vector steered by name joins the salt with its version (``steer_pins``): its slot's contents
        change when the name is replaced (or the slot is reused), and blocks computed with the old vector must not
        be read by a request steered with the new one.
        """
        if not self.entries:
            return None
        where = "all" if self.scope == "all" else [self.scope, int(prompt_len)]
        pins = sorted([name, *pin] for name, pin in self.steer_pins.items())
        canonical = json.dumps([where, sorted(self.entries)] + ([pins] if pins else []), separators=(",", ":"))
        return "emokern:" + hashlib.sha256(canonical.encode()).hexdigest()[:32]


def _fail(where: str, expected: str, got: Any) -> SpecError:
    return SpecError(f"extra_args['emokern']{where}: expected {expected}; got {got!r}")


def _layers(where: str, value, installed: List[int]) -> List[int]:
    if value is None:
        return list(range(len(installed)))
    wanted = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(wanted, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in wanted):
        raise _fail(where, "a layer index or a list of them", value)
    unknown = [x for x in wanted if x not in installed]
    if unknown or not wanted:
        raise _fail(where, f"installed layers (this engine has the op at {installed}; set EMOKERN_VLLM_LAYERS to "
                           f"change them)", value)
    return [installed.index(x) for x in wanted]


def _index(where: str, loaded, name, registered: Mapping[str, Tuple[int, int]], pins: List[dict]) -> int:
    """The vector index of ``name``: the bank's, else ``K + slot`` of a registered vector (recorded in each of
    ``pins``)."""
    if not isinstance(name, str):
        raise _fail(where, "an emotion name (a string)", name)
    try:
        return loaded.bank.index(name)
    except KeyError as exc:
        if name in registered:
            version, slot = registered[name]
            for pin in pins:
                pin[name] = (int(version), int(slot))
            return len(loaded.names) + int(slot)
        extra = f" (registered at run time: {sorted(registered)})" if registered else ""
        raise SpecError(f"extra_args['emokern']{where}: {exc.args[0]}{extra}") from None


_STEER_KEYS = {"emotions", "strength", "mode", "scope", "layers", "relative"}


def _check_bounds(where: str, name: str, mode: str, value, params, relative: bool, norm: float, layer: int) -> None:
    """Refuse table entries beyond :data:`MAX_STRENGTH` (see the module docstring), in the units the request used."""
    a, b, lo, hi = params
    if mode == "scale":
        if abs(b) > MAX_STRENGTH:
            raise SpecError(f"extra_args['emokern']{where}: the scale factor for {name!r} must be between "
                            f"-{MAX_STRENGTH:g} and {MAX_STRENGTH:g}; got {value!r}")
        return
    largest = max(abs(a), abs(lo) if math.isfinite(lo) else 0.0, abs(hi) if math.isfinite(hi) else 0.0)
    if largest <= MAX_STRENGTH * norm:
        return
    if relative:
        limit = f"{MAX_STRENGTH:g} in size (residual norms)"
    else:
        limit = f"{MAX_STRENGTH * norm:g} in size ('relative': false at layer {layer}: {MAX_STRENGTH:g} x its " \
                f"residual norm {norm:g})"
    what = "clamp bounds" if mode == "clamp" else "target" if mode == "set" else "strength"
    raise SpecError(f"extra_args['emokern']{where}: the {what} for {name!r} must be at most {limit}; got {value!r}")


def _steer(spec: RequestSpec, items, loaded, registered) -> None:
    items = items if isinstance(items, list) else [items]
    if not items:
        raise _fail("['steer']", "a steering item or a non-empty list of them", items)
    for i, item in enumerate(items):
        where = f"['steer'][{i}]" if len(items) > 1 else "['steer']"
        if not isinstance(item, Mapping):
            raise _fail(where, "a mapping such as {'emotions': {'calm': 0.05}, 'mode': 'add'}", item)
        unknown = set(item) - _STEER_KEYS
        if unknown:
            raise _fail(where, f"only the keys {sorted(_STEER_KEYS)}", sorted(unknown))
        if "emotions" not in item:
            raise _fail(where, "an 'emotions' entry", item)
        mode, scope = item.get("mode", "add"), item.get("scope", "all")
        relative = item.get("relative", True)
        if not isinstance(relative, bool):
            raise _fail(where + "['relative']", "true or false", relative)
        if not isinstance(scope, str):
            raise _fail(where + "['scope']", f"one of {steering.SCOPES} (token spans and text scopes need the "
                                             f"Hugging Face patch)", scope)
        sites = _layers(where + "['layers']", item.get("layers"), loaded.layers)
        def check(name, value, entry: TableEntry) -> None:
            _check_bounds(where, name, mode, value, entry[2:], relative, loaded.residual_norm[entry.site],
                          loaded.layers[entry.site])

        try:
            steering.check_mode(mode)
            steering.check_scope(scope)
            pairs = steering.steer_items(item["emotions"], item.get("strength"))
            spec.entries.extend(steering.compile_entries(
                pairs, mode, index=lambda name: _index(where + "['emotions']", loaded, name, registered, [spec.pins, spec.steer_pins]),
                sites=sites,
                norms=loaded.residual_norm, relative=relative, check=check))
        except SpecError:
            raise
        except (TypeError, ValueError) as exc:
            raise SpecError(f"extra_args['emokern']{where}: {exc}") from None
        spec.scope = scope
    last = {}
    for entry in spec.entries:  # a later setting of the same vector at the same site replaces the earlier one
        last[entry.site, entry.k] = entry
    spec.entries = list(last.values())


def _monitor(spec: RequestSpec, value, loaded, registered) -> None:
    if value is False or value is None:
        return
    if value is True:
        value = {}
    if not isinstance(value, Mapping):
        raise _fail("['monitor']", "true or a mapping such as {'emotions': ['desperate'], 'layers': [19]}", value)
    unknown = set(value) - {"emotions", "layers", "prompt"}
    if unknown:
        raise _fail("['monitor']", "only the keys ['emotions', 'layers', 'prompt']", sorted(unknown))
    emotions = value.get("emotions", "all")
    if emotions == "all":
        spec.monitor_k = list(range(len(loaded.names)))
    else:
        names = [emotions] if isinstance(emotions, str) else emotions
        if not isinstance(names, list) or not names:
            raise _fail("['monitor']['emotions']", "'all', a name or a non-empty list of names", emotions)
        spec.monitor_k = list(dict.fromkeys(_index("['monitor']['emotions']", loaded, n, registered, [spec.pins])
                                            for n in names))
    spec.monitor_sites = _layers("['monitor']['layers']", value.get("layers"), loaded.layers)
    prompt = value.get("prompt", True)
    if not isinstance(prompt, bool):
        raise _fail("['monitor']['prompt']", "true or false", prompt)
    spec.monitor_prompt = prompt


def _alert(spec: RequestSpec, value, loaded, registered) -> None:
    if value is None:
        return
    if not isinstance(value, Mapping) or "emotion" not in value:
        raise _fail("['alert']", "a mapping such as {'emotion': 'desperate', 'z': 3, 'tokens': 8}", value)
    unknown = set(value) - {"emotion", "z", "tokens", "stop", "layer"}
    if unknown:
        raise _fail("['alert']", "only the keys ['emotion', 'layer', 'stop', 'tokens', 'z']", sorted(unknown))
    if spec.monitor_k is None:
        raise _fail("['alert']", "a request that also has 'monitor'", value)
    if loaded.neutral_mean is None:
        raise SpecError("extra_args['emokern']['alert']: the bank has no neutral statistics, so there are no "
                        "z-scores to alert on")
    k = _index("['alert']['emotion']", loaded, value["emotion"], registered, [])
    if k >= len(loaded.names):
        raise _fail("['alert']['emotion']", "one of the bank's emotions (a registered vector has no neutral "
                                            "statistics, so no z-scores to alert on)", value["emotion"])
    if k not in spec.monitor_k:
        raise _fail("['alert']['emotion']", "one of the monitored emotions", value["emotion"])
    layer = value.get("layer", loaded.layers[spec.monitor_sites[0]])
    site = _layers("['alert']['layer']", layer, loaded.layers)[0]
    if site not in spec.monitor_sites:
        raise _fail("['alert']['layer']", "one of the monitored layers", layer)
    try:
        z = steering.number(value["emotion"], value.get("z", 3.0), "alert z")
    except (TypeError, ValueError) as exc:
        raise SpecError(f"extra_args['emokern']['alert']['z']: {exc}") from None
    tokens = value.get("tokens", 8)
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        raise _fail("['alert']['tokens']", "an integer >= 1", tokens)
    stop = value.get("stop", False)
    if not isinstance(stop, bool):
        raise _fail("['alert']['stop']", "true or false", stop)
    spec.alert = Alert(spec.monitor_k.index(k), spec.monitor_sites.index(site), z, tokens, stop,
                       value["emotion"], loaded.layers[site])


def parse(raw, loaded, registered: Optional[Mapping[str, Tuple[int, int]]] = None) -> RequestSpec:
    """Parse ``extra_args["emokern"]`` (a dict or a JSON string) against the process's bank (:func:`config.load`)
    and the registered vectors ``registered``, ``{name: (version, slot)}`` (None: none).

    Raises :class:`SpecError` for anything unusable: unknown keys, emotions (with close matches), modes, scopes
    or layers; strengths that are not finite numbers; an alert without monitoring.
    """
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise SpecError(f"extra_args['emokern']: a string must be JSON ({exc})") from None
    if not isinstance(raw, Mapping):
        raise _fail("", "a mapping with 'steer', 'monitor' and/or 'alert' (or the same as a JSON string)", raw)
    unknown = set(raw) - {"steer", "monitor", "alert"}
    if unknown:
        raise _fail("", "only the keys ['alert', 'monitor', 'steer']", sorted(unknown))
    spec = RequestSpec()
    registered = registered or {}
    if raw.get("steer") is not None:
        _steer(spec, raw["steer"], loaded, registered)
    _monitor(spec, raw.get("monitor"), loaded, registered)
    _alert(spec, raw.get("alert"), loaded, registered)
    return spec
