"""What happens to each text the model writes for a corpus (:mod:`emokern.extraction.corpus`): clean-up
(:func:`clean_story`, :func:`relabel_dialogue`) and the checks that drop a text, in the order of "Filtering" in
:mod:`emokern.extraction.corpus` (:func:`story_reason` for stories; :func:`is_dialogue` and a word floor for
dialogues).
"""

from __future__ import annotations

import re

from emokern.extraction.emotion_words import emotion_word_spans, find_emotion_word

__all__ = ["MIN_DISTINCT_TRIGRAMS", "clean_story", "distinct_trigrams", "is_dialogue", "own_words", "relabel_dialogue",
           "story_reason"]

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


def is_dialogue(text: str) -> bool:
    return bool(re.search(r"^Human: ", text, re.MULTILINE) and re.search(r"^Assistant: ", text, re.MULTILINE))


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
