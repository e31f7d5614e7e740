"""What a story corpus asks the model for (:mod:`emokern.extraction.corpus` generates and stores it): the presets,
the 100 everyday premises of ``emokern/data/topics.txt``, and the fixed plan of jobs cut into chunks that makes a
corpus resumable (see "Jobs, chunks and resuming" in :mod:`emokern.extraction.corpus`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from importlib.resources import files
from typing import Sequence

from emokern.extraction.prompts import (NAMES, NARRATION, NEUTRAL_OPENING, NEUTRAL_SYSTEM, NEUTRAL_TASKS,
                                        NEUTRAL_USER, StoryStyle, resolve_style)

__all__ = ["PRESETS", "Chunk", "CorpusPreset", "Job", "load_topics", "plan_chunks", "resolve_preset"]

_N_TOPICS = 100

_TOPICS_FILE = "topics.txt"


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
# Premises
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
    Arguments are assumed valid (:func:`emokern.extraction.corpus.generate_corpus` checks them).
    """
    style = resolve_style(style)
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


def resolve_preset(preset) -> CorpusPreset:
    """``preset`` itself when it is a :class:`CorpusPreset`, else the entry of :data:`PRESETS` that it names;
    ``ValueError`` naming the presets otherwise."""
    if isinstance(preset, CorpusPreset):
        return preset
    if isinstance(preset, str) and preset in PRESETS:
        return PRESETS[preset]
    raise ValueError(f"preset: expected one of {', '.join(PRESETS)} or a CorpusPreset; got {preset!r}")
