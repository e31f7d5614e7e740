"""emokern: find, read and steer emotion vectors inside language models.

Where things live, in layers: each imports only itself and the layers above it in this list, never a private
(``_``) name of another module (``tests/test_layout.py`` checks both).

* :mod:`emokern.util` — helpers written once: atomic file writes, Agg figures, Pearson r and unit rows, "did you
  mean", progress bars, input-file checks, packaged data files, the transformers cache keyword.
* :mod:`emokern.ops` — the fused, in-place project-and-steer op: reference (the executable spec), C++ CPU, Triton
  and CUDA backends, the extension loader, ``SteeringTable`` and the steering modes' coefficients.
* :mod:`emokern.core` — what every engine shares: ``VectorBank`` (:mod:`.bank`) and its llama.cpp control-vector
  form (:mod:`.control_vectors`), the steering-spec language compiled to the op's tables (:mod:`.steering`), model
  families and their layers (:mod:`.architecture`), ``Trace`` and its pictures (:mod:`.trace`, :mod:`.trace_plots`), chat prompts (:mod:`.chat`), the 171 emotion words and their
  human norms (:mod:`.emotions`), the embedded offline models and fingerprints (:mod:`.models`).
* :mod:`emokern.engines` — where vectors meet a running model: ``patch(model, bank)`` for Hugging Face models
  (:mod:`.hf`), training through it (:mod:`.training`), the vLLM plugin (:mod:`.vllm`).
* :mod:`emokern.extraction` — the paper's recipe: prompts, the story corpus (plan, generation, filters, shipped
  corpora), the sampler, activations and emotion vectors, held-out quality and the layer choice, the bank.
* :mod:`emokern.validation` — ``emokern report``: its computations, page, external datasets and the concept and
  cause checks (sections 5-7).
* :mod:`emokern.experiments` — the paper's experiments behind ``emokern experiment NAME`` (activity preferences,
  blackmail, reward hacking with its sandbox, sycophancy) and what they share (run directories, conditions,
  rollouts, statistics, the judge).
* :mod:`emokern.pipeline` — the end-to-end jobs behind ``emokern extract`` and ``emokern demo``.
* :mod:`emokern.ui` — ``emokern ui``: the live local page (chat, per-token emotions, steering).
* :mod:`emokern.cli` — the ``emokern`` command. :mod:`emokern.testing` — tiny models and tokenizers for tests and
  examples.

Importing emokern never initialises CUDA and never imports triton.
"""

from emokern.core.bank import VectorBank
from emokern.ops import (
    SteeringTable,
    orthonormalize,
    project,
    project_and_steer,
    project_and_steer_,
)
from emokern.core.architecture import ArchSpec
from emokern.engines.hf import PatchHandle, patch
from emokern.core.trace import Trace

from emokern.version import __version__

__all__ = [
    "ArchSpec",
    "PatchHandle",
    "SteeringTable",
    "Trace",
    "VectorBank",
    "patch",
    "__version__",
    "orthonormalize",
    "project",
    "project_and_steer",
    "project_and_steer_",
]
