"""The four experiments with the model on a CUDA device (micro sizes, the tiny chat model): the rollouts, the
preference forward passes and the episode trace must run where the model is. Skipped without a GPU."""

import json

import pytest
import torch

from emokern.experiments import run_experiment

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

MICRO = {
    "preferences": dict(max_activities=8, steer_emotions=["blissful", "hostile"], batch_size=56, layers="1,2",
                        probe_layers="1,2"),
    "blackmail": dict(emotions=["desperate"], strengths=[0.5], samples=2, max_new_tokens=16, batch_size=4),
    "sycophancy": dict(emotions=["calm"], strengths=[0.5], samples=1, max_new_tokens=16, batch_size=24),
    "reward_hacking": dict(max_tasks=1, episodes=1, emotions=["desperate"], strengths=[0.5], max_turns=2,
                           max_new_tokens=32),
}


@pytest.fixture(scope="module")
def cuda_tiny(tiny):
    model, tok, bank = tiny
    return model.to("cuda"), tok, bank


@pytest.mark.parametrize("name", sorted(MICRO))
def test_experiment_runs_on_cuda(name, cuda_tiny, tmp_path):
    model, tok, bank = cuda_tiny
    result = run_experiment(name, out=tmp_path, model=model, tokenizer=tok, bank=bank, progress=False, **MICRO[name])
    assert json.loads((tmp_path / "result.json").read_text())["summary"] == json.loads(json.dumps(result["summary"]))
    assert (tmp_path / "report.html").is_file()
