"""Benchmark: what does emokern's patch cost during generation?

Providers, measured in one run on the same model and inputs:

* ``unpatched`` — plain ``model.generate``;
* ``emokern_monitor`` — monitoring all K=171 vectors at every layer's residual stream;
* ``emokern_monitor_steer`` — the same plus steering with 2 vectors on every token;
* ``python_hooks`` — the same math as ``emokern_monitor_steer`` with plain forward hooks and unfused PyTorch
  (``h @ V.T``, elementwise, ``addmm``), the way repeng / steering-vectors style libraries do it.

CPU (default): the embedded SmolLM2-135M-Instruct when installed, otherwise a random model of the same shape;
batch 1 and 16, 64 new tokens, eager. ``--compiled`` (CPU): ``generate`` with a static cache and transformers'
torch.compile of the decoding forward (inductor, fullgraph, static shapes) instead. Compiled, a patch cannot come and
go between repetitions (each new set of hooks would be a new graph), so the patched providers run on a second copy
of the model, patched once: ``emokern_monitor`` with no steering set and ``emokern_monitor_steer`` with it (steering
on and off are two graphs, each compiled once in the warm-up), against ``unpatched`` on the first copy; no
``python_hooks`` row. GPU (``--device cuda``): a Llama-3-8B-shaped random-weight model in bf16
with a static cache and ``torch.compile`` (CUDA graphs), compiled as with ``--compiled``; batch 1 and 32 decode, and
a 4k-token prefill.

Prints a table and writes ``benchmarks/results/bench_generate_<device>_<machine>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import emokern  # noqa: E402
from benchmarks.bench_ops import device_name, machine_slug, versions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
K = 171


def smollm2_shaped(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True,
                      rms_norm_eps=1e-5, rope_theta=100000.0)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(dtype).eval(), "random SmolLM2-135M-shaped"


def llama3_8b_shaped(dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval(), "random Llama-3-8B-shaped"


def load_cpu_model(dtype):
    try:
        from emokern.core.models import load_model

        model, _ = load_model("smollm2-135m-instruct", dtype=dtype)
        return model, "SmolLM2-135M-Instruct (embedded)"
    except Exception as exc:  # a missing embedded model falls back to the same shape with random weights
        print(f"embedded model unavailable ({type(exc).__name__}: {exc}); using a random model of the same shape")
        return smollm2_shaped(dtype)


def random_bank(model):
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    vectors = torch.randn(cfg.num_hidden_layers, K, cfg.hidden_size, generator=g)
    norms = torch.full((cfg.num_hidden_layers,), 10.0)
    return emokern.VectorBank.from_tensors(vectors, [f"e{i}" for i in range(K)], residual_norm=norms, model=model)


class PythonHookBaseline:
    """Forward hooks doing the monitoring + 2-vector steering with unfused PyTorch ops."""

    def __init__(self, model, bank, steer_idx, strength):
        blocks = model.model.layers
        unit = bank.vectors / bank.vectors.norm(dim=-1, keepdim=True)
        p = next(model.parameters())
        self.records = []
        self.handles = []
        for layer, block in enumerate(blocks):
            V = unit[layer].to(p.device, p.dtype)
            Vs = V[steer_idx]
            add = torch.full((len(steer_idx),), strength * float(bank.residual_norm[layer]), device=p.device)

            def hook(mod, args, output, V=V, Vs=Vs, add=add):
                h = output[0] if isinstance(output, tuple) else output
                P = h @ V.T
                self.records.append(P)
                Ps = h @ Vs.T
                delta = (Ps + add) - Ps
                return torch.addmm(h.reshape(-1, h.shape[-1]), delta.reshape(-1, Vs.shape[0]).to(h.dtype), Vs).view(h.shape)

            self.handles.append(block.register_forward_hook(hook))

    def remove(self):
        for h in self.handles:
            h.remove()


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def generate_once(model, ids, mask, new_tokens, device) -> float:
    model = active_model.get("model", model)
    """Seconds for one greedy generation of exactly ``new_tokens`` tokens."""
    sync(device)
    t0 = clock()
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=0, **generate_extra)
    sync(device)
    return clock() - t0


def time_providers(model, providers, ids, mask, new_tokens, device, reps):
    """Median seconds per provider. Providers are interleaved within each repetition (and each is warmed up once)
    so that slow drifts of the machine affect them all alike. A provider is ``(name, attach, detach)``."""
    samples = {name: [] for name, _, _ in providers}
    for rep in range(reps + 1):
        for name, attach, detach in providers:
            attach()
            seconds = generate_once(model, ids, mask, new_tokens, device)
            detach()
            if rep:  # repetition 0 is the warm-up (and compilation on GPU)
                samples[name].append(seconds)
    return {name: statistics.median(v) for name, v in samples.items()}


generate_extra: dict = {}
clock = time.perf_counter  # --clock cpu: time.thread_time (one intra-op thread)
active_model: dict = {}  # --compiled: the copy of the model the provider being timed runs on


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default: 1,16 CPU; 1,32 GPU)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--random-model", action="store_true", help="CPU: use a random SmolLM2-shaped model")
    parser.add_argument("--prefill", type=int, default=4096, help="GPU: prefill length measured separately")
    parser.add_argument("--compiled", action="store_true", help="CPU: static cache + torch.compile (see above)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="CPU: 'cpu' times each generation by the CPU time of the thread running it, with one "
                             "intra-op thread, so time spent descheduled by other jobs on the machine is not counted")
    args = parser.parse_args(argv)
    global clock
    if args.clock == "cpu":
        if args.device != "cpu":
            parser.error("--clock cpu is for --device cpu")
        torch.set_num_threads(1)
        clock = time.thread_time
    device = args.device
    torch.manual_seed(0)
    if device == "cpu":
        model, model_name = smollm2_shaped(torch.float32) if args.random_model else load_cpu_model(torch.float32)
        batches = [int(b) for b in (args.batches or "1,16").split(",")]
    else:
        model, model_name = llama3_8b_shaped(torch.bfloat16, device)
        batches = [int(b) for b in (args.batches or "1,32").split(",")]
    compiled = args.compiled or device == "cuda"
    if compiled:
        from transformers import CompileConfig

        # CUDA graphs on the GPU; inductor's C++ code on the CPU
        config = CompileConfig(fullgraph=True, dynamic=False, mode="reduce-overhead" if device == "cuda" else "default")
        config._compile_all_devices = True  # transformers compiles only on accelerators unless told
        generate_extra.update(cache_implementation="static", compile_config=config)
        # one graph per (model copy, steering on/off, batch size): more than dynamo's default limit of 8
        torch._dynamo.config.recompile_limit = 64
    bank = random_bank(model)
    steer_names = ["e3", "e7"]
    vocab = model.config.vocab_size
    rows = []
    print(f"{device_name(device)} | {model_name} | {args.new_tokens} new tokens")
    print(f"{'provider':<24}{'batch':>6}{'tokens/s':>12}{'vs unpatched':>14}")
    for B in batches:
        ids = torch.randint(100, vocab, (B, args.prompt_tokens), device=device)
        mask = torch.ones_like(ids)
        state = {}

        def patch_monitor():
            state["handle"] = emokern.patch(model, bank, batch=B, tokens=args.prompt_tokens + args.new_tokens + 1)

        def patch_steer():
            patch_monitor()
            state["handle"].steer({name: 0.05 for name in steer_names})

        def unpatch():
            state.pop("handle").remove()

        def hooks():
            state["hooks"] = PythonHookBaseline(model, bank, [bank.index(n) for n in steer_names], 0.05)

        def unhook():
            state.pop("hooks").remove()

        providers = [("unpatched", lambda: None, lambda: None), ("emokern_monitor", patch_monitor, unpatch),
                     ("emokern_monitor_steer", patch_steer, unpatch), ("python_hooks", hooks, unhook)]
        if compiled:
            import copy

            patched = copy.deepcopy(model)
            handle = emokern.patch(patched, bank, batch=B, tokens=args.prompt_tokens + args.new_tokens + 1)

            def use(m, steer=None):
                def attach():
                    active_model["model"] = m
                    if steer is not None:
                        handle.steer({name: 0.05 for name in steer_names}) if steer else handle.clear_steering()
                return attach

            providers = [("unpatched", use(model), active_model.clear),
                         ("emokern_monitor", use(patched, steer=False), active_model.clear),
                         ("emokern_monitor_steer", use(patched, steer=True), active_model.clear)]
        results = time_providers(model, providers, ids, mask, args.new_tokens, device, args.reps)
        if compiled:
            handle.remove()
            del patched
        for provider, seconds in results.items():
            tps = B * args.new_tokens / seconds
            ratio = results["unpatched"] / seconds
            rows.append({"provider": provider, "batch": B, "new_tokens": args.new_tokens, "seconds": round(seconds, 4),
                         "tokens_per_s": round(tps, 2), "fraction_of_unpatched": round(ratio, 4)})
            print(f"{provider:<24}{B:>6}{tps:>12.1f}{ratio:>14.3f}")
    if device == "cuda" and args.prefill:
        ids = torch.randint(100, vocab, (1, args.prefill), device=device)
        state = {}

        def attach():
            state["handle"] = emokern.patch(model, bank, batch=1, tokens=args.prefill + 2)
            state["handle"].steer({name: 0.05 for name in steer_names})

        providers = [("unpatched", lambda: None, lambda: None),
                     ("emokern_monitor_steer", attach, lambda: state.pop("handle").remove())]
        prefill = time_providers(model, providers, ids, torch.ones_like(ids), 1, device, args.reps)
        for provider, seconds in prefill.items():
            rows.append({"provider": provider, "batch": 1, "prefill_tokens": args.prefill, "seconds": round(seconds, 4),
                         "fraction_of_unpatched": round(prefill["unpatched"] / seconds, 4)})
            print(f"prefill {args.prefill} {provider:<24}{seconds * 1e3:>10.1f} ms")
    machine = machine_slug(device_name(device))
    suffix = ("_compiled" if args.compiled and device == "cpu" else "") + ("_cpu_clock" if args.clock == "cpu" else "")
    out = RESULTS / f"bench_generate_{device}{suffix}_{machine}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "bench_generate", "device": device_name(device), "model": model_name, "K": K,
        "mode": "compiled (static cache, torch.compile)" if compiled else "eager", "clock": args.clock,
        "steered_vectors": len(steer_names), "versions": versions(), "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "rows": rows,
    }, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
