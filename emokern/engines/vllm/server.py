"""``vllm serve`` additions: per-token readouts in the responses of monitored requests, and
``GET /v1/emokern/trace/{request_id}``, the full trace of a finished, monitored request; with
``EMOKERN_VLLM_REGISTRY_SLOTS`` set, ``/v1/emokern/vectors`` (vectors registered at run time:
:mod:`emokern.engines.vllm.registry`).

Enable it with the general plugin (``EMOKERN_VLLM_BANK=...``) and vLLM's endpoint-plugin allowlist::

    EMOKERN_VLLM_BANK=bank.json VLLM_PLUGINS=emokern vllm serve MODEL

(``VLLM_PLUGINS`` names the plugins vLLM may load; both emokern entry points are called ``emokern``.) Send the
spec as a JSON string in ``vllm_xargs``::

    POST /v1/chat/completions  {"messages": [...], "vllm_xargs": {"emokern": "{\\"monitor\\": true}"}}

then fetch the trace with the response's ``id`` (``chatcmpl-...``, or ``cmpl-...`` from ``/v1/completions``,
whose prompts are traced as ``cmpl-...-0``, ``cmpl-...-1``, ...: the plain id gives the first), once: the worker
hands it over and forgets it. The answer is JSON: ``layers`` (S), ``names`` (K), ``prompt_len``, ``length`` (T
positions recorded: every position fed to the model, that is the prompt and all generated tokens but the last,
``prompt_tokens + completion_tokens - 1`` of the response's usage), ``projections`` (T x S x K numbers, null where a
position was not recorded), ``neutral_mean`` / ``neutral_std`` (S x K, for z-scores, or null), ``alert`` (null or
``{"emotion", "layer", "z", "tokens", "position", "stopped"}``) and ``error`` (null, or why the worker failed the
request: it then ran unsteered and unrecorded, ended at its next token, and the other fields are empty); 404 when
nothing is held for that id.

Readouts in the response. A monitored (or steered) request's ``/v1/chat/completions`` or ``/v1/completions``
response carries an ``"emokern"`` list, one readout per choice (by index), so a standard OpenAI client gets them with
no second call::

    "emokern": [{"layers": [19], "emotions": ["desperate", "calm"], "values": "zscore",
                 "tokens": [[[0.41, -1.2]], [[2.3, -0.8]], ...], "alert": null, "error": null}]

``tokens`` row i belongs to completion token i (as in ``"return_token_ids": true``): the ``values`` (z-scores
against the bank's neutral statistics, else raw projections, 2 decimals) at every monitored layer (S lists of K) of
the residual stream where the model read that token; the last completion token is never read back and has no row.
With ``"stream": true`` the readouts come as one more chunk, ``{"id", "object", "created", "model", "choices": [],
"emokern": [...]}``, just before ``data: [DONE]``. The trace stays held for the GET endpoint. Cost:
S·K numbers of 2 decimals per generated token, one RPC per monitored or steered response. Each readout also has
``"steered"``: null, or what the request's steering touched (layers, token positions: see
:meth:`emokern.engines.vllm.worker.Installation.readout`); a steered request that does not monitor gets a readout
with empty ``layers``, ``emotions`` and ``tokens`` and its ``"steered"``. Cost of the trace: 4·S·K bytes per
token held in the worker until fetched (at most ``EMOKERN_VLLM_MAX_TRACES`` finished requests), about 10·S·K bytes
per token of JSON.
"""

import json
import math

import numpy as np

__all__ = ["ReadoutMiddleware", "TraceEndpoint"]

_READOUT_PATHS = ("/v1/chat/completions", "/v1/completions")


def _as_json(record: dict) -> dict:
    S, K = len(record["layers"]), len(record["names"])
    data = np.frombuffer(record["data"], dtype=np.float32).reshape(record["length"], S, K)
    projections = [[[None if math.isnan(v) else round(v, 5) for v in site] for site in t] for t in data.tolist()]
    return {k: v for k, v in record.items() if k != "data"} | {"projections": projections}


def _monitored(body: bytes) -> bool:
    """Whether a request body carries an emokern spec that monitors or steers (the front end has already checked
    it): its response gets a readout (a steered one: at least what the steering touched)."""
    if b"emokern" not in body:
        return False
    try:
        spec = json.loads(body).get("vllm_xargs", {}).get("emokern")
        spec = json.loads(spec) if isinstance(spec, str) else spec
        return bool(isinstance(spec, dict) and (spec.get("monitor") or spec.get("steer")))
    except (ValueError, AttributeError):
        return False


async def _readouts(app, response_id: str, path: str, choices: int) -> list:
    """One readout per choice (None where nothing is held): chat requests run under the response id, completions
    prompts under ``<id>-<index>``."""
    engine = getattr(app.state, "emokern_engine", None)
    if engine is None:
        return [None] * choices
    ids = [response_id] if path == "/v1/chat/completions" else [f"{response_id}-{i}" for i in range(choices)]
    per_rank = await engine.collective_rpc("emokern_readout", args=(ids,))
    found = per_rank[0] if per_rank else [None] * len(ids)
    return list(found) + [None] * (choices - len(found))


class ReadoutMiddleware:
    """ASGI middleware adding the ``"emokern"`` readouts to monitored chat/completions responses (see the module
    docstring). Other requests pass through untouched; a response that is not a 200 is left as it is."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in _READOUT_PATHS:
            await self.app(scope, receive, send)
            return
        body = bytearray()
        state = {"mode": None, "start": None, "buffer": bytearray(), "first": None}

        async def receive_copy():
            message = await receive()
            if message["type"] == "http.request":
                body.extend(message.get("body", b""))
            return message

        async def send_with_readouts(message):
            if message["type"] == "http.response.start":
                headers = {k.lower(): v for k, v in message.get("headers", [])}
                if message["status"] != 200 or not _monitored(bytes(body)):
                    state["mode"] = "pass"
                elif headers.get(b"content-type", b"").startswith(b"text/event-stream"):
                    state["mode"] = "stream"
                else:
                    state["mode"], state["start"] = "json", message  # sent with the final length below
                    return
                await send(message)
                return
            if message["type"] != "http.response.body" or state["mode"] == "pass":
                await send(message)
                return
            if state["mode"] == "json":
                state["buffer"].extend(message.get("body", b""))
                if message.get("more_body", False):
                    return
                await self._send_json(scope, send, state)
                return
            chunk = message.get("body", b"")
            if state["first"] is None and b"data: {" in chunk:
                event = chunk[chunk.index(b"data: {") + 6:].split(b"\n\n", 1)[0]
                state["first"] = json.loads(event)
            if b"data: [DONE]" in chunk and state["first"] is not None:
                head, tail = chunk.split(b"data: [DONE]", 1)
                first = state["first"]
                n = 1 + max((c.get("index", 0) for c in first.get("choices", [])), default=0)
                readouts = await _readouts(scope["app"], first["id"], scope["path"], n)
                extra = {k: first[k] for k in ("id", "object", "created", "model") if k in first}
                event = json.dumps(extra | {"choices": [], "emokern": readouts}).encode()
                message = dict(message, body=head + b"data: " + event + b"\n\ndata: [DONE]" + tail)
            await send(message)

        await self.app(scope, receive_copy, send_with_readouts)

    @staticmethod
    async def _send_json(scope, send, state) -> None:
        payload = json.loads(bytes(state["buffer"]))
        readouts = await _readouts(scope["app"], payload["id"], scope["path"], len(payload.get("choices", [])))
        usage = payload.get("usage") or {}
        for readout in readouts:  # rows past the last completion token: a step the engine ran after the stop
            if readout is not None and len(payload.get("choices", [])) == 1 and "completion_tokens" in usage:
                del readout["tokens"][max(0, usage["completion_tokens"] - 1):]
        payload["emokern"] = readouts
        data = json.dumps(payload).encode()
        start = state["start"]
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(data)).encode()))
        await send(dict(start, headers=headers))
        await send({"type": "http.response.body", "body": data, "more_body": False})


class TraceEndpoint:
    """The ``vllm.endpoint_plugins`` entry point (a zero-argument factory, as vLLM expects)."""

    name = "emokern"
    required_tasks = ("generate",)

    def attach_router(self, app) -> None:
        from fastapi import Request

        app.add_middleware(ReadoutMiddleware)
        from fastapi.responses import JSONResponse

        # (no `from __future__ import annotations` in this module: FastAPI reads the annotation below as a class)
        @app.get("/v1/emokern/trace/{request_id}")
        async def emokern_trace(request_id: str, raw_request: Request):
            engine = raw_request.app.state.emokern_engine
            if engine is None:
                return JSONResponse({"error": "this server has no engine"}, status_code=503)
            # /v1/completions answers with "cmpl-X" and runs its prompts as "cmpl-X-0", "cmpl-X-1", ...
            wanted = [request_id, f"{request_id}-0"] if request_id.startswith("cmpl-") else [request_id]
            per_rank = await engine.collective_rpc("emokern_take", args=(wanted,))
            found = [r for r in (per_rank[0] if per_rank else []) if r is not None]
            record = found[0] if found else None
            if record is None:
                return JSONResponse({"error": f"no emokern trace is held for request {request_id!r} (not monitored, "
                                              f"still running, already fetched, or evicted)"}, status_code=404)
            return JSONResponse(_as_json(record))

        from emokern.engines.vllm import config as config_mod

        cfg = config_mod.from_env()
        if cfg is not None and cfg.registry_slots > 0:
            _attach_registry(app, cfg.registry_slots)

    async def init_state(self, engine_client, state, args) -> None:
        state.emokern_engine = engine_client
        state.emokern_api_servers = int(getattr(args, "api_server_count", None) or 1)


def _attach_registry(app, slots: int) -> None:
    """``/v1/emokern/vectors``: register, list and delete vectors at run time (:mod:`emokern.engines.vllm.registry`
    has the shapes, the refusals and the protection). Only attached when ``EMOKERN_VLLM_REGISTRY_SLOTS`` > 0."""
    import asyncio

    from fastapi import Request
    from fastapi.responses import JSONResponse

    from emokern.engines.vllm import config as config_mod
    from emokern.engines.vllm import registry as registry_mod

    lock = asyncio.Lock()  # one registration at a time: slot plans and commits must not interleave

    def refused(exc: "registry_mod.AdminError") -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    async def admitted(request: Request) -> None:
        registry_mod.check_admin(request.headers.get(registry_mod.ADMIN_HEADER),
                                 request.client.host if request.client else None)
        if getattr(request.app.state, "emokern_api_servers", 1) > 1:
            raise registry_mod.AdminError(409, "registering vectors needs one API server process (this server runs "
                                               "several, each with its own names: drop --api-server-count)")

    async def body_of(request: Request) -> bytes:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > registry_mod.MAX_BODY_BYTES:
            raise registry_mod.AdminError(413, f"the body has {size} bytes; at most {registry_mod.MAX_BODY_BYTES}")
        body = bytearray()
        async for chunk in request.stream():  # counted as it arrives: a missing or false length cannot get past
            body.extend(chunk)
            if len(body) > registry_mod.MAX_BODY_BYTES:
                raise registry_mod.AdminError(413, f"the body is larger than {registry_mod.MAX_BODY_BYTES} bytes")
        return bytes(body)

    def listing(registry) -> dict:
        layers = config_mod.load().layers
        return {"slots": registry.slots, "vectors": [{"name": n, "version": e.version, "slot": e.slot,
                                                      "layers": layers} for n, e in sorted(registry.names.items())]}

    @app.post("/v1/emokern/vectors")
    async def emokern_register(raw_request: Request):
        try:
            await admitted(raw_request)
            loaded = config_mod.load()
            name, vectors = registry_mod.directions_from_payload(await body_of(raw_request), loaded)
            registry = registry_mod.front(slots)
            async with lock:
                version, slot = registry.plan(name)
                engine = raw_request.app.state.emokern_engine
                try:
                    await engine.collective_rpc("emokern_register", args=(slot, name, version, vectors.tobytes(),
                                                                          list(vectors.shape)))
                except Exception as exc:  # noqa: BLE001 - the name keeps its old vector; the server keeps serving
                    return JSONResponse({"error": f"the workers did not take the vector: {exc}"}, status_code=500)
                replaced = registry.commit(name, version, slot)
        except registry_mod.AdminError as exc:
            return refused(exc)
        return JSONResponse({"name": name, "version": version, "slot": slot, "layers": list(loaded.layers),
                             "replaced": replaced})

    @app.get("/v1/emokern/vectors")
    async def emokern_vectors(raw_request: Request):
        try:
            await admitted(raw_request)
        except registry_mod.AdminError as exc:
            return refused(exc)
        return JSONResponse(listing(registry_mod.front(slots)))

    @app.delete("/v1/emokern/vectors/{name}")
    async def emokern_delete(name: str, raw_request: Request):
        try:
            await admitted(raw_request)
            async with lock:
                registry_mod.front(slots).remove(name)
        except registry_mod.AdminError as exc:
            return refused(exc)
        return JSONResponse({"name": name, "deleted": True})
