"""emokern: find, read and steer emotion vectors inside language models.

Where things live:

* :mod:`emokern.ops` — the fused, in-place project-and-steer op (reference, C++ CPU, Triton, CUDA backends).
* :mod:`emokern.engines.hf` — ``patch(model, bank)``: per-token monitoring and steering inside a Hugging Face model.
* :mod:`emokern.core.bank` — ``VectorBank``: named vectors per layer with the model identity, saved as safetensors+JSON.
* :mod:`emokern.core.trace` / :mod:`emokern.core.trace_plots` — recorded projections, their plots and heatmap pages.
* :mod:`emokern.core.models` — embedded offline models (SmolLM2-135M-Instruct by default) and model fingerprints.
* :mod:`emokern.extraction.corpus` — the story and neutral-dialogue corpus (resumable generation).
* :mod:`emokern.extraction.extract` — activations, emotion vectors, denoising, the bank, llama.cpp control-vector export.
* :mod:`emokern.validation.report` / :mod:`emokern.validation.datasets` — the validation report and the external data it uses.
* :mod:`emokern.pipeline` — the end-to-end jobs behind ``emokern extract`` and ``emokern demo``.
* :mod:`emokern.experiments` — the paper's experiments behind ``emokern experiment NAME``: activity preferences,
  blackmail, reward hacking (with its sandbox) and sycophancy.
* :mod:`emokern.core.emotions` — the paper's 171 emotion words.
* :mod:`emokern.cli` — the ``emokern`` command.

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

__version__ = "0.1.0"

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
