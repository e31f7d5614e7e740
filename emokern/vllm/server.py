"""``GET /v1/emokern/trace/{request_id}`` on ``vllm serve``: the trace of a finished, monitored request.

Enable it with the general plugin (``EMOKERN_VLLM_BANK=...``) and vLLM's endpoint-plugin allowlist::

    EMOKERN_VLLM_BANK=bank.json VLLM_PLUGINS=emokern vllm serve MODEL

(``VLLM_PLUGINS`` names the plugins vLLM may load; both emokern entry points are called ``emokern``.) Send the
spec as a JSON string in ``vllm_xargs``::

    POST /v1/chat/completions  {"messages": [...], "vllm_xargs": {"emokern": "{\\"monitor\\": true}"}}

then fetch the trace with the response's ``id`` (``chatcmpl-...``), once: the worker hands it over and forgets it.
The answer is JSON: ``layers`` (S), ``names`` (K), ``prompt_len``, ``length`` (T positions recorded),
``projections`` (T x S x K numbers, null where a position was not recorded), ``neutral_mean`` / ``neutral_std``
(S x K, for z-scores, or null) and ``alert`` (null or ``{"emotion", "layer", "z", "tokens", "position",
"stopped"}``); 404 when no trace is held for that id. Cost: 4·S·K bytes per token held in the worker until
fetched (at most ``EMOKERN_VLLM_MAX_TRACES`` finished requests), about 10·S·K bytes per token of JSON.
"""

import math

import numpy as np

__all__ = ["TraceEndpoint"]


def _as_json(record: dict) -> dict:
    S, K = len(record["layers"]), len(record["names"])
    data = np.frombuffer(record["data"], dtype=np.float32).reshape(record["length"], S, K)
    projections = [[[None if math.isnan(v) else round(v, 5) for v in site] for site in t] for t in data.tolist()]
    return {k: v for k, v in record.items() if k != "data"} | {"projections": projections}


class TraceEndpoint:
    """The ``vllm.endpoint_plugins`` entry point (a zero-argument factory, as vLLM expects)."""

    name = "emokern"
    required_tasks = ("generate",)

    def attach_router(self, app) -> None:
        from fastapi import Request
        from fastapi.responses import JSONResponse

        # (no `from __future__ import annotations` in this module: FastAPI reads the annotation below as a class)
        @app.get("/v1/emokern/trace/{request_id}")
        async def emokern_trace(request_id: str, raw_request: Request):
            engine = raw_request.app.state.emokern_engine
            if engine is None:
                return JSONResponse({"error": "this server has no engine"}, status_code=503)
            per_rank = await engine.collective_rpc("emokern_take", args=([request_id],))
            record = per_rank[0][0] if per_rank and per_rank[0] else None
            if record is None:
                return JSONResponse({"error": f"no emokern trace is held for request {request_id!r} (not monitored, "
                                              f"still running, already fetched, or evicted)"}, status_code=404)
            return JSONResponse(_as_json(record))

    async def init_state(self, engine_client, state, args) -> None:
        state.emokern_engine = engine_client
