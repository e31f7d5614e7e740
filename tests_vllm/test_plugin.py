"""The plugin's start-up check: Python started in the checkout without ``-P`` imports the checkout's ``emokern``,
whose ``_C`` (built for the main environment's torch, or not built) has no ops for vLLM's torch. The engine used to
die at its first step with ``'_OpNamespace' 'emokern' object has no attribute 'project'``; ``register()`` now refuses
to start, saying why and what to do."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROBE = ("import emokern, sys; from emokern.ops import extension as x; "
         "print(emokern.__path__[0]); sys.exit(0 if (x.HAS_CPU_KERNELS or x.HAS_CUDA_KERNELS) else 3)")


def test_shadowing_checkout_is_refused_with_the_fix():
    probe = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True)
    assert probe.stdout.strip() == str(ROOT / "emokern")  # without -P the checkout's emokern is the one imported
    if probe.returncode == 0:
        pytest.skip("the checkout's emokern/_C was built for this environment's torch: nothing is shadowed")
    run = subprocess.run([sys.executable, "-c", "from emokern.engines.vllm import plugin; plugin.register()"], cwd=ROOT,
                         capture_output=True, text=True, env=dict(os.environ))
    assert run.returncode != 0
    assert "has no compiled ops for torch" in run.stderr and "start Python with -P" in run.stderr, run.stderr
    # with -P (as the README's commands run it) the installed emokern is imported and registers
    run = subprocess.run([sys.executable, "-P", "-c", "from emokern.engines.vllm import plugin; plugin.register(); "
                                                      "print(plugin._REGISTERED)"], cwd=ROOT, capture_output=True,
                         text=True)
    assert run.returncode == 0 and run.stdout.strip().endswith("True"), run.stderr[-2000:]
