"""Benchmark: the op at monitoring and decode sizes against the bare PyTorch it replaces, interleaved.

Two comparisons per shape (N tokens, d hidden size, K = 171 vectors), each in fp32 and bf16:

* **monitor**: the registered op ``torch.ops.emokern.project(h, V, P)`` (the projections, fp32 ``P``; what the
  patch and the vLLM plugin call) against a bare ``torch.mm(h, V.T, out=Q)`` in the same dtype as ``h`` (what a user
  would write to read K directions: no cast, no copy); ``api_us``: the public ``emokern.ops.project`` with its
  Python-side argument checks (``validate=False``), timed in the same interleaving;
* **ablate** / **clamp**: the registered ``project_and_steer_`` ablating (clamping to [-0.5, 0.5]) all K vectors of every token in
  place, against the same maths in unfused PyTorch (:func:`benchmarks.bench_ops.unfused`); ``pct_of_floor`` is the
  share of the memory floor reached: the bytes of one read and one write of h (plus V once and P once), at the
  copy bandwidth measured in the same run, over the op's time.
* **steer2** (monitor + 2 steered, what the patch runs at a steered site): the one call the patch makes on the CPU
  kernel, ``project_and_steer_(h, V, row, a, b, lo, hi, P)`` over all K with full-width tables (two vectors get
  ``add 1e-3``, the rest the identity), against the two calls it made before: ``project(h, V, P)`` then
  ``project_and_steer_(h, Vs, row, ...)`` on the 4 steering slots (the two vectors and two zero rows, as the
  patch's slot buffers hold them). ``torch_us`` is then the two calls' time and ``ratio`` the speed-up.

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

from benchmarks.bench_ops import device_name, machine_slug, make_inputs, unfused, versions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = [(1, 576), (16, 576), (64, 576), (512, 576), (4096, 576), (1, 2048), (16, 2048), (64, 2048), (512, 2048),
          (4096, 2048)]
K = 171


def interleaved(calls, samples: int, target_s: float = 2e-3, clock=time.perf_counter):
    """Median seconds per call of each of ``calls``, sampled in turn (one loop of ``inner`` calls per sample)."""
    for fn in calls:  # warm-up, and the loop length from the slowest provider
        fn()
    t0 = clock()
    for fn in calls:
        fn()
    per_round = clock() - t0
    inner = max(1, int(target_s * len(calls) / max(per_round, 1e-9)))
    times = [[] for _ in calls]
    for _ in range(samples):
        for i, fn in enumerate(calls):
            t0 = clock()
            for _ in range(inner):
                fn()
            times[i].append((clock() - t0) / inner)
    return [statistics.median(t) for t in times], inner


def copy_bandwidth(clock) -> float:
    """Bytes read + written per second by ``dst.copy_(src)`` on 64 MB, median of 10, timed with ``clock``."""
    src = torch.randn(16 << 20)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = []
    for _ in range(10):
        t0 = clock()
        dst.copy_(src)
        seconds.append(clock() - t0)
    return 2 * src.numel() * 4 / statistics.median(seconds) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--label", default="", help="a note stored with the results (e.g. the build)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: the calling thread's CPU time with one intra-op thread, which time spent "
                             "descheduled does not inflate (for a machine other jobs are using)")
    args = parser.parse_args()
    if args.clock == "cpu":
        args.threads = 1  # thread CPU time counts only this thread's work
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter

    from emokern.ops.api import SteeringTable, project

    rows = []
    bandwidth = copy_bandwidth(clock)  # GB/s, read + write, at the intra-op threads and clock of this run
    print(f"copy bandwidth {bandwidth:.1f} GB/s")
    print(f"{'dtype':<9}{'mode':<9}{'N':>6}{'d':>6}{'emokern us':>12}{'torch us':>10}{'ratio':>8}")
    for dtype in (torch.float32, torch.bfloat16):
        for N, d in SHAPES:
            for mode in ("monitor", "ablate", "clamp", "steer2"):
                h, V, row, table, P = make_inputs(N, d, K, dtype, "cpu", "identity" if mode == "steer2" else mode)
                extra = []
                if mode == "steer2":
                    steered = [3, 57]  # bank indices of the two steered vectors
                    table = tuple(table.add(0, steered, 1e-3))  # tuples, as the patch passes its tables
                    slots = tuple(SteeringTable(1, 4).add(0, [0, 1], 1e-3))
                    Vs = torch.zeros(4, d, dtype=dtype)
                    Vs[:2] = V[steered]
                    P_slots = torch.empty(N, 4)

                    def ours():
                        torch.ops.emokern.project_and_steer_(h, V, row, *table, P)

                    def theirs():
                        torch.ops.emokern.project(h, V, P)
                        torch.ops.emokern.project_and_steer_(h, Vs, row, *slots, P_slots)
                elif mode == "monitor":
                    Q = torch.empty(N, K, dtype=dtype)
                    ours = lambda: torch.ops.emokern.project(h, V, P)  # noqa: E731
                    theirs = lambda: torch.mm(h, V.T, out=Q)  # noqa: E731
                    extra = [lambda: project(h, V, P_out=P, backend="cpu", validate=False)]
                else:
                    h2 = h.clone()
                    ours = lambda: torch.ops.emokern.project_and_steer_(h, V, row, *table, P)  # noqa: E731
                    theirs = lambda: unfused(h2, V, row, table, P)  # noqa: E731
                (a, b, *api), inner = interleaved([ours, theirs] + extra, args.samples, clock=clock)
                rows.append({"dtype": str(dtype).replace("torch.", ""), "mode": mode, "N": N, "d": d, "K": K,
                             "emokern_us": round(a * 1e6, 3), "torch_us": round(b * 1e6, 3),
                             "ratio": round(b / a, 3), "calls_per_sample": inner})
                if api:
                    rows[-1]["api_us"] = round(api[0] * 1e6, 3)
                if mode in ("ablate", "clamp"):
                    elem = h.element_size()
                    floor_s = (2 * N * d * elem + K * d * elem + N * K * 4) / (bandwidth * 1e9)
                    rows[-1]["pct_of_floor"] = round(100 * floor_s / a, 1)
                r = rows[-1]
                print(f"{r['dtype']:<9}{mode:<9}{N:>6}{d:>6}{r['emokern_us']:>12.1f}{r['torch_us']:>10.1f}"
                      f"{r['ratio']:>8.2f}" + (f"{r['pct_of_floor']:>8.1f}%" if "pct_of_floor" in r else ""), flush=True)
    name = device_name("cpu")
    out = args.out or RESULTS / f"bench_monitor_{machine_slug(name)}{'_cpu_clock' if args.clock == 'cpu' else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "bench_monitor", "device": name, "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "label": args.label, "versions": versions(),
        "copy_bandwidth_GB_per_s": round(bandwidth, 1),
        "samples": args.samples, "clock": args.clock, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
