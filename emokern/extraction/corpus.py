"""The story corpus: short stories written by the model itself, one emotion each, plus emotionally neutral dialogues.

This is step one of the paper's recipe (PAPER_NOTES §1)::

    model, tok = load_model("smollm2-135m-instruct", dtype=torch.bfloat16)
    corpus = generate_corpus(model, tok, "/tmp/corpus", preset="quick")   # resumable: rerun after a kill
    corpus = StoryCorpus.load("/tmp/corpus")
    corpus.stories[0].text, corpus.neutral[0].text, corpus.stats()

**Stories.** Each story job asks the model, through its chat template (an optional system turn and a user turn),
for ONE short story of about a paragraph on an everyday premise (``emokern/data/topics.txt``, 100 premises) whose
main character feels the job's emotion, narrated in the first or the third person. *How* it is asked is the corpus's
**style** (:data:`emokern.extraction.prompts.STYLES`): the paper's ``implicit`` rule (never name the feeling) or one of the
styles compared by ``benchmarks/bench_recipe.py``, among them ``opening``, where the answer starts with words written
for the model ("I felt {emotion}." / "{name} felt {emotion}.") that it then continues; those words are stored as the
start of the story and recorded as its ``opening``. The paper asked for several stories per call, tagged ``[story
1]``, ``[story 2]``...; one story per call needs no parsing, and a small model keeps to one story far better than to
a numbered list.

**Neutral dialogues.** Each neutral job asks, over the same premises, for one emotionless task dialogue (code, facts,
how-to, lists, names, work tasks) of 2 to 4 exchanges with no pleasantries. As in the paper, the model writes the
speakers as ``Person:`` and ``AI:`` (labels a chat model does not confuse with its own turn markers); they are
stored relabelled ``Human:`` / ``Assistant:``. The paper's occasional system prompt in a dialogue is not imitated.

**Filtering.** Each output is cleaned (:func:`clean_story`, :func:`relabel_dialogue`), then checked in this order:
a dialogue under ``min_words`` words, or a story under ``min_words`` words of its own (:func:`own_words`: the
opening and every form of the emotion word not counted, the tokens the ``opening`` reading leaves out), is dropped
as ``"too_short"``; a story whose distinct word trigrams are under half of its trigrams (:func:`distinct_trigrams`:
a model caught in a loop, "I was sad. I was sad. ...", common in small base models) as ``"repetitive"``; a story
that no longer starts with its opening after clean-up as ``"opening_lost"``; in a style that may not name its
emotion (``names_emotion=False``), a story that contains its emotion word in any form
:func:`emokern.extraction.emotion_words.emotion_word_pattern` knows as ``"emotion_word"`` (the form found is recorded as
``matched`` in every style); a dialogue without both a ``Human:`` and an ``Assistant:`` line as
``"not_a_dialogue"``. Dropped jobs are kept on disk (with their reason) and
counted per emotion by :meth:`StoryCorpus.stats`; they are not regenerated.

**Jobs, chunks and resuming.** :func:`plan_chunks` turns the configuration into a fixed list of jobs (story key
``"{emotion}|{topic_index}|{k}"``, neutral key ``"neutral|{topic_index}|{k}"``) cut into chunks of ``batch_size``
jobs: the same configuration always gives the same chunks. A chunk is the unit of work and of commit: one batched
sampling call (:func:`emokern.extraction.sampling.sample`, left padding, its generator seeded with the chunk's seed), then one
shard file ``shards/stories-{chunk:05d}.jsonl`` (or ``neutral-...``) written to a temporary file and renamed into
place, with one JSON record per job, kept or dropped. A run that is killed at any moment and started again with the
same arguments skips the chunks whose shard exists, so no finished story is lost or written twice.
``manifest.json`` records the configuration; starting with a different one in the same directory raises
:class:`CorpusConfigError`, except that a corpus can be grown to more stories or dialogues (see
:func:`generate_corpus`). Given the chunk, generation is deterministic on the same machine, dtype, thread count and
library versions (a resumed run then equals an uninterrupted one); elsewhere the sampled texts may differ.

**Presets** (:data:`PRESETS`; most fields can be overridden through :func:`generate_corpus`'s arguments):

* ``standard``: the main job's corpus: all 171 emotions x 32 stories on 32 premises in the ``opening`` style and 48
  neutral dialogues. The package ships the one generated on the embedded SmolLM2 (:mod:`emokern.extraction.shipped_corpora`).
* ``quick``: the same recipe with 4 stories per emotion, for a corpus made here in minutes.
* ``mini``: for tests and CI: 4 emotions (desperate, calm, happy, afraid) x 2 stories and 4 neutral dialogues of at
  most 40 new tokens.
* ``paper``: the paper's scale and rule: 100 premises x 12 stories for each of the 171 emotions (205,200 stories) in
  the ``implicit`` style and 1,200 neutral dialogues, 300 new tokens each: days of a 2-core machine, a GPU job.

The model is used as given: put it in eval mode. On CPUs with AMX a bfloat16 model samples about three times faster
than float32. The tokenizer is never modified: padding is done here.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import time
from importlib.resources import files
from pathlib import Path
from typing import Sequence

import torch

from emokern.extraction.emotion_words import emotion_word_pattern, emotion_word_spans, find_emotion_word  # noqa: F401
from emokern.core.emotions import load_emotions
from emokern.extraction.prompts import (NAMES, NARRATION, NEUTRAL_OPENING, NEUTRAL_SYSTEM, NEUTRAL_TASKS, NEUTRAL_USER, PLAIN_LEAD,
                             STYLES, StoryStyle, prompts_sha256)
from emokern.core.models import model_fingerprint

__all__ = [
    "MANIFEST",
    "PRESETS",
    "PROMPT_FORMATS",
    "SHARDS",
    "Chunk",
    "CorpusConfigError",
    "CorpusPreset",
    "Job",
    "NeutralDialogue",
    "Story",
    "StoryCorpus",
    "clean_story",
    "emotion_word_pattern",
    "emotion_word_spans",
    "find_emotion_word",
    "own_words",
    "distinct_trigrams",
    "story_reason",
    "generate_corpus",
    "load_topics",
    "plan_chunks",
    "relabel_dialogue",
]

MANIFEST = "manifest.json"
SHARDS = "shards"
_FORMAT = 1
_N_TOPICS = 100
_TOPICS_FILE = "topics.txt"
PROMPT_FORMATS = ("chat", "plain")
# Recorded in the manifest: shards sampled another way are not continued with this sampler.
_SAMPLER = "emokern.extraction.sampling.sample(candidates=256)"


class CorpusConfigError(ValueError):
    """The output directory holds a corpus made with another configuration (or shards of unknown origin)."""


# ----------------------------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CorpusPreset:
    """A named corpus configuration.

    Attributes:
        name: a short name, recorded in the manifest (the key in :data:`PRESETS` for the built-in ones).
        description: what it is for, with measured or estimated costs.
        emotions: the emotion names, or ``None`` for all 171 (:func:`emokern.core.emotions.load_emotions`).
        stories_per_emotion: stories per emotion. Story ``j`` of an emotion uses the ``(j mod T)``-th premise of a
            seeded permutation of the T premises, for the ``k = j // T``-th time; every emotion gets the same premises,
            so premise content cancels when the mean over emotions is subtracted.
        neutral: number of neutral dialogues (0 for none).
        max_new_tokens: the most tokens generated for one story or dialogue.
        batch_size: jobs per chunk, i.e. per batched generation call and per shard file.
        min_words: a dialogue with fewer whitespace-separated words after cleaning, or a story with fewer words
            of its own (:func:`own_words`: not counting its opening or any form of its emotion word), is dropped as
            ``"too_short"``.
        temperature, top_p: sampling settings (``top_k`` is disabled).
        prompt_format: ``"chat"`` (the tokenizer's chat template, system + user turns) or ``"plain"`` (the same
            instructions as plain text, for base models without a chat template).
        style: the name of the story style in :data:`emokern.extraction.prompts.STYLES` (how a story is asked for).
    """

    name: str
    description: str
    emotions: tuple[str, ...] | None
    stories_per_emotion: int
    neutral: int
    max_new_tokens: int
    batch_size: int
    min_words: int
    temperature: float = 0.8
    top_p: float = 0.95
    prompt_format: str = "chat"
    style: str = "implicit"


PRESETS: dict[str, CorpusPreset] = {
    p.name: p
    for p in [
        CorpusPreset(
            name="standard",
            description=(
                "The main job's corpus: all 171 emotions x 32 stories (one on each of 32 premises) in the 'opening' "
                "style at temperature 0.6 + 48 neutral dialogues, <= 64 new tokens each (benchmarks/bench_recipe.py: "
                "short stories at a lower temperature carry as much held-out signal as long ones, for half the "
                "generation). Shipped in the package for the embedded SmolLM2-135M-Instruct "
                "(emokern/data/corpora/), so the main job only reads it; generating it anew (emokern demo "
                "--regenerate, or emokern corpus) takes the time the README gives."),
            emotions=None,
            stories_per_emotion=32,
            neutral=48,
            max_new_tokens=64,
            batch_size=171,
            min_words=20,
            temperature=0.6,
            style="opening",
        ),
        CorpusPreset(
            name="quick",
            description=(
                "The standard recipe with 4 stories per emotion: all 171 emotions x 4 stories + 48 neutral "
                "dialogues, <= 64 new tokens each, generated here in minutes."),
            emotions=None,
            stories_per_emotion=4,
            neutral=48,
            max_new_tokens=64,
            batch_size=171,
            min_words=20,
            temperature=0.6,
            style="opening",
        ),
        CorpusPreset(
            name="base",
            description=(
                "For small base models without a chat template (Gemma-3-270M): the standard recipe written as plain "
                "text, at temperature 0.8 (at 0.6 a 270M base model loops: benchmarks/bench_recipe.py dropped 115 of "
                "its 192 standard stories as repetitive), 16 stories per emotion (one on each of 16 premises) + 48 "
                "neutral dialogues, <= 64 new tokens each: sized to generate in about an hour on this project's "
                "2-core machine. Read it with fmt='raw' (emokern extract --format raw)."),
            emotions=None,
            stories_per_emotion=16,
            neutral=48,
            max_new_tokens=64,
            batch_size=171,
            min_words=20,
            temperature=0.8,
            prompt_format="plain",
            style="opening",
        ),
        CorpusPreset(
            name="mini",
            description="4 emotions x 2 stories + 4 neutral dialogues, <= 40 new tokens: for tests and CI.",
            emotions=("desperate", "calm", "happy", "afraid"),
            stories_per_emotion=2,
            neutral=4,
            max_new_tokens=40,
            batch_size=4,
            min_words=10,
            style="opening",
        ),
        CorpusPreset(
            name="paper",
            description=(
                "The paper's scale: 100 premises x 12 stories x 171 emotions = 205,200 stories + 1,200 neutral "
                "dialogues, <= 300 new tokens each: at most (205,200 + 1,200) x 300 = 61.9 million generated "
                "tokens. Not run. Estimate for SmolLM2-135M on this project's 2-core machine: at the 261 tokens/s "
                "measured while generating the standard corpus (emokern.extraction.sampling, batch 171, <= 64 new tokens), "
                "237,000 s = 2.7 days, and more in practice, since 300-token outputs make each decoding step slower "
                "than 64-token ones; 3,226 shards of up to 64 jobs. A job for a GPU."),
            emotions=None,
            stories_per_emotion=1200,
            neutral=1200,
            max_new_tokens=300,
            batch_size=64,
            min_words=60,
            style="implicit",
        ),
    ]
}


# ----------------------------------------------------------------------------------------------------------------------
# Topics and prompts
# ----------------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _topics() -> tuple[str, ...]:
    text = files("emokern").joinpath("data", _TOPICS_FILE).read_text(encoding="utf-8")
    topics = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(topics) != _N_TOPICS or len(set(topics)) != len(topics):
        raise RuntimeError(f"emokern/data/{_TOPICS_FILE}: expected {_N_TOPICS} unique premises, got {len(topics)} "
                           f"lines ({len(set(topics))} unique)")
    return topics


def load_topics() -> list[str]:
    """The 100 everyday premises of ``emokern/data/topics.txt``, in file order (a new list each call)."""
    return list(_topics())


def _resolve_style(style) -> StoryStyle:
    if isinstance(style, StoryStyle):
        return style
    if isinstance(style, str) and style in STYLES:
        return STYLES[style]
    raise ValueError(f"style: expected one of {', '.join(STYLES)} or a StoryStyle; got {style!r}")


# ----------------------------------------------------------------------------------------------------------------------
# Job plan
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Job:
    """One story or neutral dialogue to generate.

    Attributes:
        key: ``"{emotion}|{topic_index}|{k}"`` for a story, ``"neutral|{topic_index}|{k}"`` for a dialogue, where
            ``k`` counts the earlier jobs of the same emotion (or of the neutral set) on the same premise.
        kind: ``"story"`` or ``"neutral"``.
        emotion: the story's emotion; ``None`` for a dialogue.
        topic_index: index of the premise in the topic list; ``topic`` is its text.
        person: ``"first"`` or ``"third"`` (narration) for a story; ``None`` for a dialogue.
        task: the dialogue's task type; ``None`` for a story.
        system, user: the two prompt turns (``system`` may be ``None``).
        opening: the first words of the answer, written for the model and stored as part of the text (``""``: none).
    """

    key: str
    kind: str
    emotion: str | None
    topic_index: int
    topic: str
    person: str | None
    task: str | None
    system: str | None
    user: str
    opening: str = ""


@dataclasses.dataclass(frozen=True)
class Chunk:
    """``jobs`` generated together, seeded with ``seed``, and stored as shard ``f"{kind}-{index:05d}.jsonl"``
    (``kind`` is ``"stories"`` or ``"neutral"``)."""

    kind: str
    index: int
    seed: int
    jobs: tuple[Job, ...]

    @property
    def shard_name(self) -> str:
        return f"{self.kind}-{self.index:05d}.jsonl"


def _derived_seed(*parts) -> int:
    """A 31-bit seed from the SHA-256 of ``parts`` (independent of Python's hash randomisation)."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def plan_chunks(emotions: Sequence[str], topics: Sequence[str], stories_per_emotion: int, neutral: int,
                batch_size: int, seed: int, style: str | StoryStyle = "implicit") -> list[Chunk]:
    """The fixed job list of a configuration, cut into chunks: story chunks first, then neutral chunks.

    Premise order is a permutation of ``range(len(topics))`` seeded by ``seed`` (sorted by the SHA-256 of
    ``f"{seed}|topic|{t}"``); with ``T = len(topics)``:

    * story ``j`` (0 <= j < ``stories_per_emotion``) of emotion ``i`` (its position in ``emotions``) uses premise
      ``order[j % T]`` for the ``k = j // T``-th time and first-person narration when ``(i + j % T + k)`` is even,
      third-person otherwise, so that narration alternates across emotions, premises and repeats; its prompt is
      ``style``'s (:data:`emokern.extraction.prompts.STYLES`), and its opening, if the style has one, names the character
      ``NAMES[i']`` with ``i'`` from the SHA-256 of the job key;
    * stories are listed by ``j`` first, then emotion (every emotion has ``j + 1`` stories after ``(j + 1) *
      len(emotions)`` jobs), and cut into chunks of ``batch_size`` (the last may be shorter). So a configuration
      with more stories per emotion (and otherwise the same) begins with the same chunks whenever ``batch_size``
      divides ``len(emotions)`` times the smaller count;
    * neutral dialogue ``j`` uses premise ``order[j % T]`` (``k = j // T``), task ``j % 6`` of the six task types
      and ``2 + j % 3`` exchanges, and opens with ``"Person:"``; neutral jobs are cut into their own chunks.

    Chunk ``c`` of kind ``kind`` is seeded with the first 31 bits of the SHA-256 of ``f"{seed}|{kind}|{c}"``.
    Arguments are assumed valid (:func:`generate_corpus` checks them).
    """
    style = _resolve_style(style)
    T = len(topics)
    order = sorted(range(T), key=lambda t: hashlib.sha256(f"{seed}|topic|{t}".encode()).digest())
    stories = []
    for j in range(stories_per_emotion):
        pos, k = j % T, j // T
        t = order[pos]
        for i, emotion in enumerate(emotions):
            person = "first" if (i + pos + k) % 2 == 0 else "third"
            key = f"{emotion}|{t}|{k}"
            user = style.user.format(topic=topics[t], emotion=emotion, narration=NARRATION[person])
            name = NAMES[_derived_seed(key) % len(NAMES)]
            stories.append(Job(key, "story", emotion, t, topics[t], person, None, style.system, user,
                               style.opening(person, emotion, name)))
    dialogues = []
    for j in range(neutral):
        t, k, task = order[j % T], j // T, NEUTRAL_TASKS[j % len(NEUTRAL_TASKS)]
        user = NEUTRAL_USER.format(topic=topics[t], task=task, exchanges=2 + j % 3)
        dialogues.append(Job(f"neutral|{t}|{k}", "neutral", None, t, topics[t], None, task, NEUTRAL_SYSTEM, user,
                             NEUTRAL_OPENING))
    chunks = []
    for kind, jobs in (("stories", stories), ("neutral", dialogues)):
        for c, start in enumerate(range(0, len(jobs), batch_size)):
            chunks.append(Chunk(kind, c, _derived_seed(seed, kind, c), tuple(jobs[start:start + batch_size])))
    return chunks


# ----------------------------------------------------------------------------------------------------------------------
# Filter and clean-up
# ----------------------------------------------------------------------------------------------------------------------

_MARKER = re.compile(r"\[\s*/?\s*(?:story|dialogue|end)\b[^\]\n]*\]", re.IGNORECASE)
_TITLE_LINE = re.compile(r"^\s*(?:#.*|(?:\*\*)?\s*title\s*(?:\*\*)?\s*:.*|\*\*[^*]+\*\*\s*)$", re.IGNORECASE)
_LABEL = re.compile(r"^\s*(?:\*\*)?\s*(?:story|dialogue)\s*\d*\s*(?:\*\*)?\s*:\s*", re.IGNORECASE)
_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d"}


def clean_story(raw: str) -> str:
    """``raw`` model output without chat artefacts, in this order:

    1. ``[story]``, ``[story 1]``, ``[/story]``, ``[dialogue 2]``, ``[end]`` markers are removed anywhere;
    2. leading lines are dropped while they are blank, a ``Title: ...`` line, a markdown heading (``# ...``), a line
       that is wholly bold (``**...**``), or a preface of at most 12 words ending in ``:`` ("Here is your story:");
    3. a leading ``Story:`` / ``Dialogue:`` label is removed (the text after it on the line stays);
    4. quotes wrapping the whole text are removed when they are its only quotes of that kind (so a story that
       merely starts and ends with dialogue keeps them);
    5. surrounding whitespace is stripped.

    A story cut off by ``max_new_tokens`` keeps its unfinished last sentence.
    """
    text = _MARKER.sub("", raw)
    lines = text.strip().splitlines()
    while lines and (not lines[0].strip() or _TITLE_LINE.match(lines[0])
                     or (lines[0].rstrip().endswith(":") and len(lines[0].split()) <= 12)):
        lines.pop(0)
    text = _LABEL.sub("", "\n".join(lines)).strip()
    if len(text) >= 2 and text[0] in _QUOTES and text[-1] == _QUOTES[text[0]]:
        opening, closing = text[0], _QUOTES[text[0]]
        if text.count(opening) + (text.count(closing) if closing != opening else 0) == 2:
            text = text[1:-1].strip()
    return text


_HUMAN_LABEL = re.compile(r"^[ \t]*(?:\*\*)?(?:person|user|human)(?:\*\*)?[ \t]*:(?:\*\*)?[ \t]*",
                          re.IGNORECASE | re.MULTILINE)
_AI_LABEL = re.compile(r"^[ \t]*(?:\*\*)?(?:ai|assistant)(?:\*\*)?[ \t]*:(?:\*\*)?[ \t]*", re.IGNORECASE | re.MULTILINE)


def relabel_dialogue(raw: str) -> str:
    """A neutral dialogue with its speaker labels replaced as the paper did: a line starting with ``Person:``,
    ``User:`` or ``Human:`` (any case, optionally in ``**bold**``) starts with ``Human: ``, one starting with
    ``AI:`` or ``Assistant:`` with ``Assistant: ``. Markers are removed as in :func:`clean_story`, and anything
    before the first ``Human:`` line (a preface) is dropped when there is such a line."""
    text = _AI_LABEL.sub("Assistant: ", _HUMAN_LABEL.sub("Human: ", _MARKER.sub("", raw)))
    first = re.search(r"^Human: ", text, re.MULTILINE)
    return (text[first.start():] if first else text).strip()


def _is_dialogue(text: str) -> bool:
    return bool(re.search(r"^Human: ", text, re.MULTILINE) and re.search(r"^Assistant: ", text, re.MULTILINE))


# ----------------------------------------------------------------------------------------------------------------------
# Corpus on disk
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Story:
    """A kept story: ``key`` (see :class:`Job`), ``emotion``, ``topic`` (the premise's text), ``person`` (``"first"``
    or ``"third"``), ``text`` (cleaned), ``n_tokens`` (tokens of ``text`` under the generating tokenizer, no
    special tokens) and ``opening`` (the words written for the model, with which ``text`` begins; ``""``: none)."""

    key: str
    emotion: str
    topic: str
    person: str
    text: str
    n_tokens: int
    opening: str = ""


@dataclasses.dataclass(frozen=True)
class NeutralDialogue:
    """A kept neutral dialogue: ``key``, ``topic``, ``task`` (the requested task type), ``text`` (``Human:`` /
    ``Assistant:`` lines) and ``n_tokens`` (as for :class:`Story`)."""

    key: str
    topic: str
    task: str
    text: str
    n_tokens: int


class StoryCorpus:
    """A generated corpus read back from its directory (see :meth:`load`).

    Attributes:
        out_dir: the directory.
        manifest: the parsed ``manifest.json`` (``config``, ``chunks``, ``model``, ...).
        records: every job's record, kept or dropped, in job order (dicts as stored in the shards).
        stories: the kept stories, in job order.
        neutral: the kept neutral dialogues, in job order.
        complete: whether every planned chunk has its shard.
    """

    def __init__(self, out_dir: Path, manifest: dict, records: list[dict], complete: bool):
        self.out_dir = out_dir
        self.manifest = manifest
        self.records = records
        self.complete = complete
        self.stories = [Story(r["key"], r["emotion"], r["topic"], r["person"], r["text"], r["n_tokens"],
                              r.get("opening", ""))
                        for r in records if r["kind"] == "story" and r["reason"] is None]
        self.neutral = [NeutralDialogue(r["key"], r["topic"], r["task"], r["text"], r["n_tokens"])
                        for r in records if r["kind"] == "neutral" and r["reason"] is None]

    def __repr__(self) -> str:
        return (f"StoryCorpus({str(self.out_dir)!r}: {len(self.stories)} stories, {len(self.neutral)} neutral "
                f"dialogues{'' if self.complete else ', incomplete'})")

    @classmethod
    def load(cls, out_dir: str | os.PathLike, *, allow_partial: bool = False) -> "StoryCorpus":
        """Read the corpus in ``out_dir``.

        Raises ``FileNotFoundError`` when ``out_dir`` has no ``manifest.json``, ``ValueError`` when a shard is
        malformed or does not hold exactly its chunk's jobs, and, unless ``allow_partial``, ``RuntimeError`` when
        some chunks have no shard yet (a run that has not finished: run :func:`generate_corpus` again with the same
        arguments to complete it).
        """
        out_dir = Path(out_dir)
        manifest = _read_manifest(out_dir)
        if manifest is None:
            raise FileNotFoundError(f"out_dir: expected a corpus directory with {MANIFEST} (made by generate_corpus); "
                                    f"{out_dir} has none")
        records, missing = [], []
        chunks = _plan_from_manifest(manifest)
        for chunk in chunks:
            path = out_dir / SHARDS / chunk.shard_name
            if not path.is_file():
                missing.append(path.name)
                continue
            shard = _read_shard(path)
            expected = [j.key for j in chunk.jobs]
            if [r.get("key") for r in shard] != expected:
                raise ValueError(f"{path}: expected the records of jobs {_short(expected)}; got "
                                 f"{_short([r.get('key') for r in shard])}; delete the shard to regenerate it")
            records.extend(shard)
        if missing and not allow_partial:
            raise RuntimeError(f"{out_dir}: the corpus is incomplete: {len(missing)} of {len(chunks)} chunks have no "
                               f"shard (first: {missing[0]}); run generate_corpus again with the same arguments to "
                               f"finish it, or load with allow_partial=True")
        return cls(out_dir, manifest, records, complete=not missing)

    def stats(self) -> dict:
        """Counts, tokens and timings of the records read.

        Returns a dict with:

        * ``emotions``: ``{emotion: {"kept": int, "dropped": {reason: int}}}`` for every configured emotion, in
          configuration order (reasons ``"too_short"``, ``"repetitive"``, ``"opening_lost"``, ``"emotion_word"``);
        * ``neutral``: ``{"kept": int, "dropped": {reason: int}}`` (reasons ``"too_short"``, ``"not_a_dialogue"``);
        * ``totals``: ``stories_kept``, ``stories_dropped``, ``neutral_kept``, ``neutral_dropped``, ``jobs`` (records
          read), ``chunks_done`` (shards read), ``chunks_total`` (planned), ``complete``;
        * ``tokens``: ``generated`` (new tokens sampled, up to and including the end-of-sequence token, over all
          records), ``kept`` (``n_tokens`` summed over kept texts), ``mean_kept_story`` (mean ``n_tokens`` of kept
          stories, 0.0 when none);
        * ``timings``: ``generation_seconds`` (wall time of the batched generation calls, summed over chunks; the
          model's time only, without filtering and writing) and ``tokens_per_second`` (``generated`` over it).
        """
        emotions = {e: {"kept": 0, "dropped": {}} for e in self.manifest["config"]["emotions"]}
        neutral = {"kept": 0, "dropped": {}}
        chunk_seconds = {}
        for r in self.records:
            entry = emotions[r["emotion"]] if r["kind"] == "story" else neutral
            if r["reason"] is None:
                entry["kept"] += 1
            else:
                entry["dropped"][r["reason"]] = entry["dropped"].get(r["reason"], 0) + 1
            chunk_seconds[(r["kind"], r["chunk"])] = r["chunk_seconds"]
        kept_stories = [s.n_tokens for s in self.stories]
        generated = sum(r["new_tokens"] for r in self.records)
        seconds = sum(chunk_seconds.values())
        return {
            "emotions": emotions,
            "neutral": neutral,
            "totals": {
                "stories_kept": len(self.stories),
                "stories_dropped": sum(sum(e["dropped"].values()) for e in emotions.values()),
                "neutral_kept": len(self.neutral),
                "neutral_dropped": sum(neutral["dropped"].values()),
                "jobs": len(self.records),
                "chunks_done": len(chunk_seconds),
                "chunks_total": sum(self.manifest["chunks"].values()),
                "complete": self.complete,
            },
            "tokens": {
                "generated": generated,
                "kept": sum(kept_stories) + sum(d.n_tokens for d in self.neutral),
                "mean_kept_story": sum(kept_stories) / len(kept_stories) if kept_stories else 0.0,
            },
            "timings": {
                "generation_seconds": seconds,
                "tokens_per_second": generated / seconds if seconds > 0 else 0.0,
            },
        }


def _read_manifest(out_dir: Path) -> dict | None:
    path = out_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: expected the JSON manifest of a corpus; cannot read it ({exc}); pass "
                         f"overwrite=True (or delete the directory) to start again") from exc
    if manifest.get("format") != _FORMAT:
        raise ValueError(f"{path}: expected corpus format {_FORMAT}; got {manifest.get('format')!r}")
    return manifest


def _plan_from_manifest(manifest: dict) -> list[Chunk]:
    config, topics = manifest["config"], manifest["topics"]
    if hashlib.sha256("\n".join(topics).encode()).hexdigest() != config["topics_sha256"]:
        raise ValueError(f"{MANIFEST}: its topics do not match its topics_sha256; the manifest was edited or damaged")
    return plan_chunks(config["emotions"], topics, config["stories_per_emotion"], config["neutral"],
                       config["batch_size"], config["seed"], config.get("style", "implicit"))


def _read_shard(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: expected one JSON record a line; cannot read it ({exc}); delete the shard to "
                         f"regenerate it") from exc


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` all at once: a crash leaves either the old file (or none) or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------------------


def _render(tokenizer, job: Job, prompt_format: str) -> str:
    """The full prompt text of ``job``, ending with the start of the answer (``job.opening``)."""
    if prompt_format == "chat":
        messages = ([{"role": "system", "content": job.system}] if job.system else []) + [
            {"role": "user", "content": job.user}]
        head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        head = (f"{job.system}\n\n" if job.system else "") + f"{job.user}\n\n{PLAIN_LEAD[job.kind]}"
    return head + job.opening


def _special_ids(model, tokenizer) -> tuple[int, list[int]]:
    """``(pad_id, eos_ids)``: the end-of-sequence ids of the model's generation config and of the tokenizer, and
    the tokenizer's pad id (its first end-of-sequence id when it has none)."""
    eos = []
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for tid in ([config_eos] if isinstance(config_eos, int) else list(config_eos or [])) + [tokenizer.eos_token_id]:
        if tid is not None and tid not in eos:
            eos.append(int(tid))
    if not eos:
        raise ValueError("tokenizer: expected an end-of-sequence token (tokenizer.eos_token_id or the model's "
                         "generation_config.eos_token_id); got neither")
    pad = tokenizer.pad_token_id
    return (eos[0] if pad is None else int(pad)), eos


def _generate_chunk(model, tokenizer, prompts: list[str], *, seed: int, max_new_tokens: int, temperature: float,
                    top_p: float, add_special_tokens: bool) -> tuple[list[str], list[int]]:
    """Sample one continuation per prompt in one batched call (:func:`emokern.extraction.sampling.sample`); returns the decoded
    texts (special tokens skipped) and the number of new tokens of each, up to and including its first
    end-of-sequence token."""
    from emokern.extraction.sampling import sample

    pad_id, eos_ids = _special_ids(model, tokenizer)
    encoded = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):  # left padding: every prompt ends where generation starts
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    new_ids, n_new = sample(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_p=top_p, eos_ids=eos_ids, pad_id=pad_id, seed=seed)
    texts = [tokenizer.decode(row[:n].tolist(), skip_special_tokens=True) for row, n in zip(new_ids, n_new.tolist())]
    return texts, n_new.tolist()


def own_words(text: str, opening: str, emotion: str) -> int:
    """The number of words of a story that are neither its ``opening`` (a prefix of ``text``) nor a form of its
    ``emotion`` word (:func:`emokern.extraction.emotion_words.emotion_word_spans`); a word is a whitespace-separated piece
    with at least one letter or digit (the punctuation left behind by a removed word is not one)."""
    if opening and text.startswith(opening):
        text = text[len(opening):]
    for a, b in sorted(emotion_word_spans(text, emotion), reverse=True):
        text = text[:a] + " " + text[b:]
    return sum(1 for w in text.split() if any(c.isalnum() for c in w))


#: A story whose distinct word trigrams are fewer than this fraction of its trigrams is ``"repetitive"``.
MIN_DISTINCT_TRIGRAMS = 0.5


def distinct_trigrams(text: str) -> float:
    """The fraction of a text's word trigrams (lower-cased, whitespace-separated) that are distinct: about 1 for
    prose, near 0 for a model caught in a loop ("I was sad. I was sad. ..."); 1.0 for texts under three words."""
    words = text.lower().split()
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    return len(set(grams)) / len(grams) if grams else 1.0


def story_reason(text: str, opening: str, emotion: str, min_words: int, names_emotion: bool) -> str | None:
    """Why a cleaned story is dropped, by the story checks of "Filtering" in their order (``"too_short"``,
    ``"repetitive"``, ``"opening_lost"``, ``"emotion_word"``), or None when it is kept."""
    if own_words(text, opening, emotion) < min_words:
        return "too_short"
    if distinct_trigrams(text) < MIN_DISTINCT_TRIGRAMS:
        return "repetitive"  # a loop: with the emotion word and its neighbours left out, little or nothing is left
    if not text.startswith(opening):
        return "opening_lost"  # clean-up removed the words written for the model: their span is unknown
    if not names_emotion and find_emotion_word(text, emotion) is not None:
        return "emotion_word"
    return None


def _records(chunk: Chunk, raws: list[str], new_tokens: list[int], tokenizer, min_words: int, seconds: float,
             names_emotion: bool) -> list[dict]:
    """The shard records of a generated chunk: each job's cleaned text, its fate and where it came from."""
    out = []
    for job, raw, n_new in zip(chunk.jobs, raws, new_tokens):
        if job.kind == "story":
            text = clean_story(raw)
            matched = find_emotion_word(text, job.emotion)
            reason = story_reason(text, job.opening, job.emotion, min_words, names_emotion)
        else:
            text, matched = relabel_dialogue(raw), None
            reason = ("too_short" if len(text.split()) < min_words else
                      "not_a_dialogue" if not _is_dialogue(text) else None)
        out.append({
            "key": job.key, "kind": job.kind, "emotion": job.emotion, "topic_index": job.topic_index,
            "topic": job.topic, "person": job.person, "task": job.task, "opening": job.opening, "text": text,
            "reason": reason, "matched": matched,
            "n_tokens": len(tokenizer(text, add_special_tokens=False)["input_ids"]), "new_tokens": n_new, "raw": raw,
            "chunk": chunk.index, "seed": chunk.seed, "chunk_seconds": seconds,
        })
    return out


def _resolve_preset(preset) -> CorpusPreset:
    if isinstance(preset, CorpusPreset):
        return preset
    if isinstance(preset, str) and preset in PRESETS:
        return PRESETS[preset]
    raise ValueError(f"preset: expected one of {', '.join(PRESETS)} or a CorpusPreset; got {preset!r}")


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}; got {value!r}")
    return value


def _check_emotions(emotions) -> list[str]:
    if isinstance(emotions, str) or not isinstance(emotions, Sequence):
        raise ValueError(f"emotions: expected a non-empty list of emotion names; got {emotions!r}")
    emotions = list(emotions)
    if not emotions:
        raise ValueError("emotions: expected a non-empty list of emotion names; got an empty list")
    known = load_emotions()
    for e in emotions:
        if e not in known:
            close = difflib.get_close_matches(str(e), known, n=3)
            hint = f" (closest: {', '.join(close)})" if close else ""
            raise ValueError(f"emotions: expected names from the 171 emotion words (emokern.core.emotions."
                             f"load_emotions()); got {e!r}{hint}")
    duplicates = sorted({e for e in emotions if emotions.count(e) > 1})
    if duplicates:
        raise ValueError(f"emotions: expected each name once; got duplicates {duplicates}")
    return emotions


def _check_topics(topics) -> list[str]:
    if isinstance(topics, str) or not isinstance(topics, Sequence) or not topics:
        raise ValueError(f"topics: expected a non-empty list of one-line premises; got {topics!r}")
    topics = list(topics)
    for i, t in enumerate(topics):
        if not isinstance(t, str) or not t.strip() or "\n" in t:
            raise ValueError(f"topics[{i}]: expected a non-empty one-line string; got {t!r}")
    if len(set(topics)) != len(topics):
        raise ValueError(f"topics: expected distinct premises; got duplicates "
                         f"{sorted({t for t in topics if topics.count(t) > 1})}")
    return [t.strip() for t in topics]


def _prepare_dir(out_dir: Path, overwrite: bool) -> None:
    """Create ``out_dir/shards`` and prove it writable; with ``overwrite``, remove a previous corpus there first
    (only ``manifest.json`` and ``shards/``; other files are left alone). Leftover temporary files of a killed run
    are removed."""
    try:
        if overwrite:
            (out_dir / MANIFEST).unlink(missing_ok=True)
            shutil.rmtree(out_dir / SHARDS, ignore_errors=True)
        (out_dir / SHARDS).mkdir(parents=True, exist_ok=True)
        probe = out_dir / SHARDS / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        for leftover in (out_dir / SHARDS).glob(".*.tmp-*"):
            leftover.unlink()
        for leftover in out_dir.glob(f".{MANIFEST}.tmp-*"):
            leftover.unlink()
    except OSError as exc:
        where = exc.filename or out_dir
        raise OSError(exc.errno, f"out_dir: expected a writable directory; cannot create or write {where}: "
                                 f"{exc.strerror or exc}") from exc


def generate_corpus(model, tokenizer, out_dir: str | os.PathLike, *, preset: str | CorpusPreset = "quick",
                    emotions: Sequence[str] | None = None, topics: Sequence[str] | None = None,
                    stories_per_emotion: int | None = None, neutral: int | None = None,
                    max_new_tokens: int | None = None, batch_size: int | None = None,
                    prompt_format: str | None = None, style: str | None = None, temperature: float | None = None,
                    min_words: int | None = None, seed: int = 0, progress: bool = True,
                    overwrite: bool = False, sampler=None) -> StoryCorpus:
    """Generate (or finish) a story corpus in ``out_dir`` and return it, loaded with :meth:`StoryCorpus.load`.

    Args:
        model, tokenizer: a causal LM and its tokenizer (used as given, never modified); sampling is
            :func:`emokern.extraction.sampling.sample`.
        out_dir: the corpus directory, created if needed: ``manifest.json`` and ``shards/*.jsonl``.
        preset: a name in :data:`PRESETS` or a :class:`CorpusPreset`. The keyword arguments ``emotions``,
            ``stories_per_emotion``, ``neutral``, ``max_new_tokens``, ``batch_size``, ``prompt_format``, ``style``,
            ``temperature`` and ``min_words`` override its fields when not ``None``.
        topics: the premises, default :func:`load_topics` (100).
        seed: fixes the premise order and every chunk's sampling seed (see :func:`plan_chunks`).
        progress: show a tqdm bar over jobs (ETA, and generated tokens per second of this run as postfix).
        overwrite: delete a previous corpus in ``out_dir`` (its ``manifest.json`` and ``shards/``) first.
        sampler: another engine for the sampling (e.g. :class:`emokern.engines.vllm.sampler.VllmSampler`): a callable
            ``sampler(prompts, seed=, max_new_tokens=, temperature=, top_p=, add_special_tokens=)`` returning what
            :func:`emokern.extraction.sampling.sample` gives here (decoded continuations, special tokens skipped, and the
            number of new tokens of each up to and including its end-of-sequence token), with a ``name`` that the
            manifest records as ``config["sampler"]``; ``model`` then only identifies the weights (fingerprint,
            dtype, end-of-sequence ids). A corpus is resumed only by the sampler that started it.

    Chunks whose shard exists are skipped, so calling again with the same arguments after an interruption
    continues where it stopped. One process per directory: a second one running at the same time would redo the
    same chunks. Each chunk samples with its own generator seeded by the chunk's seed. The manifest's ``config``
    holds everything that determines the jobs and the sampling: preset name, model fingerprint and dtype, emotions,
    topics' SHA-256, stories per emotion, neutral count, max_new_tokens, batch size (chunk size), min_words,
    temperature, top_p, prompt format, style, prompt texts' SHA-256, sampler and seed.

    **Growing a corpus.** A directory whose configuration differs only by fewer ``stories_per_emotion`` and/or
    ``neutral`` is grown rather than refused (:func:`plan_chunks` lists the smaller plan's jobs first): the manifest
    is updated, every shard that is a chunk of the new plan is kept, the old plan's last, partial chunk of each kind
    is generated again in full (same seed, more jobs), and the new chunks are generated. With a ``batch_size`` that
    divides ``len(emotions)`` times the old count, nothing is generated twice.

    Raises:
        ValueError: an unknown preset (the presets are listed), an empty or unknown emotion list (close names are
            suggested), malformed topics or counts, ``prompt_format="chat"`` with a tokenizer that has no chat
            template (pass ``prompt_format="plain"``: there is no silent fallback, because the corpus would change),
            an unknown style, a temperature below 0, or no end-of-sequence token.
        CorpusConfigError: ``out_dir`` holds a corpus of another configuration (the differing keys are named), or
            shards without a manifest; pass a fresh directory or ``overwrite=True``.
        OSError: ``out_dir`` cannot be created or written (the path and the reason are given).
    """
    p = _resolve_preset(preset)
    if emotions is None:
        emotions = load_emotions() if p.emotions is None else p.emotions
    emotions = _check_emotions(emotions)
    topics = load_topics() if topics is None else _check_topics(topics)
    stories_per_emotion = _check_int("stories_per_emotion", p.stories_per_emotion if stories_per_emotion is None
                                     else stories_per_emotion, 0)
    neutral = _check_int("neutral", p.neutral if neutral is None else neutral, 0)
    if stories_per_emotion == 0 and neutral == 0:
        raise ValueError("stories_per_emotion, neutral: expected at least one story or neutral dialogue; got 0 and 0")
    max_new_tokens = _check_int("max_new_tokens", p.max_new_tokens if max_new_tokens is None else max_new_tokens, 1)
    batch_size = _check_int("batch_size", p.batch_size if batch_size is None else batch_size, 1)
    seed = _check_int("seed", seed, 0)
    prompt_format = p.prompt_format if prompt_format is None else prompt_format
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format: expected one of {PROMPT_FORMATS}; got {prompt_format!r}")
    if prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompt_format: 'chat' needs a tokenizer with a chat template, and this one has none; pass "
                         "prompt_format='plain' to write the instructions as plain text (for base models)")
    min_words = _check_int("min_words", p.min_words if min_words is None else min_words, 0)
    story_style = _resolve_style(p.style if style is None else style)
    temperature = p.temperature if temperature is None else temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature: expected a number >= 0; got {temperature!r}")
    _special_ids(model, tokenizer)

    config = {
        "preset": p.name,
        "model_fingerprint": model_fingerprint(model),
        "model_dtype": str(next(model.parameters()).dtype),
        "emotions": emotions,
        "topics_sha256": hashlib.sha256("\n".join(topics).encode()).hexdigest(),
        "n_topics": len(topics),
        "stories_per_emotion": stories_per_emotion,
        "neutral": neutral,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "min_words": min_words,
        "temperature": float(temperature),
        "top_p": p.top_p,
        "prompt_format": prompt_format,
        "style": story_style.name,
        "prompts_sha256": prompts_sha256(story_style),
        "sampler": _SAMPLER if sampler is None else sampler.name,
        "seed": seed,
    }
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise OSError(f"out_dir: expected a directory; {out_dir} is a file")
    chunks = plan_chunks(emotions, topics, stories_per_emotion, neutral, batch_size, seed, story_style)
    grow = False if overwrite else _check_existing(out_dir, config, chunks)
    _prepare_dir(out_dir, overwrite)

    if grow or not (out_dir / MANIFEST).is_file():
        manifest = {
            "format": _FORMAT,
            "config": config,
            "topics": topics,
            "chunks": {kind: sum(c.kind == kind for c in chunks) for kind in ("stories", "neutral")},
            "model": {"name_or_path": getattr(model, "name_or_path", None),
                      "device": str(next(model.parameters()).device)},
            "versions": {"torch": torch.__version__, "transformers": importlib.metadata.version("transformers")},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        _write_atomic(out_dir / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")

    todo = [c for c in chunks if not (out_dir / SHARDS / c.shard_name).is_file()]
    n_jobs = sum(len(c.jobs) for c in chunks)
    from tqdm.auto import tqdm  # here, like transformers, so that importing this module stays light

    bar = tqdm(total=n_jobs, initial=n_jobs - sum(len(c.jobs) for c in todo), unit="job", desc="corpus",
               disable=not progress, dynamic_ncols=True)
    tokens, seconds = 0, 0.0
    try:
        for chunk in todo:
            prompts = [_render(tokenizer, job, prompt_format) for job in chunk.jobs]
            start = time.perf_counter()
            # a chat template writes its own special tokens; plain text needs the tokenizer's (e.g. a BOS)
            sampling = dict(seed=chunk.seed, max_new_tokens=max_new_tokens, temperature=temperature, top_p=p.top_p,
                            add_special_tokens=prompt_format == "plain")
            continuations, new_tokens = (_generate_chunk(model, tokenizer, prompts, **sampling) if sampler is None
                                         else sampler(prompts, **sampling))
            elapsed = time.perf_counter() - start
            raws = [job.opening + text for job, text in zip(chunk.jobs, continuations)]
            records = _records(chunk, raws, new_tokens, tokenizer, min_words, round(elapsed, 3),
                               story_style.names_emotion)
            _write_atomic(out_dir / SHARDS / chunk.shard_name,
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            tokens += sum(new_tokens)
            seconds += elapsed
            bar.update(len(chunk.jobs))
            bar.set_postfix_str(f"{tokens / seconds:.1f} tok/s")
    finally:
        bar.close()
    return StoryCorpus.load(out_dir)


def _check_existing(out_dir: Path, config: dict, chunks: list[Chunk]) -> bool:
    """Whether ``out_dir`` holds a smaller corpus of this configuration to grow (see :func:`generate_corpus`);
    ``False`` when it is new, empty of shards, or holds this configuration; else :class:`CorpusConfigError`."""
    manifest = _read_manifest(out_dir)
    if manifest is None:
        shards = sorted((out_dir / SHARDS).glob("*.jsonl")) if (out_dir / SHARDS).is_dir() else []
        if shards:
            raise CorpusConfigError(f"out_dir: {out_dir / SHARDS} holds {len(shards)} shards but {out_dir} has no "
                                    f"{MANIFEST}, so their configuration is unknown; pass a fresh out_dir or "
                                    f"overwrite=True")
        return False
    stored = manifest["config"]
    differ = [k for k in sorted(set(stored) | set(config)) if stored.get(k) != config.get(k)]
    if not differ:
        return False
    if set(differ) <= {"stories_per_emotion", "neutral"} and all(stored[k] <= config[k] for k in differ):
        planned = {c.shard_name: [j.key for j in c.jobs] for c in chunks}
        present = {p: [r.get("key") for r in _read_shard(p)] for p in sorted((out_dir / SHARDS).glob("*.jsonl"))}
        # a shard holding the first jobs of a larger chunk was the old plan's last, partial chunk: it is regenerated
        partial = [p for p, keys in present.items() if keys != planned.get(p.name)
                   and keys == (planned.get(p.name) or [])[:len(keys)]]
        if all(keys == planned.get(p.name) or p in partial for p, keys in present.items()):
            for p in partial:
                p.unlink()
            return True
    diffs = [f"{k}: stored {_short(stored.get(k))}, requested {_short(config.get(k))}" for k in differ]
    raise CorpusConfigError(f"out_dir: {out_dir} holds a corpus made with another configuration ("
                            f"{'; '.join(diffs)}); pass a fresh out_dir, or overwrite=True to replace it")


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."
