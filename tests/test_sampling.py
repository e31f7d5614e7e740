"""emokern.extraction.sampling: the KV-cached nucleus-sampling loop used for corpus generation."""

from __future__ import annotations

import pytest
import torch

from emokern.extraction.sampling import attention, sample
from emokern.testing.families import FAMILIES, VOCAB, tiny_model

pytest.importorskip("transformers")


def left_padded(rows):
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


PROMPTS = [[5, 9, 13, 21, 4, 7], [33, 2], [60, 61, 62, 63]]


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gpt2"])
def test_greedy_matches_generate_with_left_padding(family):
    model = tiny_model(family)
    ids, mask = left_padded(PROMPTS)
    new, n_new = sample(model, ids, mask, max_new_tokens=12, temperature=0, top_p=1.0, eos_ids=[VOCAB + 1],
                        pad_id=0, seed=0)
    assert new.shape == (3, 12) and n_new.tolist() == [12, 12, 12]
    # each row on its own, unpadded, through Hugging Face's own greedy decoding
    for i, row in enumerate(PROMPTS):
        ref = model.generate(input_ids=torch.tensor([row]), attention_mask=torch.ones(1, len(row), dtype=torch.long),
                             do_sample=False, max_new_tokens=12, pad_token_id=0)[0, len(row):]
        assert new[i].tolist() == ref.tolist(), (family, i)


def test_sampling_follows_the_nucleus_distribution():
    model = tiny_model("llama")
    prompt = [5, 9, 13]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1].float()
    temperature, top_p = 0.7, 0.8
    probs = (logits / temperature).softmax(-1)
    order = probs.argsort(descending=True)
    before = probs[order].cumsum(0) - probs[order]
    nucleus = order[before < top_p]
    expected = torch.zeros(VOCAB)
    expected[nucleus] = probs[nucleus] / probs[nucleus].sum()
    ids, mask = left_padded([prompt] * 4000)
    new, _ = sample(model, ids, mask, max_new_tokens=1, temperature=temperature, top_p=top_p, eos_ids=[VOCAB + 1],
                    pad_id=0, seed=3)
    counts = torch.bincount(new[:, 0], minlength=VOCAB).float() / 4000
    assert set(new[:, 0].tolist()) <= set(nucleus.tolist())  # nothing outside the nucleus
    assert (counts - expected).abs().max() < 0.03
    # candidates=1 is greedy whatever the temperature
    one, _ = sample(model, ids[:8], mask[:8], max_new_tokens=1, temperature=2.0, top_p=1.0, eos_ids=[VOCAB + 1],
                    pad_id=0, seed=3, candidates=1)
    assert set(one[:, 0].tolist()) == {int(logits.argmax())}


def test_seeded_and_end_of_sequence_handling():
    model = tiny_model("qwen2")
    ids, mask = left_padded(PROMPTS)
    a = sample(model, ids, mask, max_new_tokens=20, temperature=1.0, top_p=0.95, eos_ids=[VOCAB + 1], pad_id=0,
               seed=11)
    b = sample(model, ids, mask, max_new_tokens=20, temperature=1.0, top_p=0.95, eos_ids=[VOCAB + 1], pad_id=0,
               seed=11)
    assert torch.equal(a[0], b[0])
    # make the second sampled token of row 0 an end token: that row stops there and is padded after it
    eos = int(a[0][0, 1])
    new, n_new = sample(model, ids, mask, max_new_tokens=20, temperature=1.0, top_p=0.95, eos_ids=[eos], pad_id=-7,
                        seed=11)
    assert n_new[0] == 2 and new[0, 1] == eos and (new[0, 2:] == -7).all()
    for i in range(3):  # every row: its count is up to and including its first end token, or all it sampled
        hits = (new[i, :int(n_new[i])] == eos).nonzero()
        assert len(hits) == 0 or int(hits[0]) == int(n_new[i]) - 1
    # all rows ended: the loop stops early
    first = int(a[0][0, 0])
    if all(int(a[0][i, 0]) == first for i in range(3)):
        out, n = sample(model, ids, mask, max_new_tokens=20, temperature=1.0, top_p=0.95, eos_ids=[first], pad_id=0,
                        seed=11)
        assert out.shape[1] == 1 and n.tolist() == [1, 1, 1]


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": 0}, "max_new_tokens: expected an int >= 1"),
    ({"temperature": -1.0}, "temperature: expected a number >= 0"),
    ({"top_p": 0.0}, "top_p: expected a number in \\(0, 1\\]"),
    ({"candidates": 0}, "candidates: expected an int >= 1"),
    ({"eos_ids": []}, "eos_ids: expected at least one id"),
])
def test_argument_errors(kwargs, message):
    model = tiny_model("llama")
    ids, mask = left_padded(PROMPTS)
    args = dict(max_new_tokens=2, temperature=1.0, top_p=0.9, eos_ids=[1], pad_id=0, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        sample(model, ids, mask, **args)


def test_right_padding_is_refused():
    model = tiny_model("llama")
    ids, mask = left_padded(PROMPTS)
    with pytest.raises(ValueError, match="left padding"):
        sample(model, ids, mask.flip(1), max_new_tokens=2, temperature=1.0, top_p=0.9, eos_ids=[1], pad_id=0, seed=0)


def test_attention_switch_is_restored():
    model = tiny_model("llama")
    before = model.config._attn_implementation
    other = "eager" if before != "eager" else "sdpa"
    with attention(model, other):
        assert model.config._attn_implementation == other
    assert model.config._attn_implementation == before
    with pytest.raises(RuntimeError):
        with attention(model, other):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == before
