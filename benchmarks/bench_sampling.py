"""Benchmark: corpus sampling with :func:`emokern.extraction.sampling.sample` against Hugging Face ``model.generate``.

Both sample the same batch of real story prompts (the ``opening`` style, left-padded) for exactly ``--tokens`` new
tokens (end-of-sequence disabled, so both do the same number of steps) with temperature 0.8 and top-p 0.95; ``generate``
runs with its default attention (SDPA) and with eager attention. Providers are interleaved rep by rep; the table gives
the median tokens/s over ``--reps`` and the ratio to ``generate`` measured in the same reps.

Writes ``benchmarks/results/bench_sampling_<machine>.json``.
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

from benchmarks.bench_ops import device_name, machine_slug, versions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from emokern.extraction.corpus import job_prompt
    from emokern.extraction.corpus_plan import load_topics, plan_chunks
    from emokern.core.emotions import load_emotions
    from emokern.core.models import load_model
    from emokern.extraction.sampling import attention, sample

    model, tok = load_model(args.model, dtype=torch.bfloat16)
    model.eval()
    jobs = [j for c in plan_chunks(load_emotions()[:args.batch], load_topics(), 1, 0, args.batch, 0, "opening")
            for j in c.jobs][:args.batch]
    encoded = [tok(job_prompt(tok, j, "chat"), add_special_tokens=False)["input_ids"] for j in jobs]
    width = max(map(len, encoded))
    ids = torch.full((len(encoded), width), tok.eos_token_id)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(encoded):
        ids[i, width - len(e):] = torch.tensor(e)
        mask[i, width - len(e):] = 1
    never = model.config.vocab_size + 7  # an end-of-sequence id that never comes: every row runs all the steps

    def hf(implementation):
        def run(seed):
            torch.manual_seed(seed)
            with attention(model, implementation), torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.8, top_p=0.95,
                                     top_k=0, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                     pad_token_id=tok.eos_token_id)
            return out.shape[1] - width
        return run

    def ours(seed):
        out, _ = sample(model, ids, mask, max_new_tokens=args.tokens, temperature=0.8, top_p=0.95, eos_ids=[never],
                        pad_id=tok.eos_token_id, seed=seed)
        return out.shape[1]

    providers = {"generate (sdpa)": hf("sdpa"), "generate (eager)": hf("eager"), "emokern.extraction.sampling.sample": ours}
    ours(0)  # warm-up
    rates = {name: [] for name in providers}
    for rep in range(args.reps):
        for name, run in providers.items():
            t0 = time.perf_counter()
            steps = run(rep)
            rates[name].append(args.batch * steps / (time.perf_counter() - t0))
    base = rates["generate (sdpa)"]
    rows = {name: {"tokens_per_s_median": statistics.median(r), "tokens_per_s": r,
                   "ratio_to_generate_median": statistics.median(x / b for x, b in zip(r, base))}
            for name, r in rates.items()}
    for name, row in rows.items():
        print(f"{name:26s} {row['tokens_per_s_median']:7.1f} tok/s   x{row['ratio_to_generate_median']:.2f} of "
              f"generate (sdpa)")
    result = {"benchmark": "bench_sampling", "model": args.model, "batch": args.batch, "new_tokens": args.tokens,
              "reps": args.reps, "machine": device_name("cpu"), "threads": torch.get_num_threads(),
              "versions": versions(), "dtype": "bfloat16", "providers": rows,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"bench_sampling_{machine_slug(device_name('cpu'))}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
