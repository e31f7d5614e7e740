"""`import emokern` touches no CUDA and does not import triton (run in a fresh interpreter)."""

import subprocess
import sys

PROBE = r"""
import sys
import torch
import torch.cuda

def refuse(*args, **kwargs):
    raise RuntimeError("CUDA was initialised during import")

torch.cuda._lazy_init = refuse
torch.cuda.init = refuse
import emokern
import emokern.ops
assert not torch.cuda.is_initialized()
assert "triton" not in sys.modules, "import emokern imported triton"
print("lean")
"""


def test_import_touches_no_cuda_and_no_triton():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("lean")
