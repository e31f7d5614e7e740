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

**Filtering.** Each output is cleaned (:func:`~emokern.extraction.corpus_filters.clean_story`,
:func:`~emokern.extraction.corpus_filters.relabel_dialogue`), then checked in this order: a dialogue under ``min_words``
words, or a story under ``min_words`` words of its own (:func:`~emokern.extraction.corpus_filters.own_words`: the
opening and every form of the emotion word not counted, the tokens the ``opening`` reading leaves out), is dropped as
``"too_short"``; a story whose distinct word trigrams are under half of its trigrams
(:func:`~emokern.extraction.corpus_filters.distinct_trigrams`: a model caught in a loop, "I was sad. I was sad. ...",
common in small base models) as ``"repetitive"``; a story that no longer starts with its opening after clean-up as
``"opening_lost"``; in a style that may not name its emotion (``names_emotion=False``), a story that contains its
emotion word in any form :func:`emokern.extraction.emotion_words.emotion_word_pattern` knows as ``"emotion_word"`` (the
form found is recorded as ``matched`` in every style); a dialogue without both a ``Human:`` and an ``Assistant:`` line
as ``"not_a_dialogue"``. Dropped jobs are kept on disk (with their reason) and counted per emotion by
:meth:`StoryCorpus.stats`; they are not regenerated.

**Jobs, chunks and resuming.** :func:`~emokern.extraction.corpus_plan.plan_chunks` turns the configuration into a fixed
list of jobs (story key ``"{emotion}|{topic_index}|{k}"``, neutral key ``"neutral|{topic_index}|{k}"``) cut into chunks
of ``batch_size`` jobs: the same configuration always gives the same chunks. A chunk is the unit of work and of commit:
one batched sampling call (:func:`emokern.extraction.sampling.sample`, left padding, its generator seeded with the
chunk's seed), then one shard file ``shards/stories-{chunk:05d}.jsonl`` (or ``neutral-...``) written to a temporary file
and renamed into place, with one JSON record per job, kept or dropped. A run that is killed at any moment and started
again with the same arguments skips the chunks whose shard exists, so no finished story is lost or written twice.
``manifest.json`` records the configuration; starting with a different one in the same directory raises
:class:`CorpusConfigError`, except that a corpus can be grown to more stories or dialogues (see
:func:`generate_corpus`). Given the chunk, generation is deterministic on the same machine, dtype, thread count and
library versions (a resumed run then equals an uninterrupted one); elsewhere the sampled texts may differ.

**Presets** (:data:`~emokern.extraction.corpus_plan.PRESETS`; most fields can be overridden through
:func:`generate_corpus`'s arguments):

* ``standard``: the main job's corpus: all 171 emotions x 32 stories on 32 premises in the ``opening`` style and 48
  neutral dialogues. The package ships the one generated on the embedded SmolLM2 (:mod:`emokern.extraction.shipped_corpora`).
* ``quick``: the same recipe with 4 stories per emotion, for a corpus made here in minutes.
* ``mini``: for tests and CI: 4 emotions (desperate, calm, happy, afraid) x 2 stories and 4 neutral dialogues of at
  most 40 new tokens.
* ``paper``: the paper's scale and rule: 100 premises x 12 stories for each of the 171 emotions (205,200 stories) in
  the ``implicit`` style and 1,200 neutral dialogues, 300 new tokens each: days of a 2-core machine, a GPU job.

This module stores and generates the corpus; what it asks for (presets, premises, the job plan) is
:mod:`emokern.extraction.corpus_plan`, the clean-up and the checks :mod:`emokern.extraction.corpus_filters`. (About
600 lines: reading a corpus and writing one share its manifest and shard format, kept in one place.)

The model is used as given: put it in eval mode. On CPUs with AMX a bfloat16 model samples about three times faster
than float32. The tokenizer is never modified: padding is done here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

import torch

from emokern.core.emotions import load_emotions
from emokern.core.models import model_fingerprint
from emokern.extraction.corpus_filters import clean_story, is_dialogue, relabel_dialogue, story_reason
from emokern.extraction.corpus_plan import Chunk, CorpusPreset, Job, load_topics, plan_chunks, resolve_preset
from emokern.extraction.emotion_words import find_emotion_word
from emokern.extraction.prompts import PLAIN_LEAD, prompts_sha256, resolve_style
from emokern.util.files import atomic_write_text, temporary_leftovers
from emokern.util.names import close_names

__all__ = [
    "MANIFEST",
    "PROMPT_FORMATS",
    "SHARDS",
    "CorpusConfigError",
    "NeutralDialogue",
    "Story",
    "StoryCorpus",
    "generate_corpus",
    "job_prompt",
    "plan_from_manifest",
    "read_manifest",
    "special_token_ids",
]

MANIFEST = "manifest.json"
SHARDS = "shards"
_FORMAT = 1
PROMPT_FORMATS = ("chat", "plain")
# Recorded in the manifest: shards sampled another way are not continued with this sampler.
_SAMPLER = "emokern.extraction.sampling.sample(candidates=256)"


class CorpusConfigError(ValueError):
    """The output directory holds a corpus made with another configuration (or shards of unknown origin)."""


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
        manifest = read_manifest(out_dir)
        if manifest is None:
            raise FileNotFoundError(f"out_dir: expected a corpus directory with {MANIFEST} (made by generate_corpus); "
                                    f"{out_dir} has none")
        records, missing = [], []
        chunks = plan_from_manifest(manifest)
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


def read_manifest(out_dir: Path) -> dict | None:
    """The parsed ``manifest.json`` of the corpus in ``out_dir``, or ``None`` when there is none; ``ValueError``
    when it is unreadable or of another corpus format."""
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


def plan_from_manifest(manifest: dict) -> list[Chunk]:
    """The chunks (:func:`~emokern.extraction.corpus_plan.plan_chunks`) that a corpus's manifest describes; ``ValueError`` when its topics do not
    match their recorded hash."""
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


# ----------------------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------------------


def job_prompt(tokenizer, job: Job, prompt_format: str) -> str:
    """The full prompt text of ``job``, ending with the start of the answer (``job.opening``): its system and user
    turns in the tokenizer's chat template (``prompt_format="chat"``), or as plain paragraphs followed by the
    kind's :data:`~emokern.extraction.prompts.PLAIN_LEAD` (``"plain"``)."""
    if prompt_format == "chat":
        messages = ([{"role": "system", "content": job.system}] if job.system else []) + [
            {"role": "user", "content": job.user}]
        head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        head = (f"{job.system}\n\n" if job.system else "") + f"{job.user}\n\n{PLAIN_LEAD[job.kind]}"
    return head + job.opening


def special_token_ids(model, tokenizer) -> tuple[int, list[int]]:
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

    pad_id, eos_ids = special_token_ids(model, tokenizer)
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
                      "not_a_dialogue" if not is_dialogue(text) else None)
        out.append({
            "key": job.key, "kind": job.kind, "emotion": job.emotion, "topic_index": job.topic_index,
            "topic": job.topic, "person": job.person, "task": job.task, "opening": job.opening, "text": text,
            "reason": reason, "matched": matched,
            "n_tokens": len(tokenizer(text, add_special_tokens=False)["input_ids"]), "new_tokens": n_new, "raw": raw,
            "chunk": chunk.index, "seed": chunk.seed, "chunk_seconds": seconds,
        })
    return out


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
            close = close_names(e, known, n=3)
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
        for leftover in temporary_leftovers(out_dir / SHARDS) + temporary_leftovers(out_dir, MANIFEST):
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
        preset: a name in :data:`~emokern.extraction.corpus_plan.PRESETS` or a
            :class:`~emokern.extraction.corpus_plan.CorpusPreset`. The keyword arguments ``emotions``,
            ``stories_per_emotion``, ``neutral``, ``max_new_tokens``, ``batch_size``, ``prompt_format``, ``style``,
            ``temperature`` and ``min_words`` override its fields when not ``None``.
        topics: the premises, default :func:`~emokern.extraction.corpus_plan.load_topics` (100).
        seed: fixes the premise order and every chunk's sampling seed (see :func:`~emokern.extraction.corpus_plan.plan_chunks`).
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
    ``neutral`` is grown rather than refused (:func:`~emokern.extraction.corpus_plan.plan_chunks` lists the smaller plan's jobs first): the manifest
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
    p = resolve_preset(preset)
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
    story_style = resolve_style(p.style if style is None else style)
    temperature = p.temperature if temperature is None else temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature: expected a number >= 0; got {temperature!r}")
    special_token_ids(model, tokenizer)

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
        atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")

    todo = [c for c in chunks if not (out_dir / SHARDS / c.shard_name).is_file()]
    n_jobs = sum(len(c.jobs) for c in chunks)
    from tqdm.auto import tqdm  # here, like transformers, so that importing this module stays light

    bar = tqdm(total=n_jobs, initial=n_jobs - sum(len(c.jobs) for c in todo), unit="job", desc="corpus",
               disable=not progress, dynamic_ncols=True)
    tokens, seconds = 0, 0.0
    try:
        for chunk in todo:
            prompts = [job_prompt(tokenizer, job, prompt_format) for job in chunk.jobs]
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
            atomic_write_text(out_dir / SHARDS / chunk.shard_name,
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
    manifest = read_manifest(out_dir)
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
