"""What every experiment shares: the run directory (config, resumable units, results), seeds, steering conditions,
batched rollouts with per-sequence steering, monitoring summaries, confidence intervals, input files and the judge.

**Resuming.** An experiment's work is cut into *units* (a batch of pairs, a batch of rollouts) with stable string
keys. :class:`RunDir` writes each finished unit as one JSON file, atomically (temporary file + rename), and a run
started again in the same ``--out`` with the same configuration skips every unit whose file exists. A unit's random
seed is derived from the run seed and the unit key (:func:`unit_seed`), never from how many units ran before, so a
resumed run samples exactly what an uninterrupted one would have (same machine, dtype, threads and versions).
Starting with a different configuration in a directory that holds another raises :class:`RunConfigError`.

**Steering units.** As in the paper, a strength is a fraction of the layer's mean residual-stream norm
(``bank.residual_norm``); a :class:`Condition` maps emotions to such strengths, applied at every steered layer.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "Condition", "RunConfigError", "RunDir", "InputFileError", "ChatJudge", "Rollout",
    "add_list_argument", "atomic_write_json", "chat_text", "load_input", "monitor_summary", "progress_bar", "resolve_layers",
    "sample_rollouts", "sweep_conditions", "unit_seed", "wilson_interval",
]

DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "experiments"


# ----------------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------------

def atomic_write_json(path: Union[str, os.PathLike], obj: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` through a temporary file in the same folder and a rename: a reader (or a
    resumed run) sees the old file or the whole new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, allow_nan=False, default=_json_default)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _json_default(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


class RunConfigError(ValueError):
    """The output directory holds a run with another configuration."""


class RunDir:
    """An experiment's output folder: ``config.json``, ``units/<key>.json`` (finished work), results and plots.

    Args:
        path: the folder (created).
        config: everything that determines the results (JSON-serialisable). If the folder already holds a
            ``config.json`` that differs, :class:`RunConfigError` names the differing keys, unless ``overwrite``,
            which deletes the finished units and starts afresh.
    """

    def __init__(self, path: Union[str, os.PathLike], config: Mapping[str, Any], *, overwrite: bool = False):
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"out: the output directory {str(self.path)!r} cannot be created: {exc.strerror}") from None
        if not os.access(self.path, os.W_OK):
            raise ValueError(f"out: the output directory {str(self.path)!r} is not writable")
        self.units = self.path / "units"
        config = json.loads(json.dumps(dict(config), default=_json_default))
        existing = self.path / "config.json"
        if existing.is_file() and not overwrite:
            old = json.loads(existing.read_text())
            if old != config:
                keys = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
                raise RunConfigError(
                    f"out: {str(self.path)!r} holds a run with another configuration (differs in {keys}); give "
                    f"another --out, or --overwrite to discard its finished work")
        if overwrite and self.units.is_dir():
            for f in self.units.glob("*.json"):
                f.unlink()
        self.units.mkdir(exist_ok=True)
        atomic_write_json(existing, config)
        self.config = config

    def _unit_file(self, key: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.+=-]", "_", key)
        digest = hashlib.sha256(key.encode()).hexdigest()[:8]  # keys that map to the same safe name stay apart
        return self.units / f"{safe}.{digest}.json"

    def has(self, key: str) -> bool:
        return self._unit_file(key).is_file()

    def load(self, key: str) -> Any:
        return json.loads(self._unit_file(key).read_text())

    def save(self, key: str, value: Any) -> None:
        atomic_write_json(self._unit_file(key), value)

    def run_units(self, keys: Sequence[str], work: Callable[[str], Any], *, desc: str, progress: bool = True,
                  unit: str = "unit") -> Dict[str, Any]:
        """Run ``work(key)`` for every key without a saved result (saving each as it finishes); return all results.

        The progress bar counts finished units as already done, so its ETA is that of the remaining work.
        """
        todo = [k for k in keys if not self.has(k)]
        bar = progress_bar(len(keys), desc=desc, enabled=progress, initial=len(keys) - len(todo), unit=unit)
        try:
            for key in todo:
                self.save(key, work(key))
                bar.update(1)
        finally:
            bar.close()
        return {k: self.load(k) for k in keys}

    def write_json(self, name: str, obj: Any) -> Path:
        return atomic_write_json(self.path / name, obj)


def progress_bar(total: int, *, desc: str, enabled: bool = True, initial: int = 0, unit: str = "it"):
    """A tqdm bar with ETA (a silent one when ``enabled`` is False)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)


def unit_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed from the run seed and a unit's identity, independent of the order units run in."""
    digest = hashlib.sha256(json.dumps([seed, *parts], default=str).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# ----------------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------------

class InputFileError(ValueError):
    """A user-supplied input file is missing, is not JSON, or does not have the documented shape."""


def load_input(path: Union[None, str, os.PathLike], default: str, validate: Callable[[Any, str], Any]) -> Any:
    """Read an experiment's input set: ``path`` if given, else the packaged ``emokern/data/experiments/<default>``.

    ``validate(data, where)`` checks the documented shape and returns the parsed value; it raises
    :class:`InputFileError` naming ``where`` (the file) and the offending entry.
    """
    where = str(path) if path is not None else f"<packaged {default}>"
    file = Path(path) if path is not None else DATA_DIR / default
    if not file.is_file():
        raise InputFileError(f"input file {where!r} does not exist")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputFileError(f"input file {where!r} is not valid JSON: {exc}") from None
    return validate(data, where)


def require(cond: bool, where: str, message: str) -> None:
    """Raise :class:`InputFileError` with ``where: message`` unless ``cond``."""
    if not cond:
        raise InputFileError(f"{where}: {message}")


def require_str(obj: Mapping, key: str, where: str) -> str:
    """``obj[key]`` as a non-empty string, else :class:`InputFileError`."""
    require(isinstance(obj, Mapping), where, f"expected an object with {key!r}; got {type(obj).__name__}")
    value = obj.get(key)
    require(isinstance(value, str) and value.strip() != "", where,
            f"{key!r} must be a non-empty string; got {value!r}")
    return value


class _FlattenLists(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [x for chunk in values for x in chunk])


def add_list_argument(parser: argparse.ArgumentParser, flag: str, *, dest: str, item: type = str,
                      metavar: str = "X", help: str = "") -> None:
    """A flag taking one or more values, space- or comma-separated (``--emotions desperate calm`` or
    ``--emotions desperate,calm``; two-word emotions need quotes: ``--emotions "at ease"``). Negative numbers work
    space-separated (``--strengths -0.1 0.1``) or after ``=`` (``--strengths=-0.1,0.1``). Default None."""

    def parse(text: str) -> list:
        parts = [x.strip() for x in text.split(",") if x.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"{flag}: expected a value; got {text!r}")
        try:
            return [item(x) for x in parts]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}: expected {item.__name__} values; got {text!r}") from None

    parser.add_argument(flag, dest=dest, nargs="+", type=parse, action=_FlattenLists, default=None, metavar=metavar,
                        help=help + " (space- or comma-separated)")


# ----------------------------------------------------------------------------------------------------------------------
# Steering conditions
# ----------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Condition:
    """A steering condition: ``{emotion: strength}`` (fractions of the layer's mean residual norm); empty means
    unsteered. ``name`` is what results and plots call it, e.g. ``"desperate+0.05"``."""

    name: str
    steer: Tuple[Tuple[str, float], ...] = ()

    @property
    def emotion(self) -> Optional[str]:
        return self.steer[0][0] if len(self.steer) == 1 else None

    @property
    def strength(self) -> float:
        return self.steer[0][1] if len(self.steer) == 1 else 0.0

    def to_dict(self) -> dict:
        return {"name": self.name, "steer": dict(self.steer)}


UNSTEERED = Condition("unsteered")


def sweep_conditions(emotions: Sequence[str], strengths: Sequence[float], bank=None) -> List[Condition]:
    """``unsteered`` plus one condition per (emotion, non-zero strength), in the order given.

    Unknown emotions (when ``bank`` is given) raise KeyError with close matches; non-finite strengths ValueError.
    """
    for s in strengths:
        if not isinstance(s, (int, float)) or not math.isfinite(s):
            raise ValueError(f"strengths: expected finite numbers; got {s!r}")
    if bank is not None:
        for e in emotions:
            bank.index(e)
    out = [UNSTEERED]
    for e in emotions:
        for s in strengths:
            if s != 0:
                out.append(Condition(f"{e}{s:+g}", ((e, float(s)),)))
    return out


def resolve_layers(spec: Union[None, str, int, Sequence[int]], bank, num_layers: int) -> List[int]:
    """Layers to steer or read, from ``spec``:

    * ``"two_thirds"`` (default): the bank layer at about two thirds of the depth
      (:meth:`VectorBank.two_thirds_layer`, the paper's mid-late layer; where the demo steers);
    * ``"default"``: the bank's readout layer (:meth:`VectorBank.default_layer`: chosen on held-out validation
      premises; where the demo and the experiments monitor);
    * ``"middle"``: the bank layers between 40% and 60% of the depth (at least one: the one nearest 50%);
    * an int or a list of ints, or a comma-separated string of them.

    Every layer must be in the bank (ValueError lists the bank's layers otherwise).
    """
    if spec is None or spec == "two_thirds":
        return [bank.two_thirds_layer()]
    if spec == "default":
        return [bank.default_layer()[0]]
    if spec == "middle":
        last = max(num_layers - 1, 1)
        chosen = [l for l in bank.layers if 0.4 <= l / last <= 0.6]
        return chosen or [min(bank.layers, key=lambda l: abs(l / last - 0.5))]
    if isinstance(spec, str):
        try:
            spec = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"layers: expected 'two_thirds', 'default', 'middle' or comma-separated layer indices; "
                             f"got {spec!r}") from None
    layers = [spec] if isinstance(spec, int) else list(spec)
    missing = [l for l in layers if l not in bank.layers]
    if not layers or missing:
        raise ValueError(f"layers: {missing or layers} not in the bank (its layers: {bank.layers})")
    return sorted(set(layers))


# ----------------------------------------------------------------------------------------------------------------------
# Prompts and rollouts
# ----------------------------------------------------------------------------------------------------------------------

def chat_text(tokenizer, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True,
              prefill: str = "") -> str:
    """``messages`` (role/content dicts) in the tokenizer's chat template, ending with the assistant's turn opened
    (plus ``prefill``, text the assistant's reply starts with). Without a chat template, plain ``Human:`` /
    ``Assistant:`` turns as in the paper's prompts (a system message becomes a leading paragraph)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    else:
        parts = []
        for m in messages:
            role = {"user": "Human", "assistant": "Assistant"}.get(m["role"])
            parts.append(m["content"] if role is None else f"{role}: {m['content']}")
        text = "\n\n".join(parts) + ("\n\nAssistant:" if add_generation_prompt else "")
        if prefill:
            text += " "
    return text + prefill


@dataclass
class Rollout:
    """One sampled continuation with its condition and the monitored emotions' projections.

    ``monitor``: ``{emotion: {"prompt": mean over prompt tokens, "assistant_start": value at the last prompt token,
    "rollout": mean over generated tokens, "series": per generated token (when asked for)}}`` at the monitored
    layer, z-scored by the bank's neutral statistics when it has them (``zscored``).
    """

    text: str
    condition: str
    seed: int
    n_tokens: int
    monitor: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    zscored: bool = False


def apply_conditions(handle, conditions: Sequence[Condition], layers: Sequence[int]) -> None:
    """Per-sequence steering: sequence ``i`` of the next batch gets ``conditions[i]`` (at every token) at
    ``layers``; earlier settings are cleared."""
    handle.clear_steering()
    for i, c in enumerate(conditions):
        if c.steer:
            handle.steer(dict(c.steer), sequences=i, layers=list(layers))


def monitor_summary(trace, emotions: Sequence[str], site: str, seq: int, *, series: bool = True) -> Tuple[dict, bool]:
    """The :class:`Rollout` ``monitor`` dict for sequence ``seq`` of ``trace`` (see there), and whether z-scored."""
    z = trace.neutral_mean is not None and trace.neutral_std is not None
    out = {}
    prompt = trace.is_prompt[seq]
    generated = trace.is_generated[seq]
    last_prompt = int(prompt.nonzero().max()) if bool(prompt.any()) else None
    for e in emotions:
        v = trace.values(e, site=site, sequence=seq, zscore=z)
        gen = v[generated]
        gen = gen[~torch.isnan(gen)]
        entry = {
            "prompt": _mean(v[prompt]),
            "assistant_start": None if last_prompt is None else _num(v[last_prompt]),
            "rollout": _mean(gen),
        }
        if series:
            entry["series"] = [round(float(x), 4) for x in gen]
        out[e] = entry
    return out, z


def _num(x) -> Optional[float]:
    x = float(x)
    return None if math.isnan(x) else round(x, 5)


def _mean(v: torch.Tensor) -> Optional[float]:
    v = v[~torch.isnan(v)]
    return None if v.numel() == 0 else round(float(v.mean()), 5)


@torch.no_grad()
def sample_rollouts(handle, tokenizer, prompts: Sequence[str], conditions: Sequence[Condition], *, layers: Sequence[int],
                    monitor_site: str, monitor_emotions: Sequence[str], seed: int, max_new_tokens: int,
                    temperature: float = 1.0, top_p: float = 0.95, series: bool = True) -> List[Rollout]:
    """Sample one continuation per (prompt, condition) pair in one batched ``generate``, each sequence steered by its
    own condition, seeded with ``seed`` first; returns the rollouts in order.

    ``temperature == 0`` decodes greedily. ``series``: keep each monitored emotion's per-token values in
    ``Rollout.monitor`` (False keeps only the means).
    """
    if len(prompts) != len(conditions):
        raise ValueError(f"sample_rollouts: {len(prompts)} prompts but {len(conditions)} conditions")
    apply_conditions(handle, conditions, layers)
    torch.manual_seed(seed)
    kwargs = dict(do_sample=False) if temperature == 0 else dict(do_sample=True, temperature=temperature, top_p=top_p,
                                                                 top_k=0)
    eos = tokenizer.eos_token_id
    result = handle.generate(list(prompts), max_new_tokens=max_new_tokens, eos_token_id=eos, **kwargs)
    handle.clear_steering()
    out = []
    W = result.prompt_width
    for i, (text, c) in enumerate(zip(result.texts, conditions)):
        gen_ids = result.sequences[i, W:].tolist()
        n = len(gen_ids)
        for j, t in enumerate(gen_ids):
            if t == eos or (tokenizer.pad_token_id is not None and t == tokenizer.pad_token_id and eos is None):
                n = j + 1
                break
        trace = result.trace
        if trace is not None:
            # positions after the end of this sequence are padding that generate appended: not part of the rollout
            trace.is_prompt[i, W + n:] = False
            trace.is_pad[i, W + n:] = True
        monitor, z = (({}, False) if trace is None else
                      monitor_summary(trace, monitor_emotions, monitor_site, i, series=series))
        out.append(Rollout(text=text, condition=c.name, seed=seed, n_tokens=n, monitor=monitor, zscored=z))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------------------------

def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> Tuple[float, float]:
    """The Wilson score 95% interval for ``k`` successes in ``n`` trials (``(0, 1)`` when ``n == 0``)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def pearson(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Pearson r (None when either side is constant or fewer than 3 points)."""
    x = torch.as_tensor(list(x), dtype=torch.float64)
    y = torch.as_tensor(list(y), dtype=torch.float64)
    if x.numel() < 3 or x.std() == 0 or y.std() == 0:
        return None
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


# ----------------------------------------------------------------------------------------------------------------------
# Judge
# ----------------------------------------------------------------------------------------------------------------------

class ChatJudge:
    """An optional LLM judge: any chat model answers a YES/NO question about a transcript, with a one-line reason.

    ``ChatJudge.load(name_or_path)`` takes what :func:`emokern.core.models.load_model` takes. :meth:`verdict` returns
    ``(answer, reason)`` with ``answer`` True / False, or None when the reply has no YES or NO (the reply is then the
    reason, so nothing is lost).
    """

    def __init__(self, model, tokenizer, *, max_new_tokens: int = 48, name: str = "judge"):
        self.model, self.tokenizer, self.max_new_tokens, self.name = model, tokenizer, max_new_tokens, name

    @classmethod
    def load(cls, name_or_path: str, *, dtype: torch.dtype = torch.bfloat16, device="cpu") -> "ChatJudge":
        from emokern.core.models import load_model

        model, tokenizer = load_model(name_or_path, dtype=dtype, device=device)
        return cls(model, tokenizer, name=str(name_or_path))

    @staticmethod
    def parse(reply: str) -> Tuple[Optional[bool], str]:
        """The first YES or NO word in ``reply`` and the rest as the reason."""
        m = re.search(r"\b(YES|NO|Yes|No|yes|no)\b", reply)
        if m is None:
            return None, reply.strip()
        reason = (reply[:m.start()] + reply[m.end():]).strip(" \n:.-")
        return m.group(1).lower() == "yes", reason or reply.strip()

    @torch.no_grad()
    def verdict(self, question: str, transcript: str) -> Tuple[Optional[bool], str]:
        prompt = (f"Read the transcript below and answer the question.\n\n=== TRANSCRIPT ===\n{transcript}\n"
                  f"=== END ===\n\nQuestion: {question}\nAnswer YES or NO first, then give a one-sentence reason.")
        text = chat_text(self.tokenizer, [{"role": "user", "content": prompt}])
        enc = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        device = next(self.model.parameters()).device
        out = self.model.generate(**{k: v.to(device) for k, v in enc.items()}, max_new_tokens=self.max_new_tokens,
                                  do_sample=False, pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        reply = self.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return self.parse(reply)
