"""Emotion words in text: every inflected and derived form of each of the 171 emotion words, as whole words.

The corpus uses it to drop stories that name their emotion (the paper's "implicit" prompt) and to find the spans
that extraction leaves out of a story's mean (``emokern.extraction.extract``'s ``exclude_spans``)::

    find_emotion_word("She was desperately tired.", "desperate")   # 'desperately'
    emotion_word_spans("Calm. Calmly, calmer.", "calm")              # [(0, 4), (6, 12), (14, 20)]
"""

from __future__ import annotations

import functools
import re

__all__ = ["emotion_word_pattern", "emotion_word_spans", "find_emotion_word"]

# Suffixes added to the emotion word itself (calm -> calmly, calmness, calmed, calming, calmer; hope -> hopeful).
_SUFFIXES = ("", "s", "es", "d", "ed", "ing", "ingly", "ly", "ally", "ness", "ment", "ments", "er", "est", "ity",
             "ful", "fully")
# Suffixes that begin with a vowel, after a final "e" is dropped (desperate -> desperation, serene -> serenity) or
# a final consonant doubled (sad -> sadden, upset -> upsetting).
_VOWEL_SUFFIXES = ("ing", "ingly", "ion", "ions", "ation", "ity", "ed", "er", "est", "en", "ened", "ening")
# Derived words the suffix rules cannot reach, for the commonest cases. Only derivations of the word itself, not
# synonyms (afraid has no entry: "fear" is a synonym). The bare verb of a participle (alarm, please, scar, puzzle,
# rattle, tire) is deliberately not matched by the rules, because it usually means something else; the few that do
# carry the emotion are listed here.
_DERIVED = {
    "angry": ("anger", "angered", "angers"),
    "anxious": ("anxiety", "anxieties"),
    "ashamed": ("shame", "shamed", "shameful"),
    "bored": ("bore", "bores", "boredom"),
    "compassionate": ("compassion",),
    "contemptuous": ("contempt",),
    "delighted": ("delight", "delights", "delightful"),
    "disdainful": ("disdain",),
    "disgusted": ("disgust", "disgusting"),
    "ecstatic": ("ecstasy",),
    "empathetic": ("empathy",),
    "enraged": ("rage", "enrage"),
    "envious": ("envy",),
    "euphoric": ("euphoria",),
    "excited": ("excite", "excites"),
    "furious": ("fury",),
    "grateful": ("gratitude",),
    "greedy": ("greed",),
    "grief-stricken": ("grief", "grieve", "grieves", "grieved", "grieving"),
    "guilty": ("guilt",),
    "hateful": ("hate", "hates", "hated", "hating", "hatred"),
    "heartbroken": ("heartbreak", "heartbreaking"),
    "hopeful": ("hope", "hopes", "hoped", "hoping"),
    "horrified": ("horror", "horrific"),
    "hysterical": ("hysteria", "hysterics"),
    "indignant": ("indignation",),
    "jealous": ("jealousy",),
    "joyful": ("joy", "joys", "joyous"),
    "jubilant": ("jubilation",),
    "loving": ("love", "loves", "loved"),
    "melancholy": ("melancholic",),
    "miserable": ("misery",),
    "nostalgic": ("nostalgia",),
    "offended": ("offend", "offence", "offense"),
    "optimistic": ("optimism",),
    "outraged": ("outrage",),
    "panicked": ("panic", "panics", "panicky"),
    "paranoid": ("paranoia",),
    "peaceful": ("peace",),
    "proud": ("pride",),
    "regretful": ("regret", "regrets", "regretted"),
    "relieved": ("relief", "relieve"),
    "remorseful": ("remorse",),
    "resentful": ("resent", "resents", "resentment"),
    "safe": ("safety",),
    "satisfied": ("satisfy", "satisfaction"),
    "scared": ("scare", "scares", "scary"),
    "scornful": ("scorn",),
    "shocked": ("shock",),
    "skeptical": ("skepticism", "sceptical", "scepticism"),
    "spiteful": ("spite",),
    "stressed": ("stress", "stressful"),
    "surprised": ("surprise", "surprises"),
    "suspicious": ("suspicion",),
    "sympathetic": ("sympathy",),
    "terrified": ("terror", "terrify"),
    "tormented": ("torment", "torments"),
    "triumphant": ("triumph",),
    "valiant": ("valour", "valor"),
    "vengeful": ("vengeance",),
    "vulnerable": ("vulnerability",),
    "worried": ("worry", "worries"),
}


def _word_forms(word: str) -> set[str]:
    """The forms of one lower-case word that the suffix rules generate (see :func:`emotion_word_pattern`)."""
    forms = {word + s for s in _SUFFIXES}
    if word.endswith("e"):
        forms |= {word[:-1] + s for s in _VOWEL_SUFFIXES}
    if word.endswith("y"):
        forms |= {word[:-1] + "i" + s for s in ("ly", "ness", "er", "est", "es", "ed")}
    if word.endswith(("ent", "ant")):
        forms.add(word[:-1] + "ce")
    if re.search(r"(?:^|[^aeiou])[aeiou][bdgklmnprt]$", word):
        forms |= {word + word[-1] + s for s in _VOWEL_SUFFIXES}
    if word.endswith("ed") and len(word) > 4:
        roots = {word[:-2], word[:-1]}
        if word[-3] == word[-4]:
            roots.add(word[:-3])
        if word.endswith("ied"):
            roots.add(word[:-3] + "y")
        forms |= {r + s for r in roots for s in ("ing", "ingly", "ment", "ments", "ion", "ation")}
    return forms


@functools.lru_cache(maxsize=None)
def emotion_word_pattern(emotion: str) -> re.Pattern:
    """A compiled case-insensitive regex matching ``emotion`` and its inflections as whole words.

    The emotion is split on spaces and hyphens; all parts but the last must appear in order, separated by spaces,
    hyphens or nothing ("worn out", "worn-out"; "grief-stricken", "grief stricken"). The last part (the whole word,
    for one-word emotions) matches in these forms:

    * the word plus any of ``"", s, es, d, ed, ing, ingly, ly, ally, ness, ment(s), er, est, ity, ful, fully``;
    * ending in ``e``: the word without it plus a vowel suffix ``ing, ingly, ion(s), ation, ity, ed, er, est, en,
      ened, ening`` (desperate -> desperation, serene -> serenity);
    * ending in ``y``: ``y`` -> ``i`` plus ``ly, ness, er, est, es, ed`` (angry -> angrily, happy -> happiness);
    * ending in ``ent``/``ant``: ``-ence``/``-ance`` (patient -> patience, defiant -> defiance);
    * ending consonant-vowel-consonant (not w, x, y): the last letter doubled plus a vowel suffix (sad -> sadden,
      upset -> upsetting);
    * a participle in ``ed`` of 5+ letters: the word without ``ed``, without ``d``, without ``ied`` plus ``y``, and
      without the doubled consonant, each plus ``ing, ingly, ment(s), ion, ation`` (amused -> amusement,
      frustrated -> frustration, worried -> worrying). The bare verb is not matched (alarmed does not match
      "alarm", pleased does not match "please");
    * for one-word emotions, the hand-written derived words of ``_DERIVED`` (angry -> anger, proud -> pride,
      hopeful -> hope, worried -> worry), and for "grief-stricken" grief/grieve/grieving.

    The rules over-generate non-words ("happyness"), which cost nothing. They are an approximation: irregular
    derivations not listed are missed, and a form can also be an unrelated word ("kind" in "a kind of").
    """
    if not isinstance(emotion, str) or not emotion.strip():
        raise ValueError(f"emotion: expected a non-empty string; got {emotion!r}")
    parts = re.split(r"[\s-]+", emotion.strip().lower())
    alternatives = set(_word_forms(parts[-1]))
    prefix = "".join(re.escape(p) + r"[\s-]*" for p in parts[:-1])
    pattern = prefix + "(?:" + "|".join(re.escape(f) for f in sorted(alternatives, key=len, reverse=True)) + ")"
    derived = _DERIVED.get(emotion.strip().lower(), ())
    if derived:
        pattern = "(?:" + pattern + "|" + "|".join(re.escape(d) for d in derived) + ")"
    return re.compile(r"\b" + pattern + r"\b", re.IGNORECASE)


def find_emotion_word(text: str, emotion: str) -> str | None:
    """The first form of ``emotion`` in ``text`` (as written there), or ``None``; see :func:`emotion_word_pattern`."""
    match = emotion_word_pattern(emotion).search(text)
    return None if match is None else match.group(0)


def emotion_word_spans(text: str, emotion: str) -> list[tuple[int, int]]:
    """The ``(start, end)`` character spans of every form of ``emotion`` in ``text`` (see
    :func:`emotion_word_pattern`), in order; what ``story_activations(exclude_spans=...)`` leaves out of a mean."""
    return [m.span() for m in emotion_word_pattern(emotion).finditer(text)]
