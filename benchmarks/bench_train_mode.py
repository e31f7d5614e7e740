"""Benchmark: does ``emokern.patch(..., train=True)`` cost anything when generating under ``torch.no_grad()``?

SmolLM2-135M-Instruct (bf16, batch 1, 32 greedy tokens), monitoring all 30 layers x 171 vectors and steering two
emotions at layer 19, patched with ``train=False`` and with ``train=True``; the two are interleaved rep by rep (the
order alternating), and the table gives the median tokens/s of each and their ratio. The generated tokens must be
identical. Needs the bank ``make demo`` leaves in ``emokern_out/bank/``. Writes
``benchmarks/results/bench_train_mode_<machine>.json``.
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
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import emokern
    from emokern.core.models import load_model

    model, tok = load_model("smollm2-135m-instruct", dtype=torch.bfloat16)
    bank = emokern.VectorBank.load("emokern_out/bank/smollm2-135m-instruct.json", model=model)
    ids = tok.apply_chat_template([{"role": "user", "content": "What should I cook tonight?"}],
                                  add_generation_prompt=True, return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    seconds, outputs = {False: [], True: []}, {}
    for rep in range(args.reps):
        for train in ((False, True) if rep % 2 else (True, False)):
            with emokern.patch(model, bank, train=train) as handle:
                handle.steer({"desperate": 0.05, "calm": -0.05}, layers=[19])
                with torch.no_grad():
                    t0 = time.perf_counter()
                    outputs[train] = model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                                    do_sample=False)
                    seconds[train].append(time.perf_counter() - t0)
    rate = {train: args.tokens / statistics.median(s) for train, s in seconds.items()}
    same = torch.equal(outputs[False], outputs[True])
    print(f"train=False {rate[False]:.1f} tok/s, train=True {rate[True]:.1f} tok/s, ratio "
          f"{rate[True] / rate[False]:.3f}; identical tokens: {same}")
    name = device_name("cpu")
    out = RESULTS / f"bench_train_mode_{machine_slug(name)}.json"
    out.write_text(json.dumps({
        "benchmark": "bench_train_mode", "device": name, "threads": torch.get_num_threads(), "versions": versions(),
        "reps": args.reps, "tokens": args.tokens, "tokens_per_second": {"train=False": rate[False],
                                                                        "train=True": rate[True]},
        "ratio": rate[True] / rate[False], "identical_tokens": same,
        "seconds": {"train=False": seconds[False], "train=True": seconds[True]},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
