"""The two places a page's request can run: a Hugging Face model patched in this process (:class:`HFBackend`) or a
running vLLM server with the emokern plugin (:class:`VLLMBackend`, in :mod:`emokern.ui.vllm_backend`).

A backend turns a checked request (:class:`emokern.ui.requests.ParsedRequest`) into a :class:`Job`
(``make_job``: applies the chat template and the prompt-token limit, raising :class:`RequestError`) and streams the
job's events (``events``: an async iterator of server-sent-event strings, see :mod:`emokern.ui.events`). Finished
generations keep their :class:`emokern.Trace` in a small store for the export links.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import inspect
import itertools
import logging
import threading
import time
from collections import OrderedDict
from typing import AsyncIterator, Callable, List, Optional

import torch

from emokern.engines.hf import patch
from emokern.core.trace import SINK_FACTOR, Trace
from emokern.ui.events import readout_rows, sse
from emokern.ui.requests import Limits, ParsedRequest, RequestError, SpecLayers, alert_hit, steer_items

__all__ = ["Backend", "HFBackend", "Job", "chat_prompt_ids"]

log = logging.getLogger("emokern.ui")

TRACE_STORE = 16  # finished traces kept for export (each ~4*T*S*K bytes: ~10 MB at 500 tokens x 30 layers x 171)


def chat_prompt_ids(tokenizer, messages: List[dict]) -> List[int]:
    """The token ids of ``messages`` in the tokenizer's chat template with the assistant's turn opened; without a
    template, ``User:`` / ``Assistant:`` paragraphs."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        names = {"user": "User", "assistant": "Assistant", "system": "System"}
        text = "\n\n".join(f"{names[m['role']]}: {m['content']}" for m in messages) + "\n\nAssistant:"
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclasses.dataclass
class Job:
    """One request on its way through a backend. ``cancelled`` is set when the page goes away (the stream is
    closed); the generation loop checks it every token."""

    id: str
    request: ParsedRequest
    prompt_ids: List[int]
    cancelled: bool = False


class _IncrementalText:
    """Streams the text each new token adds, by the rule of :meth:`emokern.Trace.decode_tokens` (a window that
    restarts one emitted token back; a token that ends inside a multi-byte character gets "" and the token that
    completes it the whole character). The page replaces these with ``decode_tokens`` of the whole sequence at the
    end, so any difference at the window edges lasts only while streaming."""

    def __init__(self, tokenizer, context: List[int]):
        self.tok, self.ids = tokenizer, list(context)
        self.prefix = self.read = len(self.ids)
        self.prefix_text = ""
        if self.ids:  # start from the last context token, as decode_tokens would at this point
            self.prefix = len(self.ids) - 1
            self.prefix_text = self._dec(self.ids[self.prefix:self.read])

    def _dec(self, chunk: List[int]) -> str:
        return self.tok.decode(chunk, skip_special_tokens=False, clean_up_tokenization_spaces=False) if chunk else ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self._dec(self.ids[self.prefix:])
        if text.endswith("\ufffd") or len(text) <= len(self.prefix_text):
            return ""
        out = text[len(self.prefix_text):]
        self.prefix, self.read = self.read, len(self.ids)
        self.prefix_text = self._dec(self.ids[self.prefix:self.read])
        return out


class Backend:
    """What the app needs from a backend: ``info()``, ``make_job(request)``, ``events(job)`` and ``trace(id)``."""

    kind = "?"
    queue_note = ""

    def __init__(self, bank, tokenizer, *, layers: List[int], readout_layer: int, steer_layer: int, limits: Limits,
                 model_name: str, bank_path: str = ""):
        self.bank, self.tokenizer, self.limits = bank, tokenizer, limits
        self.layers, self.readout_layer, self.steer_layer = list(layers), readout_layer, steer_layer
        self.spec_layers = SpecLayers.of(bank, self.layers)
        self.model_name, self.bank_path = model_name, bank_path
        self._traces: "OrderedDict[str, Trace]" = OrderedDict()
        self._ids = itertools.count(1)
        self._traces_lock = threading.Lock()

    def info(self) -> dict:
        """What the page shows and offers: emotions, layers, limits, how requests are scheduled."""
        from emokern.engines.vllm.spec import MAX_STRENGTH

        return {"backend": self.kind, "model": self.model_name, "bank": self.bank_path,
                "emotions": list(self.bank.names), "layers": self.layers, "readout_layer": self.readout_layer,
                "steer_layer": self.steer_layer,
                "values": "zscore" if self.bank.neutral_mean is not None else "projection",
                "max_strength": MAX_STRENGTH, "limits": dataclasses.asdict(self.limits), "queue": self.queue_note,
                "sink_factor": SINK_FACTOR}

    def new_id(self) -> str:
        return f"g{next(self._ids)}"

    def keep_trace(self, job_id: str, trace: Trace) -> None:
        with self._traces_lock:
            self._traces[job_id] = trace
            while len(self._traces) > TRACE_STORE:
                self._traces.popitem(last=False)

    def trace(self, job_id: str) -> Optional[Trace]:
        """The trace of finished generation ``job_id`` (None once evicted: the store keeps the last 16)."""
        with self._traces_lock:
            return self._traces.get(job_id)

    def make_job(self, request: ParsedRequest) -> Job:
        ids = chat_prompt_ids(self.tokenizer, request.messages)
        if len(ids) > self.limits.max_prompt_tokens:
            raise RequestError(f"the prompt is too long: {len(ids)} tokens with the chat template, this server takes "
                               f"at most {self.limits.max_prompt_tokens} (start a new chat, or raise "
                               f"--max-prompt-tokens)")
        return Job(self.new_id(), request, ids)

    def events(self, job: Job) -> AsyncIterator[str]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class HFBackend(Backend):
    """A Hugging Face causal LM patched with :func:`emokern.patch` at every layer of the bank, generating one request
    at a time (the patch's steering settings are per model, so requests take turns: a FIFO queue).

    Generation is a KV-cached sampling loop (temperature, nucleus ``top_p``, a ``torch.Generator`` seeded with the
    request's seed, so two requests with the same seed and prompt draw the same tokens until their logits differ;
    temperature 0 is greedy). Each step's readout is read back through :meth:`emokern.PatchHandle.trace` (the patch
    is made without a tokenizer, so that call only copies projections; token texts are decoded here).
    """

    kind = "hf"
    queue_note = ("this model generates one request at a time: requests from other tabs wait in a queue "
                  "(first come, first served)")

    def __init__(self, model, tokenizer, bank, *, readout_layer: Optional[int] = None,
                 steer_layer: Optional[int] = None, limits: Limits = Limits(), model_name: str = "",
                 bank_path: str = ""):
        layers = list(bank.layers)
        readout = bank.default_layer()[0] if readout_layer is None else readout_layer
        steer = bank.two_thirds_layer() if steer_layer is None else steer_layer
        for name, layer in (("readout layer", readout), ("steering layer", steer)):
            if layer not in layers:
                raise ValueError(f"the {name} {layer} is not in the bank (its layers: {layers})")
        super().__init__(bank, tokenizer, layers=layers, readout_layer=readout, steer_layer=steer, limits=limits,
                         model_name=model_name, bank_path=bank_path)
        self.model = model
        self.handle = patch(model, bank, layers=layers, batch=1, tokens=256)
        self.site = self.handle.site_names.index(f"layer{readout}.residual")
        slot = bank.layer_slot(readout)
        self.mean = bank.neutral_mean[slot] if bank.neutral_mean is not None else None
        self.std = bank.neutral_std[slot] if bank.neutral_std is not None else None
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.eos = set(eos)
        self.device = next(model.parameters()).device
        # transformers 5 renamed the forward's past_key_values to cache (the old name warns); take what it has
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        # one worker thread: the model and the patch are used by one generation at a time, also when a page that
        # went away leaves its (cancelled) generation finishing while the next request is already waiting
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="emokern-ui-hf")
        self._turn = asyncio.Lock()  # FIFO, so the page's "n ahead" is the order requests run in
        self._pending = 0

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)
        self.handle.remove()

    async def events(self, job: Job) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(event: str, data: dict) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (event, data))

        ahead = self._pending
        self._pending += 1
        try:
            if ahead:
                yield sse("queued", {"ahead": ahead})
            async with self._turn:
                future = loop.run_in_executor(self._worker, self._run, job, emit)
                future.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, None))
                while (item := await queue.get()) is not None:
                    yield sse(*item)
                future.result()  # _run turns every exception into an error event; this re-raises only a bug of its own
        finally:
            self._pending -= 1
            job.cancelled = True  # the page closed the stream early: the worker stops at its next token

    # ------------------------------------------------------------------------------------------ the worker thread
    def _run(self, job: Job, emit: Callable[[str, dict], None]) -> None:
        try:
            self._generate(job, emit)
        except Exception as exc:  # one request failing must not stop the server; the page gets one line
            log.exception("generation %s failed", job.id)
            emit("error", {"message": f"generation failed: {type(exc).__name__}: {exc}"})
        finally:
            self.handle.clear_steering()

    def _sample(self, logits: torch.Tensor, request: ParsedRequest, gen: torch.Generator) -> int:
        logits = logits.float()
        if request.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / request.temperature, dim=-1)
        if request.top_p < 1:
            p, idx = probs.sort(descending=True)
            p[(p.cumsum(0) - p) >= request.top_p] = 0  # keep the smallest head whose mass reaches top_p
            return int(idx[torch.multinomial(p, 1, generator=gen)])
        return int(torch.multinomial(probs, 1, generator=gen))

    @torch.no_grad()
    def _generate(self, job: Job, emit: Callable[[str, dict], None]) -> None:
        from transformers import DynamicCache

        req, h, ids = job.request, self.handle, job.prompt_ids
        W = len(ids)
        t0 = time.perf_counter()
        h.clear_steering()
        for item in steer_items(req.spec):
            h.steer(item["emotions"], item.get("strength"), mode=item.get("mode", "add"),
                    scope=item.get("scope", "all"), layers=item.get("layers"), relative=item.get("relative", True))
        prompt = torch.tensor([ids], device=self.device)
        h.prepare(prompt, torch.ones_like(prompt))
        h.reserve(batch=1, tokens=W + req.max_new_tokens + 1)
        emit("start", {"id": job.id, "prompt_tokens": Trace.decode_tokens(self.tokenizer, ids),
                       "layer": self.readout_layer, "backend": self.kind})
        text = _IncrementalText(self.tokenizer, ids)
        gen = torch.Generator().manual_seed(req.seed)
        alert = req.parsed.alert
        alert_z: List[float] = []
        fired: Optional[int] = None
        fed, generated = list(ids), []
        sent = 0  # positions whose readout went out
        ttft = None
        stop = "length"
        cache = DynamicCache(config=self.model.config)  # grown in place by every forward
        out = self.model(input_ids=prompt, use_cache=True, **{self._cache_arg: cache})
        for step in range(req.max_new_tokens):
            token = self._sample(out.logits[0, -1], req, gen)
            generated.append(token)
            if ttft is None:
                ttft = time.perf_counter() - t0
                t_first = time.perf_counter()
            emit("token", {"i": W + step, "text": text.push(token)})
            # what was fed so far is recorded now: send its readout (the prompt's after the first token, for a
            # fast first token), then check the alert on the generated positions among it
            rows = h.trace(torch.tensor([fed])).projections[0, sent:, self.site]
            emit("readout", {"start": sent, **readout_rows(rows, self.mean, self.std)})
            if alert is not None and fired is None and len(fed) > W:
                new = rows[max(0, W - sent):, self.bank.index(alert.name)]
                alert_z += ((new - self.mean[self.bank.index(alert.name)]) /
                            self.std[self.bank.index(alert.name)].clamp(min=1e-6)).tolist()
                hit = alert_hit(alert_z, alert.z, alert.tokens)
                if hit is not None:
                    fired = W + hit
                    emit("alert", {"emotion": alert.name, "layer": alert.layer, "z": alert.z, "tokens": alert.tokens,
                                   "position": fired, "stopped": alert.stop})
            sent = len(fed)
            if fired is not None and alert.stop:
                stop = "alert"
                break
            if token in self.eos:
                stop = "eos"
                break
            if job.cancelled:
                stop = "cancelled"
                break
            if step + 1 == req.max_new_tokens:
                break
            fed.append(token)
            out = self.model(input_ids=torch.tensor([[token]], device=self.device), use_cache=True,
                             **{self._cache_arg: cache})
        if stop != "alert" and sent < len(fed):  # the last fed token's readout (read when it was fed)
            rows = h.trace(torch.tensor([fed])).projections[0, sent:, self.site]
            emit("readout", {"start": sent, **readout_rows(rows, self.mean, self.std)})
        elapsed = time.perf_counter() - t_first if ttft is not None else 0.0
        all_ids = ids + generated
        trace = h.trace(torch.tensor([all_ids]), prompt_width=W)
        tokens = Trace.decode_tokens(self.tokenizer, all_ids)
        self.keep_trace(job.id, dataclasses.replace(trace, tokens=[tokens]))
        emit("done", {"id": job.id, "tokens": tokens, "n_prompt": W, "n_generated": len(generated),
                      "reply": self.tokenizer.decode(generated, skip_special_tokens=True),
                      "ttft_s": round(ttft or 0.0, 4),
                      "tokens_per_s": round((len(generated) - 1) / elapsed, 2) if len(generated) > 1 and elapsed > 0
                      else None, "stop": stop})
