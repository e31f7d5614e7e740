"""Benchmark: the op at monitoring and decode sizes against the bare PyTorch it replaces, interleaved.

Two comparisons per shape (N tokens, d hidden size, K = 171 vectors), each in fp32 and bf16:

* **monitor**: ``emokern.project(h, V, P_out=P)`` (the projections, fp32 ``P``) against a bare ``torch.mm(h, V.T,
  out=Q)`` in the same dtype as ``h`` (what a user would write to read K directions: no cast, no copy);
* **ablate** / **clamp**: ``project_and_steer_`` ablating (clamping to [-0.5, 0.5]) all K vectors of every token in
  place, against the same maths in unfused PyTorch (:func:`benchmarks.bench_ops.unfused`); ``pct_of_floor`` is the
  share of the memory floor reached: the bytes of one read and one write of h (plus V once and P once), at the
  copy bandwidth measured in the same run, over the op's time.

Each provider gets the same V tensor on every call, as the patch does, so the kernel's packing of V is made once (in
the warm-up) and reused (csrc/cpu/pack_cache.h). Providers are interleaved sample by sample (A, B, A, B, ...), each sample timing a loop of calls long enough
(about 2 ms) for the clock; the table gives each provider's median microseconds per call and the ratio of the
medians (> 1: emokern is faster). This machine is shared, so only ratios measured side by side mean anything.

Writes ``benchmarks/results/bench_monitor_<machine>.json`` (machine, versions, threads, the CPU capability ATen
reports, every row).
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

from benchmarks.bench_ops import copy_bandwidth, device_name, machine_slug, make_inputs, unfused, versions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = [(1, 576), (16, 576), (64, 576), (512, 576), (4096, 576), (1, 2048), (16, 2048), (64, 2048), (512, 2048),
          (4096, 2048)]
K = 171


def interleaved(calls, samples: int, target_s: float = 2e-3):
    """Median seconds per call of each of ``calls``, sampled in turn (one loop of ``inner`` calls per sample)."""
    for fn in calls:  # warm-up, and the loop length from the slowest provider
        fn()
    t0 = time.perf_counter()
    for fn in calls:
        fn()
    per_round = time.perf_counter() - t0
    inner = max(1, int(target_s * len(calls) / max(per_round, 1e-9)))
    times = [[] for _ in calls]
    for _ in range(samples):
        for i, fn in enumerate(calls):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[i].append((time.perf_counter() - t0) / inner)
    return [statistics.median(t) for t in times], inner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--label", default="", help="a note stored with the results (e.g. the build)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from emokern.ops.api import project, project_and_steer_

    rows = []
    bandwidth = copy_bandwidth("cpu")  # GB/s, read + write
    print(f"copy bandwidth {bandwidth:.1f} GB/s")
    print(f"{'dtype':<9}{'mode':<9}{'N':>6}{'d':>6}{'emokern us':>12}{'torch us':>10}{'ratio':>8}")
    for dtype in (torch.float32, torch.bfloat16):
        for N, d in SHAPES:
            for mode in ("monitor", "ablate", "clamp"):
                h, V, row, table, P = make_inputs(N, d, K, dtype, "cpu", mode)
                if mode == "monitor":
                    Q = torch.empty(N, K, dtype=dtype)
                    ours = lambda: project(h, V, P_out=P, backend="cpu", validate=False)  # noqa: E731
                    theirs = lambda: torch.mm(h, V.T, out=Q)  # noqa: E731
                else:
                    h2 = h.clone()
                    ours = lambda: project_and_steer_(h, V, row, *table, P_out=P, backend="cpu",  # noqa: E731
                                                      validate=False)
                    theirs = lambda: unfused(h2, V, row, table, P)  # noqa: E731
                (a, b), inner = interleaved([ours, theirs], args.samples)
                rows.append({"dtype": str(dtype).replace("torch.", ""), "mode": mode, "N": N, "d": d, "K": K,
                             "emokern_us": round(a * 1e6, 3), "torch_us": round(b * 1e6, 3),
                             "ratio": round(b / a, 3), "calls_per_sample": inner})
                if mode != "monitor":
                    elem = h.element_size()
                    floor_s = (2 * N * d * elem + K * d * elem + N * K * 4) / (bandwidth * 1e9)
                    rows[-1]["pct_of_floor"] = round(100 * floor_s / a, 1)
                r = rows[-1]
                print(f"{r['dtype']:<9}{mode:<9}{N:>6}{d:>6}{r['emokern_us']:>12.1f}{r['torch_us']:>10.1f}"
                      f"{r['ratio']:>8.2f}" + (f"{r['pct_of_floor']:>8.1f}%" if "pct_of_floor" in r else ""), flush=True)
    name = device_name("cpu")
    out = args.out or RESULTS / f"bench_monitor_{machine_slug(name)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "bench_monitor", "device": name, "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "label": args.label, "versions": versions(),
        "copy_bandwidth_GB_per_s": round(bandwidth, 1),
        "samples": args.samples, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
