"""The model patch against plain PyTorch hooks that apply the reference op, for every supported family."""

import math

import pytest
import torch

import emokern
from emokern.ops.reference import project_and_steer_ref
from emokern.core.architecture import ARCHITECTURES, UnsupportedModelError, get_module, site_module
from emokern.testing.families import FAMILIES, LAYERS, VOCAB, tiny_bank, tiny_model

NORM = 2.0  # the tiny banks' residual norm: strength s means s * 2.0 along the unit vector


def _batch(B=3, T=7, pads=(0, 2, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b, p in enumerate(pads[:B]):
        mask[b, :p] = 0
        ids[b, :p] = 0
    return ids, mask, list(pads[:B])


def _position_ids(mask):
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


class ReferenceHooks:
    """Forward hooks applying project_and_steer_ref on full (uncached) forwards: token t has position t."""

    def __init__(self, model, bank, site, layers, tables, seq_row, in_scope):
        spec = ARCHITECTURES[model.config.model_type]
        blocks = get_module(get_module(model, spec.base), spec.layers)
        unit = bank.vectors / bank.vectors.norm(dim=-1, keepdim=True)
        self.handles = []
        for layer in layers:
            module = site_module(blocks[layer], site, spec)
            V = unit[bank.layer_slot(layer)]

            def hook(mod, args, output, V=V):
                h = output[0] if isinstance(output, tuple) else output
                B, T, d = h.shape
                row = torch.tensor([[seq_row[b] if seq_row[b] >= 0 and in_scope(b, t) else -1 for t in range(T)]
                                    for b in range(B)], dtype=torch.int32).reshape(-1)
                h_new, _ = project_and_steer_ref(h.reshape(-1, d), V.to(h.dtype), row, *tables)
                h_new = h_new.view(B, T, d)
                return (h_new,) + tuple(output[1:]) if isinstance(output, tuple) else h_new

            self.handles.append(module.register_forward_hook(hook))

    def remove(self):
        for h in self.handles:
            h.remove()


def _tables(K=6):
    """seq 0: +0.5 on emotion1; seq 1: ablate emotion2 and clamp emotion3 to [-0.1, 0.2]; seq 2: nothing."""
    a = torch.zeros(3, K)
    b = torch.ones(3, K)
    lo = torch.full((3, K), -math.inf)
    hi = torch.full((3, K), math.inf)
    a[0, 1] = 0.5 * NORM
    b[1, 2] = 0.0
    lo[1, 3], hi[1, 3] = -0.1 * NORM, 0.2 * NORM
    return (a, b, lo, hi), [0, 1, -1]


def _steer(handle, scope0="all", scope1="all"):
    handle.steer({"emotion1": 0.5}, sequences=[0], scope=scope0)
    handle.steer("emotion2", mode="ablate", sequences=[1], scope=scope1)
    handle.steer("emotion3", (-0.1, 0.2), mode="clamp", sequences=[1], scope=scope1)


@pytest.mark.parametrize("site", ["residual", "attn", "mlp"])
@pytest.mark.parametrize("family", FAMILIES)
def test_steered_forward_matches_reference_hooks(family, site):
    model = tiny_model(family)
    bank = tiny_bank(model, norm=NORM)
    ids, mask, pads = _batch()
    layers = [0, 2]
    kwargs = dict(attention_mask=mask, position_ids=_position_ids(mask), output_hidden_states=True)
    tables, seq_row = _tables()
    ref = ReferenceHooks(model, bank, site, layers, tables, seq_row, lambda b, t: t >= pads[b] or b == 0)
    with torch.no_grad():
        expected = model(ids, **kwargs)
    ref.remove()
    with emokern.patch(model, bank, layers=layers, sites=site) as handle:
        _steer(handle, scope0="all", scope1="prompt")
        handle.prepare(ids, mask)
        with torch.no_grad():
            got = model(ids, **kwargs)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    for g, e in zip(got.hidden_states, expected.hidden_states):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got.logits, model(ids, **kwargs).logits)  # the steering did something


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_cache_matches_uncached_reference(family):
    model = tiny_model(family)
    bank = tiny_bank(model, norm=NORM)
    ids, mask, pads = _batch(seed=3)
    W, steps = ids.shape[1], 4
    tables, seq_row = _tables()
    # seq 0 steered on generated tokens only; seq 1 on prompt tokens 1..3 (counted without padding)
    in_scope = lambda b, t: t >= W if b == 0 else pads[b] + 1 <= t < pads[b] + 3  # noqa: E731
    ref = ReferenceHooks(model, bank, "residual", list(range(LAYERS)), tables, seq_row, in_scope)
    seq, m = ids.clone(), mask.clone()
    ref_logits = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(seq, attention_mask=m, position_ids=_position_ids(m)).logits[:, -1]
            ref_logits.append(logits)
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
            m = torch.cat([m, torch.ones(3, 1, dtype=m.dtype)], 1)
    ref.remove()
    with emokern.patch(model, bank) as handle:
        _steer(handle, scope0="generated", scope1=[(1, 3)])
        out = handle.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                              output_logits=True, return_dict_in_generate=True)
    for step, (got, exp) in enumerate(zip(out.output.logits, ref_logits)):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-4, msg=f"step {step}")
    assert torch.equal(out.sequences, seq)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_one_call_per_site_equals_monitoring_then_steering(dtype):
    """On the CPU kernel a monitored and steered site is one op call with the full-width tables; it must give the
    trace and the generation of the two calls (monitor all K, then steer the slot vectors)."""
    if not _cpu_kernels():
        pytest.skip("emokern._C with CPU kernels is not built")
    model = tiny_model("llama").to(dtype)
    bank = tiny_bank(model, norm=NORM)
    ids, mask, _ = _batch(seed=5)
    results = []
    for one_call in (True, False):
        with emokern.patch(model, bank) as handle:
            assert handle._one_call  # CPU tensors, the default backend
            handle._one_call = one_call
            _steer(handle, scope0="generated", scope1="all")
            calls = []
            spy = lambda *args: calls.append(args[1].shape[0])  # noqa: E731  (K of each steering call)
            real = handle._fixed_kernels
            handle._fixed_kernels = real._replace(project_and_steer=lambda *args: (spy(*args),
                                                                                   real.project_and_steer(*args))[1])
            out = handle.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                  output_logits=True, return_dict_in_generate=True)
            results.append((out, handle.state.P.clone(), calls))
    (one, trace_one, calls_one), (two, trace_two, calls_two) = results
    K = bank.vectors.shape[1]
    assert calls_one and set(calls_one) == {K} and set(calls_two) == {4}  # all K at once vs the 4 slots
    assert torch.equal(one.sequences, two.sequences)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(one.output.logits, two.output.logits):
        torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(trace_one, trace_two, equal_nan=True, **tol)


@pytest.mark.parametrize("family", FAMILIES)
def test_monitor_only_is_bit_identical_and_trace_matches_hidden_states(family):
    model = tiny_model(family)
    bank = tiny_bank(model)
    ids, mask, pads = _batch(seed=5)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, position_ids=_position_ids(mask)).logits
    with emokern.patch(model, bank, sites=("residual", "attn", "mlp")) as handle:
        with torch.no_grad():
            got = model(ids, attention_mask=mask, position_ids=_position_ids(mask)).logits
        assert torch.equal(got, expected)
        out = handle.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    trace = out.trace
    T = out.sequences.shape[1]
    assert trace.projections.shape == (3, T, 3 * LAYERS, 6)
    assert trace.is_generated[:, ids.shape[1]:].all() and not trace.is_generated[:, :ids.shape[1]].any()
    assert trace.is_pad[1, :pads[1]].all() and not trace.is_pad[0].any()
    full_mask = torch.cat([mask, torch.ones(3, T - ids.shape[1], dtype=mask.dtype)], 1)
    with torch.no_grad():
        hs = model(out.sequences, attention_mask=full_mask, position_ids=_position_ids(full_mask),
                   output_hidden_states=True).hidden_states
    unit = bank.vectors / bank.vectors.norm(dim=-1, keepdim=True)
    for layer in range(LAYERS - 1):  # the last entry of hidden_states may be after the final norm
        expected_P = hs[layer + 1][:, :T - 1] @ unit[layer].T
        got_P = trace.projections[:, :T - 1, trace.sites.index(f"layer{layer}.residual")]
        keep = ~trace.is_pad[:, :T - 1]
        torch.testing.assert_close(got_P[keep], expected_P[keep], rtol=1e-4, atol=1e-4)
    assert torch.isnan(trace.projections[:, T - 1]).all()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_remove_restores_the_model_exactly(family):
    model = tiny_model(family)
    ids, mask, _ = _batch()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
    handle = emokern.patch(model, tiny_bank(model), sites=("residual", "mlp"))
    handle.steer({"emotion0": 1.0, "emotion4": -1.0})
    with torch.no_grad():
        assert not torch.equal(model(ids, attention_mask=mask).logits, before)
    handle.remove()
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, before)
    again = emokern.patch(model, tiny_bank(model))  # patching again after removal is allowed
    again.remove()


def test_steering_changes_do_not_reregister_hooks():
    model = tiny_model("llama")
    handle = emokern.patch(model, tiny_bank(model))
    hooks_before = [id(h) for h in handle._hooks]
    buffers = [handle.state.a.data_ptr(), handle.state.scope.data_ptr(), handle.state.P.data_ptr()]
    handle.steer("emotion1", 0.1).steer("emotion2", mode="ablate", sequences=[1]).clear_steering().steer("emotion3", 0.2)
    assert [id(h) for h in handle._hooks] == hooks_before
    assert [handle.state.a.data_ptr(), handle.state.scope.data_ptr(), handle.state.P.data_ptr()] == buffers
    handle.remove()


def test_static_cache_generation_matches_dynamic_cache():
    model = tiny_model("llama")
    bank = tiny_bank(model)
    ids, mask, _ = _batch(seed=9)
    with emokern.patch(model, bank) as handle:
        handle.steer({"emotion1": 0.5}, scope="generated", sequences=[0, 2])
        dynamic = handle.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        static = handle.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                 cache_implementation="static")
    assert torch.equal(dynamic.sequences, static.sequences)
    T = dynamic.sequences.shape[1]
    torch.testing.assert_close(static.trace.projections[:, :T - 1], dynamic.trace.projections[:, :T - 1],
                               rtol=1e-4, atol=1e-4, equal_nan=True)


def test_torch_compile_fullgraph_matches_eager():
    model = tiny_model("llama")
    bank = tiny_bank(model)
    ids, mask, _ = _batch(seed=2)
    with emokern.patch(model, bank, backend="reference" if not _cpu_kernels() else None) as handle:
        handle.steer({"emotion1": 0.5, "emotion2": -0.5})
        with torch.no_grad():
            eager = model(ids, attention_mask=mask, use_cache=False).logits
            eager_P = handle.state.P.clone()
            handle.state.P.fill_(float("nan"))
            compiled = torch.compile(model, fullgraph=True, dynamic=False)
            got = compiled(ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(handle.state.P, eager_P, equal_nan=True, rtol=1e-5, atol=1e-5)


def _cpu_kernels():
    from emokern.ops.extension import HAS_CPU_KERNELS

    return HAS_CPU_KERNELS


# ------------------------------------------------------------------------------------------------ bad input
def test_bank_model_mismatch_is_refused():
    model = tiny_model("llama")
    other = tiny_model("llama", seed=7)
    bank = tiny_bank(model)
    with pytest.raises(emokern.core.bank.BankMismatchError, match="fingerprint"):
        emokern.patch(other, bank)
    emokern.patch(other, bank, force=True).remove()
    wrong_size = emokern.VectorBank.from_tensors(torch.randn(LAYERS, 2, 16), ["a", "b"])
    with pytest.raises(emokern.core.bank.BankMismatchError, match="hidden size 16 .* model's hidden size is 32"):
        emokern.patch(model, wrong_size, force=True)


def test_bad_steering_arguments():
    model = tiny_model("llama")
    with emokern.patch(model, tiny_bank(model)) as handle:
        with pytest.raises(KeyError, match="'emotion9' is not in this bank \\(6 names\\); did you mean .*'emotion1'"):
            handle.steer("emotion9", 0.1)
        with pytest.raises(ValueError, match="strength for 'emotion1' must be finite; got nan"):
            handle.steer("emotion1", float("nan"))
        with pytest.raises(ValueError, match="'mode' must be one of"):
            handle.steer("emotion1", 0.1, mode="push")
        with pytest.raises(ValueError, match="lo <= hi"):
            handle.steer("emotion1", (0.5, 0.1), mode="clamp")
        with pytest.raises(ValueError, match="layers \\[7\\] are not patched"):
            handle.steer("emotion1", 0.1, layers=[7])
        ids, mask, _ = _batch()
        handle.steer("emotion1", 0.1, scope=[(2, 40)])
        with pytest.raises(ValueError, match=r"scope span \(2, 40\) is outside the prompt of sequence 0 \(7 tokens\)"):
            handle.prepare(ids, mask)
        handle.clear_steering()
        handle.steer("emotion1", 0.1, scope="prompt")
        with pytest.raises(RuntimeError, match="does not know the prompt"):
            with torch.no_grad():
                model(ids)


def test_patching_twice_and_unsupported_models_are_refused():
    model = tiny_model("llama")
    bank = tiny_bank(model)
    with emokern.patch(model, bank):
        with pytest.raises(RuntimeError, match="already patched"):
            emokern.patch(model, bank)
    model.config.model_type = "mystery"
    with pytest.raises(UnsupportedModelError, match="model.layers.*arch=emokern.ArchSpec"):
        emokern.patch(model, bank, force=True)
    handle = emokern.patch(model, bank, force=True, arch=emokern.ArchSpec("model", "layers", "self_attn", "mlp"))
    handle.remove()
    with pytest.raises(ValueError, match="'sites' must be a non-empty subset"):
        emokern.patch(model, bank, sites="ffn", arch=ARCHITECTURES["llama"], force=True)
    with pytest.raises(ValueError, match="out of range for a model with 3 layers"):
        emokern.patch(model, bank, layers=[5], arch=ARCHITECTURES["llama"], force=True)


def test_layer_selection_by_fraction_slice_and_index():
    model = tiny_model("llama")
    bank = tiny_bank(model)
    for layers, expected in [(None, [0, 1, 2]), (0.5, [1]), (slice(1, None), [1, 2]), ([-1, 0], [0, 2]), (1.0, [2])]:
        with emokern.patch(model, bank, layers=layers) as handle:
            assert handle.layers == expected


def test_text_scope_steers_only_the_tokens_of_the_substring():
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "would", "you", "like", "to", "paint", "a", "fence", "or", "swim", "?"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<pad>")
    model = tiny_model("llama")
    with emokern.patch(model, tiny_bank(model), tokenizer=tokenizer) as handle:
        handle.steer("emotion1", 0.5, scope={"text": "paint a fence"})
        handle.prepare(prompts=["would you like to paint a fence or swim ?", "you like to paint a fence ?"])
        mask = handle.state.scope[:2, :10]
    assert mask[0].tolist() == [False] * 4 + [True] * 3 + [False] * 3
    assert mask[1].tolist() == [False] * 4 + [False, False] + [True] * 3 + [False]  # 4 pads, then "you like"


def test_steering_more_vectors_than_slots_grows_them_and_matches_reference():
    model = tiny_model("qwen3")
    bank = tiny_bank(model, norm=NORM)
    ids, mask, pads = _batch(seed=11)
    strengths = {f"emotion{k}": 0.1 * (k + 1) for k in range(6)}  # 6 vectors > the 4 initial slots
    K = 6
    a = torch.zeros(3, K)
    a[:] = torch.tensor([0.1 * (k + 1) * NORM for k in range(K)])
    tables = (a, torch.ones(3, K), torch.full((3, K), -math.inf), torch.full((3, K), math.inf))
    ref = ReferenceHooks(model, bank, "residual", list(range(LAYERS)), tables, [0, 1, 2], lambda b, t: True)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    ref.remove()
    with emokern.patch(model, bank) as handle:
        handle.steer(strengths)
        assert handle.state.slots == 8
        with torch.no_grad():
            got = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_per_sequence_steer_calls_update_only_their_rows_and_equal_a_full_rebuild():
    """steer() for given sequences rebuilds and copies only those rows; after any mix of calls (new vectors moving
    slots, everyone-settings, refused calls) the buffers equal a rebuild of everything from the settings."""
    model = tiny_model("llama")
    bank = tiny_bank(model)
    rng = torch.Generator().manual_seed(0)
    with emokern.patch(model, bank, layers=[0, 2]) as handle:
        ids, mask, _ = _batch(B=3, T=7, pads=(0, 2, 3))
        handle.prepare(torch.zeros(6, 7, dtype=torch.long), torch.ones(6, 7, dtype=torch.long))
        st = handle.state
        names = list(bank.names)

        def buffers():
            return [t.clone() for t in (st.a, st.b, st.lo, st.hi, st.seq_row, st.scope, st.Vs,
                                        st.a_all, st.b_all, st.lo_all, st.hi_all)]

        calls = 0
        for step in range(40):
            emotion = names[int(torch.randint(0, 3 if step < 20 else len(names), (1,), generator=rng))]
            seq = int(torch.randint(0, 6, (1,), generator=rng))
            kind = step % 5
            try:
                if kind == 0:
                    handle.steer({emotion: 0.3}, sequences=seq, scope=[(seq % 4, seq % 4 + 2)])
                elif kind == 1:
                    handle.steer(emotion, mode="ablate", sequences=[seq, (seq + 1) % 6], layers=[2])
                elif kind == 2:
                    handle.steer(emotion, (-0.1, 0.2), mode="clamp", sequences=seq, scope="prompt")
                elif kind == 3 and step % 10 == 3:
                    handle.steer({emotion: 0.1})  # everyone
                else:
                    handle.steer({emotion: 0.2}, sequences=seq, scope=[(5, 9)])  # outside the prompt: refused
            except ValueError:
                pass
            calls += 1
            incremental = buffers()
            handle._materialize()  # everything, from the settings
            for got, want in zip(incremental, buffers()):
                assert torch.equal(got, want), f"after call {calls}"
            assert handle._steered_sites == [any(entry.site == s for c in handle._configs.values()
                                                 for entry in c.entries) for s in range(st.S)]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_generate_with_static_cache_compiles_once_and_matches_eager(device):
    """``generate`` with a static cache and torch.compile (transformers compiles the decoding forward): the patch
    traces into one graph with no breaks (fullgraph=True would raise on one), a second call reuses it, and
    tokens and trace equal the eager run's."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    if device == "cpu" and not _cpu_kernels():
        pytest.skip("emokern._C with CPU kernels is not built")
    model = tiny_model("llama")
    bank = tiny_bank(model)
    model.to(device)
    ids, mask, _ = _batch(seed=4)
    ids, mask = ids.to(device), mask.to(device)
    config = CompileConfig(fullgraph=True, dynamic=False, mode="default")
    config._compile_all_devices = True  # transformers compiles only on accelerators unless told
    kw = dict(max_new_tokens=10, do_sample=False, cache_implementation="static")
    torch._dynamo.reset()
    with emokern.patch(model, bank) as handle:
        handle.steer({"emotion1": 0.5}, scope="generated")
        handle.steer({"emotion3": (None, 0.1)}, mode="clamp", scope="generated")
        eager = handle.generate(input_ids=ids, attention_mask=mask, disable_compile=True, **kw)
        counters.clear()
        compiled = handle.generate(input_ids=ids, attention_mask=mask, compile_config=config, **kw)
        graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
        counters.clear()
        again = handle.generate(input_ids=ids, attention_mask=mask, compile_config=config, **kw)
        recompiled = counters["stats"]["unique_graphs"]
    assert (graphs, breaks, recompiled) == (1, 0, 0)
    assert torch.equal(compiled.sequences, eager.sequences) and torch.equal(again.sequences, eager.sequences)
    torch.testing.assert_close(compiled.trace.projections, eager.trace.projections, rtol=1e-5, atol=1e-5,
                               equal_nan=True)
