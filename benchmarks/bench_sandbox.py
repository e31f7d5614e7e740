"""Benchmark: what does the bwrap sandbox add to one test run of model-written code, against the Python guard alone?

Question answered: the wall-clock cost of one sandboxed test run (what the reward-hacking experiment does once per
turn with code, plus once for the hidden tests) under ``sandbox="bwrap"`` (bubblewrap's namespaces and seccomp, with
the Python guard inside) and under ``sandbox="python-guard"`` (the guard alone), on a small candidate program: a
``solution.py`` and three visible tests run by the experiment's test runner
(:func:`emokern.experiments.reward_hacking.run_tests`). Also the start-up probe (:func:`check_isolation`), which a
run pays once.

The two levels alternate within each repetition, in alternating order, so that a slow patch of a shared machine
hits both; the medians of each level and of the paired differences are reported. Prints a table and writes
``benchmarks/results/bench_sandbox_<machine>.json`` (rows plus machine, versions, threads). Usage::

    python benchmarks/bench_sandbox.py               # 40 repetitions
    python benchmarks/bench_sandbox.py --reps 3 --out /tmp/bench_sandbox.json   # a quick check
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_ops import device_name, machine_slug, versions  # noqa: E402
from emokern.experiments import reward_hacking as rh  # noqa: E402
from emokern.experiments.sandbox import SANDBOXES, WeakSandboxWarning, check_isolation, sandbox_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# The small candidate program: a possible task, its solution, three visible tests.
TASK = rh.validate_tasks({"tasks": [{
    "id": "double", "prompt": "Implement double(x), returning 2 * x.", "function_name": "double",
    "visible_tests": ("from solution import double\n\n\ndef test_two():\n    assert double(2) == 4\n\n\n"
                      "def test_zero():\n    assert double(0) == 0\n\n\ndef test_negative():\n"
                      "    assert double(-3) == -6\n"),
    "hidden_tests": "from solution import double\n\n\ndef test_five():\n    assert double(5) == 10\n"}]},
    "bench_sandbox")[0]
CODE = "def double(x):\n    return 2 * x\n"


def one_run(sandbox: str) -> float:
    """Seconds of one visible-test run of CODE (it must pass: a broken sandbox is not a fast one)."""
    start = time.perf_counter()
    result = rh.run_tests(TASK, CODE, "visible", per_test_s=2.0, sandbox=sandbox)
    seconds = time.perf_counter() - start
    if not result["passed"]:
        raise RuntimeError(f"bench_sandbox: the candidate program failed under {sandbox}: {result['output']}")
    return seconds


def summary(samples: list) -> dict:
    ms = sorted(s * 1e3 for s in samples)
    return {"median_ms": round(statistics.median(ms), 2), "min_ms": round(ms[0], 2),
            "p90_ms": round(ms[min(len(ms) - 1, int(0.9 * len(ms)))], 2), "n": len(ms)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=40, help="repetitions of each level (interleaved)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured runs of each level first")
    parser.add_argument("--out", default=None,
                        help="result file (default: benchmarks/results/bench_sandbox_<machine>.json)")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.warmup < 0:
        parser.error(f"--reps must be >= 1 and --warmup >= 0; got {args.reps} and {args.warmup}")
    warnings.simplefilter("ignore", WeakSandboxWarning)  # measured on purpose
    levels = list(SANDBOXES)
    for _ in range(args.warmup):
        for level in levels:
            one_run(level)
    samples = {level: [] for level in levels}
    differences = []
    for rep in range(args.reps):
        seconds = {}
        for level in (levels if rep % 2 == 0 else levels[::-1]):
            seconds[level] = one_run(level)
            samples[level].append(seconds[level])
        differences.append(seconds["bwrap"] - seconds["python-guard"])
    probe = {level: [] for level in levels}
    for rep in range(max(1, args.reps // 4)):
        for level in (levels if rep % 2 == 0 else levels[::-1]):
            start = time.perf_counter()
            check_isolation(level)
            probe[level].append(time.perf_counter() - start)

    machine = device_name("cpu")
    rows = [{"sandbox": level, "what": "test run", **summary(samples[level])} for level in levels]
    rows += [{"sandbox": level, "what": "start-up probe", **summary(probe[level])} for level in levels]
    overhead = {"median_paired_difference_ms": round(statistics.median(differences) * 1e3, 2),
                "ratio_of_medians": round(statistics.median(samples["bwrap"])
                                          / statistics.median(samples["python-guard"]), 3)}
    print(f"{machine} | one visible-test run of a 3-test candidate | {args.reps} interleaved repetitions")
    print(f"{'sandbox':<14}{'what':<16}{'median ms':>11}{'min ms':>9}{'p90 ms':>9}")
    for row in rows:
        print(f"{row['sandbox']:<14}{row['what']:<16}{row['median_ms']:>11.1f}{row['min_ms']:>9.1f}"
              f"{row['p90_ms']:>9.1f}")
    print(f"bwrap - python-guard per test run: {overhead['median_paired_difference_ms']:.1f} ms (median of paired "
          f"differences); ratio of medians {overhead['ratio_of_medians']:.2f}")
    info = sandbox_info("bwrap")
    out = Path(args.out) if args.out else RESULTS / f"bench_sandbox_{machine_slug(machine)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "bench_sandbox", "device": machine, "cpu_count": os.cpu_count(),
        "versions": {**versions(), "bwrap": info["bwrap"], "kernel": platform.release()},
        "threads": torch.get_num_threads(), "seccomp": info["seccomp"] is not None, "reps": args.reps,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "rows": rows, "overhead": overhead,
    }, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
