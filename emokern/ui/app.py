"""The ``emokern ui`` web app (Starlette): the page, its static files, and a small JSON + server-sent-events API.

Routes:

* ``GET /`` — the page (``emokern/ui/static/index.html``; ``/static/...`` its script and style; nothing external).
* ``GET /api/info`` — the backend's :meth:`~emokern.ui.backends.Backend.info`.
* ``POST /api/generate`` — a request (:mod:`emokern.ui.requests`); answers 400 ``{"error": message}`` for a request
  it refuses, otherwise a ``text/event-stream`` of the events of :mod:`emokern.ui.events`.
* ``GET /api/trace/{id}.json?layers=readout|all`` — a finished generation's :meth:`emokern.Trace.to_dict` (the
  readout layer only by default; ``all``: every recorded layer), plus ``id`` and ``readout_layer``; a download.
* ``GET /api/trace/{id}.html?emotion=E&emotions=A,B`` — the same trace as the self-contained heatmap page of
  :func:`emokern.core.trace_plots.trace_heatmap_html` at the readout layer, coloured by ``E`` (with a picker
  among ``A,B``); a download.

Every error answers JSON ``{"error": message}`` (400 for bad input, 404 for an unknown trace, 500 with the
exception's type and message for a bug, logged with its traceback on the server); no traceback reaches the page, and
the server keeps serving.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from emokern.core.trace_plots import trace_heatmap_html
from emokern.ui.requests import RequestError, parse_body, parse_request

__all__ = ["STATIC", "create_app"]

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("emokern.ui")


def _error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(backend) -> Starlette:
    """The app serving ``backend`` (:class:`~emokern.ui.backends.HFBackend` or
    :class:`~emokern.ui.vllm_backend.VLLMBackend`). The backend is closed when the app shuts down."""

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def info(request: Request) -> Response:
        return JSONResponse(backend.info())

    async def generate(request: Request) -> Response:
        try:
            body = parse_body(await request.body())
            parsed = parse_request(body, backend.spec_layers, backend.readout_layer, backend.limits)
            job = backend.make_job(parsed)
        except RequestError as exc:
            return _error(str(exc))
        return StreamingResponse(backend.events(job), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    def _trace_or_404(job_id: str):
        trace = backend.trace(job_id)
        if trace is None:
            raise HTTPException(404, f"no trace {job_id!r} here (the server keeps the last 16 generations; it may "
                                     f"have been evicted, or the server restarted)")
        return trace

    async def trace_json(request: Request) -> Response:
        job_id = request.path_params["job"]
        trace = _trace_or_404(job_id)
        which = request.query_params.get("layers", "readout")
        if which not in ("readout", "all"):
            return _error(f"'layers' must be 'readout' or 'all'; got {which!r}")
        sites = None if which == "all" else [f"layer{backend.readout_layer}.residual"]
        data = {"id": job_id, "readout_layer": backend.readout_layer, "model": backend.model_name,
                **trace.to_dict(sites=sites)}
        return JSONResponse(data, headers={"Content-Disposition": f'attachment; filename="emokern-{job_id}.json"'})

    async def trace_html(request: Request) -> Response:
        job_id = request.path_params["job"]
        trace = _trace_or_404(job_id)
        emotion = request.query_params.get("emotion", "")
        others = [e for e in request.query_params.get("emotions", "").split(",") if e]
        for name in [emotion] + others:
            if name not in trace.names:
                try:
                    backend.bank.index(name)
                except KeyError as exc:
                    return _error(f"heatmap: {exc.args[0]}")
        with tempfile.TemporaryDirectory() as tmp:
            path = trace_heatmap_html(trace, emotion, Path(tmp) / "trace.html",
                                      site=f"layer{backend.readout_layer}.residual", emotions=others,
                                      title=f"emokern ui · {backend.model_name} · {job_id}")
            page = path.read_text(encoding="utf-8")
        return HTMLResponse(page, headers={"Content-Disposition": f'attachment; filename="emokern-{job_id}.html"'})

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return _error(str(exc.detail), exc.status_code)

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("request %s failed", request.url.path, exc_info=exc)
        return _error(f"internal error: {type(exc).__name__}: {exc}", 500)

    routes = [
        Route("/", index),
        Route("/api/info", info),
        Route("/api/generate", generate, methods=["POST"]),
        Route("/api/trace/{job}.json", trace_json),
        Route("/api/trace/{job}.html", trace_html),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        backend.close()

    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error},
                     lifespan=lifespan)
