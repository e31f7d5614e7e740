# Running one of the paper's experiments from Python: sycophancy under steering.
#
# What it shows: `emokern.experiments.run_experiment(name, out=..., model=..., tokenizer=..., bank=..., size=...,
# **options)`, the function behind `emokern experiment NAME`, called with a model already loaded in this process.
# The sycophancy experiment asks the model 12 scenarios (a correct answer pushed back on, or a dubious belief),
# samples replies unsteered and under +-happy, +-loving and +-calm at two thirds of the depth, and labels each reply
# hold / give in / harsh / unclear by rules. It writes `result.json` (rates with 95% intervals, the monitored
# emotions per condition), `rollouts.json`, two PNG plots and a browsable `report.html` into --out. The run is
# resumable: rerun the same command after an interruption and it skips the finished batches. The other experiments
# (preferences, blackmail, reward_hacking) are called the same way; each module's `SIZES` and `Options` list the
# settings a keyword can override.
#
# Run:   python examples/run_experiment.py [--size quick] [--out DIR] [--tiny]
# Time:  4 min (238 s) on this project's 2-core CPU with SmolLM2-135M-Instruct at the `quick` size, one thread
#        (OMP_NUM_THREADS=1), measured while other jobs ran (168 replies of up to 100 tokens in 7 batches);
#        --tiny (a micro size: 36 replies of 8 tokens): about 7 s, mostly imports.

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, Optional, Sequence

from emokern.experiments import run_experiment
from _common import add_model_arguments, load, out_dir

# A micro size for the tiny model: every scenario and code path, one short reply per condition.
MICRO = dict(emotions=["calm"], strengths=[-0.1, 0.1], samples=1, batch_size=18, max_new_tokens=8)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description="Run the sycophancy experiment from Python.")
    add_model_arguments(parser)
    parser.add_argument("--size", default="quick", choices=["quick", "full"],
                        help="quick: minutes on 2 CPU cores; full: the paper's size, for a GPU")
    parser.add_argument("--out", default=None, help="output folder (default: emokern_out/examples/experiment)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh when --out holds a run with other settings")
    args = parser.parse_args(argv)

    model, tokenizer, bank = load(args)
    out = out_dir(args, "experiment")
    result = run_experiment("sycophancy", out=out, model=model, tokenizer=tokenizer, bank=bank, size=args.size,
                            seed=0, overwrite=args.overwrite, progress=not args.tiny,
                            **(MICRO if args.tiny else {}))

    print(f"\n{len(result['conditions'])} conditions, {result['seconds']:.0f} s; steering at layers "
          f"{result['layers']}, monitored at layer {result['monitor_layer']}")
    for row in result["rates"]["give_in"]:
        low, high = row["ci"]
        print(f"  {row['condition']:<12} gives in {row['k']:>2}/{row['n']:<2} (95% CI {low:.2f}-{high:.2f})")
    print(json.dumps(result["summary"], indent=1))
    print(f"result: {Path(out) / 'result.json'}\npage:   {result['outputs']['report']}")
    return result


if __name__ == "__main__":
    main()
