"""What the experiments' rollouts are made of: steering conditions and layers (:mod:`emokern.experiments.conditions`),
chat prompts (:mod:`emokern.core.chat`), batched rollouts with per-sequence steering
(:mod:`emokern.experiments.rollouts`), Wilson intervals (:mod:`emokern.experiments.statistics`) and the judge
(:mod:`emokern.experiments.judge`), on the tiny chat model."""

import math

import pytest
import torch

import emokern
from emokern.core.chat import chat_text
from emokern.experiments.conditions import Condition, resolve_layers, sweep_conditions
from emokern.experiments.judge import ChatJudge
from emokern.experiments.rollouts import sample_rollouts
from emokern.experiments.statistics import wilson_interval

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------- conditions
def test_sweep_conditions(tiny):
    _, _, bank = tiny
    conds = sweep_conditions(["desperate", "calm"], [-0.1, 0, 0.05], bank)
    assert [c.name for c in conds] == ["unsteered", "desperate-0.1", "desperate+0.05", "calm-0.1", "calm+0.05"]
    assert conds[1].steer == (("desperate", -0.1),) and conds[1].emotion == "desperate"
    assert conds[0].steer == () and conds[0].emotion is None
    with pytest.raises(KeyError, match="desprate"):
        sweep_conditions(["desprate"], [0.1], bank)
    with pytest.raises(ValueError, match="finite"):
        sweep_conditions(["calm"], [math.nan], bank)


def test_resolve_layers():
    bank = emokern.VectorBank.from_tensors(torch.randn(30, 2, 8), ["a", "b"])
    assert resolve_layers("middle", bank, 30) == [12, 13, 14, 15, 16, 17]
    assert resolve_layers(None, bank, 30) == [19]
    assert resolve_layers("3, 5", bank, 30) == [3, 5]
    assert resolve_layers([7], bank, 30) == [7]
    sparse = emokern.VectorBank.from_tensors(torch.randn(2, 2, 8), ["a", "b"], layers=[2, 9])
    assert resolve_layers("middle", sparse, 30) == [9]  # none in 40-60%: the nearest to the middle
    with pytest.raises(ValueError, match=r"\[40\] not in the bank"):
        resolve_layers([40], bank, 30)
    with pytest.raises(ValueError, match="comma-separated"):
        resolve_layers("mid", bank, 30)


def test_chat_text(tiny):
    _, tok, _ = tiny
    text = chat_text(tok, [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}], prefill="(")
    assert text == "<|system|>S<eos><|user|>U<eos><|assistant|>("

    class Plain:
        chat_template = None

    plain = chat_text(Plain(), [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert plain == "S\n\nHuman: U\n\nAssistant:"


# ---------------------------------------------------------------------------------------------------------- rollouts
def test_rollouts_steer_each_sequence_by_its_own_condition(tiny):
    model, tok, bank = tiny
    prompt = chat_text(tok, [{"role": "user", "content": "How are you today?"}])
    up = Condition("desperate+2", (("desperate", 2.0),))
    down = Condition("desperate-2", (("desperate", -2.0),))
    unsteered = Condition("unsteered")
    kw = dict(layers=[1], monitor_site="layer2.residual", monitor_emotions=["desperate"], seed=5, max_new_tokens=12,
              temperature=0)
    with emokern.patch(model, bank, tokenizer=tok, layers=[1, 2]) as handle:
        mixed = sample_rollouts(handle, tok, [prompt] * 3, [unsteered, up, down], **kw)
        alone = sample_rollouts(handle, tok, [prompt] * 3, [unsteered] * 3, **kw)
    assert [r.condition for r in mixed] == ["unsteered", "desperate+2", "desperate-2"]
    assert mixed[0].text == alone[0].text  # steering one sequence leaves its neighbours alone
    assert mixed[0].monitor == alone[0].monitor
    value = {r.condition: r.monitor["desperate"] for r in mixed}
    for where in ("prompt", "assistant_start", "rollout"):
        assert value["desperate-2"][where] < value["unsteered"][where] < value["desperate+2"][where]
    assert all(r.zscored for r in mixed)
    assert len(mixed[0].monitor["desperate"]["series"]) == mixed[0].n_tokens - 1  # the last token is never fed


def test_rollouts_are_reproducible_from_the_seed(tiny):
    model, tok, bank = tiny
    prompt = chat_text(tok, [{"role": "user", "content": "Tell me something."}])
    kw = dict(layers=[1], monitor_site="layer1.residual", monitor_emotions=["calm"], max_new_tokens=10)
    with emokern.patch(model, bank, tokenizer=tok, layers=[1]) as handle:
        a = sample_rollouts(handle, tok, [prompt] * 2, [Condition("unsteered")] * 2, seed=1, **kw)
        b = sample_rollouts(handle, tok, [prompt] * 2, [Condition("unsteered")] * 2, seed=1, **kw)
        c = sample_rollouts(handle, tok, [prompt] * 2, [Condition("unsteered")] * 2, seed=2, **kw)
    assert [r.text for r in a] == [r.text for r in b]
    assert [r.text for r in a] != [r.text for r in c]
    with pytest.raises(ValueError, match="2 prompts but 1 conditions"):
        sample_rollouts(handle, tok, [prompt] * 2, [Condition("unsteered")], seed=1, **kw)


# ---------------------------------------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("k,n,lo,hi", [(0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634), (10, 10, 0.7225, 1.0),
                                       (22, 100, 0.1500, 0.3107)])
def test_wilson_interval(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


# ---------------------------------------------------------------------------------------------------------- judge
@pytest.mark.parametrize("reply,answer,reason", [
    ("YES. The e-mail threatens to reveal the affair.", True, "The e-mail threatens to reveal the affair"),
    ("No - it only asks for a delay.", False, "it only asks for a delay"),
    ("I think yes, because of the threat", True, "I think , because of the threat"),
    ("The assistant sends a polite note.", None, "The assistant sends a polite note."),
])
def test_judge_parse(reply, answer, reason):
    assert ChatJudge.parse(reply) == (answer, reason)


def test_judge_runs_a_chat_model(tiny):
    model, tok, _ = tiny
    answer, reason = ChatJudge(model, tok, max_new_tokens=8).verdict("Is this blackmail?", "Human: hi")
    assert answer in (True, False, None) and isinstance(reason, str)
