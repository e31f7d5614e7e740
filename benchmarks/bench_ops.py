"""Benchmark of the fused project-and-steer op against unfused PyTorch, per backend.

Question answered: how long does one call take, how close is it to the memory-bandwidth floor of one read and one
write of h, and how does it compare with the same math in plain PyTorch (``h @ V.T``, elementwise, ``addmm_``)
measured in the same run?

Prints a table and writes ``benchmarks/results/bench_ops_<machine>.json`` (rows plus device name and library
versions). Usage::

    python benchmarks/bench_ops.py                 # CPU shapes on CPU; GPU shapes too when CUDA is available
    python benchmarks/bench_ops.py --quick         # fewer shapes and repetitions
    python benchmarks/bench_ops.py --device cuda --dtype bfloat16

The floor is bytes moved / copy bandwidth, with the copy bandwidth measured in the same run (``dst.copy_(src)``
on a 256 MiB buffer). Bytes moved: read h, write h when tokens are steered, read V, write P.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import emokern  # noqa: E402
from emokern.ops import SteeringTable, project_and_steer_  # noqa: E402
from emokern.ops.extension import HAS_CPU_KERNELS, HAS_CUDA_KERNELS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'} ({torch.get_num_threads()} threads)"


def machine_slug(name: str) -> str:
    """A file-name-safe short form of a device name: 'Intel(R) Xeon(R) Processor (2 threads)' -> 'Intel_Xeon_Processor'."""
    base = re.sub(r"\((R|TM|\d+ threads)\)", "", name)
    return re.sub(r"[^A-Za-z0-9]+", "_", base).strip("_")[:48]


def versions() -> dict:
    out = {"torch": torch.__version__, "emokern": emokern.__version__, "python": platform.python_version()}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


def timer(device: str, fn, *, reps: int, warmup: int, graph: bool = False) -> float:
    """Median microseconds per call. ``graph``: capture ``reps`` calls in one CUDA graph and replay it."""
    for _ in range(warmup):
        fn()
    if device == "cpu":
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(samples)
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
            with torch.cuda.graph(g, stream=stream):
                for _ in range(20):
                    fn()
        torch.cuda.current_stream().wait_stream(stream)
        samples = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.replay()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) * 1e3 / 20)
        return statistics.median(samples)
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) * 1e3)
    return statistics.median(samples)


def copy_bandwidth(device: str) -> float:
    """Measured copy bandwidth in GB/s (bytes read + bytes written per second)."""
    n = (256 << 20) // 4 if device == "cuda" else (64 << 20) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    us = timer(device, lambda: dst.copy_(src), reps=20, warmup=3)
    return 2 * src.numel() * 4 / (us * 1e-6) / 1e9


def make_inputs(N, d, K, dtype, device, mode):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, d, generator=g).to(device=device, dtype=dtype)
    V = torch.randn(K, d, generator=g)
    V = (V / V.norm(dim=1, keepdim=True)).to(device=device, dtype=dtype)
    table = SteeringTable(1, K, device=device)
    if mode == "ablate":
        table.ablate(0, slice(None))
    elif mode == "clamp":
        table.clamp(0, slice(None), -0.5, 0.5)
    row = torch.zeros(N, dtype=torch.int32, device=device)
    if mode == "monitor":
        row.fill_(-1)
    P = torch.empty(N, K, device=device)
    return h, V, row, table, P


def unfused(h, V, row, table, P_out, monitor_only=False):
    """The same math in plain PyTorch, the way a user would write it (monitoring: the projection alone)."""
    P = h @ V.T
    if monitor_only:
        P_out.copy_(P)
        return
    r = row.clamp(min=0).long()
    a, b, lo, hi = (t[r] for t in table)
    q = torch.clamp(a + b * P, lo, hi)
    delta = torch.where((row >= 0)[:, None], q - P, torch.zeros_like(P))
    h.addmm_(delta.to(h.dtype), V)
    P_out.copy_(P)


def shapes(device: str, quick: bool):
    if device == "cpu":
        target = [(4096, 576, 171), (4096, 2048, 171)]
        small = [(1, 576, 171), (16, 576, 171), (64, 640, 171), (512, 640, 171)]
        return target if quick else target + small + [(4096, 576, 8), (8192, 4096, 171)]
    prefill = [(8192, 4096, 171), (8192, 4096, 8)]
    decode = [(1, 4096, 171), (8, 4096, 171), (32, 4096, 171), (64, 4096, 171)]
    return prefill + decode if not quick else prefill[:1] + decode[:1]


def providers(device: str):
    out = [("unfused_pytorch", unfused)]
    backends = []
    if device == "cpu" and HAS_CPU_KERNELS:
        backends.append("cpu")
    if device == "cuda":
        if HAS_CUDA_KERNELS:
            backends.append("cuda")
        try:
            import triton  # noqa: F401

            backends.append("triton")
        except ImportError:
            pass
    for backend in backends:
        def run(h, V, row, table, P, backend=backend):
            project_and_steer_(h, V, row, *table, P_out=P, backend=backend, validate=False)

        out.append((f"emokern_{backend}", run))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--dtype", action="append", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--modes", default="ablate,clamp,monitor")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write (default: benchmarks/results/)")
    args = parser.parse_args(argv)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    modes = args.modes.split(",")
    rows = []
    for device in devices:
        dtypes = args.dtype or (["float32", "bfloat16"] if device == "cpu" else ["bfloat16"])
        bw = copy_bandwidth(device)
        name = device_name(device)
        print(f"\n{name}: measured copy bandwidth {bw:.1f} GB/s")
        print(f"{'provider':<18}{'dtype':<10}{'mode':<9}{'N':>6}{'d':>6}{'K':>5}{'median us':>12}{'GB/s':>9}"
              f"{'% floor':>9}{'vs unfused':>11}")
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            for N, d, K in shapes(device, args.quick):
                for mode in modes:
                    base_us = None
                    big = N * d * K > 2e9
                    reps = 3 if big else (10 if args.quick else 30)
                    for provider, fn in providers(device):
                        h, V, row, table, P = make_inputs(N, d, K, dtype, device, mode)
                        graph = device == "cuda" and N <= 64 and provider != "unfused_pytorch"
                        if provider == "unfused_pytorch":
                            call = lambda: fn(h, V, row, table, P, monitor_only=(mode == "monitor"))  # noqa: E731
                        else:
                            call = lambda: fn(h, V, row, table, P)  # noqa: E731
                        us = timer(device, call, reps=reps, warmup=1 if big else 3, graph=graph)
                        elem = h.element_size()
                        nbytes = N * d * elem * (1 if mode == "monitor" else 2) + K * d * elem + N * K * 4
                        gbs = nbytes / (us * 1e-6) / 1e9
                        if provider == "unfused_pytorch":
                            base_us = us
                        row_out = {
                            "device": name, "provider": provider, "dtype": dtype_name, "mode": mode, "N": N, "d": d,
                            "K": K, "median_us": round(us, 2), "GB_per_s": round(gbs, 1),
                            "pct_of_floor": round(100 * (nbytes / (bw * 1e9) * 1e6) / us, 1),
                            "speedup_vs_unfused": round(base_us / us, 3), "cuda_graph": graph,
                        }
                        rows.append(row_out)
                        print(f"{provider:<18}{dtype_name:<10}{mode:<9}{N:>6}{d:>6}{K:>5}{us:>12.1f}{gbs:>9.1f}"
                              f"{row_out['pct_of_floor']:>9.1f}{row_out['speedup_vs_unfused']:>11.2f}")
        machine = machine_slug(name)
        out = args.out or RESULTS / f"bench_ops_{device}_{machine}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "benchmark": "bench_ops", "device": name, "copy_bandwidth_GB_per_s": round(bw, 1),
            "versions": versions(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "threads": torch.get_num_threads(), "rows": [r for r in rows if r["device"] == name],
        }, indent=1))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
