"""Extraction: story activations against output_hidden_states, vectors on planted data, the bank, GGUF export."""

import random
import types

import gguf
import numpy as np
import pytest
import torch

from emokern.core.bank import VectorBank
from emokern.core.architecture import get_module
from emokern.core.control_vectors import export_gguf_control_vector, read_gguf_control_vector
from emokern.extraction.extract import CHAT_REQUEST, extract_bank, extract_bank_from_corpus, story_activations
from emokern.extraction.quality import held_out_accuracy
from emokern.extraction.vectors import emotion_vectors
from emokern.testing.families import HIDDEN, LAYERS, VOCAB, tiny_model
from emokern.testing.words import word_tokenizer

FIRST = 3  # first_token in these tests: the tiny texts are 2..30 words long
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = (CHAT_REQUEST.replace(".", " .").split() + ["user", "assistant", ":"]
         + [f"w{i}" for i in range(VOCAB - len(SPECIALS) - 9)])
# One word pool per emotion, so that extraction on the tiny model has something to find.
POOLS = {"calm": WORDS[9:25], "afraid": WORDS[25:41], "happy": WORDS[41:57]}


def tiny_tokenizer():
    """A word-level fast tokenizer over exactly VOCAB ids, with BOS on raw text and a minimal chat template."""
    assert len(SPECIALS + WORDS) == VOCAB
    return word_tokenizer(SPECIALS + WORDS, unk="<unk>", pad="<pad>", eos="</s>", bos="<s>", bos_on_raw_text=True,
                          chat_template="{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> "
                                        "{% endfor %}")


def texts_of(lengths, pool=WORDS[9:], seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(pool) for _ in range(n)) for n in lengths]


def final_norm_path(model):
    return "transformer.ln_f" if model.config.model_type == "gpt2" else "model.norm"


def reference_means(model, tok, texts, fmt, first_token):
    """Per-text means from output_hidden_states, one unpadded text at a time, with the final norm made the identity
    (Hugging Face's last hidden state is taken after it); also the mean norm over the averaged tokens."""
    parent_path, _, name = final_norm_path(model).rpartition(".")
    parent = get_module(model, parent_path)
    norm = getattr(parent, name)
    setattr(parent, name, torch.nn.Identity())
    means, norms = [], []
    try:
        for text in texts:
            full = text if fmt == "raw" else tok.apply_chat_template(
                [{"role": "user", "content": CHAT_REQUEST}, {"role": "assistant", "content": text}], tokenize=False)
            ids = tok(full, add_special_tokens=fmt == "raw").input_ids
            story = tok(text, add_special_tokens=False).input_ids
            s0 = max(i for i in range(len(ids)) if ids[i:i + len(story)] == story)
            n = len(story)
            a = s0 + first_token if n > first_token else s0 + n // 2
            with torch.no_grad():
                hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
            window = torch.stack([h[0, a:s0 + n] for h in hs[1:]])  # (L, tokens, d)
            means.append(window.mean(1))
            norms.append(window.norm(dim=-1))
    finally:
        setattr(parent, name, norm)
    return torch.stack(means), torch.cat(norms, dim=1).mean(1)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])
@pytest.mark.parametrize("fmt", ["chat", "raw"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_story_activations_equal_hidden_state_means(family, fmt, padding_side):
    model, tok = tiny_model(family), tiny_tokenizer()
    tok.padding_side = padding_side
    texts = texts_of([12, 2, 30, 3, 7, 25, 4])  # 2 and 3 words: short stories (their last half is averaged)
    means, norm, n_story = story_activations(model, tok, texts, first_token=FIRST, fmt=fmt, batch_size=3,
                                             progress=False, return_counts=True)
    ref, ref_norm = reference_means(model, tok, texts, fmt, FIRST)
    assert means.shape == (len(texts), LAYERS, HIDDEN) and means.dtype == torch.float32
    torch.testing.assert_close(means, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(norm, ref_norm, atol=1e-5, rtol=1e-5)
    assert n_story.tolist() == [12, 2, 30, 3, 7, 25, 4]


def test_layer_selection_and_first_token_zero():
    model, tok = tiny_model("qwen2"), tiny_tokenizer()
    texts = texts_of([5, 9])
    full, _ = story_activations(model, tok, texts, first_token=0, progress=False)
    part, _ = story_activations(model, tok, texts, layers=[2, 0], first_token=0, progress=False)
    torch.testing.assert_close(part, full[:, [0, 2]])  # ascending layer order, whatever the order given
    ref, _ = reference_means(model, tok, texts, "chat", 0)
    torch.testing.assert_close(full, ref, atol=1e-5, rtol=1e-5)


def test_chat_template_that_trims_content():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] | trim }} </s> {% endfor %}"
    texts = ["  " + t + "  " for t in texts_of([6, 9])]
    means, _ = story_activations(model, tok, texts, first_token=2, progress=False)
    ref, _ = reference_means(model, tok, [t.strip() for t in texts], "chat", 2)
    torch.testing.assert_close(means, ref, atol=1e-5, rtol=1e-5)


def _raiser(what):
    def forward(*args, **kwargs):
        raise AssertionError(f"{what} must not run")
    return forward


def test_lm_head_final_norm_and_later_layers_never_run():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    texts = texts_of([6, 10, 4])
    expected, _ = story_activations(model, tok, texts, first_token=FIRST, progress=False)
    model.lm_head.forward = _raiser("the LM head")
    model.model.norm.forward = _raiser("the final norm")
    got, _ = story_activations(model, tok, texts, first_token=FIRST, progress=False)
    torch.testing.assert_close(got, expected)
    model.model.layers[2].forward = _raiser("layer 2")
    part, _ = story_activations(model, tok, texts, layers=[0, 1], first_token=FIRST, progress=False)
    torch.testing.assert_close(part, expected[:, :2])
    model.model.layers[1].forward = _raiser("layer 1")
    only0, _ = story_activations(model, tok, texts, layers=0, first_token=FIRST, progress=False)
    torch.testing.assert_close(only0, expected[:, :1])
    assert all(not layer._forward_hooks for layer in model.model.layers)


def test_hooks_removed_and_mode_restored_on_error():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    model.train()

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    model.model.layers[1].forward = boom
    with pytest.raises(RuntimeError, match="boom"):
        story_activations(model, tok, texts_of([5]), progress=False)
    assert all(not layer._forward_hooks for layer in model.model.layers)
    assert model.training


def _planted(K=4, L=2, d=48, per=12, seed=0, nuisance=0.0):
    """Stories of emotion k at e_k * 3 plus noise; optionally a per-emotion offset along a nuisance direction n0
    that also dominates the neutral texts' variance."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, K + 1, generator=g, dtype=torch.float64))[0].T  # K+1 orthonormal rows
    e, n0 = basis[:K], basis[K]
    acts, labels = [], []
    names = [f"emo{k}" for k in range(K)]
    for k in range(K):
        offset = 3 * e[k] + nuisance * (k + 1) * n0
        acts.append(offset + 0.05 * torch.randn(per, L, d, generator=g, dtype=torch.float64))
        labels += [names[k]] * per
    neutral = (10 * torch.randn(40, 1, 1, generator=g, dtype=torch.float64) * n0
               + 0.05 * torch.randn(40, L, d, generator=g, dtype=torch.float64))
    return torch.cat(acts).float(), labels, names, neutral.float(), e, n0


def test_emotion_vectors_recover_planted_directions():
    acts, labels, names, neutral, e, _ = _planted()
    ev = emotion_vectors(acts, labels, names, neutral)
    target = e - e.mean(0)
    target = (target / target.norm(dim=-1, keepdim=True)).float()
    for v in (ev.raw, ev.denoised):
        assert v.shape == (2, 4, 48) and v.dtype == torch.float32
        torch.testing.assert_close(v.norm(dim=-1), torch.ones(2, 4))
        assert ((v * target).sum(-1) > 0.95).all()
    assert ev.center.shape == (2, 48)


def test_denoising_removes_the_dominant_neutral_direction():
    acts, labels, names, neutral, e, n0 = _planted(nuisance=2.0)
    ev = emotion_vectors(acts, labels, names, neutral, variance=0.5)
    assert ev.n_pcs_removed.tolist() == [1, 1]
    raw_along, denoised_along = (ev.raw @ n0.float()).abs(), (ev.denoised @ n0.float()).abs()
    assert (raw_along > 0.3).all() and (denoised_along < 0.01).all()
    target = e - e.mean(0)
    target = (target / target.norm(dim=-1, keepdim=True)).float()
    assert ((ev.denoised * target).sum(-1) > 0.95).all()
    plain = emotion_vectors(acts, labels, names, neutral, variance=0.0)
    assert plain.n_pcs_removed.tolist() == [0, 0]
    torch.testing.assert_close(plain.denoised, plain.raw)


def test_held_out_accuracy_is_perfect_when_separated():
    acts, labels, names, neutral, _, _ = _planted(K=6, per=10)
    curve = held_out_accuracy(acts, labels, names, neutral, test_fraction=0.2)
    assert curve.top1.tolist() == [1.0, 1.0] and curve.top5.tolist() == [1.0, 1.0]
    assert (curve.n_train, curve.n_test) == (48, 12)
    again = held_out_accuracy(acts, labels, names, neutral, test_fraction=0.2)
    assert torch.equal(again.top1, curve.top1)


def _corpus(per=4):
    stories, labels = [], []
    for k, (emotion, pool) in enumerate(POOLS.items()):
        for j in range(per):
            stories += texts_of([8 + 3 * j], pool, seed=10 * k + j)
            labels.append(emotion)
    return stories, labels, texts_of([6, 9, 12, 7], WORDS[57:], seed=99)


def test_extract_bank_round_trips_with_metadata(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    stories, labels, neutral = _corpus()
    bank = extract_bank(model, tok, stories, labels, neutral, first_token=2, progress=False,
                        metadata={"source": "test"})
    assert bank.names == ["afraid", "calm", "happy"] and bank.layers == [0, 1, 2]
    assert bank.vectors.shape == (3, 3, HIDDEN) and bank.extra["raw_vectors"].shape == (3, 3, HIDDEN)
    assert bank.neutral_mean.shape == (3, 3) and (bank.neutral_std > 0).all()
    meta = bank.metadata
    assert meta["corpus"]["per_emotion"] == {"afraid": 4, "calm": 4, "happy": 4}
    assert meta["corpus"]["short_stories"] == 0 and meta["recipe"]["first_token"] == 2
    # no premises given: stories are held out, and the default layer is the 2/3-depth one
    assert meta["default_layer"] == {"chosen": None, "two_thirds": 1, "rule": None}
    assert bank.default_layer() == (1, "bank.metadata['default_layer']['two_thirds']")
    assert meta["quality"]["split"] == "stories"
    assert len(meta["quality"]["top1"]) == 3 and meta["quality"]["n_test"] == 3
    assert meta["model"]["model_type"] == "llama" and meta["source"] == "test"
    assert set(meta["timings"]) >= {"story_forward_s", "neutral_forward_s", "total_s"}
    from emokern.core.models import model_fingerprint

    assert bank.fingerprint == model_fingerprint(model)
    loaded = VectorBank.load(bank.save(tmp_path / "bank"), model=model)
    assert loaded.metadata == meta and loaded.names == bank.names and loaded.layers == bank.layers
    for name in ("vectors", "residual_norm", "neutral_mean", "neutral_std"):
        assert torch.equal(getattr(loaded, name), getattr(bank, name))
    assert torch.equal(loaded.extra["raw_vectors"], bank.extra["raw_vectors"])

    records = [types.SimpleNamespace(text=t, emotion=e, key=str(i), topic=f"t{i % 2}")
               for i, (t, e) in enumerate(zip(stories, labels))]
    corpus = types.SimpleNamespace(stories=records, neutral=[types.SimpleNamespace(text=t) for t in neutral])
    again = extract_bank_from_corpus(model, tok, corpus, first_token=2, progress=False)
    torch.testing.assert_close(again.vectors, bank.vectors)
    assert again.metadata["corpus_topics"] == 2
    two = extract_bank(model, tok, stories, labels, neutral, names=["calm", "afraid"], layers=[1], first_token=2,
                       progress=False)
    assert two.names == ["calm", "afraid"] and two.layers == [1] and two.metadata["corpus"]["n_excluded"] == 4


def _gguf_bank():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(3, 4, HIDDEN, generator=g)
    return VectorBank(vectors=v / v.norm(dim=-1, keepdim=True), names=["calm", "desperate", "happy", "sad"],
                      layers=[0, 1, 2], residual_norm=torch.tensor([1.5, 2.0, 4.0]), model_id="tiny",
                      fingerprint="0123456789abcdef", metadata={"model": {"model_type": "mistral"}})


def test_gguf_export_matches_llama_cpp_layout(tmp_path):
    bank = _gguf_bank()
    path = export_gguf_control_vector(bank, tmp_path / "mix.gguf", {"calm": 1.0, "desperate": -0.5})
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == "controlvector"
    assert reader.fields["controlvector.model_hint"].contents() == "llama"
    layer_count = reader.fields["controlvector.layer_count"]
    assert layer_count.contents() == 2 and layer_count.types == [gguf.GGUFValueType.INT32]
    assert [t.name for t in reader.tensors] == ["direction.1", "direction.2"]  # block 0 cannot be steered
    for t in reader.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [HIDDEN]
        layer = int(t.name.split(".")[1])
        expected = bank.residual_norm[layer] * (bank.vector("calm", layer) - 0.5 * bank.vector("desperate", layer))
        np.testing.assert_allclose(np.asarray(t.data), expected.numpy(), rtol=1e-6, atol=1e-6)
    cv = read_gguf_control_vector(path)
    assert sorted(cv.directions) == [1, 2] and cv.metadata["controlvector.emokern.scale"] == "residual_norm"
    assert cv.metadata["controlvector.emokern.fingerprint"] == bank.fingerprint


def test_gguf_export_options(tmp_path):
    bank = _gguf_bank()
    unit = bank.vector("sad", 2).clone()
    bank.vectors *= 3.0  # the export, like emokern.engines.hf, uses the vectors at unit length
    one = read_gguf_control_vector(export_gguf_control_vector(bank, tmp_path / "a.gguf", "sad", layers=[2],
                                                              scale_by_residual_norm=False, model_hint="custom"))
    assert list(one.directions) == [2] and one.metadata["controlvector.model_hint"] == "custom"
    torch.testing.assert_close(one.directions[2], unit)
    with pytest.raises(ValueError, match="block 0"):
        export_gguf_control_vector(bank, tmp_path / "b.gguf", "sad", layers=[0, 1])
    with pytest.raises(ValueError, match="no vectors for layer 7"):
        export_gguf_control_vector(bank, tmp_path / "b.gguf", "sad", layers=[7])
    with pytest.raises(KeyError, match="did you mean 'desperate'"):
        export_gguf_control_vector(bank, tmp_path / "b.gguf", {"desparate": 1.0})
    with pytest.raises(ValueError, match="finite"):
        export_gguf_control_vector(bank, tmp_path / "b.gguf", {"sad": float("nan")})
    with pytest.raises(ValueError, match="non-empty"):
        export_gguf_control_vector(bank, tmp_path / "b.gguf", {})
    assert not (tmp_path / "b.gguf").exists() and not list(tmp_path.glob("*.tmp"))


def test_read_rejects_files_llama_cpp_would_reject(tmp_path):
    def write(name, arch, tensor_name, values):
        w = gguf.GGUFWriter(str(tmp_path / name), arch)
        w.add_tensor(tensor_name, values)
        w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
        return tmp_path / name

    vec = np.ones(4, dtype=np.float32)
    with pytest.raises(ValueError, match="general.architecture"):
        read_gguf_control_vector(write("a.gguf", "llama", "direction.1", vec))
    with pytest.raises(ValueError, match="N >= 1"):
        read_gguf_control_vector(write("b.gguf", "controlvector", "direction.0", vec))
    with pytest.raises(ValueError, match="1-D F32"):
        read_gguf_control_vector(write("c.gguf", "controlvector", "direction.1", np.ones((2, 2), np.float32)))


def test_errors_name_the_argument():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    stories, labels, neutral = _corpus(per=2)
    with pytest.raises(ValueError, match="texts: expected at least one text"):
        story_activations(model, tok, [], progress=False)
    with pytest.raises(ValueError, match=r"texts\[1\]: expected a non-blank"):
        story_activations(model, tok, ["w1 w2", "  "], progress=False)
    with pytest.raises(ValueError, match="fmt: expected one of"):
        story_activations(model, tok, ["w1"], fmt="html", progress=False)
    tok.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        story_activations(model, tok, ["w1"], progress=False)
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match=r"story_labels: expected one label per story \(6\); got 5"):
        extract_bank(model, tok, stories, labels[:-1], neutral, progress=False)
    with pytest.raises(ValueError, match=r"names: expected at least one story per emotion; \['joy'\]"):
        extract_bank(model, tok, stories, labels, neutral, names=["calm", "joy"], progress=False)
    with pytest.raises(ValueError, match="neutral_texts: expected at least one text"):
        extract_bank(model, tok, stories, labels, [], progress=False)
    acts, labels, names, neutral_acts, _, _ = _planted()
    with pytest.raises(ValueError, match="names: expected at least 2 emotions"):
        emotion_vectors(acts, labels, names[:1], neutral_acts)
    with pytest.raises(ValueError, match=r"neutral_acts: expected shape \(n, 2, 48\)"):
        emotion_vectors(acts, labels, names, neutral_acts[:, :1])
    with pytest.raises(ValueError, match="variance: expected a fraction"):
        emotion_vectors(acts, labels, names, neutral_acts, variance=1.0)
    with pytest.raises(ValueError, match="look close: \\['emo1'"):
        emotion_vectors(acts, labels, ["emo0", "emo_1"], neutral_acts)


def story_token_states(model, tok, text, fmt):
    """(L, n_story_tokens, d) hidden states of the story's own tokens (final norm made the identity)."""
    parent_path, _, name = final_norm_path(model).rpartition(".")
    parent = get_module(model, parent_path)
    norm = getattr(parent, name)
    setattr(parent, name, torch.nn.Identity())
    try:
        full = text if fmt == "raw" else tok.apply_chat_template(
            [{"role": "user", "content": CHAT_REQUEST}, {"role": "assistant", "content": text}], tokenize=False)
        ids = tok(full, add_special_tokens=fmt == "raw").input_ids
        story = tok(text, add_special_tokens=False).input_ids
        s0 = max(i for i in range(len(ids)) if ids[i:i + len(story)] == story)
        with torch.no_grad():
            hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        return torch.stack([h[0, s0:s0 + len(story)] for h in hs[1:]])
    finally:
        setattr(parent, name, norm)


@pytest.mark.parametrize("fmt", ["chat", "raw"])
def test_excluded_spans_and_the_tokens_after_them_leave_the_mean(fmt):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    words = texts_of([12], seed=4)[0].split()
    text = " ".join(words)
    starts = [sum(len(w) + 1 for w in words[:i]) for i in range(len(words))]
    span = lambda i: (starts[i], starts[i] + len(words[i]))  # noqa: E731  the character span of word i
    # exclude words 0-1 (one span over both) and word 6, plus 2 tokens after each span
    spans = [[(starts[0], starts[1] + len(words[1])), span(6)]]
    got, _ = story_activations(model, tok, [text], first_token=0, fmt=fmt, progress=False, exclude_spans=spans,
                               exclude_after=2)
    states = story_token_states(model, tok, text, fmt)
    kept = [i for i in range(12) if i not in {0, 1, 2, 3, 6, 7, 8}]
    torch.testing.assert_close(got[0], states[:, kept].mean(1), atol=1e-5, rtol=1e-5)
    # with first_token: the exclusions apply inside the averaged range
    got, _ = story_activations(model, tok, [text], first_token=5, fmt=fmt, progress=False, exclude_spans=spans,
                               exclude_after=2)
    torch.testing.assert_close(got[0], states[:, [5, 9, 10, 11]].mean(1), atol=1e-5, rtol=1e-5)
    # everything from first_token on excluded: the other story tokens are averaged instead
    got, _ = story_activations(model, tok, [text], first_token=9, fmt=fmt, progress=False,
                               exclude_spans=[[(starts[9], len(text))]])
    torch.testing.assert_close(got[0], states[:, :9].mean(1), atol=1e-5, rtol=1e-5)
    # an empty list excludes nothing
    plain, _ = story_activations(model, tok, [text], first_token=0, fmt=fmt, progress=False)
    none, _ = story_activations(model, tok, [text], first_token=0, fmt=fmt, progress=False, exclude_spans=[[]])
    torch.testing.assert_close(plain, none)


def test_exclusion_errors():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    text = texts_of([4])[0]
    with pytest.raises(ValueError, match="leaves no token of texts\\[0\\] to average"):
        story_activations(model, tok, [text], progress=False, exclude_spans=[[(0, len(text))]])
    with pytest.raises(ValueError, match="exclude_spans: expected one list of \\(start, end\\) character spans per "
                                         "text \\(1\\); got 2"):
        story_activations(model, tok, [text], progress=False, exclude_spans=[[], []])
    with pytest.raises(ValueError, match="exclude_spans\\[0\\]: expected \\(start, end\\) ints with 0 <= start < end"):
        story_activations(model, tok, [text], progress=False, exclude_spans=[[(3, 2)]])
    with pytest.raises(ValueError, match="exclude_spans\\[0\\]: expected .* got \\(0, 999\\)"):
        story_activations(model, tok, [text], progress=False, exclude_spans=[[(0, 999)]])
    with pytest.raises(ValueError, match="exclude_after: expected an int >= 0; got -1"):
        story_activations(model, tok, [text], progress=False, exclude_after=-1)


def test_story_exclusions_from_openings_and_emotion_words():
    from types import SimpleNamespace as S

    from emokern.extraction.extract import story_exclusions

    stories = [S(text="I felt calm. The calm sea, calmly.", emotion="calm", opening="I felt calm."),
               S(text="Nothing here.", emotion="sad", opening="")]
    assert story_exclusions(stories, "none") is None
    assert story_exclusions(stories, "opening") == [[(0, 12)], []]
    assert story_exclusions(stories, "opening+word") == [[(0, 12), (17, 21), (27, 33)], []]
    with pytest.raises(ValueError, match="exclude: expected one of"):
        story_exclusions(stories, "words")


def test_extract_bank_with_premises_chooses_its_layer_on_validation(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    stories, labels, neutral = _corpus(per=6)
    groups = [f"premise {i % 6}" for i in range(len(stories))]
    bank = extract_bank(model, tok, stories, labels, neutral, first_token=2, progress=False, story_groups=groups)
    q, default = bank.metadata["quality"], bank.metadata["default_layer"]
    assert q["split"] == "premises" and set(q["premises"]) == {"train", "validation", "test"}
    held = set(q["premises"]["test"])
    assert held.isdisjoint(q["premises"]["validation"]) and held.isdisjoint(q["premises"]["train"])
    assert len(q["top1"]) == len(q["validation_top1"]) == len(q["valence_auroc"]) == 3
    assert default["chosen"] in bank.layers and "validation" in default["rule"]
    assert bank.default_layer() == (default["chosen"], "bank.metadata['default_layer']['chosen']")
    assert str(default["chosen"]) in q["probe_top1"] and str(default["two_thirds"]) in q["probe_top1"]
    # with exclusions, the recipe records them
    spans = [[(0, len(s.split()[0]))] for s in stories]
    excluded = extract_bank(model, tok, stories, labels, neutral, first_token=0, progress=False, story_groups=groups,
                            story_exclude_spans=spans, exclude_after=1, probe=False)
    assert excluded.metadata["recipe"]["excluded_tokens"] == 2 * len(stories)
    assert excluded.metadata["quality"]["probe_top1"] == {}


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text", "qwen3"])
def test_the_shared_chat_prefix_runs_once_and_changes_nothing(family, monkeypatch):
    import emokern.extraction.extract as X

    model, tok = tiny_model(family), tiny_tokenizer()
    texts = texts_of([12, 2, 30, 3, 7, 25, 4], seed=5)
    widths = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, a, out: widths.append(out.shape[1]))
    cached, _ = story_activations(model, tok, texts, first_token=1, batch_size=3, progress=False)
    hook.remove()
    rendered = tok.apply_chat_template([{"role": "user", "content": CHAT_REQUEST},
                                        {"role": "assistant", "content": "w1"}], tokenize=False)
    template = len(tok(rendered[:rendered.index("w1")], add_special_tokens=False).input_ids)
    assert widths[0] == template >= X.MIN_CACHED_PREFIX  # one forward of the template before the texts ...
    assert len(widths) == 1 + 3 and max(widths[1:]) == 30 + 1  # ... then the texts' own tokens and "</s>"
    monkeypatch.setattr(X, "MIN_CACHED_PREFIX", 10_000)  # no caching: the whole sequence every time
    whole, _ = story_activations(model, tok, texts, first_token=1, batch_size=3, progress=False)
    torch.testing.assert_close(cached, whole, atol=1e-5, rtol=1e-5)
