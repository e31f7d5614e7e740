"""emokern inside vLLM: per-request steering and per-token emotion monitoring, with vLLM's compilation left on.

* :mod:`emokern.engines.vllm.plugin` — ``register()``, the ``vllm.general_plugins`` entry point (inert unless
  ``EMOKERN_VLLM_BANK`` names a bank; kill switch ``EMOKERN_VLLM_DISABLE=1``).
* :mod:`emokern.engines.vllm.config` — the environment variables (bank, layers, trace store size).
* :mod:`emokern.engines.vllm.spec` — the per-request spec in ``SamplingParams.extra_args["emokern"]`` (steer / monitor /
  alert), parsed with the same rules as :meth:`emokern.PatchHandle.steer` (:mod:`emokern.core.steering`).
* :mod:`emokern.engines.vllm.worker` — the op at the chosen layers, the per-step routing, the recorded traces.
* :mod:`emokern.engines.vllm.client` — :func:`sampling_params`, :func:`generate`, :func:`take_traces` for ``vllm.LLM``.
* :mod:`emokern.engines.vllm.server` — ``GET /v1/emokern/trace/{request_id}`` for ``vllm serve``.

Importing this package does not import vLLM; the functions do, when called.
"""

from emokern.engines.vllm.client import Result, generate, sampling_params, take_traces
from emokern.engines.vllm.plugin import register

__all__ = ["Result", "generate", "register", "sampling_params", "take_traces"]
