"""emokern: find, read and steer emotion vectors inside language models.

Where things live:

* :mod:`emokern.ops` — the fused, in-place project-and-steer op (reference, C++ CPU, Triton, CUDA backends).
* :mod:`emokern.patch` — ``patch(model, bank)``: per-token monitoring and steering inside a Hugging Face model.
* :mod:`emokern.bank` — ``VectorBank``: named vectors per layer with the model identity, saved as safetensors+JSON.
* :mod:`emokern.trace` / :mod:`emokern.viz` — recorded projections, their plots and heatmap pages.
* :mod:`emokern.models` — embedded offline models (SmolLM2-135M-Instruct by default) and model fingerprints.
* :mod:`emokern.corpus` — the story and neutral-dialogue corpus (resumable generation).
* :mod:`emokern.extract` — activations, emotion vectors, denoising, the bank, llama.cpp control-vector export.
* :mod:`emokern.report` / :mod:`emokern.datasets` — the validation report and the external data it uses.
* :mod:`emokern.pipeline` — the end-to-end jobs behind ``emokern extract`` and ``emokern demo``.
* :mod:`emokern.experiments` — the paper's experiments behind ``emokern experiment NAME``: activity preferences,
  blackmail, reward hacking (with its sandbox) and sycophancy.
* :mod:`emokern.emotions` — the paper's 171 emotion words.
* :mod:`emokern.cli` — the ``emokern`` command.

Importing emokern never initialises CUDA and never imports triton.
"""

from emokern.bank import VectorBank
from emokern.ops import (
    SteeringTable,
    orthonormalize,
    project,
    project_and_steer,
    project_and_steer_,
)
from emokern.patch import ArchSpec, PatchHandle, patch
from emokern.trace import Trace

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
