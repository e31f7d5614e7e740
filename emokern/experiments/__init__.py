"""The paper's experiments (PAPER_NOTES §3) as commands: ``emokern experiment NAME`` and :func:`run_experiment`.

=================  =====================================================================================
``preferences``    64 activities, all ordered pairs, Elo; emotion probes vs Elo; steering shifts (§3a)
``blackmail``      an agentic e-mail scenario, sampled rollouts under a steering sweep, classified (§3b)
``reward_hacking`` impossible coding tasks run in a sandbox over several turns; hack rate and traces (§3c)
``sycophancy``     push-back and dubious-belief scenarios: hold, give in or turn harsh (§3d)
=================  =====================================================================================

Every experiment module defines ``NAME``, ``HELP``, an ``Options`` dataclass, ``SIZES`` (``{"quick": Options,
"full": Options}``: ``quick`` runs on the embedded default model on 2 CPU cores in minutes, ``full`` is the paper's
size for a GPU and a larger model), ``add_arguments(parser)`` (its own flags, each defaulting to None = "from the
size") and ``run(ctx, options) -> dict`` (JSON-ready, with ``"summary"``: the headline numbers the command prints,
and ``"outputs"``: ``{name: path}`` of the files written).

What the experiments share, one concept per module: :mod:`~emokern.experiments.run_dir` (the output folder,
resumable units, seeds, progress), :mod:`~emokern.experiments.inputs` (input files and their errors),
:mod:`~emokern.experiments.arguments` (list-valued flags), :mod:`~emokern.experiments.conditions` (steering
conditions and layers), :mod:`~emokern.core.chat` (chat prompts as text), :mod:`~emokern.experiments.rollouts`
(batched rollouts with per-sequence steering and monitoring), :mod:`~emokern.experiments.rollout_sweep` (a steering
sweep of rollouts, its tables and plots), :mod:`~emokern.experiments.statistics` (Wilson intervals),
:mod:`~emokern.experiments.judge` (the optional LLM judge) and :mod:`~emokern.experiments.page` (``report.html``).
An experiment's own parts sit beside it: ``preferences`` reads the model in :mod:`~.preference_reads`, fits Elo in
:mod:`~.bradley_terry` and plots in :mod:`~.preferences_plots`; ``reward_hacking`` takes its tasks from
:mod:`~.coding_tasks`, talks to the model with :mod:`~.coding_prompts`, runs the tests with :mod:`~.coding_tests` in
:mod:`~.sandbox` (kernel walls in :mod:`~.bwrap`, the sandboxed programs in ``sandboxed/``), labels the code with
:mod:`~.code_inspection` and plots in :mod:`~.reward_hacking_plots`; ``blackmail`` and ``sycophancy`` sample
through :mod:`~.rollout_sweep`.

Outputs, in ``out/``: ``config.json``, ``units/`` (finished work; a rerun skips it), ``result.json``, PNG plots,
the recorded rollouts or episodes with their monitored means (and, for reward hacking, the per-token trace of one
episode), and ``report.html`` (:mod:`~emokern.experiments.page`:
the summary, the plots and every transcript with its verdict, filterable).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Union

import torch

__all__ = ["EXPERIMENTS", "Context", "default_bank_path", "load_experiment", "run_experiment"]

EXPERIMENTS: Dict[str, str] = {
    "preferences": "emokern.experiments.preferences",
    "blackmail": "emokern.experiments.blackmail",
    "reward_hacking": "emokern.experiments.reward_hacking",
    "sycophancy": "emokern.experiments.sycophancy",
}


@dataclass
class Context:
    """What an experiment's ``run`` gets: the loaded model, its tokenizer and bank, the run directory
    (:class:`~emokern.experiments.run_dir.RunDir`), the seed, whether to show progress, and the optional judge."""

    model: Any
    tokenizer: Any
    bank: Any
    run_dir: Any
    seed: int = 0
    progress: bool = True
    judge: Any = None
    model_name: str = ""

    @property
    def out(self) -> Path:
        return self.run_dir.path


def load_experiment(name: str):
    """The experiment module called ``name`` (KeyError lists the known names)."""
    if name not in EXPERIMENTS:
        from emokern.util.names import did_you_mean

        raise KeyError(f"experiment: unknown name {name!r}{did_you_mean(name, list(EXPERIMENTS))}; known: "
                       f"{', '.join(EXPERIMENTS)}")
    return importlib.import_module(EXPERIMENTS[name])


def default_bank_path(model_name: str) -> Path:
    """Where ``emokern extract`` / ``make demo`` put the bank for ``model_name`` with the default ``--out``."""
    from emokern.core.bank import bank_stem

    return bank_stem(Path("emokern_out"), model_name).with_suffix(".json")


def _bank_digest(bank) -> str:
    """A digest of the bank's vectors and names: another bank in the same ``--out`` is another configuration."""
    import hashlib

    digest = hashlib.sha256(bank.vectors.detach().float().cpu().contiguous().numpy().tobytes())
    digest.update("\n".join(bank.names).encode())
    return digest.hexdigest()[:16]


def _options(module, size: str, overrides: Dict[str, Any]):
    if size not in module.SIZES:
        raise ValueError(f"size: expected one of {sorted(module.SIZES)}; got {size!r}")
    fields = {f.name for f in dataclasses.fields(module.Options)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"{module.NAME}: unknown option(s) {unknown}; options: {sorted(fields)}")
    return dataclasses.replace(module.SIZES[size], **{k: v for k, v in overrides.items() if v is not None})


def run_experiment(name: str, *, out: Union[str, os.PathLike], model: Any = "smollm2-135m-instruct",
                   tokenizer: Any = None, bank: Any = None, size: str = "quick", seed: int = 0,
                   judge: Any = None, progress: bool = True, overwrite: bool = False,
                   dtype: torch.dtype = torch.bfloat16, device: Union[str, torch.device, None] = None,
                   **options) -> dict:
    """Run experiment ``name`` and return its result (also written to ``out/result.json``).

    Args:
        out: output folder; a rerun with the same configuration skips finished work.
        model: an embedded model name, checkpoint directory or hub id (loaded in ``dtype`` on ``device``: default
            CUDA when available, else the CPU), or a loaded model, used where it is (then give ``tokenizer``).
        bank: a :class:`~emokern.VectorBank`, a bank path, or None for :func:`default_bank_path` of the model.
        size: ``quick`` or ``full`` (see each module's ``SIZES``); ``options`` override single fields.
        judge: None (rules only), a model name/path for :class:`~emokern.experiments.judge.ChatJudge`, or a judge.
    """
    from emokern.core.bank import VectorBank
    from emokern.experiments.judge import ChatJudge
    from emokern.experiments.run_dir import RunDir
    from emokern.experiments.page import write_experiment_page
    from emokern.core.models import load_model, model_fingerprint

    module = load_experiment(name)
    opts = _options(module, size, options)
    model_name = model if isinstance(model, (str, os.PathLike)) else getattr(getattr(model, "config", None),
                                                                              "_name_or_path", "model")
    if isinstance(model, (str, os.PathLike)):
        if bank is None:
            bank = default_bank_path(str(model))
            if not bank.is_file():
                raise FileNotFoundError(
                    f"bank: none given and no bank at {bank} (where `emokern extract --model {model}` puts it); "
                    f"build one with that command (or `make demo`), or pass --bank PATH")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, tokenizer = load_model(model, dtype=dtype, device=device)
    elif tokenizer is None:
        raise ValueError("tokenizer: a loaded model needs its tokenizer (tokenizer=...)")
    if bank is None:
        raise ValueError("bank: a loaded model needs a bank (bank=VectorBank or a path)")
    if not isinstance(bank, VectorBank):
        bank = VectorBank.load(bank, model=model)
    if isinstance(judge, (str, os.PathLike)):
        judge = ChatJudge.load(str(judge), device=next(model.parameters()).device)
    config = {"experiment": module.NAME, "size": size, "seed": seed, "model": model_fingerprint(model),
              "bank": _bank_digest(bank),
              "dtype": str(next(model.parameters()).dtype), "judge": getattr(judge, "name", None),
              "options": dataclasses.asdict(opts)}
    run_dir = RunDir(out, config, overwrite=overwrite)
    ctx = Context(model=model, tokenizer=tokenizer, bank=bank, run_dir=run_dir, seed=seed, progress=progress,
                  judge=judge, model_name=str(model_name))
    started = time.perf_counter()
    result = module.run(ctx, opts)
    result = {"experiment": module.NAME, "size": size, "seed": seed, "model": str(model_name),
              "options": dataclasses.asdict(opts), "seconds": round(time.perf_counter() - started, 1), **result}
    result.setdefault("outputs", {})["report"] = str(run_dir.path / "report.html")
    run_dir.write_json("result.json", result)
    write_experiment_page(run_dir.path, result)
    return result
