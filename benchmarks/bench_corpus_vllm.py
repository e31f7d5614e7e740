"""Benchmark: corpus generation on vLLM (``emokern corpus --engine vllm``) against the Hugging Face path
(:func:`emokern.extraction.sampling.sample` on transformers), same corpus configuration, generated tokens per second.

The configuration: the ``quick`` preset with one story per emotion (171 stories in one chunk of 171, <= 64 new
tokens, temperature 0.6) and no neutral dialogues, SmolLM2-135M-Instruct in bf16, 2 threads. Each engine generates
the corpus into a fresh directory ``--reps`` times; the rate is the corpus's generated tokens over the chunk seconds
the corpus records. The HF runs come first, before the vLLM engine exists: an idle vLLM engine's processes
busy-poll and would slow the HF runs down (measured: interleaved, HF ran at 27 tok/s beside it). vLLM runs compiled
(its default) unless ``--eager``. Run in the vLLM environment::

    .venv-vllm/bin/python -P benchmarks/bench_corpus_vllm.py [--eager] [--reps 3]

Writes ``benchmarks/results/bench_corpus_vllm_<machine>.json`` with an estimate for the ``paper`` preset
(61.9 million new tokens at most) at the measured rates.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAPER_TOKENS = (205_200 + 1_200) * 300  # the paper preset's upper bound on generated tokens


def _bench_ops():
    # loaded by path: the checkout's emokern must not shadow the installed one (another torch's extension)
    spec = importlib.util.spec_from_file_location("bench_ops", HERE / "bench_ops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import vllm
    from vllm import LLM

    from emokern.extraction.corpus import special_token_ids, generate_corpus
    from emokern.core.models import load_model, model_cache_dir
    from emokern.engines.vllm.sampler import VllmSampler

    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m-instruct", dtype=torch.bfloat16)
    kw = dict(preset="quick", stories_per_emotion=1, neutral=0, progress=False)
    rates = {"hf": [], "vllm": []}
    tmp = Path(tempfile.mkdtemp(prefix="bench-corpus-"))

    def measure(engine, rep, sampler=None):
        corpus = generate_corpus(model, tok, tmp / f"{engine}{rep}", sampler=sampler, **kw)
        tokens = sum(r["new_tokens"] for r in corpus.records)
        seconds = sum({r["chunk"]: r["chunk_seconds"] for r in corpus.records}.values())
        rates[engine].append(tokens / seconds)
        print(f"rep {rep} {engine:4s} {tokens} tokens in {seconds:.1f} s: {tokens / seconds:.1f} tok/s", flush=True)

    for rep in range(args.reps):
        measure("hf", rep)
    llm = LLM(model=str(model_cache_dir("smollm2-135m-instruct")), dtype="bfloat16", max_model_len=512,
              max_num_seqs=256, seed=0, enforce_eager=args.eager,
              enable_chunked_prefill=False)  # vllm-cpu: seeded requests cannot survive a chunked prefill
    try:
        sampler = VllmSampler(llm, tok, special_token_ids(model, tok)[1])
        for rep in range(args.reps):
            measure("vllm", rep, sampler)
    finally:
        llm.llm_engine.engine_core.shutdown()
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"HF {med['hf']:.1f} tok/s, vLLM {med['vllm']:.1f} tok/s: {med['vllm'] / med['hf']:.2f}x")
    ops = _bench_ops()
    name = ops.device_name("cpu")
    out = HERE / "results" / f"bench_corpus_vllm_{ops.machine_slug(name)}.json"
    out.write_text(json.dumps({
        "benchmark": "bench_corpus_vllm",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": name, "threads": args.threads, "versions": {**ops.versions(), "vllm": vllm.__version__},
        "vllm_mode": "eager" if args.eager else "compiled (dynamo + inductor)",
        "corpus": "quick preset, 1 story per emotion (171 in one chunk), no neutral, <= 64 new tokens",
        "tok_per_s": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "tok_per_s_median": {k: round(v, 1) for k, v in med.items()},
        "vllm_over_hf": round(med["vllm"] / med["hf"], 3),
        "paper_preset_estimate_hours_this_machine": {
            k: round(PAPER_TOKENS / v / 3600, 1) for k, v in med.items()},
        "paper_preset_estimate_note": "upper bound of 61.9 M new tokens at the measured <= 64-token rates; 300-token "
                                      "outputs make each step slower, so an underestimate",
    }, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
