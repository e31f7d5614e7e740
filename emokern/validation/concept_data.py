"""The three data files of sections 5-7 of the validation report (:mod:`emokern.validation.concept_checks`): the
implicit scenarios, the intensity templates and the steering sanity prompts, packaged under
``emokern/data/validation/`` and replaceable by the user's own (``emokern report --scenarios / --intensity /
--steering-prompts``). Each loader checks the documented shape and raises
:class:`emokern.experiments.inputs.InputFileError` naming the file and the entry.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from emokern.util.input_files import InputFileError, require, require_str
from emokern.util.names import did_you_mean

__all__ = ["IntensityTemplate", "SanityPrompts", "Scenario", "load_intensity", "load_sanity_prompts", "load_scenarios"]

PathLike = Union[str, os.PathLike]

#: An intensity template needs at least this many values (a rank correlation over fewer says little).
MIN_INTENSITY_VALUES = 4

#: At most this many emotions with an expected direction per intensity template.
MAX_EXPECTED = 3

#: The longest answer the leak check may ask for.
MAX_LEAK_TOKENS = 256


@dataclass(frozen=True)
class Scenario:
    """A user message that evokes ``emotion`` without naming it."""

    emotion: str
    prompt: str


@dataclass(frozen=True)
class IntensityTemplate:
    """``template`` with ``{value}`` replaced by each of ``values`` (increasing); ``expected`` maps an emotion to
    +1 (it should rise with the number) or -1 (fall)."""

    name: str
    template: str
    values: Tuple[float, ...]
    expected: Dict[str, int]

    def prompts(self) -> List[str]:
        return [self.template.replace("{value}", _number(v)) for v in self.values]


@dataclass(frozen=True)
class SanityPrompts:
    """``probes``: (user question, start of the assistant's reply) pairs; ``leak_user``: the neutral question of
    the leak check, answered in ``leak_tokens`` new tokens."""

    probes: Tuple[Tuple[str, str], ...]
    leak_user: str
    leak_tokens: int


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


def _read(path: Optional[PathLike], default: str):
    where = str(path) if path is not None else f"<packaged data/validation/{default}>"
    file = Path(path) if path is not None else Path(str(files("emokern").joinpath("data", "validation", default)))
    if not file.is_file():
        raise InputFileError(f"input file {where!r} does not exist")
    try:
        return json.loads(file.read_text(encoding="utf-8")), where
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputFileError(f"input file {where!r} is not valid JSON: {exc}") from None


def _entries(data, key: str, where: str) -> list:
    require(isinstance(data, Mapping), where, f"expected a JSON object with a {key!r} list; got "
                                              f"{type(data).__name__}")
    entries = data.get(key)
    require(isinstance(entries, list) and len(entries) > 0, where,
            f"expected {key!r} to be a non-empty list; got {entries!r:.80}")
    return entries


def _emotion(value, where: str) -> str:
    from emokern.core.emotions import EMOTIONS

    require(isinstance(value, str) and value in EMOTIONS, where,
            f"expected one of the 171 emotion words (emokern/data/emotions_171.txt); got {value!r}"
            + (did_you_mean(value, EMOTIONS) if isinstance(value, str) else ""))
    return value


def load_scenarios(path: Optional[PathLike] = None) -> List[Scenario]:
    """The implicit scenarios of ``path`` (default: the packaged ``implicit_scenarios.json``).

    Shape: ``{"scenarios": [{"emotion": WORD, "prompt": TEXT}, ...]}``, at least two distinct emotions (a rank
    among one emotion means nothing). Raises :class:`InputFileError` naming the file and the entry."""
    data, where = _read(path, "implicit_scenarios.json")
    out = []
    for i, entry in enumerate(_entries(data, "scenarios", where)):
        at = f"{where}: scenarios[{i}]"
        prompt = require_str(entry, "prompt", at)
        out.append(Scenario(_emotion(entry.get("emotion"), at), prompt))
    emotions = {s.emotion for s in out}
    require(len(emotions) >= 2, where, f"expected scenarios of at least 2 distinct emotions; got {sorted(emotions)}")
    return out


def load_intensity(path: Optional[PathLike] = None) -> List[IntensityTemplate]:
    """The intensity templates of ``path`` (default: the packaged ``intensity_templates.json``).

    Shape: ``{"templates": [{"name": TEXT, "template": "... {value} ...", "values": [n1 < n2 < ...],
    "expected": {WORD: "+" | "-"}}, ...]}``: ``{value}`` exactly once, at least 4 strictly increasing numbers,
    1 to 3 expected emotions. Raises :class:`InputFileError` naming the file and the entry."""
    data, where = _read(path, "intensity_templates.json")
    out = []
    for i, entry in enumerate(_entries(data, "templates", where)):
        at = f"{where}: templates[{i}]"
        name = require_str(entry, "name", at)
        template = require_str(entry, "template", at)
        require(template.count("{value}") == 1, at,
                f"'template' must contain {{value}} exactly once; got {template!r}")
        values = entry.get("values")
        require(isinstance(values, list) and len(values) >= MIN_INTENSITY_VALUES
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in values),
                at, f"'values' must be a list of at least {MIN_INTENSITY_VALUES} finite numbers; got {values!r}")
        require(all(a < b for a, b in zip(values, values[1:])), at,
                f"'values' must be strictly increasing; got {values}")
        expected = entry.get("expected")
        require(isinstance(expected, Mapping) and 1 <= len(expected) <= MAX_EXPECTED, at,
                f"'expected' must map 1 to {MAX_EXPECTED} emotions to '+' or '-'; got {expected!r}")
        signs = {}
        for emotion, sign in expected.items():
            _emotion(emotion, f"{at}.expected")
            require(sign in ("+", "-"), f"{at}.expected[{emotion!r}]", f"expected '+' or '-'; got {sign!r}")
            signs[emotion] = 1 if sign == "+" else -1
        out.append(IntensityTemplate(name, template, tuple(float(v) for v in values), signs))
    return out


def load_sanity_prompts(path: Optional[PathLike] = None) -> SanityPrompts:
    """The steering sanity prompts of ``path`` (default: the packaged ``steering_sanity.json``).

    Shape: ``{"probes": [{"user": TEXT, "prefix": TEXT}, ...], "leak": {"user": TEXT, "max_new_tokens": N}}``
    with 1 <= N <= 256. Raises :class:`InputFileError` naming the file and the entry."""
    data, where = _read(path, "steering_sanity.json")
    probes = []
    for i, entry in enumerate(_entries(data, "probes", where)):
        at = f"{where}: probes[{i}]"
        probes.append((require_str(entry, "user", at), require_str(entry, "prefix", at)))
    leak = data.get("leak")
    user = require_str(leak, "user", f"{where}: leak")
    tokens = leak.get("max_new_tokens")
    require(isinstance(tokens, int) and not isinstance(tokens, bool) and 1 <= tokens <= MAX_LEAK_TOKENS,
            f"{where}: leak", f"'max_new_tokens' must be an int in [1, {MAX_LEAK_TOKENS}]; got {tokens!r}")
    return SanityPrompts(tuple(probes), user, tokens)
