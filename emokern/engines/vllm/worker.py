"""Inside a vLLM worker: the op at the chosen decoder layers, the per-step routing, and the recorded traces.

(About 700 lines on purpose: install, per-step routing, the registry's vector rows and trace recording all index the
same engine-lifetime buffers; the request spec, the registry's bookkeeping and the endpoints live beside it.)

Installation (:func:`install`, at the runner's ``load_model``, before vLLM's warm-up compiles the model): one
forward hook per chosen decoder layer whose body is a single registered op, ``emokern_vllm::residual_site_``, on
slices of buffers allocated here once for the engine's maximum batched tokens. Compilation (inductor on CPU,
piecewise CUDA graphs on GPU) traces the hook once and keeps the op as one opaque node; only buffer contents
change between steps, so nothing needs ``enforce_eager``.

Per step (:meth:`Installation.begin_step`, on the host, just before the runner's forward): every token row of the
flattened batch gets, per site, the table row of its request's steering slot when its request steers at that site
and the token's position is in the request's scope, else -1. After the forward (:meth:`Installation.end_step`)
the projections of monitored requests' rows are copied to per-request host buffers, indexed by position, so a
re-computed position (chunked prefill boundaries, recompute after preemption) overwrites its earlier value.

What the site op computes. vLLM's decoder layers return ``(hidden_states, residual)`` and the residual stream
that the Hugging Face patch monitors is their sum ``s = h + r``. The op projects ``s`` onto all K bank vectors
(monitoring), steers ``s`` in place with the fused op (all K at once, identity entries unchanged), and writes
``s' - r`` back into ``h`` for the steered rows only: unsteered rows of ``h`` are never written, so a request that
is not steered computes bit-for-bit what it computes beside other unsteered requests. A steered row whose result
is not finite is left as it was (unsteered), so an overflow can never reach the rest of the model.

A request can fail, the engine cannot. Everything done for one request on the host (parsing its spec, filling its
table slot and routing, recording its projections) runs under a per-request guard, and on CPU the op reports the
rows whose steered result was not finite: such a request is *failed* (:meth:`Installation.fail`): it loses its
steering and its record, ends at its next token as if the model had ended it (``finish_reason`` "stop"; with
``ignore_eos`` it runs on unsteered), and its error is handed over by :meth:`Installation.take` like a trace.

Registered vectors (:mod:`emokern.engines.vllm.registry`) live in ``EMOKERN_VLLM_REGISTRY_SLOTS`` extra rows of the
op's vector buffer, after the bank's K (zero, so inert, until written by :meth:`Installation.register`); a request
names them through the pins the front end gave it. What each steered request touched (its "fired" record: layers,
token positions) is kept beside its trace and reported by :meth:`Installation.readout`.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Dict, List, Optional

import numpy as np
import torch

from emokern.core.architecture import find_decoder_layers
from emokern.core.steering import identity_tables, reset_to_identity
from emokern.engines.vllm import spec as spec_mod

logger = logging.getLogger("emokern.engines.vllm")

__all__ = ["Installation", "install", "installation"]

# The current engine step's host flags, read by the op on CPU and set by begin_step: the op skips the work no request
# of the step asked for ("monitor": some request records; "steer": per site, some request steers there). Only on
# CPU: on CUDA a captured graph would freeze whichever branch was taken at capture time.
# "bad_rows": token rows of this step whose steered result was not finite (filled by the op on CPU only: on CUDA it
# would cost a host sync per layer; the rows are still left unsteered there).
_STEP_FLAGS = {"monitor": True, "steer": [], "bad_rows": []}
# Seconds spent inside the op on CPU (its body runs eagerly even in a compiled graph): the plugin's in-forward cost.
_OP_SECONDS = [0.0]


@torch.library.custom_op("emokern_vllm::residual_site_", mutates_args=("h", "P"))
def residual_site_(h: torch.Tensor, r: Optional[torch.Tensor], V: torch.Tensor, row: torch.Tensor,
                   a: torch.Tensor, b: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, P: torch.Tensor,
                   site: int) -> None:
    """Monitor and steer the residual stream ``s = h + r`` (``r`` None: ``s = h``) of N tokens at one site.

    ``h``, ``r``: (N, d); ``V``: (K, d) unit vectors in h's dtype; ``row``: (>= N,) int32 per-token table row
    (-1: not steered); ``a, b, lo, hi``: (R, K) fp32; ``P``: (>= N, K) fp32, receives the projections of ``s``
    (before steering) in its first N rows. ``h`` is written only at steered rows whose ``s'`` is finite, with
    ``s' - r``.
    """
    if h.device.type != "cpu":
        _site(h, r, V, row, a, b, lo, hi, P, site)
        return
    t0 = time.perf_counter()
    _site(h, r, V, row, a, b, lo, hi, P, site)
    _OP_SECONDS[0] += time.perf_counter() - t0


def _site(h, r, V, row, a, b, lo, hi, P, site: int) -> None:
    n = h.shape[0]
    if n > P.shape[0]:
        raise RuntimeError(f"emokern.engines.vllm: a forward of {n} tokens exceeds the buffers ({P.shape[0]} rows); the "
                           f"engine's max_num_batched_tokens changed after installation")
    steer = site < len(_STEP_FLAGS["steer"]) and _STEP_FLAGS["steer"][site]
    if h.device.type == "cpu" and not steer and not _STEP_FLAGS["monitor"]:
        return
    s = h if r is None else h + r
    if h.device.type == "cpu" and not steer:
        torch.ops.emokern.project(s, V, P[:n])
        return
    if r is None:
        s = h.clone()  # steered out of place, so that a row whose result overflows can keep its input
    torch.ops.emokern.project_and_steer_(s, V, row[:n], a, b, lo, hi, P[:n])
    steered = row[:n] >= 0
    finite = torch.isfinite(s).all(dim=-1)
    if h.device.type == "cpu":
        bad = steered & ~finite
        if bool(bad.any()):
            _STEP_FLAGS["bad_rows"].extend(torch.nonzero(bad).flatten().tolist())
    keep = (steered & finite)[:, None]
    h.copy_(torch.where(keep, s if r is None else s - r, h))


@residual_site_.register_fake
def _(h, r, V, row, a, b, lo, hi, P, site):
    return None


class _Record:
    """A monitored request's projections: ``P[position, site, emotion]`` fp32, grown as positions arrive."""

    def __init__(self, spec: spec_mod.RequestSpec, names: List[str]):
        self.spec = spec
        self.names = names  # of the monitored vectors (bank emotions, registered names), as in spec.monitor_k
        self.sites = spec.monitor_sites
        self.k = np.asarray(spec.monitor_k, dtype=np.int64)
        self.P = np.full((64, len(self.sites), len(self.k)), np.nan, dtype=np.float32)
        self.length = 0
        self.prompt_len = 0
        self.run = 0  # consecutive generated positions above the alert threshold
        self.alert_position: Optional[int] = None
        self.finished = False

    def put(self, positions: np.ndarray, values: List[np.ndarray]) -> None:
        end = int(positions[-1]) + 1
        if end > self.P.shape[0]:
            grown = np.full((max(end, 2 * self.P.shape[0]),) + self.P.shape[1:], np.nan, dtype=np.float32)
            grown[:self.P.shape[0]] = self.P
            self.P = grown
        for j, v in enumerate(values):
            self.P[positions, j] = v
        self.length = max(self.length, end)


class _Fired:
    """A steered request's touched positions: ``touched[position]`` True once the op applied its table row there
    (any forward, so a re-computed position counts once); ``cached``: positions in its scope that came from the
    prefix cache (computed, under the same steering, by an earlier request: the cache salt guarantees it)."""

    def __init__(self, sites: List[int]):
        self.sites = sites
        self.touched = np.zeros(64, dtype=bool)
        self.cached: Optional[int] = None  # set at the request's first forward
        self.prompt_len = 0
        self.finished = False

    def put(self, positions: np.ndarray) -> None:
        if not len(positions):
            return
        end = int(positions.max()) + 1
        if end > len(self.touched):
            grown = np.zeros(max(end, 2 * len(self.touched)), dtype=bool)
            grown[:len(self.touched)] = self.touched
            self.touched = grown
        self.touched[positions] = True

    def as_json(self, layers: List[int]) -> dict:
        idx = np.flatnonzero(self.touched)
        starts = idx[np.r_[True, np.diff(idx) > 1]] if len(idx) else idx
        ends = idx[np.r_[np.diff(idx) > 1, True]] + 1 if len(idx) else idx
        return {"layers": [layers[s] for s in self.sites], "tokens": int(len(idx)),
                "prompt_tokens": int((idx < self.prompt_len).sum()),
                "generated_tokens": int((idx >= self.prompt_len).sum()),
                "positions": [[int(a), int(b)] for a, b in zip(starts, ends)], "cached": int(self.cached or 0)}


class Installation:
    """The op's buffers and the per-request bookkeeping of one worker process (see the module docstring)."""

    def __init__(self, runner, loaded, layout, params_of):
        self.runner, self.loaded = runner, loaded
        self._layout, self._params_of = layout, params_of  # runner-specific: see install()
        vconfig = runner.vllm_config
        model = runner.model
        hidden = getattr(vconfig.model_config.hf_text_config, "hidden_size", None)
        if hidden != loaded.unit_vectors.shape[-1]:
            raise ValueError(f"EMOKERN_VLLM_BANK: the bank's vectors have hidden size {loaded.unit_vectors.shape[-1]} "
                             f"but the model {vconfig.model_config.model} has hidden size {hidden}")
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
        self.device = device
        self.S, self.K_bank = loaded.unit_vectors.shape[0], loaded.unit_vectors.shape[1]
        self.M = int(loaded.config.registry_slots)
        self.K = self.K_bank + self.M  # the bank's vectors, then the registry's slots (zero until registered)
        self.registered: List[Optional[tuple]] = [None] * self.M  # (name, version) written in each slot
        sched = vconfig.scheduler_config
        self.T = int(sched.max_num_batched_tokens) + int(sched.max_num_seqs)  # rows of the per-token buffers
        self.R = int(sched.max_num_seqs)  # steering slots: one per request that can be in a batch
        V = torch.zeros(self.S, self.K, loaded.unit_vectors.shape[-1], dtype=dtype, device=device)
        V[:, :self.K_bank] = loaded.unit_vectors.to(device=device, dtype=dtype)
        self.V = V.contiguous()
        self.a, self.b, self.lo, self.hi = identity_tables(self.S, self.R, self.K, device=device)
        self.row = torch.full((self.S, self.T), -1, dtype=torch.int32, device=device)
        self.P = torch.zeros(self.S, self.T, self.K, dtype=torch.float32, device=device)
        on_cpu = device.type == "cpu"
        self.row_host = self.row if on_cpu else torch.empty_like(self.row, device="cpu").pin_memory()
        # the host copy of the routing must not be rewritten while the previous step's copy is still queued
        self._row_copied = None if on_cpu else torch.cuda.Event()
        self.P_host = self.P if on_cpu else torch.empty_like(self.P, device="cpu").pin_memory()
        self.specs: Dict[str, Optional[spec_mod.RequestSpec]] = {}
        self.slots: Dict[str, int] = {}
        self.free = list(range(self.R - 1, -1, -1))
        self.records: "OrderedDict[str, _Record]" = OrderedDict()
        self.fired: "OrderedDict[str, _Fired]" = OrderedDict()  # steered requests' touched positions, until taken
        self.stop_requests: set = set()  # requests to end at their next sampled token (stopping alerts, failures)
        self.failed: "OrderedDict[str, str]" = OrderedDict()  # request -> its error, until taken (bounded)
        self.steps_run = 0  # engine steps (forwards) seen, for stats()
        self.recomputed = 0  # monitored positions computed again (chunk re-runs, recompute after preemption)
        self.host_seconds = 0.0  # time spent in begin_step + end_step (the plugin's host work per step)
        self._rows_used = 0
        _STEP_FLAGS["steer"] = [False] * self.S
        layers = find_decoder_layers(model)
        beyond = [layer for layer in loaded.layers if layer >= len(layers)]
        if beyond:
            raise ValueError(f"EMOKERN_VLLM_LAYERS: layers {beyond} do not exist in {vconfig.model_config.model}, "
                             f"which has {len(layers)} decoder layers")
        # this step's monitored requests: (req_id, first row, positions, prompt_len)
        self._monitored_in_step: List[tuple] = []
        self._steered_in_step: List[tuple] = []  # this step's steered requests: (req_id, first row, end row)
        self.hooks = []
        for s, layer in enumerate(loaded.layers):
            module = layers[layer]
            if type(module).__name__ == "PPMissingLayer":
                continue  # another pipeline stage owns it
            self.hooks.append(module.register_forward_hook(self._site_hook(s)))

    # ------------------------------------------------------------------------------------------ in the graph
    def _site_hook(self, s: int):
        V, row, a, b, lo, hi, P = self.V[s], self.row[s], self.a[s], self.b[s], self.lo[s], self.hi[s], self.P[s]

        def hook(module, args, output):
            if isinstance(output, tuple):
                h, r = output[0], output[1]
            else:
                h, r = output, None
            torch.ops.emokern_vllm.residual_site_(h, r, V, row, a, b, lo, hi, P, s)
            return output

        return hook

    # ------------------------------------------------------------------------------------------ requests
    def spec_of(self, req_id: str) -> Optional[spec_mod.RequestSpec]:
        if req_id in self.specs:
            return self.specs[req_id]
        extra = getattr(self._params_of(req_id), "extra_args", None) or {}
        raw = extra.get(spec_mod.KEY)
        parsed = None
        if raw is not None:
            try:
                pins = {str(n): (int(p[0]), int(p[1])) for n, p in (extra.get("emokern_pins") or {}).items()}
                parsed = spec_mod.parse(raw, self.loaded, pins)
                stale = self._stale_pins(parsed)
                if stale:
                    raise spec_mod.SpecError(stale)
            except (spec_mod.SpecError, TypeError, ValueError, IndexError) as exc:
                self.fail(req_id, str(exc))  # the front end refuses bad specs; one sent around it fails here
                return None
        self.specs[req_id] = parsed
        if parsed is not None and parsed.monitor_k is not None:
            self.records[req_id] = _Record(parsed, self._names(parsed, parsed.monitor_k))
        if parsed is not None and parsed.entries:
            self.fired[req_id] = _Fired(parsed.steered_sites)
        return parsed

    def _names(self, spec: spec_mod.RequestSpec, ks) -> List[str]:
        by_slot = {slot: name for name, (_, slot) in spec.pins.items()}
        return [self.loaded.names[k] if k < self.K_bank else by_slot[k - self.K_bank] for k in map(int, ks)]

    def _stale_pins(self, spec: spec_mod.RequestSpec) -> Optional[str]:
        """Why ``spec`` cannot run here (a pinned slot does not hold the pinned version), or None."""
        for name, (version, slot) in spec.pins.items():
            if not 0 <= slot < self.M or self.registered[slot] != (name, version):
                return (f"the registered vector {name!r} (version {version}) is no longer held by the engine: it "
                        f"was replaced or deleted, and its slot reused; send the request again")
        return None

    def register(self, slot: int, name: str, version: int, data: bytes, shape: List[int]) -> dict:
        """Write unit directions (``data``: float32 bytes of ``shape`` (S, d)) into registry slot ``slot`` as
        ``name`` at ``version``. Requests pinned to what the slot held before fail now (their steering would
        change under them). Called between engine steps (``collective_rpc``)."""
        d = self.V.shape[-1]
        if not 0 <= slot < self.M or list(shape) != [self.S, d] or len(data) != 4 * self.S * d:
            raise ValueError(f"emokern_register: slot {slot} of {self.M}, shape {shape} (expected [{self.S}, {d}])")
        vectors = torch.from_numpy(np.frombuffer(data, dtype=np.float32).reshape(self.S, d).copy())
        if not torch.isfinite(vectors).all():
            raise ValueError("emokern_register: the directions are not finite")
        self.V[:, self.K_bank + slot].copy_(vectors.to(device=self.V.device, dtype=self.V.dtype))
        self.registered[slot] = (name, version)
        for req_id, spec in list(self.specs.items()):
            if spec is not None and self._stale_pins(spec):
                self.fail(req_id, self._stale_pins(spec))
        return {"slot": slot, "name": name, "version": version}

    def _slot(self, req_id: str, spec: spec_mod.RequestSpec, batch_ids: set) -> int:
        if req_id in self.slots:
            return self.slots[req_id]
        if not self.free:  # a preempted request waiting outside the batch gives its slot up; it gets one back later
            for other in list(self.slots):
                if other not in batch_ids:
                    self.free.append(self.slots.pop(other))
                    break
        slot = self.free.pop()
        self.slots[req_id] = slot
        reset_to_identity((self.a, self.b, self.lo, self.hi), (slice(None), slot))
        for s, k, a, b, lo, hi in spec.entries:
            self.a[s, slot, k], self.b[s, slot, k], self.lo[s, slot, k], self.hi[s, slot, k] = a, b, lo, hi
        return slot

    def fail(self, req_id: str, error: str) -> None:
        """Fail one request (see the module docstring): unsteered and unrecorded from now on, ended at its next
        sampled token, ``error`` kept for :meth:`take`."""
        logger.warning("emokern.engines.vllm: request %s failed: %s", req_id, error)
        self.specs[req_id] = None
        self.records.pop(req_id, None)
        slot = self.slots.pop(req_id, None)
        if slot is not None:
            self.free.append(slot)
        self.failed[req_id] = error
        self.stop_requests.add(req_id)
        while len(self.failed) > self.loaded.config.max_traces:
            self.failed.popitem(last=False)

    def finish(self, req_ids) -> None:
        """Requests that left the engine: free their slots, keep their records until fetched (bounded)."""
        for req_id in req_ids:
            self.specs.pop(req_id, None)
            self.stop_requests.discard(req_id)
            slot = self.slots.pop(req_id, None)
            if slot is not None:
                self.free.append(slot)
            record = self.records.get(req_id)
            if record is not None:
                record.finished = True
            fired = self.fired.get(req_id)
            if fired is not None:
                fired.finished = True
        for held in (self.records, self.fired):
            finished = [rid for rid, rec in held.items() if rec.finished]
            for rid in finished[:max(0, len(finished) - self.loaded.config.max_traces)]:
                del held[rid]

    # ------------------------------------------------------------------------------------------ per step
    def begin_step(self) -> None:
        t0 = time.perf_counter()
        self._begin_step()
        self.host_seconds += time.perf_counter() - t0

    def end_step(self) -> None:
        t0 = time.perf_counter()
        self._end_step()
        self.host_seconds += time.perf_counter() - t0

    def _begin_step(self) -> None:
        """Fill the per-token routing rows of the batch about to run (see the module docstring)."""
        req_ids, qsl, computed, prompt_lens = self._layout()
        total = int(qsl[-1]) if len(qsl) else 0
        if self._row_copied is not None:
            self._row_copied.synchronize()
        row = self.row_host.numpy()
        used = max(self._rows_used, total)
        row[:, :used] = -1
        self._rows_used = total
        steer_sites = [False] * self.S
        monitor = False
        batch_ids = set(req_ids)
        self._monitored_in_step, self._steered_in_step = [], []
        _STEP_FLAGS["bad_rows"] = []
        for i, req_id in enumerate(req_ids):
            start, end = int(qsl[i]), int(qsl[i + 1])
            try:
                spec = self.spec_of(req_id)
                if spec is None or end <= start:
                    continue
                positions = int(computed[i]) + np.arange(end - start)
                prompt_len = int(prompt_lens[i])
                if spec.entries:
                    if spec.scope == "all":
                        mask = np.ones(end - start, dtype=bool)
                    elif spec.scope == "prompt":
                        mask = positions < prompt_len
                    else:
                        mask = positions >= prompt_len
                    slot = self._slot(req_id, spec, batch_ids)
                    for s in spec.steered_sites:
                        row[s, start:end][mask] = slot
                        steer_sites[s] = True
                    self._steered_in_step.append((req_id, start, end))
                    fired = self.fired.get(req_id)
                    if fired is not None:
                        if fired.cached is None:  # the first forward starts after the prefix-cache hit
                            first = int(positions[0])
                            fired.cached = first if spec.scope == "all" else \
                                min(first, prompt_len) if spec.scope == "prompt" else 0
                        fired.prompt_len = prompt_len
                        fired.put(positions[mask])
            except Exception as exc:  # noqa: BLE001 - whatever went wrong belongs to this request alone
                row[:, start:end] = -1
                self.fail(req_id, f"{type(exc).__name__}: {exc}")
                continue
            if spec.monitor_k is not None:
                monitor = True
                self._monitored_in_step.append((req_id, start, positions, prompt_len))
        if self.row_host is not self.row:
            self.row[:, :used].copy_(self.row_host[:, :used], non_blocking=True)
            self._row_copied.record()
        _STEP_FLAGS["monitor"] = monitor
        _STEP_FLAGS["steer"] = steer_sites

    def _end_step(self) -> None:
        """Copy the monitored requests' projections of the step that just ran into their records."""
        self.steps_run += 1
        if _STEP_FLAGS["bad_rows"]:
            bad = np.asarray(_STEP_FLAGS["bad_rows"])
            for req_id, start, end in self._steered_in_step:
                if ((bad >= start) & (bad < end)).any():
                    self.fail(req_id, "the steered residual stream was not finite (overflow); the request's "
                                      "steering was dropped")
        if not self._monitored_in_step:
            return
        if self.P_host is not self.P:
            total = self._rows_used
            self.P_host[:, :total].copy_(self.P[:, :total])
        P = self.P_host.numpy()
        for req_id, start, positions, prompt_len in self._monitored_in_step:
            record = self.records.get(req_id)
            if record is None:
                continue
            try:
                self._record(req_id, record, P, start, positions, prompt_len)
            except Exception as exc:  # noqa: BLE001 - a bad record fails its request, not the engine
                self.fail(req_id, f"{type(exc).__name__}: {exc}")

    def _record(self, req_id: str, record: "_Record", P: np.ndarray, start: int, positions: np.ndarray,
                prompt_len: int) -> None:
        """Put one monitored request's rows of this step into its record, and check its alert."""
        record.prompt_len = prompt_len
        keep = np.ones(len(positions), dtype=bool) if record.spec.monitor_prompt else positions >= prompt_len
        if not keep.any():
            return
        rows = start + np.nonzero(keep)[0]
        if record.length > int(positions[keep][0]):
            self.recomputed += int(min(record.length, int(positions[keep][-1]) + 1) - positions[keep][0])
        record.put(positions[keep], [P[s][rows][:, record.k] for s in record.sites])
        alert = record.spec.alert
        if alert is not None and record.alert_position is None:
            self._check_alert(req_id, record, alert, positions[keep])

    def _check_alert(self, req_id: str, record: _Record, alert: spec_mod.Alert, positions: np.ndarray) -> None:
        s = record.sites[alert.site]
        k = int(record.k[alert.emotion])
        mean = float(self.loaded.neutral_mean[s, k])
        std = max(float(self.loaded.neutral_std[s, k]), 1e-6)
        for pos in positions:
            if pos < record.prompt_len:
                continue
            z = (record.P[pos, alert.site, alert.emotion] - mean) / std
            record.run = record.run + 1 if z > alert.z else 0
            if record.run >= alert.tokens:
                record.alert_position = int(pos)
                if alert.stop:
                    self.stop_requests.add(req_id)
                break

    def end_alerted(self, output) -> None:
        """Replace the token just sampled for each request whose stopping alert fired by its end-of-sequence id,
        so the scheduler finishes it as if the model had ended it (``finish_reason`` "stop"). A request without an
        end-of-sequence id (``ignore_eos``) runs on; its alert is still reported."""
        sampled = getattr(output, "sampled_token_ids", None)
        index = getattr(output, "req_id_to_index", None)
        if not isinstance(sampled, list) or index is None:
            return  # an async output (GPU async scheduling): the alert is reported, the request not ended
        for req_id in list(self.stop_requests):
            i = index.get(req_id)
            if i is None or not sampled[i]:
                continue
            eos = getattr(self._params_of(req_id), "eos_token_id", None)
            if eos is not None:
                sampled[i][-1] = int(eos)
            self.stop_requests.discard(req_id)

    # ------------------------------------------------------------------------------------------ results
    def _ids(self) -> Dict[str, str]:
        """Held request ids (records and failures) by their worker id and by the id the front end gave them."""
        by_external = {}
        for rid in list(self.records) + list(self.failed) + list(self.fired):
            by_external.setdefault(rid.rsplit("-", 1)[0], rid)
            by_external.setdefault(rid, rid)
        return by_external

    @staticmethod
    def _alert_json(record: "_Record") -> Optional[dict]:
        alert = record.spec.alert
        if alert is None or record.alert_position is None:
            return None
        return {"emotion": alert.name, "layer": alert.layer, "z": alert.z, "tokens": alert.tokens,
                "position": record.alert_position, "stopped": alert.stop}

    def _stats_of(self, record: "_Record"):
        """The neutral mean and std (S, K) of a record's monitored vectors, or None (the bank has none, or a
        registered vector is among them: it has none)."""
        if self.loaded.neutral_mean is None or (record.k >= self.K_bank).any():
            return None
        sites, ks = record.sites, record.k
        return self.loaded.neutral_mean[sites][:, ks].numpy(), self.loaded.neutral_std[sites][:, ks].numpy()

    def _steered_json(self, rid: Optional[str], pop: bool = False) -> Optional[dict]:
        fired = (self.fired.pop(rid, None) if pop else self.fired.get(rid)) if rid is not None else None
        return None if fired is None else fired.as_json(self.loaded.layers)

    def take(self, request_ids: List[str]) -> List[Optional[dict]]:
        """The records of the requests whose external id (or worker id) is in ``request_ids``, removed here.

        vLLM's workers see ``"<external id>-<8 hex>"``; both forms are accepted. Each result is a dict of plain
        values: ``data`` (bytes, float32, shape ``(length, sites, emotions)``, NaN at positions not recorded),
        ``length``, ``prompt_len``, ``layers``, ``names``, ``neutral_mean`` / ``neutral_std`` (lists, or None),
        ``alert`` (None, or ``{"emotion", "layer", "z", "tokens", "position", "stopped"}``), ``error`` (None),
        ``steered`` (None, or what the steering touched: see :meth:`readout`). A failed request (:meth:`fail`)
        gives ``error`` (the message) and an empty record (``length`` 0, no layers, no names). The neutral
        statistics are None when a registered vector is monitored (it has none). A steered request that is not
        monitored has no record: None.
        """
        by_external = self._ids()
        out = []
        for wanted in request_ids:
            rid = by_external.get(wanted)
            error = self.failed.pop(rid, None) if rid is not None else None
            if error is not None:
                out.append({"data": b"", "length": 0, "prompt_len": 0, "layers": [], "names": [],
                            "neutral_mean": None, "neutral_std": None, "alert": None, "error": error,
                            "steered": self._steered_json(rid, pop=True)})
                continue
            record = self.records.pop(rid, None) if rid is not None else None
            if record is None:
                out.append(None)
                continue
            stats = self._stats_of(record)
            out.append({
                "data": np.ascontiguousarray(record.P[:record.length]).tobytes(),
                "length": record.length, "prompt_len": record.prompt_len,
                "layers": [self.loaded.layers[s] for s in record.sites],
                "names": list(record.names),
                "neutral_mean": stats[0].tolist() if stats else None,
                "neutral_std": stats[1].tolist() if stats else None,
                "alert": self._alert_json(record),
                "error": None,
                "steered": self._steered_json(rid, pop=True),
            })
        return out

    def readout(self, request_ids: List[str], decimals: int = 2) -> List[Optional[dict]]:
        """A compact per-token readout of each request in ``request_ids`` (ids as for :meth:`take`), left in place
        for :meth:`take` (bounded like the traces).

        Each result: ``layers`` (S), ``emotions`` (K names), ``values`` ``"zscore"`` (the bank has neutral
        statistics) or ``"projection"``, ``tokens`` (one row per generated position the model read, in order:
        row i belongs to completion token i, rounded to ``decimals``, each row S lists of K numbers; the last
        completion token is never read back, so it has no row unless the engine ran one more step), ``alert`` and
        ``error`` (as in :meth:`take`; a failed request has no rows), and ``steered``: None for a request that does
        not steer, else what its steering touched, ``{"layers", "tokens", "prompt_tokens", "generated_tokens",
        "positions", "cached"}``: the steered layers, how many token positions the op steered (in this request's
        forwards; 0 when the scope covered none of them), how many of those are prompt / generated positions, the
        positions as ``[start, end)`` ranges (0: the first prompt token), and how many positions in the scope came
        from the prefix cache instead (computed under the same steering by an earlier request). ``values`` is
        ``"projection"`` when a registered vector is monitored (it has no neutral statistics). A steered request
        that is not monitored gets ``layers`` and ``emotions`` empty, ``values`` None, ``tokens`` empty. None:
        nothing held for that id.
        """
        by_external = self._ids()
        out = []
        for wanted in request_ids:
            rid = by_external.get(wanted)
            if rid is not None and rid in self.failed:
                out.append({"layers": [], "emotions": [], "values": None, "tokens": [], "alert": None,
                            "error": self.failed[rid], "steered": self._steered_json(rid)})
                continue
            record = self.records.get(rid) if rid is not None else None
            if record is None:
                steered = self._steered_json(rid)
                out.append(None if steered is None else {"layers": [], "emotions": [], "values": None, "tokens": [],
                                                         "alert": None, "error": None, "steered": steered})
                continue
            sites = record.sites
            rows = record.P[record.prompt_len:record.length]
            stats = self._stats_of(record)
            if stats:
                rows = (rows - stats[0]) / np.maximum(stats[1], 1e-6)
            out.append({
                "layers": [self.loaded.layers[s] for s in sites],
                "emotions": list(record.names),
                "values": "zscore" if stats else "projection",
                "tokens": [[[None if v != v else v for v in site] for site in row]  # NaN: not recorded
                           for row in np.round(rows, decimals).tolist()],
                "alert": self._alert_json(record),
                "error": None,
                "steered": self._steered_json(rid),
            })
        return out

    def stats(self) -> dict:
        return {"layers": list(self.loaded.layers), "emotions": len(self.loaded.names), "buffer_rows": self.T,
                "slots": self.R, "slots_in_use": len(self.slots), "records": len(self.records),
                "failed": len(self.failed), "steps": self.steps_run,
                "recomputed_positions": self.recomputed, "host_seconds": round(self.host_seconds, 6),
                "op_seconds": round(_OP_SECONDS[0], 6),
                "hooks": len(self.hooks), "bank": self.loaded.config.bank_path,
                "registered": [None if r is None else {"name": r[0], "version": r[1]} for r in self.registered]}


_INSTALLED: Optional[Installation] = None


def installation() -> Optional[Installation]:
    """This process's installation (None before the model is loaded, or when the plugin is off)."""
    return _INSTALLED


def install(runner, loaded) -> Installation:
    """Put the op into ``runner``'s freshly loaded model and wrap the runner's per-step methods.

    Two runners: vLLM's V1 ``GPUModelRunner`` (and its ``CPUModelRunner``), which keeps a persistent input batch
    and calls ``_model_forward`` for real steps only; and the V2 runner (``vllm.v1.worker.gpu.model_runner``, the GPU
    default since vLLM 0.25), which builds an ``InputBatch`` per step in ``prepare_inputs`` and keeps no
    SamplingParams (they are read in ``add_requests``). Only the V1 path runs on CPU, so only it is tested here.
    """
    global _INSTALLED
    if hasattr(runner, "_model_forward") and hasattr(runner, "input_batch"):
        inst = _install_v1(runner, loaded)
    elif hasattr(runner, "prepare_inputs") and hasattr(runner, "add_requests") and hasattr(runner, "req_states"):
        inst = _install_v2(runner, loaded)
    else:
        raise RuntimeError(f"emokern.engines.vllm: unsupported model runner {type(runner).__module__}."
                           f"{type(runner).__name__} (the plugin drives vLLM's V1 and V2 GPU/CPU model runners)")
    _INSTALLED = inst
    logger.info("emokern.engines.vllm: op installed at layers %s (%d vectors, %d token rows, %d steering slots)",
                loaded.layers, inst.K, inst.T, inst.R)
    return inst


def _install_v1(runner, loaded) -> Installation:
    def layout():
        batch = runner.input_batch
        n = batch.num_reqs
        return (list(batch.req_ids[:n]), runner.query_start_loc.np[:n + 1], batch.num_computed_tokens_cpu[:n],
                batch.num_prompt_tokens[:n])

    def params_of(req_id):
        return getattr(runner.requests.get(req_id), "sampling_params", None)

    inst = Installation(runner, loaded, layout, params_of)
    forward, update, sample = runner._model_forward, runner._update_states, runner.sample_tokens

    def _model_forward(*args, **kwargs):
        inst.begin_step()
        out = forward(*args, **kwargs)
        inst.end_step()
        return out

    def _update_states(scheduler_output):
        inst.finish(scheduler_output.finished_req_ids)
        return update(scheduler_output)

    def sample_tokens(*args, **kwargs):
        out = sample(*args, **kwargs)
        if inst.stop_requests:
            inst.end_alerted(out)
        return out

    runner._model_forward = _model_forward
    runner._update_states = _update_states
    runner.sample_tokens = sample_tokens
    return inst


def _install_v2(runner, loaded) -> Installation:
    params: Dict[str, object] = {}
    prompt_len: Dict[str, int] = {}
    current = {"batch": None}

    def layout():
        batch = current["batch"]
        n = batch.num_reqs
        return (list(batch.req_ids[:n]), batch.query_start_loc_np[:n + 1], batch.num_computed_tokens_np[:n],
                np.array([prompt_len.get(r, 0) for r in batch.req_ids[:n]]))

    inst = Installation(runner, loaded, layout, params.get)
    add, finish, prepare, execute = runner.add_requests, runner.finish_requests, runner.prepare_inputs, \
        runner.execute_model

    def add_requests(scheduler_output):
        for new in scheduler_output.scheduled_new_reqs:  # a resumed (preempted) request comes back through here
            params[new.req_id] = new.sampling_params
            prompt_len[new.req_id] = int(new.prompt_len)
        return add(scheduler_output)

    def finish_requests(scheduler_output):
        inst.finish(scheduler_output.finished_req_ids)  # preempted requests keep their spec, slot and record
        for req_id in scheduler_output.finished_req_ids:
            params.pop(req_id, None)
            prompt_len.pop(req_id, None)
        return finish(scheduler_output)

    def prepare_inputs(*args, **kwargs):
        batch = prepare(*args, **kwargs)
        current["batch"] = batch
        inst.begin_step()
        return batch

    def execute_model(*args, **kwargs):
        out = execute(*args, **kwargs)
        if current["batch"] is not None:
            inst.end_step()  # a device-to-host copy of the projections, only when a monitored request ran
            current["batch"] = None
        return out

    runner.add_requests, runner.finish_requests = add_requests, finish_requests
    runner.prepare_inputs, runner.execute_model = prepare_inputs, execute_model
    return inst
