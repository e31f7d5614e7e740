"""``emokern ui``: a local web page to chat with a model, watch every token's emotions as it streams, and steer.

* :mod:`emokern.ui.app` — the Starlette app: the page, ``/api/info``, ``/api/generate`` (server-sent events) and the
  trace exports.
* :mod:`emokern.ui.requests` — what a request may carry and how it is checked (the vLLM plugin's spec parser).
* :mod:`emokern.ui.events` — the streamed events.
* :mod:`emokern.ui.backends` — :class:`~emokern.ui.backends.HFBackend`: a Hugging Face model patched here,
  one generation at a time.
* :mod:`emokern.ui.vllm_backend` — :class:`~emokern.ui.vllm_backend.VLLMBackend`: a running vLLM server with the
  emokern plugin, requests sent concurrently (vLLM batches them).
* :mod:`emokern.ui.cli` — ``emokern ui`` itself.
* ``static/`` — the page (HTML, CSS, vanilla JS; nothing external), shipped as package data.

Importing this package imports nothing heavy; the modules above import Starlette, torch or httpx when used.
"""
