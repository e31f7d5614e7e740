"""The plugin inside real vLLM engines on the embedded SmolLM2-135M-Instruct (bf16, greedy).

Two engines, one after the other (module-scoped, parametrized): ``eager`` (``enforce_eager=True``) and ``ci``
(``VLLM_CPU_CI_ENV=1``: dynamo traces the model once, as vLLM's compiled mode does, with the eager backend instead
of inductor's minutes of compilation; hooks run only while tracing, so anything that works here is in the graph).
The ``ci`` engine also has a 64-token step budget (chunked prefill) and a KV cache of 5 blocks of 128 tokens, so
that long requests preempt each other.

HF parity tolerance: vLLM's fused bf16 kernels and the Hugging Face model teacher-forced on the same tokens round
differently; the projections (raw, |P| up to ~100 at attention sinks) must agree to a mean absolute difference
below 3 % of the mean |P| and a correlation above 0.999 (measured: see ``TOLERANCE`` below).
"""

import json
import os

import numpy as np
import pytest
import torch

import emokern
import emokern.engines.vllm as ev
from conftest import LAYERS, shutdown

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
PROMPTS = [CHAT.format("Tell me about your morning."), CHAT.format("What should I cook tonight?")]
TOLERANCE = 0.03  # mean |vLLM - HF| / mean |HF|

ENGINES = {
    # no chunked prefill: the corpus test's seeded requests need it off on CPU (see emokern.engines.vllm.sampler)
    "eager": dict(enforce_eager=True, enable_chunked_prefill=False),
    "ci": dict(max_num_batched_tokens=64, num_gpu_blocks_override=5),
}


@pytest.fixture(scope="module", params=sorted(ENGINES))
def llm(request, bank, hf):
    from vllm import LLM

    if request.param == "ci":
        os.environ["VLLM_CPU_CI_ENV"] = "1"
    try:
        engine = LLM(model=hf[2], dtype="bfloat16", max_model_len=512, max_num_seqs=4, seed=0,
                     **ENGINES[request.param])
    finally:
        os.environ.pop("VLLM_CPU_CI_ENV", None)
    engine.kind = request.param
    yield engine
    shutdown(engine)


def _hf_trace(hf, bank, ids, prompt_len, steer=None):
    """The Hugging Face patch's trace (1, T, S, K) of ``ids`` teacher-forced, steered by ``steer`` (kwargs of
    :meth:`PatchHandle.steer`) like the vLLM request."""
    model, tok, _ = hf
    with emokern.patch(model, bank, layers=list(LAYERS), tokenizer=tok) as handle:
        x = torch.tensor([ids])
        handle.prepare(x[:, :prompt_len])
        if steer:
            handle.steer(**steer)
        with torch.no_grad():
            model(input_ids=x)
        return handle.trace(x, prompt_width=prompt_len).projections


def _assert_close(got: torch.Tensor, want: torch.Tensor):
    assert got.shape == want.shape
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite)
    g, w = got[finite].double(), want[finite].double()
    rel = float((g - w).abs().mean() / w.abs().mean())
    corr = float(torch.corrcoef(torch.stack([g, w]))[0, 1])
    assert rel < TOLERANCE and corr > 0.999, f"mean |diff| / mean |P| = {rel:.4f}, corr = {corr:.5f}"


def _ids(result):
    return list(result.output.prompt_token_ids) + list(result.output.outputs[0].token_ids)


def test_monitor_matches_hf_patch(llm, hf, bank):
    results = ev.generate(llm, PROMPTS, {"monitor": True}, max_tokens=16, temperature=0)
    for r in results:
        prompt_len = len(r.output.prompt_token_ids)
        assert r.trace.projections.shape == (1, len(_ids(r)), len(LAYERS), len(bank.names))
        assert r.trace.names == bank.names and r.trace.sites == [f"layer{x}.residual" for x in LAYERS]
        assert r.trace.is_prompt[0, :prompt_len].all() and not r.trace.is_prompt[0, prompt_len:].any()
        _assert_close(r.trace.projections, _hf_trace(hf, bank, _ids(r), prompt_len))
        # the test bank's neutral statistics are 0 / 1: z-scores are the projections
        assert torch.equal(torch.nan_to_num(r.trace.zscores()), torch.nan_to_num(r.trace.projections))


def test_steering_matches_hf_patch(llm, hf, bank):
    """add at layer 10 on generated tokens, read at layer 19: the same effect as the patch's steer()."""
    spec = {"steer": {"emotions": {"desperate": 1.0}, "scope": "generated", "layers": [10]}, "monitor": True}
    (r,) = ev.generate(llm, PROMPTS[:1], spec, max_tokens=16, temperature=0)
    prompt_len = len(r.output.prompt_token_ids)
    steered = _hf_trace(hf, bank, _ids(r), prompt_len,
                        dict(emotions={"desperate": 1.0}, scope="generated", layers=[10]))
    _assert_close(r.trace.projections, steered)
    # at layer 10 the monitored projection is that of the site's input (before steering), as in the patch; the
    # steering shows at layer 19, on generated positions only
    plain = _hf_trace(hf, bank, _ids(r), prompt_len)
    k = bank.index("desperate")
    assert torch.equal(plain[0, :prompt_len].nan_to_num(), steered[0, :prompt_len].nan_to_num())
    effect = (steered[0, prompt_len:-1, 1, k] - plain[0, prompt_len:-1, 1, k]).abs().mean()
    error = (r.trace.projections[0, prompt_len:-1, 1, k] - steered[0, prompt_len:-1, 1, k]).abs().mean()
    assert effect > 5 * error, f"steering moved 'desperate' at layer 19 by {effect:.3f}; vLLM, HF differ by {error:.3f}"


@pytest.mark.parametrize("mode,strength", [("ablate", None), ("clamp", [None, -0.2]), ("set", 0.5),
                                           ("scale", 0.0)])
def test_modes_match_hf_patch(llm, hf, bank, mode, strength):
    steer = {"emotions": ["desperate", "calm"], "mode": mode, "strength": strength, "layers": [10]}
    (r,) = ev.generate(llm, PROMPTS[1:], {"steer": steer, "monitor": True}, max_tokens=12, temperature=0)
    prompt_len = len(r.output.prompt_token_ids)
    hf_steer = dict(steer, strength=tuple(strength) if isinstance(strength, list) else strength)
    _assert_close(r.trace.projections, _hf_trace(hf, bank, _ids(r), prompt_len, hf_steer))


def test_unsteered_batchmate_is_bit_identical(llm):
    """[A steered, B plain] vs [A plain, B plain]: B's tokens and trace are identical (same batch shape: ignore_eos
    and a fixed length keep both requests in every step)."""
    kw = dict(max_tokens=20, temperature=0, ignore_eos=True)
    plain = ev.sampling_params({"monitor": True}, **kw)
    steered = ev.sampling_params({"steer": {"emotions": {"desperate": 2.0, "calm": -1.0}}, "monitor": True}, **kw)
    control = ev.generate(llm, PROMPTS, params=[plain, plain])
    mixed = ev.generate(llm, PROMPTS, params=[steered, plain])
    assert mixed[1].output.outputs[0].token_ids == control[1].output.outputs[0].token_ids
    assert torch.equal(mixed[1].trace.projections.nan_to_num(), control[1].trace.projections.nan_to_num())
    assert mixed[0].output.outputs[0].token_ids != control[0].output.outputs[0].token_ids


def test_invalid_specs_fail_alone(llm):
    bad = [
        ({"steer": {"emotions": {"calmm": 0.1}}}, "did you mean 'calm'"),
        ({"steer": {"emotions": {"calm": 0.1}, "mode": "boost"}}, "'mode' must be one of"),
        ({"steer": {"emotions": {"calm": "lots"}}}, "strength for 'calm' must be a number; got 'lots'"),
        ({"steer": {"emotions": {"calm": 0.1}, "layers": [3]}}, r"installed layers \(this engine has the op at"),
        ({"monitor": {"emotions": ["calm"]}, "alert": {"emotion": "desperate"}}, "one of the monitored emotions"),
        ("{not json", "a string must be JSON"),
        ({"steer": {"emotions": {"calm": 100.5}}}, r"strength for 'calm' must be at most 100 in size"),
        ({"steer": {"emotions": {"calm": [None, -1e6]}, "mode": "clamp"}}, "clamp bounds for 'calm' must be at most"),
        ({"steer": {"emotions": {"calm": 900.0}, "relative": False, "layers": [19]}},
         r"at most 800 in size \('relative': false at layer 19"),
    ]
    good = ev.sampling_params({"monitor": {"emotions": ["calm"]}}, max_tokens=4, temperature=0)
    for spec, message in bad:
        with pytest.raises(ValueError, match=message):
            llm.generate(PROMPTS[:1], ev.sampling_params(spec, max_tokens=4), use_tqdm=False)
    (r,) = ev.generate(llm, PROMPTS[:1], params=good)  # the engine still serves
    assert r.trace is not None and len(r.output.outputs[0].token_ids) == 4


def test_json_string_spec_and_alert_stop(llm):
    """The spec as a JSON string (what vllm_xargs carries); a strong push on "desperate" trips its alert, which
    ends the request."""
    spec = ('{"steer": {"emotions": {"desperate": 3.0}, "scope": "generated", "layers": [10]}, "monitor": '
            '{"emotions": ["desperate"]}, "alert": {"emotion": "desperate", "layer": 19, "z": 4, "tokens": 2, '
            '"stop": true}}')
    (r,) = ev.generate(llm, PROMPTS[:1], spec, max_tokens=40, temperature=0)
    alert = r.alert
    assert alert is not None and alert["emotion"] == "desperate" and alert["stopped"]
    prompt_len = len(r.output.prompt_token_ids)
    z = r.trace.zscores()[0, :, 1, 0].numpy()  # layer 19
    runs = np.convolve(z[prompt_len:] > 4, np.ones(2), "valid") == 2  # the test bank's vectors are random
    assert runs.any()  # directions, so the push shows as large but uneven projections at layer 19
    first = prompt_len + int(np.argmax(runs)) + 1
    assert alert["position"] == first
    assert r.output.outputs[0].finish_reason == "stop"
    assert len(r.output.outputs[0].token_ids) == alert["position"] - prompt_len + 2


def test_prefix_cache_never_shared_across_steering(llm):
    if llm.kind != "eager":
        pytest.skip("the ci engine's 5-block cache is for preemption; prefix caching is tested on the eager one")
    long_prompt = CHAT.format(" ".join(["The river ran past the old mill and the quiet houses."] * 30))
    kw = dict(max_tokens=2, temperature=0)
    steer_a = {"steer": {"emotions": {"calm": 0.5}}}
    steer_b = {"steer": {"emotions": {"calm": 0.25}}}

    def cached(spec):
        out = llm.generate([long_prompt], ev.sampling_params(spec, **kw), use_tqdm=False)
        return out[0].num_cached_tokens

    assert cached(steer_a) == 0  # first sight of this prompt
    assert cached(None) == 0  # plain: must not reuse the steered KV
    assert cached(None) >= 128  # plain again: the cache works (CPU blocks are 128 tokens)
    assert cached(steer_a) >= 128  # identical steering shares
    assert cached(steer_b) == 0  # other steering does not
    assert cached({"monitor": True}) == 0  # prompt monitoring reads no cached block: every position is recorded


def test_chunked_prefill_and_preemption_keep_routing(llm, hf, bank):
    if llm.kind != "ci":
        pytest.skip("the ci engine has the 64-token step budget and the small KV cache")
    prompts = [CHAT.format(f"Story {i}: " + " ".join(["a quiet walk along the shore at dusk"] * 14)) for i in range(4)]
    spec = {"steer": {"emotions": {"afraid": 1.0}, "scope": "generated", "layers": [10]}, "monitor": True}
    before = llm.collective_rpc("emokern_stats")[0]["recomputed_positions"]
    results = ev.generate(llm, prompts, spec, max_tokens=90, temperature=0, ignore_eos=True)
    recomputed = llm.collective_rpc("emokern_stats")[0]["recomputed_positions"] - before
    assert recomputed > 0, "no request was preempted: the test does not test preemption"
    for r in results:
        prompt_len = len(r.output.prompt_token_ids)
        assert prompt_len > 64  # prefilled in several chunks
        want = _hf_trace(hf, bank, _ids(r), prompt_len,
                         dict(emotions={"afraid": 1.0}, scope="generated", layers=[10]))
        _assert_close(r.trace.projections, want)


def test_plain_requests_carry_no_trace(llm):
    (r,) = ev.generate(llm, PROMPTS[:1], None, max_tokens=3, temperature=0)
    assert r.trace is None and r.alert is None
    stats = llm.collective_rpc("emokern_stats")[0]
    assert stats["layers"] == list(LAYERS) and stats["slots_in_use"] == 0  # every steered request released its slot


def test_corpus_on_vllm_writes_resumable_shards(llm, hf, tmp_path):
    """``generate_corpus(..., sampler=VllmSampler)``: the HF path's shards and resume rules, on vLLM."""
    if llm.kind != "eager":
        pytest.skip("one engine is enough for the corpus path")
    from emokern.extraction.corpus import CorpusConfigError, StoryCorpus, special_token_ids, generate_corpus
    from emokern.engines.vllm.sampler import VllmSampler

    model, tok, _ = hf
    sampler = VllmSampler(llm, tok, special_token_ids(model, tok)[1])
    kw = dict(preset="mini", emotions=["calm", "afraid"], stories_per_emotion=2, neutral=1, max_new_tokens=24,
              batch_size=2, progress=False)
    full = generate_corpus(model, tok, tmp_path / "c", sampler=sampler, **kw)
    shards = sorted((tmp_path / "c" / "shards").glob("*.jsonl"))
    assert len(shards) == 3 and len(full.records) == 5
    assert full.records[0]["new_tokens"] <= 24 and full.records[0]["raw"].startswith(full.records[0]["opening"])
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["config"]["sampler"] == sampler.name
    shards[1].unlink()  # an interrupted run: the missing chunk alone is generated again, identically

    class Counting(VllmSampler):
        calls = 0

        def __call__(self, prompts, **kwargs):
            Counting.calls += 1
            return super().__call__(prompts, **kwargs)

    resumed = generate_corpus(model, tok, tmp_path / "c", sampler=Counting(llm, tok, sampler.eos_ids), **kw)
    assert Counting.calls == 1
    strip = [{k: v for k, v in r.items() if k != "chunk_seconds"} for r in resumed.records]
    assert strip == [{k: v for k, v in r.items() if k != "chunk_seconds"} for r in full.records]
    assert StoryCorpus.load(tmp_path / "c").complete
    with pytest.raises(CorpusConfigError, match="sampler"):  # never finished by the other engine
        generate_corpus(model, tok, tmp_path / "c", **kw)


def test_request_failed_in_the_worker_fails_alone(llm):
    """A spec sent around the front end's check (the worker is its last line): the worker fails that request alone
    (unsteered, ended at its first token, the error handed over), while its batch-mate and the next request run."""
    from vllm.v1.engine.input_processor import InputProcessor

    checked = InputProcessor.process_inputs
    bad = ev.sampling_params({"steer": {"emotions": {"desperate": 1e39}, "relative": False}, "monitor": True},
                             max_tokens=8, temperature=0)
    mate = ev.sampling_params({"monitor": True}, max_tokens=8, temperature=0, ignore_eos=True)
    InputProcessor.process_inputs = checked._emokern_original
    try:
        failed, other = ev.generate(llm, PROMPTS, params=[bad, mate])
    finally:
        InputProcessor.process_inputs = checked
    assert failed.error is not None and "must be at most 800 in size" in failed.error, failed.error
    assert failed.trace is None
    assert failed.output.outputs[0].finish_reason == "stop" and len(failed.output.outputs[0].token_ids) == 1
    assert other.error is None and len(other.output.outputs[0].token_ids) == 8
    assert torch.isfinite(other.trace.projections[0, :-1]).all()
    (after,) = ev.generate(llm, PROMPTS[:1], {"steer": {"emotions": {"calm": 0.5}}}, max_tokens=4, temperature=0)
    assert after.error is None and len(after.output.outputs[0].token_ids) == 4
    stats = llm.collective_rpc("emokern_stats")[0]
    assert stats["failed"] == 0 and stats["slots_in_use"] == 0  # the error was handed over, the slots freed


@pytest.mark.parametrize("scope", ["prompt", "generated", "all"])
def test_second_turn_reads_no_block_computed_under_another_steering(llm, scope):
    """Turn 2 = turn 1's prompt + its reply + a new user message, steered alike. Under scope "generated" turn 1's
    reply was computed steered and is unsteered prompt in turn 2 ("prompt": the reverse), so turn 2 must not read
    those blocks from the prefix cache: its reply equals a run that reads no cached block. Under "all" the blocks
    hold the same state in both turns and are reused."""
    if llm.kind != "eager":
        pytest.skip("the ci engine's 5-block cache is for preemption; prefix caching is tested on the eager one")
    from vllm.inputs import TokensPrompt

    tok = llm.get_tokenizer()
    first = tok.encode(CHAT.format(f"Turn test ({scope}): tell me about the lake at dawn."))
    assert len(first) < 32  # turn 1's reply fills most of the first 128-token block (the CPU block size)
    steer = {"emotions": {"desperate": 4.0}, "scope": scope}
    (turn1,) = llm.generate([TokensPrompt(prompt_token_ids=first)],
                            ev.sampling_params({"steer": steer}, max_tokens=120, temperature=0, ignore_eos=True),
                            use_tqdm=False)
    second = first + list(turn1.outputs[0].token_ids) + tok.encode("<|im_end|>\n" + CHAT.format("And then?"))
    spec = {"steer": steer, "monitor": {"prompt": False}}  # generated positions only: the prompt may come cached

    def turn2(**kw):
        (r,) = ev.generate(llm, [TokensPrompt(prompt_token_ids=second)], params=ev.sampling_params(
            spec, max_tokens=12, temperature=0, ignore_eos=True, **kw))
        return r

    cached, fresh = turn2(), turn2(skip_reading_prefix_cache=True)
    assert fresh.output.num_cached_tokens == 0
    if scope == "all":
        assert cached.output.num_cached_tokens >= 128  # the test does read the cache
    assert cached.output.outputs[0].token_ids == fresh.output.outputs[0].token_ids
    _assert_close(cached.trace.projections, fresh.trace.projections)
