"""Shared set-up of the vLLM tests (run by ``make test-vllm`` in the vLLM environment, from this folder).

A bank of random unit vectors for the embedded SmolLM2-135M-Instruct at two layers (so that the tests need nothing
built by ``emokern extract``), written before any engine starts; the plugin reads it through the environment in
every vLLM process. Engines are module-scoped fixtures in the test modules, each shut down explicitly (a vLLM engine
left running keeps busy-polling processes alive).
"""

import os
import tempfile

import pytest
import torch

MODEL = "smollm2-135m-instruct"
LAYERS = (10, 19)
NAMES = ["calm", "desperate", "angry", "happy", "afraid", "proud"]
RESIDUAL_NORM = 8.0  # the strength unit of the test bank (of the order of SmolLM2's mid-layer token norms)

_BANK_DIR = tempfile.mkdtemp(prefix="emokern-vllm-test-")
BANK_PATH = os.path.join(_BANK_DIR, "bank.json")

# Before vLLM is imported anywhere: every process vLLM starts inherits these.
os.environ["EMOKERN_VLLM_BANK"] = BANK_PATH
os.environ["EMOKERN_VLLM_LAYERS"] = ",".join(str(x) for x in LAYERS)
os.environ.pop("EMOKERN_VLLM_DISABLE", None)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def hf():
    """``(model, tokenizer, path)``: the embedded model in bf16 (the cache is made from the package if missing)."""
    from emokern.core.models import load_model, model_cache_dir

    torch.manual_seed(0)
    model, tok = load_model(MODEL, dtype=torch.bfloat16)
    return model, tok, str(model_cache_dir(MODEL))


@pytest.fixture(scope="session")
def bank(hf):
    """The test bank (random vectors, the same at both layers; neutral mean 0 and std 1 so z-scores equal
    projections), saved at
    ``BANK_PATH``."""
    from emokern.core.bank import VectorBank

    model = hf[0]
    g = torch.Generator().manual_seed(1)
    L, K = len(LAYERS), len(NAMES)
    # one direction per emotion at every layer, so that a push at layer 10 shows along the same vector at layer 19
    vectors = torch.randn(1, K, model.config.hidden_size, generator=g).repeat(L, 1, 1)
    b = VectorBank.from_tensors(vectors, NAMES, layers=list(LAYERS), residual_norm=torch.full((L,), RESIDUAL_NORM),
                                model=model, neutral_mean=torch.zeros(L, K), neutral_std=torch.ones(L, K))
    b.save(BANK_PATH)
    return b


def shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
