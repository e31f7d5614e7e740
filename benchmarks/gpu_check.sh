#!/usr/bin/env bash
# The prepared GPU run (issue 6), for the lent machine: torch 2.11 + CUDA 13.0, Triton 3.6, transformers 5.17,
# Python 3.12, no package registry. Run from the repository root through the device tool, e.g.
#
#     bash benchmarks/gpu_check.sh            # writes everything under $OUT
#
# Pure-Python wheels the machine lacks (hypothesis, sortedcontainers, ...) can be carried in a folder named by
# $WHEELS; they are installed with --no-deps before the tests. Every step's output goes to $OUT, and a failing
# step does not stop the later ones (each step's exit status is recorded in $OUT/steps.tsv).
set -uo pipefail
OUT=${OUT:-/tmp/emokern_gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
: > "$OUT/steps.tsv"

step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, record the status and the seconds it took
  local name=$1; shift
  local t0=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%ss\n' "$name" "$rc" "$((SECONDS - t0))" | tee -a "$OUT/steps.tsv"
  return 0
}

step gpu nvidia-smi
step versions "$PY" -c "import sys, torch, triton, transformers; print(sys.version); print('torch', torch.__version__, \
'cuda', torch.version.cuda); print('triton', triton.__version__); print('transformers', transformers.__version__); \
print(torch.cuda.get_device_name())"
if [ -n "${WHEELS:-}" ] && [ -d "$WHEELS" ]; then
  step wheels "$PY" -m pip install --no-deps --no-index "$WHEELS"/*.whl
fi
# Hopper only, to keep the build short; all 16 cores.
step build env EMOKERN_BUILD_CUDA=1 EMOKERN_CUDA_ARCHS=9.0 MAX_JOBS=16 "$PY" setup.py build_ext --inplace
step import "$PY" -c "import emokern.ops.extension as e; print('CPU', e.HAS_CPU_KERNELS, 'CUDA', e.HAS_CUDA_KERNELS)"
# The op on every backend (CUDA and Triton in bf16 too), opcheck and compile, then the patch.
step tests_ops "$PY" -m pytest -q -ra tests/test_project_and_steer.py tests/test_triton_kernels.py \
  tests/test_torch_library.py tests/test_errors.py tests/test_autograd.py tests/test_cuda_graphs.py
step tests_patch "$PY" -m pytest -q -ra tests/test_patch.py
# The experiments with the model on the GPU (micro sizes; the real-model ones need weights the device lacks).
step tests_experiments "$PY" -m pytest -q -ra tests/test_experiments_cuda.py tests/test_experiments_run_dir.py tests/test_experiments_rollouts.py
step bench_ops "$PY" benchmarks/bench_ops.py --device cuda --out "$OUT/bench_ops_cuda.json"
# Generation with a static cache and torch.compile (CUDA graphs): unpatched against a second copy of the model patched
# once (monitor, monitor + 2 steered), b1 and b32, and a 4k prefill: the compiled rows of issue 12's table.
step bench_generate "$PY" benchmarks/bench_generate.py --device cuda --reps 3
# The patch under generate's own compile with a static cache (one graph, no breaks, equal to eager), on the GPU.
step tests_compiled_generate "$PY" -m pytest -q -ra tests/test_patch.py -k static_cache
cp benchmarks/results/bench_generate_cuda_*.json "$OUT/" 2>/dev/null
# emokern's vLLM plugin (issue 11): vLLM without the plugin vs monitor-only vs monitor + 2 steered, b1 and b64, CUDA
# graphs on (target: >= 97 % of plugin-off). Only where a CUDA build of vLLM is installed (carry its wheel in $WHEELS);
# the plugin registers through the checkout's entry point, so emokern must be installed: pip install --no-deps -e .
if "$PY" -c "import vllm" 2>/dev/null; then
  step install_emokern env EMOKERN_BUILD_CUDA=1 EMOKERN_CUDA_ARCHS=9.0 MAX_JOBS=16 "$PY" -m pip install \
    --no-build-isolation --no-deps --no-index -e .
  step bench_vllm "$PY" benchmarks/bench_vllm.py --device cuda --checkout --rounds 2 --reps 3
  cp benchmarks/results/bench_vllm_*.json "$OUT/" 2>/dev/null
fi
cat "$OUT/steps.tsv"
