"""The ``emokern`` command line (console script ``emokern``, also ``python -m emokern``).

Subcommands live in :data:`COMMANDS`. To add one, decorate a function ``run(args) -> int`` with :func:`command`,
giving its name, one-line help and a function that adds its arguments to its subparser::

    @command("find", help="find emotion vectors", arguments=_find_arguments)
    def _find(args) -> int:
        ...

Each command imports what it needs inside ``run`` so that ``emokern --help`` and light commands stay fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Callable, Sequence

__all__ = ["COMMANDS", "Command", "build_parser", "command", "main"]


@dataclasses.dataclass(frozen=True)
class Command:
    """A subcommand: ``name`` on the command line, ``help`` in the listing, ``arguments(parser)`` adds its options,
    ``run(args)`` does the work and returns the exit status."""

    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    arguments: Callable[[argparse.ArgumentParser], None] | None = None


COMMANDS: dict[str, Command] = {}


def command(name: str, *, help: str, arguments: Callable[[argparse.ArgumentParser], None] | None = None):
    """Decorator registering ``run(args) -> int`` as subcommand ``name`` in :data:`COMMANDS`."""

    def register(run: Callable[[argparse.Namespace], int]):
        if name in COMMANDS:
            raise ValueError(f"command: name {name!r} is already registered")
        COMMANDS[name] = Command(name=name, help=help, run=run, arguments=arguments)
        return run

    return register


def _human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _models_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", default=None,
                        help="cache root to inspect (default: $EMOKERN_CACHE, else ~/.cache/emokern/models)")
    parser.add_argument("--json", action="store_true", help="print list_models() as JSON instead of a table")


@command("models", help="list the embedded offline models: installed, cached, sizes, licences",
         arguments=_models_arguments)
def _models(args: argparse.Namespace) -> int:
    from emokern.core.models import cache_root, list_models

    rows = list_models(cache_dir=args.cache_dir)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ["NAME", "DEFAULT", "INSTALLED", "GGUF", "CACHED", "CACHE", "LICENCE"]
    table = [header] + [
        [r["name"], "*" if r["default"] else "", "yes" if r["installed"] else "no", _human_bytes(r["gguf_bytes"]),
         "yes" if r["cached"] else "no", _human_bytes(r["cache_bytes"]), r["licence"]]
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print(f"\ncache root: {cache_root(args.cache_dir)}")
    for r in rows:
        if not r["installed"] and not r["cached"]:
            print(f"install {r['name']}: {r['install']}")
    return 0


def _report_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``emokern report``: ``BANK [--model NAME_OR_PATH] [--out DIR] [--layer N] [--limit N]
    [--batch-size N] [--scenarios FILE] [--intensity FILE] [--steering-prompts FILE]``."""
    parser.add_argument("bank", metavar="BANK", help="the vector bank: NAME, NAME.json or NAME.safetensors")
    parser.add_argument("--model", default=None, metavar="NAME_OR_PATH",
                        help="model to load with emokern.core.models.load_model (default: the bank's model_id if it is an "
                             "embedded model name, else the default embedded model)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output folder (default: NAME_report beside the bank's files)")
    parser.add_argument("--layer", type=int, default=None, metavar="N",
                        help="decoder layer to report on (default: the bank's default layer, else ~2/3 depth)")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="evaluate only the first N GoEmotions comments and N EmoBank sentences (default: all)")
    parser.add_argument("--batch-size", type=int, default=32, metavar="N", help="texts per forward pass (default: 32)")
    parser.add_argument("--scenarios", default=None, metavar="FILE.json",
                        help="implicit scenarios replacing emokern/data/validation/implicit_scenarios.json "
                             "(same shape: see emokern.validation.concept_checks)")
    parser.add_argument("--intensity", default=None, metavar="FILE.json",
                        help="intensity templates replacing emokern/data/validation/intensity_templates.json")
    parser.add_argument("--steering-prompts", default=None, metavar="FILE.json",
                        help="steering sanity prompts replacing emokern/data/validation/steering_sanity.json")


@command("report", help="validation report for a bank: accuracy, geometry, logit lens, external text, implicit "
                        "scenarios, intensity, steering sanity (JSON, PNG, HTML)", arguments=_report_arguments)
def _report(args: argparse.Namespace) -> int:
    """Run ``emokern report``: load the bank and its model, write the report, print its headline numbers and where
    it is; returns 0."""
    from pathlib import Path

    from emokern.core.bank import VectorBank, bank_paths
    from emokern.core.models import DEFAULT_MODEL, REGISTRY, load_model
    from emokern.validation.concept_checks import summary_line
    from emokern.validation.html import format_number
    from emokern.validation.report import validation_report

    bank = VectorBank.load(args.bank)
    name = args.model or (bank.model_id if bank.model_id in REGISTRY else DEFAULT_MODEL)
    model, tokenizer = load_model(name)
    meta_path = bank_paths(args.bank)[1]
    out_dir = Path(args.out) if args.out else meta_path.with_name(meta_path.stem + "_report")
    report = validation_report(bank, model, tokenizer, out_dir, layer=args.layer, goemotions_limit=args.limit,
                               emobank_limit=args.limit, batch_size=args.batch_size, scenarios=args.scenarios,
                               intensity=args.intensity, steering_prompts=args.steering_prompts)
    g = report["geometry"]
    print(f"layer {report['layer']['index']}: PC1 {format_number(g['variance_explained']['pc1'])} / PC2 "
          f"{format_number(g['variance_explained']['pc2'])} of variance; PC1~valence r = "
          f"{format_number(g['pc1_valence']['r'])}, PC2~arousal r = {format_number(g['pc2_arousal']['r'])}; "
          f"GoEmotions mean AUROC {format_number(report['goemotions']['mean_auroc'])}; EmoBank valence r = "
          f"{format_number(report['emobank']['r'])}")
    print(summary_line(report))
    print(f"report: {out_dir / 'report.html'}")
    return 0


def _dtype(name: str):
    import torch

    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in choices:
        raise argparse.ArgumentTypeError(f"--dtype must be one of {sorted(choices)}; got {name!r}")
    return choices[name]


def _reading_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--first-token", type=int, default=None,
                        help="average activations from this story token on (default: the corpus style's)")
    parser.add_argument("--exclude", choices=["none", "opening", "opening+word"], default=None,
                        help="left out of each story's mean: the opening written for the model and/or the emotion "
                             "word (default: the corpus style's)")
    parser.add_argument("--exclude-after", type=int, default=None, help="tokens after each excluded span also left out")
    parser.add_argument("--format", dest="fmt", choices=["chat", "raw"], default="chat")


def _extract_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct", help="embedded model name, checkpoint dir or hub id")
    parser.add_argument("--out", default="emokern_out", help="output folder (corpus/ and bank/ inside; resumable)")
    parser.add_argument("--preset", default="standard", help="corpus preset: standard, quick, base, mini or paper")
    parser.add_argument("--emotions", default=None, help="comma-separated emotions (default: the preset's)")
    parser.add_argument("--stories-per-emotion", type=int, default=None)
    _reading_arguments(parser)
    parser.add_argument("--dtype", type=_dtype, default="bfloat16")
    parser.add_argument("--regenerate", action="store_true",
                        help="generate the corpus here even where the package ships one (takes much longer)")
    parser.add_argument("--overwrite", action="store_true", help="restart the corpus even if --out holds another one")


@command("extract", help="get the story corpus (shipped, or generated: resumable) and build the emotion-vector bank",
         arguments=_extract_arguments)
def _extract(args: argparse.Namespace) -> int:
    from emokern.pipeline import extract

    emotions = [e.strip() for e in args.emotions.split(",")] if args.emotions else None
    path = extract(args.model, args.out, preset=args.preset, dtype=args.dtype, emotions=emotions,
                   stories_per_emotion=args.stories_per_emotion, first_token=args.first_token, exclude=args.exclude,
                   exclude_after=args.exclude_after, fmt=args.fmt, regenerate=args.regenerate,
                   overwrite=args.overwrite)
    print(path)
    return 0


def _corpus_arguments(parser: argparse.ArgumentParser) -> None:
    from emokern.extraction.prompts import STYLES

    parser.add_argument("--model", default="smollm2-135m-instruct", help="embedded model name, checkpoint dir or hub id")
    parser.add_argument("--out", default="emokern_out/corpus", help="corpus directory (resumable)")
    parser.add_argument("--preset", default="standard", help="corpus preset: standard, quick, base, mini or paper")
    parser.add_argument("--emotions", default=None, help="comma-separated emotions (default: the preset's)")
    parser.add_argument("--stories-per-emotion", type=int, default=None)
    parser.add_argument("--neutral", type=int, default=None, help="neutral dialogues (default: the preset's)")
    parser.add_argument("--style", choices=sorted(STYLES), default=None, help="story style (default: the preset's)")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--prompt-format", choices=["chat", "plain"], default=None,
                        help="chat template (default) or plain text (base models)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", type=_dtype, default="bfloat16")
    parser.add_argument("--pack", default=None, metavar="FILE.jsonl.gz",
                        help="when the corpus is complete, also pack it into one file (what the package ships)")
    parser.add_argument("--overwrite", action="store_true", help="replace a corpus of another configuration in --out")
    parser.add_argument("--engine", choices=["hf", "vllm"], default="hf",
                        help="sampling engine: hf (emokern.extraction.sampling on transformers, default) or vllm (needs the "
                             "vLLM environment: make vllm-env); a corpus is resumed only by the engine that began it")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="--engine vllm: GPUs per model replica")
    parser.add_argument("--data-parallel-size", type=int, default=1, help="--engine vllm: model replicas")


def _vllm_sampler(args: argparse.Namespace, model, tok):
    """The vLLM engine of ``emokern corpus --engine vllm`` on the same weights as ``model``."""
    from pathlib import Path

    from vllm import LLM

    from emokern.extraction.corpus import special_token_ids
    from emokern.core.models import REGISTRY, model_cache_dir
    from emokern.engines.vllm.sampler import VllmSampler

    from vllm.platforms import current_platform

    path = str(model_cache_dir(args.model)) if args.model in REGISTRY else str(Path(args.model).expanduser())
    llm = LLM(model=path, dtype=str(args.dtype).replace("torch.", ""), seed=args.seed,
              tensor_parallel_size=args.tensor_parallel_size, data_parallel_size=args.data_parallel_size,
              enable_chunked_prefill=not current_platform.is_cpu())  # see VllmSampler: seeded requests on CPU
    return VllmSampler(llm, tok, special_token_ids(model, tok)[1])


@command("corpus", help="generate a story corpus with the model itself (resumable; --pack: one shippable file)",
         arguments=_corpus_arguments)
def _corpus(args: argparse.Namespace) -> int:
    from emokern.extraction.corpus import generate_corpus
    from emokern.core.models import load_model
    from emokern.extraction.shipped_corpora import pack_corpus

    model, tok = load_model(args.model, dtype=args.dtype)
    model.eval()
    emotions = [e.strip() for e in args.emotions.split(",")] if args.emotions else None
    sampler = _vllm_sampler(args, model, tok) if args.engine == "vllm" else None
    try:
        corpus = generate_corpus(model, tok, args.out, preset=args.preset, emotions=emotions,
                                 stories_per_emotion=args.stories_per_emotion, neutral=args.neutral, style=args.style,
                                 max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                 prompt_format=args.prompt_format, seed=args.seed, overwrite=args.overwrite,
                                 sampler=sampler)
    finally:
        if sampler is not None:  # a vLLM engine left running keeps busy-polling worker processes alive
            sampler.llm.llm_engine.engine_core.shutdown()
    stats = corpus.stats()
    print(json.dumps({"out": str(args.out), **stats["totals"], **stats["timings"]}, indent=1))
    if args.pack:
        print(f"packed: {pack_corpus(args.out, args.pack)}")
    return 0


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--out", default="emokern_out")
    parser.add_argument("--preset", default="standard")
    parser.add_argument("--regenerate", action="store_true",
                        help="generate the corpus here instead of using the one the package ships (much longer)")
    parser.add_argument("--strength", type=float, default=0.25,
                        help="steering strength at the default layer, as a fraction of its mean residual norm")
    parser.add_argument("--dtype", type=_dtype, default="bfloat16")


@command("demo", help="the main job: corpus, bank, report, a monitored generation and steered ones",
         arguments=_demo_arguments)
def _demo(args: argparse.Namespace) -> int:
    from emokern.pipeline import demo

    demo(args.out, model_name=args.model, preset=args.preset, strength=args.strength, dtype=args.dtype,
         regenerate=args.regenerate)
    return 0


def _experiment_arguments(parser: argparse.ArgumentParser) -> None:
    from emokern.experiments import EXPERIMENTS, load_experiment

    sub = parser.add_subparsers(dest="experiment", metavar="NAME")
    for name in EXPERIMENTS:
        module = load_experiment(name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        p.add_argument("--model", default="smollm2-135m-instruct",
                       help="embedded model name, checkpoint dir or hub id (default: the embedded SmolLM2)")
        p.add_argument("--bank", default=None,
                       help="bank JSON (default: emokern_out/bank/<model>.json, where `emokern extract` puts it)")
        p.add_argument("--out", default=None, help=f"output folder, resumable (default: emokern_out/experiments/{name})")
        p.add_argument("--size", default="quick", choices=sorted(module.SIZES),
                       help="quick: minutes on 2 CPU cores with the embedded model; full: the paper's size")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--judge", default=None, help="optional judge: a chat model name or path (default: rules only)")
        p.add_argument("--dtype", type=_dtype, default="bfloat16")
        p.add_argument("--device", default=None, help="where the model runs (default: cuda when available, else cpu)")
        p.add_argument("--overwrite", action="store_true", help="discard finished work in --out and start afresh")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        module.add_arguments(p)


_COMMON_EXPERIMENT_ARGS = {"command", "experiment", "model", "bank", "out", "size", "seed", "judge", "dtype",
                           "device", "overwrite", "no_progress"}


@command("experiment", help="run one of the paper's experiments: preferences, blackmail, reward_hacking, sycophancy",
         arguments=_experiment_arguments)
def _experiment(args: argparse.Namespace) -> int:
    from emokern.experiments import run_experiment

    if args.experiment is None:
        print("emokern experiment: give a NAME (see `emokern experiment --help`)", file=sys.stderr)
        return 2
    options = {k: v for k, v in vars(args).items() if k not in _COMMON_EXPERIMENT_ARGS and v is not None}
    out = args.out or f"emokern_out/experiments/{args.experiment}"
    result = run_experiment(args.experiment, out=out, model=args.model, bank=args.bank, size=args.size,
                            seed=args.seed, judge=args.judge, dtype=args.dtype, device=args.device,
                            overwrite=args.overwrite,
                            progress=not args.no_progress, **options)
    print(json.dumps(result.get("summary", {}), indent=1))
    print(f"results: {out}/result.json, page: {out}/report.html")
    return 0


def _ui_arguments(parser: argparse.ArgumentParser) -> None:
    from emokern.ui.cli import add_arguments

    add_arguments(parser)


@command("ui", help="a local web page: chat with the model, watch each token's emotions, steer with sliders",
         arguments=_ui_arguments)
def _ui(args: argparse.Namespace) -> int:
    from emokern.ui.cli import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per entry of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(prog="emokern", description="Find, read and steer emotion vectors in LMs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        if cmd.arguments is not None:
            cmd.arguments(p)
    return parser


def _refusals() -> tuple:
    """The exception types :func:`main` reports as one line. The sandbox's is taken from ``sys.modules``: when it
    was raised its module is loaded, and otherwise importing it (and torch with the package) would only slow down
    commands that never use it."""
    sandbox = sys.modules.get("emokern.experiments.sandbox")
    return (ValueError, KeyError, FileNotFoundError) + ((sandbox.SandboxUnavailable,) if sandbox else ())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    No subcommand prints the help to stderr and returns 2, like an argparse usage error. Bad input that a command
    refuses (``ValueError``, ``KeyError``, ``FileNotFoundError``: a missing bank, an unknown emotion, a malformed
    input file, a run directory holding another configuration; and
    :class:`~emokern.experiments.sandbox.SandboxUnavailable`: no bubblewrap, or no user namespaces, for the
    reward-hacking sandbox) is printed as one line, ``emokern COMMAND: error: MESSAGE``, with exit status 2;
    ``EMOKERN_TRACEBACK=1`` re-raises it instead, with its traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return COMMANDS[args.command].run(args)
    except Exception as exc:
        if not isinstance(exc, _refusals()) or os.environ.get("EMOKERN_TRACEBACK") == "1":
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc  # KeyError quotes its message
        print(f"emokern {args.command}: error: {message}", file=sys.stderr)
        return 2

