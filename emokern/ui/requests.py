"""What the page sends to ``POST /api/generate``, checked once for both backends.

The body is a JSON object::

    {
      "messages": [{"role": "user", "content": "The rent is due tomorrow."}],   # the conversation; last one: user
      "steer": [{"emotions": {"calm": 0.25}, "mode": "add", "layers": [19], "scope": "generated"}],   # or null
      "alert": {"emotion": "desperate", "z": 3, "tokens": 4, "stop": false},                           # or null
      "max_new_tokens": 64, "temperature": 0.7, "top_p": 0.9, "seed": 1234
    }

``steer`` and ``alert`` are the vLLM plugin's spec fields with the same meaning (the same parser,
:func:`emokern.engines.vllm.spec.parse`, checks them against the bank and the backend's layers): strengths are in
residual-norm units (fractions of the layer's mean residual-stream norm) and at most
:data:`emokern.engines.vllm.spec.MAX_STRENGTH` (100) in size; the alert fires at the first generated token where the
emotion's z-score at the readout layer has been above ``z`` for ``tokens`` consecutive generated tokens, and
``stop`` then ends the reply. Monitoring is always on: every emotion at the backend's readout layer.

Anything unusable raises :class:`RequestError` whose message the page shows as it is (no traceback).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, List, Optional

from emokern.engines.vllm import spec as vllm_spec

__all__ = ["Limits", "ParsedRequest", "RequestError", "SpecLayers", "parse_body", "parse_request"]

ROLES = ("system", "user", "assistant")


class RequestError(ValueError):
    """A request the server refuses; ``str(exc)`` is the message shown in the page (HTTP 400)."""


@dataclass(frozen=True)
class Limits:
    """Per-request bounds: prompt tokens after the chat template, new tokens, characters of all messages."""

    max_prompt_tokens: int = 2048
    max_new_tokens: int = 512
    max_chars: int = 20000


@dataclass
class SpecLayers:
    """What :func:`emokern.engines.vllm.spec.parse` needs to know about a backend: its bank and the layers that can
    be steered and read (``layers``), with each one's residual norm (the strength unit) and neutral statistics."""

    bank: Any
    layers: List[int]
    residual_norm: List[float] = field(default_factory=list)
    neutral_mean: Any = None
    neutral_std: Any = None

    @classmethod
    def of(cls, bank, layers: List[int]) -> "SpecLayers":
        slots = [bank.layer_slot(layer) for layer in layers]
        mean = bank.neutral_mean[slots] if bank.neutral_mean is not None else None
        std = bank.neutral_std[slots] if bank.neutral_std is not None else None
        return cls(bank, list(layers), [float(bank.residual_norm[s]) for s in slots], mean, std)

    @property
    def names(self) -> List[str]:
        return list(self.bank.names)


@dataclass
class ParsedRequest:
    """A checked request. ``spec`` is the raw spec (``steer``/``monitor``/``alert``) as the vLLM plugin takes it;
    ``parsed`` its :class:`emokern.engines.vllm.spec.RequestSpec`."""

    messages: List[dict]
    spec: dict
    parsed: Any
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int


def parse_body(raw: bytes) -> dict:
    """The request body as a JSON object, or :class:`RequestError` saying what is wrong with it."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object; got {type(body).__name__}")
    return body


def _number(body: dict, key: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    value = body.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"'{key}' must be a finite number; got {value!r}")
    if value < lo or value > hi or (lo_open and value == lo):
        raise RequestError(f"'{key}' must be {'above' if lo_open else 'at least'} {lo:g} and at most {hi:g}; "
                           f"got {value!r}")
    return float(value)


def _integer(body: dict, key: str, default: int, lo: int, hi: int, hint: str = "") -> int:
    value = body.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"'{key}' must be an integer; got {value!r}")
    if not lo <= value <= hi:
        raise RequestError(f"'{key}' must be between {lo} and {hi}{hint}; got {value}")
    return value


def parse_request(body: dict, layers: SpecLayers, readout_layer: int, limits: Limits) -> ParsedRequest:
    """Check a ``/api/generate`` body (see the module docstring) against a backend's bank, layers and limits.

    The prompt-token limit is checked later, by the backend, once the chat template has been applied.
    """
    unknown = set(body) - {"messages", "steer", "alert", "max_new_tokens", "temperature", "top_p", "seed"}
    if unknown:
        raise RequestError(f"unknown request fields {sorted(unknown)}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects")
    clean, chars = [], 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise RequestError(f"messages[{i}] must be {{\"role\": one of {list(ROLES)}, \"content\": text}}; "
                               f"got {m!r}"[:300])
        chars += len(m["content"])
        clean.append({"role": m["role"], "content": m["content"]})
    if clean[-1]["role"] != "user" or not clean[-1]["content"].strip():
        raise RequestError("the conversation must end with a non-empty user message")
    if chars > limits.max_chars:
        raise RequestError(f"the conversation is too long: {chars} characters, this server takes at most "
                           f"{limits.max_chars}")
    max_new = _integer(body, "max_new_tokens", 64, 1, limits.max_new_tokens, " (the server's --max-new-tokens)")
    temperature = _number(body, "temperature", 0.7, 0.0, 5.0)
    top_p = _number(body, "top_p", 0.9, 0.0, 1.0, lo_open=True)
    seed = _integer(body, "seed", 0, 0, 2**31 - 1)
    spec = {"monitor": {"emotions": "all", "layers": [readout_layer], "prompt": True}}
    steer = body.get("steer")
    if steer not in (None, []):
        spec["steer"] = steer
    if body.get("alert") is not None:
        spec["alert"] = body["alert"]
    try:
        parsed = vllm_spec.parse(spec, layers)
    except vllm_spec.SpecError as exc:
        # the plugin names the field as extra_args['emokern']['steer'][0]['emotions']; the page's own name for it
        # is steer[0].emotions
        message = str(exc).replace("extra_args['emokern']", "", 1)
        head = re.match(r"(?:\['\w+'\]|\[\d+\])+", message)
        if head:
            path = re.sub(r"\['(\w+)'\]", r".\1", head.group(0)).lstrip(".")
            message = path + message[head.end():]
        raise RequestError(message) from None
    return ParsedRequest(clean, spec, parsed, max_new, temperature, top_p, seed)


def steer_items(spec: dict) -> List[dict]:
    """The steering items of a parsed spec as a list (the spec allows one item or a list)."""
    steer = spec.get("steer")
    if steer is None:
        return []
    return steer if isinstance(steer, list) else [steer]


def alert_hit(values: List[float], threshold: float, tokens: int) -> Optional[int]:
    """The index in ``values`` (the alert emotion's z-scores over generated tokens, in order) where the z-score has
    been above ``threshold`` for ``tokens`` consecutive entries, the vLLM plugin's rule; None if it never is."""
    run = 0
    for i, v in enumerate(values):
        run = run + 1 if v > threshold else 0
        if run >= tokens:
            return i
    return None
