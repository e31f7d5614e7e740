"""The events a generation streams to the page (server-sent events, ``event: NAME`` + ``data: JSON``), shared by
both backends, and the per-token readout rows they carry.

Events, in order:

* ``queued`` ``{"ahead": n}`` — the Hugging Face backend generates one request at a time; ``n`` requests are
  running or waiting before this one (sent only when ``n > 0``).
* ``start`` ``{"id", "prompt_tokens": [text, ...], "layer": readout layer, "backend"}`` — the prompt as the model
  reads it (chat template included), one string per token (:meth:`emokern.Trace.decode_tokens`).
* ``token`` ``{"i": position, "text"}`` — one generated token (``i`` counts from the prompt's first token).
* ``readout`` ``{"start": position, "z": [[K z-scores], ...], "norm": [...]}`` — the readout of positions
  ``start, start+1, ...``: every emotion's z-score against neutral text at the readout layer (4 decimals, null when
  not a number) and the L2 norm of the raw projections over all K emotions (the attention-sink rule's input, see
  :meth:`emokern.Trace.sink_positions`). A position is read when it is fed to the model, so a generated token's
  readout arrives one step after the token, and the last generated token has none.
* ``alert`` ``{"emotion", "layer", "z", "tokens", "position", "stopped"}`` — the alert fired at ``position``.
* ``done`` ``{"id", "tokens": [all token texts], "n_prompt", "n_generated", "ttft_s", "tokens_per_s", "stop"}`` —
  the final token texts (the page re-renders with them), time to first token from the moment generation began
  (queue wait excluded), generated tokens per second after the first token, and why it ended (``eos``,
  ``length``, ``alert``, ``cancelled``).
* ``error`` ``{"message"}`` — the request failed; the message is meant for the page.
"""

from __future__ import annotations

import json
import math
from typing import List, Optional

import torch

__all__ = ["sse", "readout_rows"]


def sse(event: str, data: dict) -> str:
    """One server-sent event."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _round(v: float) -> Optional[float]:
    return None if not math.isfinite(v) else round(v, 4)


def readout_rows(proj: torch.Tensor, mean: Optional[torch.Tensor], std: Optional[torch.Tensor]) -> dict:
    """``{"z": ..., "norm": ...}`` for projections ``proj`` (N, K) at one site, with that site's neutral ``mean`` and
    ``std`` (K,) (raw projections when the bank has none; the page is told which in ``/api/info``)."""
    proj = proj.double()
    z = proj if mean is None or std is None else (proj - mean.double()) / std.double().clamp(min=1e-6)
    norm: List[Optional[float]] = [None if not math.isfinite(v) else round(v, 4) for v in proj.norm(dim=-1).tolist()]
    return {"z": [[_round(v) for v in row] for row in z.tolist()], "norm": norm}
