"""The page against a running vLLM server with the emokern plugin (``emokern ui --vllm URL``).

Each request goes to the server as it comes (no queue here: vLLM batches the requests of every tab), as a streamed
``POST /v1/completions`` whose prompt is the token ids of the chat template applied here (so the page knows the
prompt's tokens exactly), with the page's spec in ``vllm_xargs`` (``{"emokern": "<spec as JSON>"}``: steer, and
monitor every emotion at the readout layer, prompt included; see :mod:`emokern.engines.vllm.spec`) and
``return_token_ids`` for the generated ids. Text streams as vLLM sends it; the readouts come once the request ends
(the plugin reads them out after generation): the page then gets every position's readout, prompt and reply, from
``GET /v1/emokern/trace/{id}`` (the plugin's trace endpoint), which also gives the exported trace and the alert. If
that call fails, the response's own readout chunk (generated tokens only) colours the reply.

The readout layer and the steerable layers are the server's installed layers (its ``EMOKERN_VLLM_LAYERS``), which
the page cannot ask the server for: ``--vllm-layers`` must match them (default: the bank's two-thirds layer, the
plugin's default). The bank given here must be the server's (names, norms and neutral statistics come from it).
"""

from __future__ import annotations

import json
import math
import time
from typing import AsyncIterator, List, Optional

import torch

from emokern.core.trace import Trace
from emokern.ui.backends import Backend, Job
from emokern.ui.events import readout_rows, sse
from emokern.ui.requests import Limits

__all__ = ["VLLMBackend"]


def _error_message(status: int, body: bytes) -> str:
    """The message of a vLLM error response (``{"error": {"message"}}`` or ``{"message"}``), else the status."""
    try:
        data = json.loads(body)
        err = data.get("error", data)
        message = err.get("message") if isinstance(err, dict) else err
        if message:
            return f"the vLLM server refused the request ({status}): {message}"
    except (ValueError, AttributeError):
        pass
    return f"the vLLM server answered {status}: {body[:300].decode(errors='replace')}"


class VLLMBackend(Backend):
    """Requests relayed to a vLLM server; see the module docstring."""

    kind = "vllm"
    queue_note = "requests go to the vLLM server as they come; it batches the requests of every tab"

    def __init__(self, url: str, served_model: str, tokenizer, bank, *, layers: List[int], limits: Limits = Limits(),
                 bank_path: str = ""):
        for layer in layers:
            bank.layer_slot(layer)  # the bank must have vectors wherever the server has the op
        super().__init__(bank, tokenizer, layers=layers, readout_layer=layers[0], steer_layer=layers[0],
                         limits=limits, model_name=served_model, bank_path=bank_path)
        self.url = url.rstrip("/")
        self.served_model = served_model

    @classmethod
    def connect(cls, url: str, bank, *, tokenizer: Optional[str] = None, layers: Optional[List[int]] = None,
                limits: Limits = Limits(), bank_path: str = "") -> "VLLMBackend":
        """Ask the server which model it serves (``GET /v1/models``) and load that model's tokenizer from
        ``tokenizer`` (default: the served name, when it is a local directory, as with ``make demo``'s model)."""
        import httpx
        from transformers import AutoTokenizer

        url = url.rstrip("/")
        try:
            resp = httpx.get(f"{url}/v1/models", timeout=10)
            resp.raise_for_status()
            served = resp.json()["data"][0]["id"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"cannot reach a vLLM server at {url} ({exc}); start it as in the README's vLLM "
                             f"section, with EMOKERN_VLLM_BANK and VLLM_PLUGINS=emokern") from None
        source = tokenizer or served
        try:
            tok = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot load the tokenizer of the served model from {source!r} ({exc}); pass "
                             f"--tokenizer with the model's directory") from None
        return cls(url, served, tok, bank, layers=layers or [bank.two_thirds_layer()], limits=limits,
                   bank_path=bank_path)

    def _payload(self, job: Job) -> dict:
        req = job.request
        return {"model": self.served_model, "prompt": job.prompt_ids, "max_tokens": req.max_new_tokens,
                "temperature": req.temperature, "top_p": req.top_p, "seed": req.seed, "stream": True,
                "return_token_ids": True, "skip_special_tokens": False,
                "vllm_xargs": {"emokern": json.dumps(req.spec)}}

    def _trace(self, record: dict, ids: List[int], W: int) -> Trace:
        """An :class:`emokern.Trace` of the plugin's trace record for ``ids`` (prompt of width ``W`` + reply)."""
        T, S, K = len(ids), len(record["layers"]), len(record["names"])
        proj = torch.full((1, T, S, K), float("nan"))
        rows = record["projections"][:max(0, T - 1)]  # the last token is never fed back
        if rows:
            data = torch.tensor([[[math.nan if v is None else v for v in site] for site in row] for row in rows])
            proj[0, :len(rows)] = data
        is_prompt = torch.zeros(1, T, dtype=torch.bool)
        is_prompt[0, :W] = True
        mean = std = None
        if record.get("neutral_mean") is not None:
            mean, std = torch.tensor(record["neutral_mean"]), torch.tensor(record["neutral_std"])
        return Trace(proj, torch.tensor([ids]), [Trace.decode_tokens(self.tokenizer, ids)], is_prompt,
                     torch.zeros(1, T, dtype=torch.bool), [f"layer{layer}.residual" for layer in record["layers"]],
                     list(record["names"]), mean, std)

    async def events(self, job: Job) -> AsyncIterator[str]:
        import httpx

        ids, W = job.prompt_ids, len(job.prompt_ids)
        generated: List[int] = []
        texts: List[str] = []
        readout_chunk = None
        response_id = None
        stop = "length"
        t0 = time.perf_counter()
        t_first = None
        async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10)) as client:
            try:
                async with client.stream("POST", f"{self.url}/v1/completions", json=self._payload(job)) as resp:
                    if resp.status_code != 200:
                        yield sse("error", {"message": _error_message(resp.status_code, await resp.aread())})
                        return
                    yield sse("start", {"id": job.id, "prompt_tokens": Trace.decode_tokens(self.tokenizer, ids),
                                        "layer": self.readout_layer, "backend": self.kind})
                    async for line in resp.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        if line == "data: [DONE]":
                            break
                        chunk = json.loads(line[6:])
                        response_id = response_id or chunk.get("id")
                        if "emokern" in chunk and not chunk.get("choices"):
                            readout_chunk = (chunk["emokern"] or [None])[0]
                            continue
                        for choice in chunk.get("choices", []):
                            new = list(choice.get("token_ids") or [])
                            text = choice.get("text") or ""
                            if t_first is None and (new or text):
                                t_first = time.perf_counter()
                            # one event per token id; the chunk's text goes with its first token (the page
                            # re-renders every token's own text at the end)
                            for n, token in enumerate(new or ([None] if text else [])):
                                i = W + len(generated) + len(texts)
                                yield sse("token", {"i": i, "text": text if n == 0 else ""})
                                if token is None:
                                    texts.append(text)
                                else:
                                    generated.append(token)
                            if choice.get("finish_reason"):
                                stop = {"stop": "eos", "length": "length"}.get(choice["finish_reason"],
                                                                               choice["finish_reason"])
            except httpx.HTTPError as exc:
                yield sse("error", {"message": f"the vLLM server at {self.url} failed: {type(exc).__name__}: {exc}"})
                return
            t_end = time.perf_counter()
            if texts and not generated:  # a server without return_token_ids: the reply's ids from its text
                generated = list(self.tokenizer("".join(texts), add_special_tokens=False)["input_ids"])
            all_ids = ids + generated
            record = None
            if response_id is not None:
                try:
                    got = await client.get(f"{self.url}/v1/emokern/trace/{response_id}")
                    record = got.json() if got.status_code == 200 else None
                except (httpx.HTTPError, ValueError):
                    record = None
        if record is not None and record.get("error"):
            yield sse("error", {"message": f"the emokern plugin failed this request: {record['error']}"})
            return
        site = None
        if record is not None and self.readout_layer in record.get("layers", []):
            site = record["layers"].index(self.readout_layer)
            trace = self._trace(record, all_ids, W)
            self.keep_trace(job.id, trace)
            rows = trace.projections[0, :max(0, len(all_ids) - 1), site]
            slot = self.bank.layer_slot(self.readout_layer)
            mean = self.bank.neutral_mean[slot] if self.bank.neutral_mean is not None else None
            std = self.bank.neutral_std[slot] if self.bank.neutral_std is not None else None
            yield sse("readout", {"start": 0, **readout_rows(rows, mean, std)})
            if record.get("alert"):
                yield sse("alert", record["alert"])
                if record["alert"].get("stopped"):
                    stop = "alert"
        elif readout_chunk is not None and readout_chunk.get("tokens"):
            layer_i = readout_chunk["layers"].index(self.readout_layer) if self.readout_layer in \
                readout_chunk["layers"] else 0
            z = [[None if v is None else v for v in row[layer_i]] for row in readout_chunk["tokens"]]
            # the chunk carries z-scores (no raw norms): every norm is 1, so no reply token is taken for a sink
            yield sse("readout", {"start": W, "z": z, "norm": [1.0] * len(z)})
            if readout_chunk.get("alert"):
                yield sse("alert", readout_chunk["alert"])
        tokens = Trace.decode_tokens(self.tokenizer, all_ids)
        elapsed = (t_end - t_first) if t_first is not None else 0.0
        yield sse("done", {"id": job.id, "tokens": tokens, "n_prompt": W, "n_generated": len(generated),
                           "reply": self.tokenizer.decode(generated, skip_special_tokens=True),
                           "ttft_s": round((t_first or t_end) - t0, 4),
                           "tokens_per_s": round((len(generated) - 1) / elapsed, 2)
                           if len(generated) > 1 and elapsed > 0 else None, "stop": stop})
