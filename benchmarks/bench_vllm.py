"""Benchmark: what does emokern's vLLM plugin cost? Generated tokens/s of vLLM without the plugin, with it but idle
(plain requests), monitor-only (every request records all bank emotions at the installed layers, traces fetched),
and monitor + 2 steered emotions per request; batch 1 and 64.

Run in the vLLM environment, outside the checkout's import path (``make vllm-env`` first)::

    .venv-vllm/bin/python -P benchmarks/bench_vllm.py [--eager] [--rounds 2] [--reps 3]

Engines cannot be interleaved in one process without competing for the cores (an idle vLLM engine busy-polls), so
the plugin-off engine (``EMOKERN_VLLM_DISABLE=1``) and the plugin-on engine alternate ``--rounds`` times; within
each engine the configurations are interleaved rep by rep (the order alternating). Each timing is
``generate`` + fetching the traces, with 64 (or 1) chat prompts x ``--tokens`` new tokens, temperature 0.8,
``ignore_eos``. Reported: the median tokens/s per configuration and batch, each one's ratio to plugin-off, and the
plugin's own time per step and share of the wall time (host routing before the forward, trace copies after it, and
the op inside the forward, timed by the plugin itself: a measure that other load on the machine disturbs less).
Uses the bank ``make demo`` leaves in ``emokern_out/bank/`` when present (171 emotions), else a random bank of
171 vectors. Writes ``benchmarks/results/bench_vllm_<machine>[_eager].json``.

``--starts N`` measures engine starts instead: N plugin-on engines one after the other (``LLM(...)`` until it
answers a one-token request), with the compile cache left from the previous start, so the first start is cold only
if the cache (``~/.cache/vllm/torch_compile_cache``) was empty; run it under ``VLLM_USE_AOT_COMPILE=0`` to time the
path without vLLM's ahead-of-time artifact (inductor's own caches only). Writes
``benchmarks/results/bench_vllm_starts_<machine>[_noaot].json``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BANK = HERE.parent / "emokern_out" / "bank" / "smollm2-135m-instruct.json"
QUESTIONS = ["Tell me about your morning.", "What should I cook tonight?", "How do I fix a flat tyre?",
             "Write a short poem about rain.", "Why is the sky blue?", "Plan a weekend in Lisbon.",
             "Explain compound interest.", "What is a good name for a cat?"]


def _bench_ops():
    # the helpers of bench_ops.py, loaded by path: putting the checkout on sys.path would import its emokern,
    # whose compiled extension belongs to the other environment's torch
    spec = importlib.util.spec_from_file_location("bench_ops", HERE / "bench_ops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bank_path(tmp: str) -> tuple[str, str]:
    if BANK.is_file():
        return str(BANK), "emokern_out bank (171 emotions)"
    import torch

    from emokern.core.bank import VectorBank
    from emokern.core.emotions import load_emotions
    from emokern.core.models import load_model

    model, _ = load_model("smollm2-135m-instruct", dtype=torch.bfloat16)
    names = load_emotions()
    L = model.config.num_hidden_layers
    vectors = torch.randn(L, len(names), model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    bank = VectorBank.from_tensors(vectors, names, residual_norm=torch.full((L,), 8.0), model=model)
    return str(bank.save(os.path.join(tmp, "bank"))), f"random bank ({len(names)} vectors)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eager", action="store_true", help="enforce_eager (default: vLLM's torch.compile)")
    parser.add_argument("--rounds", type=int, default=2, help="plugin-off / plugin-on engine alternations")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each configuration per engine")
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="for the record (vLLM picks its platform): cuda = CUDA graphs on, vLLM's V2 runner")
    parser.add_argument("--starts", type=int, default=0, help="measure N consecutive engine starts instead")
    parser.add_argument("--checkout", action="store_true",
                        help="import emokern from this checkout (built in place, as on the GPU machine) instead of "
                             "the installed package")
    args = parser.parse_args()
    if args.checkout:
        sys.path.insert(0, str(HERE.parent))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = tempfile.mkdtemp(prefix="bench-vllm-")
    bank_path, bank_kind = _bank_path(tmp)
    os.environ["EMOKERN_VLLM_BANK"] = bank_path

    import torch
    import vllm
    from vllm import LLM

    import emokern
    import emokern.engines.vllm as ev
    from emokern.core.bank import VectorBank
    from emokern.core.models import model_cache_dir

    torch.set_num_threads(args.threads)
    # vLLM runs the plugins once per process, when the first engine is made: with the plugin on, so that this
    # process's front end checks specs and salts the prefix cache (a plugin-off engine's workers ignore it)
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    bank = VectorBank.load(bank_path)
    layer = bank.two_thirds_layer()
    path = str(model_cache_dir("smollm2-135m-instruct"))
    specs = {
        "plugin_idle": None,
        "monitor": {"monitor": True},
        "monitor_steer2": {"monitor": True, "steer": {"emotions": {bank.names[0]: 0.05, bank.names[1]: -0.05}}},
    }
    timings = {(c, b): [] for c in ["plugin_off", *specs] for b in (1, 64)}

    # (config, batch) -> [(plugin seconds per step, plugin share of the wall time)]: the plugin's own clock (host
    # routing and trace copies + the op inside the forward), less sensitive to other load than tokens/s
    host = {}
    # the 1-minute load average after each timing: above ~2.5 (this process's engine alone) another job shared the
    # cores and that timing says little
    loads = {}

    def stats(llm):
        return llm.collective_rpc("emokern_stats")[0]

    def run(llm, spec, batch, config=None):
        before = stats(llm) if config not in (None, "plugin_off") else None
        tok = llm.get_tokenizer()
        prompts = [tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                           tokenize=False, add_generation_prompt=True) for i in range(batch)]
        params = ev.sampling_params(spec, max_tokens=args.tokens, temperature=0.8, seed=0, ignore_eos=True)
        t0 = time.perf_counter()
        results = ev.generate(llm, prompts, params=params)
        seconds = time.perf_counter() - t0
        assert sum(len(r.output.outputs[0].token_ids) for r in results) == batch * args.tokens
        assert all((r.trace is not None) == (spec is not None) for r in results)
        loads.setdefault((config or "plugin_off", batch), []).append(round(os.getloadavg()[0], 2))
        if before is not None:
            after = stats(llm)
            steps = max(1, after["steps"] - before["steps"])
            cost = sum(after[k] - before[k] for k in ("host_seconds", "op_seconds"))
            host.setdefault((config, batch), []).append((cost / steps, cost / seconds))
        return batch * args.tokens / seconds

    if args.starts:
        _starts(args, path, bank_kind, layer)
        return

    start_seconds = {}
    for rnd in range(args.rounds):
        for plugin in ((True, False) if rnd % 2 else (False, True)):
            if plugin:
                os.environ.pop("EMOKERN_VLLM_DISABLE", None)
            else:
                os.environ["EMOKERN_VLLM_DISABLE"] = "1"
            t0 = time.perf_counter()
            llm = LLM(model=path, dtype="bfloat16", max_model_len=512, max_num_seqs=64, seed=0,
                      enforce_eager=args.eager)
            start_seconds.setdefault(plugin, []).append(round(time.perf_counter() - t0, 1))
            try:
                configs = list(specs) if plugin else ["plugin_off"]
                run(llm, specs[configs[-1]] if plugin else None, 8)  # warm-up (the compiled graph, the allocator)
                for rep in range(args.reps):
                    order = configs if rep % 2 == 0 else configs[::-1]
                    for batch in (1, 64):
                        for config in order:
                            rate = run(llm, specs.get(config), batch, config)
                            timings[(config, batch)].append(rate)
                            print(f"round {rnd} rep {rep} batch {batch:2d} {config:15s} {rate:7.1f} tok/s", flush=True)
            finally:
                llm.llm_engine.engine_core.shutdown()

    rows = []
    for batch in (1, 64):
        base = statistics.median(timings[("plugin_off", batch)])
        for config in ["plugin_off", *specs]:
            rates = timings[(config, batch)]
            med = statistics.median(rates)
            per_step = host.get((config, batch))
            rows.append({"batch": batch, "config": config, "tok_per_s_median": round(med, 1),
                         "ratio_to_plugin_off": round(med / base, 3), "tok_per_s_all": [round(r, 1) for r in rates],
                         "plugin_ms_per_step_median": None if not per_step else
                         round(1e3 * statistics.median(p[0] for p in per_step), 4),
                         "plugin_share_of_wall_time_median": None if not per_step else
                         round(statistics.median(p[1] for p in per_step), 5),
                         "load_average_1min": loads.get((config, batch))})
            print(f"batch {batch:2d} {config:15s} {med:7.1f} tok/s  {med / base:.3f}x")
    ops = _bench_ops()
    name = ops.device_name(args.device)
    suffix = "_eager" if args.eager else ""
    out = RESULTS / f"bench_vllm_{ops.machine_slug(name)}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "bench_vllm", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": name, "threads": args.threads, "versions": {**ops.versions(), "vllm": vllm.__version__},
        "mode": "eager (enforce_eager=True)" if args.eager else
                ("compiled (vLLM default: dynamo + inductor on CPU)" if args.device == "cpu" else
                 "compiled (vLLM default: torch.compile + CUDA graphs)"),
        "model": "smollm2-135m-instruct bf16", "bank": bank_kind, "layers": [layer],
        "tokens_per_request": args.tokens, "temperature": 0.8, "rounds": args.rounds, "reps": args.reps,
        "engine_start_seconds": {"plugin_on" if k else "plugin_off": v for k, v in start_seconds.items()},
        "rows": rows, "emokern": emokern.__version__,
    }, indent=1) + "\n")
    print(f"wrote {out}")


def _starts(args, path: str, bank_kind: str, layer: int) -> None:
    """``--starts``: seconds from ``LLM(...)`` to the first token of a one-token request, N times in a row."""
    import vllm
    from vllm import LLM, SamplingParams

    import emokern

    aot = os.environ.get("VLLM_USE_AOT_COMPILE", "default")
    seconds = []
    for i in range(args.starts):
        t0 = time.perf_counter()
        llm = LLM(model=path, dtype="bfloat16", max_model_len=512, max_num_seqs=64, seed=0, enforce_eager=args.eager)
        try:
            llm.generate(["Hello"], SamplingParams(max_tokens=1), use_tqdm=False)
        finally:
            llm.llm_engine.engine_core.shutdown()
        seconds.append(round(time.perf_counter() - t0, 1))
        print(f"start {i}: {seconds[-1]} s (VLLM_USE_AOT_COMPILE={aot})", flush=True)
    ops = _bench_ops()
    name = ops.device_name(args.device)
    suffix = "_noaot" if aot == "0" else ""
    out = RESULTS / f"bench_vllm_starts_{ops.machine_slug(name)}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "bench_vllm --starts", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"), "machine": name, "threads": args.threads,
        "versions": {**ops.versions(), "vllm": vllm.__version__}, "VLLM_USE_AOT_COMPILE": aot,
        "mode": "eager" if args.eager else "compiled", "model": "smollm2-135m-instruct bf16", "bank": bank_kind,
        "layers": [layer], "start_to_first_token_seconds": seconds, "load_average_1min": round(os.getloadavg()[0], 2),
        "emokern": emokern.__version__}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

