"""Test-session set-up shared by every test module.

Without a GPU, the Triton kernels run in Triton's CPU interpreter: TRITON_INTERPRET must be set before triton is
imported, and emokern reads it at import, so it is set here, first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
settings.load_profile("ci")
