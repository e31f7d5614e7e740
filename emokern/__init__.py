"""emokern: find, read and steer emotion vectors inside language models.

Where things live:

* :mod:`emokern.ops` — the fused, in-place project-and-steer op (reference, C++ CPU, Triton, CUDA backends).
* :mod:`emokern.models` — embedded offline models (SmolLM2-135M-Instruct by default) and model fingerprints.
* :mod:`emokern.emotions` — the paper's 171 emotion words.
* :mod:`emokern.cli` — the ``emokern`` command.

Importing emokern never initialises CUDA and never imports triton.
"""

from emokern.ops import (
    SteeringTable,
    orthonormalize,
    project,
    project_and_steer,
    project_and_steer_,
)

__version__ = "0.1.0"

__all__ = [
    "SteeringTable",
    "__version__",
    "orthonormalize",
    "project",
    "project_and_steer",
    "project_and_steer_",
]
