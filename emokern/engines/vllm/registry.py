"""Vectors registered at run time: named directions added to (or replaced in) a running engine, steered and monitored
by name like the bank's emotions.

Off by default. ``EMOKERN_VLLM_REGISTRY_SLOTS=N`` (1 to 64) gives the op's vector buffer N extra rows after the
bank's K (:mod:`emokern.engines.vllm.config`), and ``vllm serve`` then answers (:mod:`emokern.engines.vllm.server`):

* ``POST /v1/emokern/vectors`` with ``{"name": "pirate", "directions": {"10": [d numbers], "19": [...]}}`` (a
  direction for every installed layer, ``EMOKERN_VLLM_LAYERS``, and for no other layer) or ``{"name": "pirate",
  "gguf": "<base64 of a llama.cpp control-vector GGUF>"}`` (its ``direction.<il>`` is emokern's layer ``il``; it must
  have every installed layer, the others are ignored). Each direction is used at unit length, like the bank's, so a
  strength means the same as for a bank emotion (a fraction of the layer's residual norm, ``relative: true``).
  Answer: ``{"name", "version", "slot", "layers", "replaced"}``.
* ``GET /v1/emokern/vectors``: ``{"slots": N, "vectors": [{"name", "version", "slot", "layers"}]}``.
* ``DELETE /v1/emokern/vectors/{name}``: ``{"name", "deleted": true}``; the slot becomes free for a later vector.

Refused (the server keeps serving): a body over :data:`MAX_BODY_BYTES` (413); not JSON, unknown keys, a name that is
not 1 to 64 characters of letters, digits, ``_ . : -`` starting with a letter or digit (or is ``all``, the
monitor's keyword), a direction of the wrong
length, not made of finite numbers, or of zero length, a layer not installed, a missing installed layer, a GGUF that
is not base64 or not a control vector (400); a name of the bank (409: the bank's emotions are fixed for the engine's
life; register under another name); a new name when every slot holds a registered name (409: delete one first).
A registered name is replaced by posting it again.

Protection. When ``EMOKERN_VLLM_ADMIN_TOKEN`` is set, these endpoints require the header
``X-Emokern-Admin-Token: <token>`` (compared in constant time; 401 when missing, 403 when wrong), from any client.
When it is not set they answer only clients on the loopback interface (403 otherwise). A reverse proxy on the same
machine makes every client look local: set a token then. The inference endpoints are unaffected (vLLM's
``--api-key`` guards them, and ``/v1/...`` paths, these included, as usual).

Versions, in-flight requests and the prefix cache. Every registration gets a new ``version`` (one counter for the
server's life) and is written into a slot that holds no current name, the least recently written one, so that a
replaced vector keeps its old slot until the slots come round: requests already parsed against the old version keep
steering with it. The front end pins each request to the ``(version, slot)`` of every registered name it uses
(``extra_args["emokern_pins"]``, set by the front end only: a client's own value is dropped), and the steered pins
join its prefix-cache salt (:meth:`~emokern.engines.vllm.spec.RequestSpec.cache_salt`), so a request steered by a
name never reads KV blocks computed with another version of it. A worker fails (:meth:`Installation.fail`, the
request's ``error``) a request whose pinned slot no longer holds its version: when it is first scheduled, or at once
when a registration overwrites the slot under it (only when all the other slots hold current names). Registration
reaches the workers by ``collective_rpc("emokern_register")``, between engine steps; the front end uses the new
version only after every worker has written it. One API server process holds the names: with
``--api-server-count`` above 1 each would have its own registry, so registration answers 409 there (it needs the
default, one API server).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import json
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

__all__ = ["AdminError", "MAX_BODY_BYTES", "Registry", "check_admin", "directions_from_payload", "front"]

ENV_ADMIN_TOKEN = "EMOKERN_VLLM_ADMIN_TOKEN"
ADMIN_HEADER = "x-emokern-admin-token"
PINS_KEY = "emokern_pins"  # the extra_args key the front end writes (and overwrites)
# A direction per layer is d floats; 32 MiB holds a base64 GGUF of 80 layers x 16384 floats, or JSON of several
# installed layers of that width. Larger bodies are refused before they are parsed.
MAX_BODY_BYTES = 32 * 1024 * 1024
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")


class AdminError(Exception):
    """A refused admin request: ``status`` (400, 401, 403, 404, 409, 413) and the message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def check_admin(header_token: Optional[str], client_host: Optional[str]) -> None:
    """Raise :class:`AdminError` unless the caller may use the admin endpoints (see the module docstring)."""
    token = os.environ.get(ENV_ADMIN_TOKEN, "")
    if token:
        if not header_token:
            raise AdminError(401, f"this endpoint needs the header X-Emokern-Admin-Token (the server's "
                                  f"{ENV_ADMIN_TOKEN})")
        if not hmac.compare_digest(header_token.encode(), token.encode()):
            raise AdminError(403, "wrong X-Emokern-Admin-Token")
        return
    try:
        local = client_host is not None and ipaddress.ip_address(client_host).is_loopback
    except ValueError:
        local = False
    if not local:
        raise AdminError(403, f"this endpoint answers loopback clients only unless the server sets "
                              f"{ENV_ADMIN_TOKEN} (then send it as X-Emokern-Admin-Token)")


def _unit_rows(name: str, directions: Dict[int, np.ndarray], layers: List[int], d: int) -> np.ndarray:
    """(S, d) float32 unit directions at ``layers``, refusing wrong lengths, non-finite values and zero vectors."""
    out = np.empty((len(layers), d), dtype=np.float32)
    for s, layer in enumerate(layers):
        v = np.asarray(directions[layer], dtype=np.float64)
        if v.shape != (d,):
            raise AdminError(400, f"{name}: the direction for layer {layer} must have {d} numbers (the model's "
                                  f"hidden size); got shape {list(v.shape)}")
        if not np.isfinite(v).all():
            raise AdminError(400, f"{name}: the direction for layer {layer} has values that are not finite")
        largest = float(np.abs(v).max())
        if largest == 0.0:
            raise AdminError(400, f"{name}: the direction for layer {layer} has zero length")
        v = v / largest  # only the direction counts: scaled first, so that huge entries (1e308) cannot overflow
        out[s] = (v / np.linalg.norm(v)).astype(np.float32)
    return out


def directions_from_payload(body: bytes, loaded) -> Tuple[str, np.ndarray]:
    """The ``name`` and (S, d) float32 unit directions at the installed layers of a ``POST /v1/emokern/vectors``
    body (see the module docstring); :class:`AdminError` for anything unusable."""
    if len(body) > MAX_BODY_BYTES:
        raise AdminError(413, f"the body has {len(body)} bytes; at most {MAX_BODY_BYTES}")
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: absurdly nested arrays
        raise AdminError(400, f"the body must be JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(payload, dict):
        raise AdminError(400, "the body must be a JSON object such as {\"name\": ..., \"directions\": {...}}")
    unknown = set(payload) - {"name", "directions", "gguf"}
    if unknown:
        raise AdminError(400, f"only the keys ['directions', 'gguf', 'name']; got {sorted(unknown)}")
    name = payload.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name == "all":  # "all": monitor's keyword
        raise AdminError(400, f"'name': expected 1 to 64 letters, digits or _.:- starting with a letter or digit; "
                              f"got {name!r}")
    if name in loaded.names:
        raise AdminError(409, f"{name!r} is one of the bank's emotions, which are fixed for the engine's life; "
                              f"register the vector under another name")
    if ("directions" in payload) == ("gguf" in payload):
        raise AdminError(400, "exactly one of 'directions' (layer -> list of numbers) or 'gguf' (base64)")
    layers, d = list(loaded.layers), int(loaded.unit_vectors.shape[-1])
    if "directions" in payload:
        raw = payload["directions"]
        if not isinstance(raw, dict) or not raw:
            raise AdminError(400, "'directions': expected {\"<layer>\": [numbers], ...}")
        directions: Dict[int, np.ndarray] = {}
        for key, values in raw.items():
            if not (isinstance(key, str) and key.isdigit()) or int(key) not in layers:
                raise AdminError(400, f"'directions': layer {key!r} is not installed (installed layers: {layers})")
            if not isinstance(values, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                       for x in values):
                raise AdminError(400, f"'directions'[{key!r}]: expected a list of {d} numbers")
            directions[int(key)] = np.asarray(values, dtype=np.float64)
    else:
        directions = _gguf_directions(payload["gguf"])
    missing = [layer for layer in layers if layer not in directions]
    if missing:
        raise AdminError(400, f"{name}: no direction for installed layers {missing} (a registered vector needs "
                              f"every installed layer: {layers})")
    return name, _unit_rows(name, directions, layers, d)


def _gguf_directions(text) -> Dict[int, np.ndarray]:
    from emokern.core.control_vectors import read_gguf_control_vector

    if not isinstance(text, str):
        raise AdminError(400, "'gguf': expected the file as a base64 string")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise AdminError(400, f"'gguf': not base64 ({exc})") from None
    with tempfile.NamedTemporaryFile(suffix=".gguf") as f:  # the GGUF reader memory-maps a path
        f.write(data)
        f.flush()
        try:
            cv = read_gguf_control_vector(f.name)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is this request's error
            raise AdminError(400, f"'gguf': not a llama.cpp control vector ({type(exc).__name__}: "
                                  f"{str(exc).replace(f.name, 'the file')})") from None
    return {int(layer): v.numpy().astype(np.float64) for layer, v in cv.directions.items()}


@dataclass
class Entry:
    version: int
    slot: int


class Registry:
    """The front end's names: which slot and version each registered name has now (see the module docstring).

    Not thread-safe: the server calls it from its event loop, registration under one lock."""

    def __init__(self, slots: int):
        self.slots = slots
        self.names: Dict[str, Entry] = {}
        self.holder: List[Optional[str]] = [None] * slots  # the current name in each slot
        self.written = [0] * slots  # when each slot was last written (a counter): the least recent is reused first
        self.version = 0

    def current(self) -> Dict[str, Tuple[int, int]]:
        """``{name: (version, slot)}``, what a request parsed now is pinned to."""
        return {name: (e.version, e.slot) for name, e in self.names.items()}

    def plan(self, name: str) -> Tuple[int, int]:
        """The ``(version, slot)`` a registration of ``name`` is to write: a slot holding no current name, the least
        recently written; else, for a replacement, the name's own slot (in-flight requests pinned to it then fail).
        :class:`AdminError` 409 when a new name finds every slot taken."""
        free = [i for i in range(self.slots) if self.holder[i] is None]
        if free:
            slot = min(free, key=lambda i: self.written[i])
        elif name in self.names:
            slot = self.names[name].slot
        else:
            raise AdminError(409, f"all {self.slots} registry slots hold vectors ({sorted(self.names)}); delete one "
                                  f"(DELETE /v1/emokern/vectors/NAME) or start the server with a larger "
                                  f"EMOKERN_VLLM_REGISTRY_SLOTS")
        self.version += 1
        self.written[slot] = self.version
        return self.version, slot

    def commit(self, name: str, version: int, slot: int) -> bool:
        """Make ``name`` mean ``(version, slot)`` for requests parsed from now on; True when it replaced a vector."""
        old = self.names.get(name)
        if old is not None and self.holder[old.slot] == name:
            self.holder[old.slot] = None
        self.holder[slot] = name
        self.names[name] = Entry(version, slot)
        return old is not None

    def remove(self, name: str) -> None:
        entry = self.names.pop(name, None)
        if entry is None:
            raise AdminError(404, f"no vector named {name!r} is registered")
        self.holder[entry.slot] = None


_FRONT: Optional[Registry] = None


def front(slots: int) -> Optional[Registry]:
    """This process's registry (None when ``slots``, the configuration's ``registry_slots``, is 0)."""
    global _FRONT
    if slots <= 0:
        return None
    if _FRONT is None:
        _FRONT = Registry(slots)
    return _FRONT
