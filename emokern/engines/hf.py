"""The drop-in model patch: per-token monitoring and scoped, per-sequence steering inside a Hugging Face model.

(About 700 lines on purpose: the hooks, buffers, per-sequence routing, steering state and the generate loop share
one per-model state; the architecture, the steering language and the trace already live in :mod:`emokern.core`.)

::

    handle = emokern.patch(model, bank, layers=..., sites=("residual",), tokenizer=tok)
    out = handle.generate(["How are you today?"], max_new_tokens=20)     # monitored
    trace_heatmap_html(out.trace, "desperate", "trace.html")             # emokern.core.trace_plots
    handle.steer({"calm": 0.05}, scope="generated")                       # strengths: fraction of layer norm
    handle.remove()                                                       # the model is as before

How it works. One forward hook per patched site (a decoder layer's output = the residual stream, the attention
block's output or the MLP block's output, before they join the residual) calls the fused op on that site's
hidden states, in place: it projects every token onto the bank's K vectors, writing the projections into a
preallocated trace buffer at the token's cache position, and steers the tokens that the routing says to steer.
A pre-hook on the base model computes, once per forward, each token's cache position (from the KV cache, so
decode steps land after the prompt) and its routing row: sequence ``b``'s table row ``b`` where its scope mask is
set at that position, else -1.

All state lives in fixed device buffers (vectors, parameter tables, per-sequence routing, per-position scope
masks, the trace) that hooks read; :meth:`PatchHandle.steer` only rewrites their contents, so changing emotions,
strengths or scopes never re-registers hooks, never reallocates, and keeps CUDA-graph addresses valid. Nothing
synchronises with the host per token.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from emokern.core import steering
from emokern.core.architecture import SITES, ArchSpec, resolve_architecture, select_layers, site_module
from emokern.core.bank import VectorBank
from emokern.core.steering import TABLE_NAMES, TableEntry, identity_tables, reset_to_identity
from emokern.core.trace import Trace
from emokern.ops.extension import require_extension
from emokern.ops.api import project, project_and_steer, project_and_steer_, resolve_backend
from emokern.util.stats import unit_rows

__all__ = ["patch", "PatchHandle", "GenerationResult", "SteeringState"]


@dataclass
class GenerationResult:
    """What :meth:`PatchHandle.generate` returns."""

    sequences: torch.Tensor  # (B, T) prompt (left-padded) + generated ids
    texts: List[str]  # generated continuation of each sequence, decoded
    trace: Optional[Trace]
    prompt_width: int
    output: Any = None  # what model.generate returned (e.g. with logits when asked for)


@dataclass
class _SequenceConfig:
    """The steering of one sequence (or, under the key None, of every sequence): its table entries in the order
    they were given (a later entry for the same site and vector wins) and its scope."""

    entries: List[TableEntry] = field(default_factory=list)
    scope: Any = "all"


@dataclass(frozen=True)
class SteeringState:
    """A snapshot of a :class:`PatchHandle`'s steering (every sequence's table entries and scope), taken by
    :meth:`PatchHandle.steering_state` and put back by :meth:`PatchHandle.restore_steering`. Opaque: it holds its
    own copy, so later ``steer`` calls do not change it and it can be restored any number of times."""

    configs: Dict[Optional[int], _SequenceConfig]
    site_names: Tuple[str, ...]
    bank_names: Tuple[str, ...]


class _Kernels(NamedTuple):
    """The two kernels a site hook calls, without argument checks: ``project(h, V, P)`` writes the projections
    into ``P``; ``project_and_steer(h, V, row, a, b, lo, hi, P)`` also steers ``h`` in place."""

    project: Callable[..., None]
    project_and_steer: Callable[..., None]


class _State:
    """The device buffers the hooks read.

    Sizes: S sites, K bank vectors, B_cap sequences, T_cap positions (+1 overflow slot), and ``slots`` steering
    slots: the vectors being steered are copied into ``Vs`` so that the steering op works on those few vectors only,
    while monitoring projects onto all K. The same settings are also kept full width (``a_all`` ... ``hi_all``, one
    column per bank vector, identity where nothing is steered) for the CPU kernel's one call that monitors and steers.
    """

    def __init__(self, V: torch.Tensor, batch: int, tokens: int, slots: int = 4):
        self.V = V  # (S, K, d) model dtype
        self.S, self.K = V.shape[0], V.shape[1]
        self.device = V.device
        self.steering = False  # host flag: some site is steered (branching on it is a guard, not a sync)
        self.row: Optional[torch.Tensor] = None  # (B*S_tokens,) int32 for the current forward
        # (S, B*S_tokens, K) fp32: every site's projections in the current forward, copied into the trace P by one
        # index_copy_ when the forward ends (one copy per forward instead of one per site)
        self.scratch: Optional[torch.Tensor] = None
        self.scratch_sites: Sequence[torch.Tensor] = ()  # its S site views, made once per forward
        self.steer_scratch: Optional[torch.Tensor] = None  # (B*S_tokens, slots) fp32, discarded
        self.pos: Optional[torch.Tensor] = None  # (S_tokens,) int64 cache positions for the current forward
        self.batch = 0
        self.allocate(batch, tokens, slots)

    def allocate(self, batch: int, tokens: int, slots: int) -> None:
        S, K, dev = self.S, self.K, self.device
        self.B_cap, self.T_cap, self.slots = batch, tokens, slots
        self.Vs = torch.zeros(S, slots, self.V.shape[2], dtype=self.V.dtype, device=dev)
        self.a, self.b, self.lo, self.hi = identity_tables(S, batch, slots, device=dev)
        self.a_all, self.b_all, self.lo_all, self.hi_all = identity_tables(S, batch, K, device=dev)
        self.seq_row = torch.full((batch,), -1, dtype=torch.int32, device=dev)
        self.scope = torch.zeros(batch, tokens + 1, dtype=torch.bool, device=dev)
        self.P = torch.full((S, batch, tokens + 1, K), float("nan"), device=dev)
        self.site_views = [(self.V[s], self.Vs[s], self.a[s], self.b[s], self.lo[s], self.hi[s], self.P[s])
                           for s in range(S)]
        self.site_tables_all = [(self.a_all[s], self.b_all[s], self.lo_all[s], self.hi_all[s]) for s in range(S)]


class PatchHandle:
    """Returned by :func:`patch`; steers, reads traces and removes the patch. Also a context manager."""

    def __init__(self, model, bank: VectorBank, layers: List[int], sites: Tuple[str, ...], spec: ArchSpec,
                 base: torch.nn.Module, layer_modules, *, tokenizer=None, backend: Optional[str] = None,
                 monitor: bool = True, batch: int = 8, tokens: int = 512, train: bool = False):
        self.model, self.bank, self.layers, self.sites, self.spec = model, bank, layers, sites, spec
        self.tokenizer, self.backend, self.monitor, self.train = tokenizer, backend, monitor, train
        # train=True: each site's projections of the last forward run with grad enabled, as tensors in the graph
        self._graph: Dict[int, torch.Tensor] = {}
        self.site_names = [f"layer{layer}.{site}" for layer in layers for site in sites]
        self._site_layers = [layer for layer in layers for _ in sites]
        param = next(model.parameters())
        unit = unit_rows(bank.vectors)
        V = torch.stack([unit[bank.layer_slot(layer)] for layer in self._site_layers])
        self._norms = [float(bank.residual_norm[bank.layer_slot(layer)]) for layer in self._site_layers]
        self.state = _State(V.to(device=param.device, dtype=param.dtype).contiguous(), batch, tokens)
        K = self.state.K
        # the tables of "steer nothing" (every row -1 reads none of them): the differentiable op's projection-only call
        self._no_steering = identity_tables(1, K, device=param.device)
        self._configs: Dict[Optional[int], _SequenceConfig] = {}
        self._host: Optional[Dict[str, torch.Tensor]] = None  # host copies of the steering buffers (see _materialize)
        self._used: List[int] = []  # bank indices of the steered vectors, in slot order
        self._prompt: Optional[dict] = None
        self._steered_sites = [False] * len(self.site_names)
        self._needs_prompt = False
        # On CPU (or with an explicit backend) the kernels do not depend on the number of tokens: pick them once.
        dev = self.state.device
        fixed = resolve_backend(backend, dev, 1) == resolve_backend(backend, dev, 1 << 30)
        self._fixed_kernels = self._kernels(1) if fixed else None
        # The C++ CPU kernel updates h from the vectors with a nonzero delta only, so a site that is monitored and
        # steered makes one call over all K with the full-width tables (the projection reads V once). The CUDA and
        # Triton kernels' update reads every vector of V, so there the two calls stay.
        self._one_call = resolve_backend(backend, dev, 1) == "cpu"
        self._in_graph = False  # set per forward: train=True with grad enabled (projections kept in the graph)
        self._hooks = []
        self._removed = False
        self._base_params = list(inspect.signature(base.forward).parameters)
        self._hooks.append(base.register_forward_pre_hook(self._begin_forward, with_kwargs=True))
        self._hooks.append(base.register_forward_hook(self._end_forward))
        i = 0
        for layer in layers:
            block = layer_modules[layer]
            for site in sites:
                module = site_module(block, site, spec)
                self._hooks.append(module.register_forward_hook(self._make_site_hook(i)))
                i += 1
        model._emokern_patch = self

    # ------------------------------------------------------------------------------------------ hooks
    def _begin_forward(self, module, args, kwargs):
        st = self.state
        named = dict(zip(self._base_params, args))
        named.update(kwargs)
        x = named.get("input_ids")
        if x is None:
            x = named.get("inputs_embeds")
        B, S = x.shape[0], x.shape[1]
        cache_position = named.get("cache_position")
        if cache_position is None:
            cache = named.get("cache", named.get("past_key_values"))
            start = cache.get_seq_length() if cache is not None else 0
            if isinstance(start, int) and not torch.compiler.is_compiling() and start + S > st.T_cap:
                self.reserve(tokens=start + S)
            cache_position = torch.arange(S, device=st.device) + start
        if B > st.B_cap:
            if torch.compiler.is_compiling():
                raise RuntimeError(f"emokern: batch {B} exceeds the patch's capacity {st.B_cap}; call "
                                   f"handle.reserve(batch={B}) before compiling")
            self.reserve(batch=B)
        st.batch = B
        st.pos = cache_position.reshape(-1).clamp(max=st.T_cap)
        self._in_graph = self.train and torch.is_grad_enabled()  # the training path writes the trace itself
        if self._in_graph:
            self._graph = {}
        if self.monitor and not self._in_graph:
            st.scratch = torch.empty(st.S, B * S, st.K, dtype=torch.float32, device=st.device)
            st.scratch_sites = st.scratch.unbind(0)
        if st.steering:
            if self._needs_prompt and self._prompt is None:
                raise RuntimeError(
                    "emokern: a steering scope refers to the prompt ('prompt', 'generated', spans or text) but the "
                    "patch does not know the prompt: use handle.generate(...), or call handle.prepare(input_ids, "
                    "attention_mask) before calling the model"
                )
            if not (self._one_call and self.monitor):  # the slot-steering call's discarded projections
                st.steer_scratch = torch.empty(B * S, st.slots, dtype=torch.float32, device=st.device)
            scoped = st.scope[:B].index_select(1, st.pos)
            st.row = torch.where(scoped, st.seq_row[:B, None], -1).reshape(-1).to(torch.int32)

    def _end_forward(self, module, args, output):
        st = self.state
        if self.monitor and not self._in_graph:
            st.P[:, :st.batch].index_copy_(2, st.pos, st.scratch.view(st.S, st.batch, -1, st.K))
        return None

    def _make_site_hook(self, i: int):
        # The inference path. On the C++ CPU kernel a monitored and steered site is one call over all K with the
        # full-width tables: the projections recorded are those of the site's input, and the update reads only the
        # steered vectors' rows of V (the kernel skips vectors whose delta is 0; an earlier fused call whose update
        # ran over all K read all of V a second time and was reverted; the timings are in the README, "Monitoring
        # and steering in one call"). Elsewhere, monitoring projects onto all K vectors first and steering then works
        # on the few steered vectors only (Vs and the slot tables).
        def hook(module, args, output):
            st = self.state
            steer = st.steering and self._steered_sites[i]
            if not steer and not self.monitor:
                return None
            h = output[0] if isinstance(output, tuple) else output
            if self._in_graph:
                return self._site_in_graph(i, h, output, steer)
            h2 = h.view(-1, h.shape[-1])
            V, Vs, a, b, lo, hi, _ = st.site_views[i]
            kernels = self._fixed_kernels or self._kernels(h2.shape[0])
            grad = torch.is_grad_enabled()  # grad on but no train=True: record without autograd, steer through it
            if steer and self.monitor and self._one_call and not (grad and h.requires_grad):
                kernels.project_and_steer(h2, V, st.row, *st.site_tables_all[i], st.scratch_sites[i])
                return None
            if self.monitor:
                if grad:
                    with torch.no_grad():
                        kernels.project(h2.detach(), V, st.scratch_sites[i])
                else:
                    kernels.project(h2, V, st.scratch_sites[i])
            if steer:
                if grad and h.requires_grad:
                    return self._steer_in_graph(i, h, h2, output)
                kernels.project_and_steer(h2, Vs, st.row, a, b, lo, hi, st.steer_scratch)
            return None

        return hook

    def _site_in_graph(self, i: int, h: torch.Tensor, output, steer: bool):
        """The training path of a site hook (``train=True``, grad enabled): the projections onto all K vectors and
        the steering both through the differentiable op, the projections kept for :meth:`projections`. The
        vectors are cast to h's dtype (under autocast h may be bf16 while the parameters are fp32)."""
        st = self.state
        V, P_site = st.site_views[i][0], st.site_views[i][6]
        h2 = h.reshape(-1, h.shape[-1])
        if self.monitor:  # the projections of the site's input h, as in the inference path
            unsteered = torch.full((h2.shape[0],), -1, dtype=torch.int32, device=h2.device)
            _, P = project_and_steer(h2, V.to(h2.dtype), unsteered, *self._no_steering, backend=self.backend)
            self._graph[i] = P.view(*h.shape[:-1], st.K)
            with torch.no_grad():
                P_site[:st.batch].index_copy_(1, st.pos, P.detach().view(st.batch, -1, st.K))
        return self._steer_in_graph(i, h, h2, output) if steer else None

    def _steer_in_graph(self, i: int, h: torch.Tensor, h2: torch.Tensor, output):
        """Site ``i``'s steering through the differentiable op: the site's new output (same structure as
        ``output``). The steered vectors are cast to h's dtype (a no-op unless autocast made h bf16)."""
        st = self.state
        _, Vs, a, b, lo, hi, _ = st.site_views[i]
        h_new, _ = project_and_steer(h2, Vs.to(h2.dtype), st.row, a, b, lo, hi, backend=self.backend)
        h_new = h_new.view(h.shape)
        return (h_new,) + tuple(output[1:]) if isinstance(output, tuple) else h_new

    def projections(self, layer: Optional[int] = None, site: str = "residual") -> torch.Tensor:
        """The projections (B, S, K) fp32 of ``site`` at decoder layer ``layer`` (default: the first patched layer)
        in the last forward run with grad enabled, as a tensor in that forward's autograd graph: a loss on it
        (e.g. :func:`emokern.engines.training.projection_penalty`) backpropagates into the model. Needs ``train=True``
        and ``monitor=True``."""
        if not self.train:
            raise RuntimeError("projections: the patch records projections in the graph only with "
                               "emokern.patch(..., train=True)")
        if not self.monitor:
            raise RuntimeError("projections: the patch was made with monitor=False, which records no projections")
        layer = self.layers[0] if layer is None else layer
        name = f"layer{layer}.{site}"
        if name not in self.site_names:
            raise ValueError(f"projections: {name!r} is not patched (patched: {self.site_names})")
        i = self.site_names.index(name)
        if i not in self._graph:
            raise RuntimeError("projections: no forward with grad enabled has run through the patched model since "
                               "the last one began (call the model first, outside torch.no_grad())")
        return self._graph[i]

    def _kernels(self, num_tokens: int) -> _Kernels:
        """The two kernels of the backend for a call on ``num_tokens`` tokens: the registered ops themselves
        (arguments were validated when the patch was made; per-call checks would cost more than the kernel at decode
        sizes), or the reference in place."""
        which = resolve_backend(self.backend, self.state.device, num_tokens)
        if which == "reference":
            return _Kernels(lambda h, V, P: project(h, V, P_out=P, backend="reference", validate=False),
                            lambda h, V, row, a, b, lo, hi, P: project_and_steer_(h, V, row, a, b, lo, hi, P_out=P,
                                                                                  backend="reference", validate=False))
        if which == "triton":
            return _Kernels(torch.ops.emokern.project_triton, torch.ops.emokern.project_and_steer_triton_)
        require_extension()
        return _Kernels(torch.ops.emokern.project, torch.ops.emokern.project_and_steer_)

    # ------------------------------------------------------------------------------------------ capacity
    def reserve(self, batch: Optional[int] = None, tokens: Optional[int] = None, slots: Optional[int] = None) -> None:
        """Grow the buffers to hold ``batch`` sequences of ``tokens`` positions and ``slots`` steered vectors at once
        (never shrinks; keeps settings).

        Call before capturing a CUDA graph or compiling: growing reallocates the buffers.
        """
        st = self.state
        batch, tokens = max(batch or 0, st.B_cap), max(tokens or 0, st.T_cap)
        slots = max(slots or 0, st.slots)
        if (batch, tokens, slots) == (st.B_cap, st.T_cap, st.slots):
            return
        st.allocate(batch, tokens, slots)
        self._materialize()

    # ------------------------------------------------------------------------------------------ steering
    def steer(self, emotions: Union[str, Sequence[str], Mapping[str, Any]], strength: Any = None, *,
              mode: str = "add", scope: Any = "all", sequences: Union[None, int, Sequence[int]] = None,
              layers: Union[None, int, Sequence[int]] = None, relative: bool = True) -> "PatchHandle":
        """Add steering for one or many emotions at once; settings accumulate until :meth:`clear_steering`.

        Args:
            emotions: a name, a list of names (all with ``strength``), or ``{name: strength}``.
            strength: per ``mode``: ``add`` — the amount added to the projection; ``set`` — the target projection;
                ``clamp`` — ``(lo, hi)`` bounds (either may be None); ``scale`` — a unitless factor; ``ablate`` —
                unused. With ``relative=True`` (default) amounts are fractions of the layer's mean residual-stream
                norm (``bank.residual_norm``), as in the paper (0.05 = the paper's 0.05).
            mode: ``add`` | ``ablate`` | ``set`` | ``scale`` | ``clamp``.
            scope: which token positions: ``"all"`` (default), ``"prompt"``, ``"generated"``, a list of
                ``(start, end)`` prompt-token ranges (end exclusive, counted without padding), or
                ``{"text": substring}`` — the prompt tokens that overlap the substring. Positions come from the KV
                cache, so they are right during generation and with left padding. A sequence has one scope: a later
                call for the same sequences replaces it.
            sequences: which batch rows (default: every sequence).
            layers: which patched layers to steer (default: all patched layers).
            relative: see ``strength``.

        Returns ``self``. Raises ValueError/KeyError for unknown emotions (with close matches), bad modes, NaN or
        infinite strengths, and unknown layers.
        """
        steering.check_mode(mode)
        items = steering.steer_items(emotions, strength)
        site_ids = self._sites_for_layers(layers)
        steering.check_scope(scope)
        new_entries = steering.compile_entries(items, mode, index=self.bank.index, sites=site_ids, norms=self._norms,
                                               relative=relative)
        keys = [None] if sequences is None else ([sequences] if isinstance(sequences, int) else list(sequences))
        for key in keys:
            if key is not None and not 0 <= key:
                raise ValueError(f"steer: sequence indices must be >= 0; got {key}")
        # only the touched sequences are copied (and rebuilt): a call per sequence stays cheap in a large batch
        previous = {key: copy.deepcopy(self._configs.get(key)) for key in keys}
        for key in keys:
            config = self._configs.setdefault(key, _SequenceConfig())
            config.entries.extend(new_entries)
            config.scope = scope
        try:
            if keys and max((k for k in keys if k is not None), default=-1) >= self.state.B_cap:
                self.reserve(batch=max(k for k in keys if k is not None) + 1)
            self._materialize(None if None in keys else keys)
        except Exception:
            for key, config in previous.items():  # a refused call leaves the earlier settings in force
                if config is None:
                    self._configs.pop(key, None)
                else:
                    self._configs[key] = config
            self._materialize()
            raise
        return self

    def clear_steering(self) -> "PatchHandle":
        """Remove all steering (monitoring continues)."""
        self._configs.clear()
        self._materialize()
        return self

    def steering_state(self) -> SteeringState:
        """A snapshot of the current steering (every :meth:`steer` setting since the last :meth:`clear_steering`,
        for every sequence, with its scope), to put back later with :meth:`restore_steering`::

            state = handle.steering_state()
            handle.steer({"desperate": 0.05})      # for a while
            handle.restore_steering(state)         # exactly the steering of before

        The snapshot is a copy: later changes to the handle's steering do not reach it."""
        return SteeringState(copy.deepcopy(self._configs), tuple(self.site_names), tuple(self.bank.names))

    def restore_steering(self, state: SteeringState) -> "PatchHandle":
        """Replace the current steering by a snapshot from :meth:`steering_state` of this patch (the same patched
        sites and bank), as if the calls that made it were repeated; the device buffers are rewritten in place
        (never reallocated unless more vectors are steered than the slots hold). The snapshot stays usable.

        Returns ``self``. Raises TypeError for anything but a :class:`SteeringState`, ValueError for one taken from
        a patch with other sites or another bank, and what :meth:`steer` raises when the snapshot's scopes do not
        fit the prompt registered since (the steering is then cleared rather than left half-restored)."""
        if not isinstance(state, SteeringState):
            raise TypeError(f"restore_steering: expected a SteeringState from handle.steering_state(); got "
                            f"{type(state).__name__}")
        if state.site_names != tuple(self.site_names) or state.bank_names != tuple(self.bank.names):
            raise ValueError("restore_steering: the state was taken from a patch with other sites or another bank "
                             f"(its sites: {list(state.site_names)}; this patch's: {self.site_names})")
        self._configs = copy.deepcopy(state.configs)
        try:
            self._materialize()
        except Exception:
            self.clear_steering()
            raise
        return self

    def _sites_for_layers(self, layers) -> List[int]:
        if layers is None:
            return list(range(len(self.site_names)))
        wanted = [layers] if isinstance(layers, int) else list(layers)
        unknown = [x for x in wanted if x not in self.layers]
        if unknown:
            raise ValueError(f"steer: layers {unknown} are not patched (patched layers: {self.layers})")
        return [i for i, layer in enumerate(self._site_layers) if layer in wanted]

    def _materialize(self, sequences: Optional[Sequence[int]] = None) -> None:
        """Write the host-side steering configuration into the fixed device buffers (reallocating only when more
        vectors are steered at once than there are slots).

        ``sequences``: only these rows' settings changed, so only they are rebuilt and copied, which keeps a steer()
        call per sequence from costing time that grows with the batch. Everything is rebuilt when ``sequences`` is
        None or the set of steered vectors changed (their slots move).
        """
        used: List[int] = []
        for config in self._configs.values():
            for entry in config.entries:
                if entry.k not in used:
                    used.append(entry.k)
        st = self.state
        if len(used) > st.slots:
            st.allocate(st.B_cap, st.T_cap, 1 << (len(used) - 1).bit_length())
        S, B, T, slots = st.S, st.B_cap, st.T_cap, st.slots
        host = self._host
        incremental = (sequences is not None and host is not None and used == self._used
                       and tuple(host["a"].shape) == (S, B, slots) and host["scope"].shape[1] == T + 1)
        slot_of = {k: slot for slot, k in enumerate(used)}
        if incremental:
            rows = sorted({seq for seq in sequences if seq is not None and 0 <= seq < B})
        else:
            host = self._host = dict(zip(TABLE_NAMES, identity_tables(S, B, slots)))
            host["seq_row"] = torch.full((B,), -1, dtype=torch.int32)
            host["scope"] = torch.zeros(B, T + 1, dtype=torch.bool)
            rows = range(B)
        for seq in rows:
            self._fill_row(host, seq, slot_of, T)
        if incremental:
            for seq in rows:
                for name, full in zip(TABLE_NAMES, self._full_width(host, used, [seq])):
                    getattr(st, name)[:, seq].copy_(host[name][:, seq])
                    getattr(st, name + "_all")[:, seq].copy_(full[:, 0])
                st.seq_row[seq:seq + 1].copy_(host["seq_row"][seq:seq + 1])
                st.scope[seq].copy_(host["scope"][seq])
        else:
            Vs = torch.zeros_like(st.Vs)
            for k, j in slot_of.items():
                Vs[:, j] = st.V[:, k]
            for name in TABLE_NAMES + ("seq_row", "scope"):
                getattr(st, name).copy_(host[name])
            for name, full in zip(TABLE_NAMES, self._full_width(host, used, range(B))):
                getattr(st, name + "_all").copy_(full)
            st.Vs.copy_(Vs)
        self._used = used
        steered_sites = [False] * S
        live = B if self._prompt is None else min(B, self._prompt["batch"])
        for key, config in self._configs.items():
            if key is None or key < live:
                for entry in config.entries:
                    steered_sites[entry.site] = True
        self._steered_sites = steered_sites
        self._needs_prompt = any(c.entries and c.scope != "all" for c in self._configs.values())
        st.steering = any(steered_sites)

    def _full_width(self, host: Dict[str, torch.Tensor], used: List[int], rows) -> Tuple[torch.Tensor, ...]:
        """The four tables of the sequences ``rows`` with one column per bank vector, each (S, len(rows), K): the
        slot columns of the host tables placed at their vectors' indices, the identity elsewhere."""
        rows = list(rows)
        full = identity_tables(self.state.S, len(rows), self.state.K)
        if used:
            for name, table in zip(TABLE_NAMES, full):
                table[:, :, used] = host[name][:, rows, :len(used)]
        return full

    def _fill_row(self, host: Dict[str, torch.Tensor], seq: int, slot_of: Dict[int, int], T: int) -> None:
        """Reset row ``seq`` of the host buffers and write its settings (the everyone-settings, then its own)."""
        reset_to_identity([host[name] for name in TABLE_NAMES], (slice(None), seq))
        host["seq_row"][seq] = -1
        host["scope"][seq] = False
        prompt = self._prompt
        everyone = self._configs.get(None, _SequenceConfig())
        own = self._configs.get(seq)
        entries = everyone.entries + (own.entries if own else [])
        if not entries or (prompt is not None and seq >= prompt["batch"]):
            return
        host["seq_row"][seq] = seq
        a, b, lo, hi = host["a"], host["b"], host["lo"], host["hi"]
        for e in entries:  # in order, so a later entry for the same site and vector wins
            j = slot_of[e.k]
            a[e.site, seq, j], b[e.site, seq, j], lo[e.site, seq, j], hi[e.site, seq, j] = e.a, e.b, e.lo, e.hi
        host["scope"][seq] = self._scope_mask(own.scope if own and own.entries else everyone.scope, seq, T)

    def _scope_mask(self, scope, seq: int, T: int) -> torch.Tensor:
        mask = torch.zeros(T + 1, dtype=torch.bool)
        if scope == "all":
            mask[:] = True
            return mask
        prompt = self._prompt
        if prompt is None:
            return mask  # the pre-hook refuses to run until the prompt is known
        pad, width = prompt["pad"][seq], prompt["width"]
        if scope == "prompt":
            mask[pad:width] = True
        elif scope == "generated":
            mask[width:] = True
        else:
            length = width - pad
            if isinstance(scope, Mapping):
                spans = [self._text_span(scope["text"], seq)]
            else:
                spans = [(int(s), int(e)) for s, e in scope]
            for s, e in spans:
                if e > length:
                    raise ValueError(f"steer: scope span ({s}, {e}) is outside the prompt of sequence {seq} "
                                     f"({length} tokens)")
                mask[pad + s:pad + e] = True
        return mask

    def _text_span(self, text: str, seq: int) -> Tuple[int, int]:
        prompt = self._prompt
        if prompt.get("texts") is None or prompt.get("offsets") is None:
            raise ValueError("steer: a {'text': ...} scope needs prompts given as strings (handle.generate(prompts) "
                             "or handle.prepare(prompts=...)) and a fast tokenizer")
        where = prompt["texts"][seq].find(text)
        if where < 0:
            raise ValueError(f"steer: scope text {text!r} does not occur in the prompt of sequence {seq}")
        end = where + len(text)
        tokens = [i for i, (s, e) in enumerate(prompt["offsets"][seq]) if e > where and s < end and e > s]
        return tokens[0], tokens[-1] + 1

    # ------------------------------------------------------------------------------------------ running
    def prepare(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None, *,
                prompts: Optional[Sequence[str]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Tell the patch the prompt batch (left-padded), so prompt-relative scopes can be placed.

        Give ``prompts`` (strings, tokenized here with left padding; needs ``tokenizer``) or ``input_ids`` with
        ``attention_mask``. Returns ``(input_ids, attention_mask)``.
        """
        offsets = None
        if prompts is not None:
            if self.tokenizer is None:
                raise ValueError("prepare: prompts given as strings need patch(..., tokenizer=...)")
            if isinstance(prompts, str):
                prompts = [prompts]
            tok = self.tokenizer
            side = getattr(tok, "padding_side", "right")
            tok.padding_side = "left"
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            try:
                enc = tok(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
                try:
                    offsets = [tok(p, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
                               for p in prompts]
                except (NotImplementedError, TypeError, ValueError):
                    offsets = None
            finally:
                tok.padding_side = side
            input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]
        if input_ids is None:
            raise ValueError("prepare: give 'prompts' or 'input_ids'")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = attention_mask.bool().cpu()
        B, W = input_ids.shape
        lengths = mask.sum(1)
        pads = (W - lengths).tolist()
        for i in range(B):
            if not bool(mask[i, pads[i]:].all()):
                raise ValueError(f"prepare: sequence {i} is not left-padded (decoder-only generation needs "
                                 f"tokenizer.padding_side = 'left')")
        self.reserve(batch=B)
        previous = self._prompt
        self._prompt = {"batch": B, "width": W, "pad": pads, "texts": list(prompts) if prompts else None,
                        "offsets": offsets}
        try:
            self._materialize()
        except Exception:
            self._prompt = previous  # a prompt the steering settings do not fit is not adopted
            raise
        device = self.state.device
        return input_ids.to(device), attention_mask.to(device)

    @torch.no_grad()
    def generate(self, prompts: Optional[Sequence[str]] = None, *, input_ids: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, max_new_tokens: int = 32,
                 **generate_kwargs) -> GenerationResult:
        """``model.generate`` with the prompt registered, buffers reserved and the trace read back once after."""
        input_ids, attention_mask = self.prepare(input_ids, attention_mask, prompts=prompts)
        B, W = input_ids.shape
        self.reserve(batch=B, tokens=W + max_new_tokens)
        if self.tokenizer is not None and self.tokenizer.pad_token_id is not None:
            generate_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                  **generate_kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        trace = self.trace(sequences, prompt_width=W, attention_mask=attention_mask) if self.monitor else None
        texts = []
        if self.tokenizer is not None:
            texts = self.tokenizer.batch_decode(sequences[:, W:], skip_special_tokens=True)
        return GenerationResult(sequences=sequences, texts=texts, trace=trace, prompt_width=W, output=out)

    def trace(self, token_ids: torch.Tensor, *, prompt_width: Optional[int] = None,
              attention_mask: Optional[torch.Tensor] = None) -> Trace:
        """Read the recorded projections for ``token_ids`` (B, T), as fed at cache positions 0..T-1.

        ``prompt_width``: width of the (left-padded) prompt; positions from there on are "generated" and the last
        one, never fed back through the model by ``generate``, is NaN. Default: everything is prompt.
        """
        st = self.state
        B, T = token_ids.shape
        if B > st.B_cap or T > st.T_cap:
            raise ValueError(f"trace: ({B}, {T}) exceeds the recorded capacity ({st.B_cap}, {st.T_cap})")
        proj = st.P[:, :B, :T].permute(1, 2, 0, 3).float().cpu().clone()  # (B, T, S, K)
        W = T if prompt_width is None else prompt_width
        is_pad = torch.zeros(B, T, dtype=torch.bool)
        if attention_mask is not None:
            is_pad[:, :attention_mask.shape[1]] = ~attention_mask.bool().cpu()[:, :T]
        is_prompt = torch.zeros(B, T, dtype=torch.bool)
        is_prompt[:, :W] = True
        is_prompt &= ~is_pad
        if W < T:
            proj[:, T - 1] = float("nan")
        ids = token_ids.cpu()
        tokens = ([Trace.decode_tokens(self.tokenizer, r) for r in ids.tolist()] if self.tokenizer is not None
                  else [[str(t) for t in r] for r in ids.tolist()])
        mean = std = None
        if self.bank.neutral_mean is not None and self.bank.neutral_std is not None:
            slots = [self.bank.layer_slot(layer) for layer in self._site_layers]
            mean, std = self.bank.neutral_mean[slots], self.bank.neutral_std[slots]
        return Trace(proj, ids, tokens, is_prompt, is_pad, list(self.site_names), list(self.bank.names), mean, std)

    # ------------------------------------------------------------------------------------------ removal
    def remove(self) -> None:
        """Remove every hook; the model computes exactly what it did before :func:`patch`."""
        if self._removed:
            return
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if getattr(self.model, "_emokern_patch", None) is self:
            del self.model._emokern_patch
        self._removed = True

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def patch(model, bank: VectorBank, *, layers=None, sites: Union[str, Sequence[str]] = ("residual",),
          tokenizer=None, arch: Optional[ArchSpec] = None, backend: Optional[str] = None, monitor: bool = True,
          force: bool = False, batch: int = 8, tokens: int = 512, train: bool = False) -> PatchHandle:
    """Patch a loaded ``transformers`` causal LM in place to monitor and steer with ``bank``; returns the handle.

    Args:
        model: a causal LM whose ``config.model_type`` is in :data:`emokern.core.architecture.ARCHITECTURES` (or pass ``arch``).
        bank: the vectors; refused if made for another hidden size, or another model fingerprint unless ``force``.
        layers: None (all layers), an index, a float fraction of depth, a slice, or a list of those. Every
            selected layer must be in the bank.
        sites: any of ``"residual"`` (decoder layer output), ``"attn"``, ``"mlp"`` (block outputs before the
            residual add).
        tokenizer: used for prompts given as text, token strings in traces, and decoded outputs.
        arch: an :class:`~emokern.core.architecture.ArchSpec` for models not in the table.
        backend: op backend (see :func:`emokern.ops.resolve_backend`).
        monitor: record projections (set False to only steer).
        force: accept a bank whose model fingerprint differs (hidden size must still match).
        batch, tokens: initial buffer capacity (grown on demand in eager mode; reserve before compiling).
        train: training mode. In a forward with grad enabled, every site's projections onto all K vectors are
            computed by the differentiable op and kept in the graph (:meth:`PatchHandle.projections`), and
            steering is differentiable too, so a loss on either reaches the model's parameters
            (:mod:`emokern.engines.training`). Forwards under ``torch.no_grad()`` (generation, evaluation) take the
            in-place inference path, exactly as with ``train=False``.
    """
    if getattr(model, "_emokern_patch", None) is not None:
        raise RuntimeError("this model is already patched by emokern: call handle.remove() on the existing patch "
                           "(or use it) before patching again")
    if not isinstance(bank, VectorBank):
        raise TypeError(f"patch: 'bank' must be an emokern.VectorBank; got {type(bank).__name__}")
    sites = (sites,) if isinstance(sites, str) else tuple(sites)
    bad = [s for s in sites if s not in SITES]
    if bad or not sites:
        raise ValueError(f"patch: 'sites' must be a non-empty subset of {SITES}; got {sites}")
    spec, base, layer_modules = resolve_architecture(model, arch)
    bank.check_model(model, force=force)
    chosen = select_layers(layers, len(layer_modules))
    missing = [layer for layer in chosen if layer not in bank.layers]
    if missing:
        raise ValueError(f"patch: the bank has no vectors for layers {missing} (it covers {bank.layers})")
    return PatchHandle(model, bank, chosen, sites, spec, base, layer_modules, tokenizer=tokenizer, backend=backend,
                       monitor=monitor, batch=batch, tokens=tokens, train=bool(train))
