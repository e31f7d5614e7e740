"""The fused project-and-steer op and its helpers.

* :mod:`emokern.ops.reference` — the executable specification (pure PyTorch, fp64).
* :mod:`emokern.ops.api` — the public API: checks, backend choice, autograd.
* :mod:`emokern.ops.triton_kernels` — the Triton kernels (imported on first use).
* ``csrc/`` — the C++ CPU and CUDA kernels, registered as ``torch.ops.emokern.*``.
"""

from emokern.ops.extension import ExtensionNotBuiltError
from emokern.ops.api import (
    BACKENDS,
    SteeringTable,
    orthonormalize,
    project,
    project_and_steer,
    project_and_steer_,
    resolve_backend,
)
from emokern.ops.reference import project_and_steer_ref, project_ref

__all__ = [
    "BACKENDS",
    "ExtensionNotBuiltError",
    "SteeringTable",
    "orthonormalize",
    "project",
    "project_and_steer",
    "project_and_steer_",
    "project_and_steer_ref",
    "project_ref",
    "resolve_backend",
]
