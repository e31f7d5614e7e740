"""Loading of the compiled extension ``emokern._C`` and the fake kernels of the ops it defines.

Loading a shared library does not initialise CUDA, so this runs at ``import emokern``. If the library is
missing or broken, the import still succeeds and the first op call raises :class:`ExtensionNotBuiltError` with
the original reason and the command that fixes it.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

__all__ = ["ExtensionNotBuiltError", "HAS_CPU_KERNELS", "HAS_CUDA_KERNELS", "load_error", "require_extension"]

BUILD_HINT = (
    "Build it from the repository root with `pip install --no-build-isolation -e .` (or `make install`), in the "
    "environment whose torch you run with; EMOKERN_BUILD_CUDA=auto|0|1 chooses whether the CUDA kernels are built."
)


class ExtensionNotBuiltError(RuntimeError):
    """The compiled extension ``emokern._C`` is missing or failed to load."""


_load_error: Optional[BaseException] = None

try:
    importlib.import_module("emokern._C")  # registers the emokern:: ops with the dispatcher
except (ImportError, OSError) as exc:
    _load_error = exc
else:
    # The ops mutate their arguments and return nothing, so the fakes only need to exist: they let
    # torch.compile trace the call without running a kernel and without copying the mutated tensors.
    @torch.library.register_fake("emokern::project")
    def _project_fake(h, V, P_out):
        return None

    @torch.library.register_fake("emokern::project_and_steer_")
    def _project_and_steer_fake(h, V, row, a, b, lo, hi, P_out):
        return None


def load_error() -> Optional[BaseException]:
    """Why ``emokern._C`` did not load (the exception its import raised), or ``None`` when it loaded."""
    return _load_error


def require_extension() -> None:
    """Raise :class:`ExtensionNotBuiltError` with the reason and the fix if ``emokern._C`` did not load."""
    if _load_error is not None:
        raise ExtensionNotBuiltError(
            f"emokern's compiled extension emokern._C is not available "
            f"({type(_load_error).__name__}: {_load_error}). {BUILD_HINT}"
        )


def _has_kernel(dispatch_key: str) -> bool:
    return _load_error is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "emokern::project_and_steer_", dispatch_key
    )


HAS_CPU_KERNELS = _has_kernel("CPU")
HAS_CUDA_KERNELS = _has_kernel("CUDA")
