"""``register()``: the ``vllm.general_plugins`` entry point, run by vLLM in every process it starts.

It is cheap, idempotent and inert unless configured (:mod:`emokern.engines.vllm.config`). When configured it patches two
classes present in every vLLM process (no model work happens here):

* ``InputProcessor.process_inputs`` (the front end: ``LLM`` or the API server): a request's
  ``extra_args["emokern"]`` is parsed against the bank before it enters the engine, so an unknown emotion, a bad
  mode or a strength that is not a number, or beyond :data:`~emokern.engines.vllm.spec.MAX_STRENGTH`, fails that request
  alone with a clear message (HTTP 400 on the server) and the engine never sees it. A steered request gets a
  prefix-cache salt derived from its steering (and, for the ``prompt`` and ``generated`` scopes, its prompt length:
  :meth:`RequestSpec.cache_salt`), combined with any salt it brought, so it never reads KV blocks computed under
  another steering state; a request that monitors its prompt reads nothing from the prefix cache
  (``skip_reading_prefix_cache``), so every prompt position is computed, and recorded. With a registry
  (:mod:`emokern.engines.vllm.registry`) the spec is parsed against the names registered now, and the request is
  pinned to their versions (``extra_args["emokern_pins"]``, always the front end's: a client's value is dropped).
* ``WorkerWrapperBase`` (each worker): ``load_model`` installs the op into the loaded model (before vLLM's
  warm-up and compilation) and the RPC methods ``emokern_take``, ``emokern_readout``, ``emokern_stats`` and
  ``emokern_register`` are added for ``collective_rpc`` with a string method name.

It refuses to start when the imported emokern has no compiled ops (:func:`_check_extension`), and salts vLLM's
compile-cache key with the bank and layers (:func:`_patch_compile_hash`).
"""

from __future__ import annotations

import logging

from emokern.engines.vllm import config as config_mod

logger = logging.getLogger("emokern.engines.vllm")

__all__ = ["register"]

_REGISTERED = False


def register() -> None:
    """Patch vLLM for emokern when ``EMOKERN_VLLM_BANK`` is set (and ``EMOKERN_VLLM_DISABLE`` is not); else no-op."""
    global _REGISTERED
    if _REGISTERED:
        return
    cfg = config_mod.from_env()
    if cfg is None:
        return
    _check_extension()
    _patch_front_end()
    _patch_worker()
    _patch_compile_hash(cfg)
    _REGISTERED = True


def _check_extension() -> None:
    """Fail the engine's start, with the cause and the fix, when the imported emokern has no compiled ops.

    The usual cause: Python was started in a source checkout, whose ``emokern/`` shadows the one installed in vLLM's
    environment, and the checkout's ``_C`` was built against another torch. It may load without an error yet
    register nothing, and the engine would die at its first step (``'_OpNamespace' 'emokern' object has no
    attribute 'project'``)."""
    import importlib
    from pathlib import Path

    import torch

    from emokern.ops.extension import HAS_CPU_KERNELS, HAS_CUDA_KERNELS

    if HAS_CPU_KERNELS or HAS_CUDA_KERNELS:
        return
    try:  # the reason, for the message: a failed import leaves nothing in sys.modules, so it fails the same again
        importlib.import_module("emokern._C")
        cause = "loaded, but it registered no kernels"
    except (ImportError, OSError) as exc:
        cause = str(exc)
    raise RuntimeError(
        f"emokern.engines.vllm: the emokern imported from {Path(__file__).resolve().parents[2]} has no compiled ops for torch "
        f"{torch.__version__} (emokern._C: {cause}). "
        f"If that is a source checkout, Python put the current directory first on its import path: start Python "
        f"with -P (or set PYTHONSAFEPATH=1), or run from another directory, so that the emokern installed in this "
        f"environment is used (make vllm-env builds it).")


def _patch_front_end() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    from emokern.engines.vllm import registry as registry_mod
    from emokern.engines.vllm import spec as spec_mod

    from vllm.exceptions import VLLMValidationError

    original = InputProcessor.process_inputs
    if getattr(original, "_emokern", False):
        return

    class RequestSpecError(spec_mod.SpecError, VLLMValidationError):
        """A :class:`SpecError` that vLLM's server answers with 400 and the message (it is a ValueError too)."""

        parameter = "extra_args.emokern"
        value = None

    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        extra = getattr(params, "extra_args", None) or {}
        raw = extra.get(spec_mod.KEY)
        loaded = config_mod.load()
        registry = registry_mod.front(loaded.config.registry_slots)
        try:
            parsed = spec_mod.parse(raw, loaded, registry and registry.current()) if raw is not None else None
        except spec_mod.SpecError as exc:  # this request fails alone, before it reaches the engine
            raise RequestSpecError(str(exc)) from None
        request = original(self, request_id, prompt, params, *args, **kwargs)
        pins = parsed.pins if parsed is not None else {}
        own = request.sampling_params  # the request's copy: `params` may be shared by several prompts
        if own is not None and (pins or registry_mod.PINS_KEY in (own.extra_args or {})):
            # only the front end pins: a client's forged pins are dropped
            own.extra_args = {k: v for k, v in own.extra_args.items() if k != registry_mod.PINS_KEY}
            if pins:
                own.extra_args[registry_mod.PINS_KEY] = {name: list(pin) for name, pin in pins.items()}
        if parsed is None:
            return request
        salt = parsed.cache_salt(_prompt_len(request))
        if salt is not None:
            request.cache_salt = salt if not request.cache_salt else f"{request.cache_salt}|{salt}"
        if parsed.monitor_k is not None and parsed.monitor_prompt and request.sampling_params is not None:
            request.sampling_params.skip_reading_prefix_cache = True
        return request

    process_inputs._emokern = True
    process_inputs._emokern_original = original  # what the tests call to send a spec around the front end's check
    InputProcessor.process_inputs = process_inputs


def _prompt_len(request) -> int:
    if request.prompt_token_ids is not None:
        return len(request.prompt_token_ids)
    return 0 if request.prompt_embeds is None else int(request.prompt_embeds.shape[0])


def _patch_compile_hash(cfg) -> None:
    """Salt ``VllmConfig.compute_hash`` (vLLM's compile-cache key) with :func:`config.fingerprint`: vLLM keys its
    cached compiled graphs by configuration and model source, not by plugins, and a graph traced without the op (or
    with another bank's buffers) would otherwise be loaded and run without emokern."""
    import hashlib

    from vllm.config import VllmConfig

    original = VllmConfig.compute_hash
    if getattr(original, "_emokern", False):
        return
    salt = config_mod.fingerprint(cfg)

    def compute_hash(self, *args, **kwargs):
        base = original(self, *args, **kwargs)
        return hashlib.sha256(f"{base}|{salt}".encode()).hexdigest()[:len(base)]

    compute_hash._emokern = True
    VllmConfig.compute_hash = compute_hash


def _patch_worker() -> None:
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    if getattr(WorkerWrapperBase, "_emokern", False):
        return

    def load_model(self, *args, **kwargs):
        from emokern.engines.vllm import worker

        self.worker.load_model(*args, **kwargs)
        worker.install(self.worker.model_runner, config_mod.load())

    def emokern_take(self, request_ids):
        """Traces of finished requests by id (see :meth:`emokern.engines.vllm.worker.Installation.take`)."""
        from emokern.engines.vllm import worker

        inst = worker.installation()
        return [None] * len(request_ids) if inst is None else inst.take(list(request_ids))

    def emokern_readout(self, request_ids):
        """Compact readouts of requests by id, kept for emokern_take (see
        :meth:`emokern.engines.vllm.worker.Installation.readout`)."""
        from emokern.engines.vllm import worker

        inst = worker.installation()
        return [None] * len(request_ids) if inst is None else inst.readout(list(request_ids))

    def emokern_stats(self):
        from emokern.engines.vllm import worker

        inst = worker.installation()
        return None if inst is None else inst.stats()

    def emokern_register(self, slot, name, version, data, shape):
        """Write a registered vector into a slot (see :meth:`emokern.engines.vllm.worker.Installation.register`)."""
        from emokern.engines.vllm import worker

        inst = worker.installation()
        if inst is None:
            raise RuntimeError("emokern.engines.vllm: this worker has no installation to register a vector in")
        return inst.register(int(slot), str(name), int(version), bytes(data), list(shape))

    WorkerWrapperBase.load_model = load_model
    WorkerWrapperBase.emokern_register = emokern_register
    WorkerWrapperBase.emokern_take = emokern_take
    WorkerWrapperBase.emokern_stats = emokern_stats
    WorkerWrapperBase.emokern_readout = emokern_readout
    WorkerWrapperBase._emokern = True
