"""The prompts that write the corpus: story styles (one per recipe) and the neutral-dialogue prompt.

A :class:`StoryStyle` says how one story is asked for: an optional system turn, a user turn with the fields
``{topic}``, ``{emotion}`` and ``{narration}``, and an optional **opening**: the first words of the answer, written
for the model (``{emotion}``, ``{name}``), which it then continues. The opening is part of the stored story; extraction
can leave it out of the mean (``emokern.extraction.extract.extract_bank_from_corpus``). ``names_emotion`` says whether a story
may contain its emotion word: when False, stories that do are dropped (the paper's rule). A style also says how its
stories are read by default (``first_token``, ``exclude``, ``exclude_after``; see
:func:`emokern.extraction.extract.story_exclusions`), since what to leave out of a mean depends on how the story was written.

Styles (:data:`STYLES`), compared by ``benchmarks/bench_recipe.py`` (results and the reasons for the default in the
README):

* ``implicit`` — the paper's recipe: never name the emotion, convey it through actions, body, speech, thoughts
  and setting (PAPER_NOTES §1). On a 135M model the stories carry almost no emotion the activations can see.
* ``plain`` — a short, plain request that names the feeling; the story may name it too.
* ``fewshot`` — the plain request after one short example story of our own.
* ``diary`` — a first-person diary entry full of the feeling.
* ``dialogue`` — a scene told mostly in dialogue.
* ``opening`` — the plain request, and the answer opens with "I felt {emotion}." (first person) or
  "{name} felt {emotion}." (third person): the model then writes a story in which the character has that feeling.
  The default of the main job: by far the strongest held-out signal on small models (see the README).

All prompt texts are ours.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Optional

__all__ = ["NAMES", "NARRATION", "NEUTRAL_OPENING", "NEUTRAL_SYSTEM", "NEUTRAL_TASKS", "NEUTRAL_USER", "PLAIN_LEAD",
           "STYLES", "StoryStyle", "prompts_sha256", "resolve_style"]


@dataclasses.dataclass(frozen=True)
class StoryStyle:
    """How one story is asked for (see the module docstring)."""

    name: str
    description: str
    user: str
    system: Optional[str] = None
    opening_first: str = ""
    opening_third: str = ""
    names_emotion: bool = True
    first_token: int = 0
    exclude: str = "opening+word"
    exclude_after: int = 3

    def opening(self, person: str, emotion: str, name: str) -> str:
        """The answer's first words for a ``person`` ("first" / "third") story, or ``""``."""
        template = self.opening_first if person == "first" else self.opening_third
        return template.format(emotion=emotion, name=name)


#: How ``{narration}`` is filled for first- and third-person stories.
NARRATION = {"first": "first person (\"I\")", "third": "third person (\"he\", \"she\" or a name)"}
#: Third-person openings name the character; story ``j`` of the corpus gets ``NAMES[hash(key) % len(NAMES)]``.
NAMES = ("Maya", "Tom", "Aisha", "Leo", "Nina", "Sam", "Priya", "Jonas", "Elena", "Kofi", "Hana", "Omar", "Lucy",
         "Diego", "Mei", "Ben")

_PLAIN_USER = ("Write a short story (one paragraph) about this: {topic}. The main character feels very {emotion}. "
               "Show how {emotion} they feel through what they do, think and say.")

STYLES: dict[str, StoryStyle] = {s.name: s for s in [
    StoryStyle(
        name="implicit",
        description="the paper's rule: the emotion is never named, only shown; stories naming it are dropped",
        system=("You are a fiction writer. You answer with the story only: no title, no introduction, no notes "
                "after it."),
        user=("Write one short story of about one paragraph (four to six sentences).\n"
              "Premise: {topic}.\n"
              "The main character feels {emotion}.\n"
              "Narration: {narration}.\n"
              "Never write the word \"{emotion}\" or any word that means the same. The reader must sense the feeling "
              "only through what the character does, how their body feels and moves, what they say and in what "
              "tone, what they think, and what the place around them is like."),
        names_emotion=False, first_token=50, exclude="none", exclude_after=0),
    StoryStyle(
        name="plain",
        description="a short plain request naming the feeling; the story may name it",
        user=_PLAIN_USER),
    StoryStyle(
        name="fewshot",
        description="the plain request after one example story of ours (about nervousness)",
        user=("Here is an example of a short story whose main character feels nervous:\n\n"
              "Tom read the question on the screen for the third time. His palms left damp marks on the desk, and "
              "he kept clicking his pen, open, shut, open. \"Just breathe,\" he muttered, but his voice came out "
              "thin. Every time the door opened he flinched, sure it was his turn, and his stomach turned over like "
              "a fish on a deck.\n\n"
              "Now write a different short story of one paragraph, about this: {topic}. The main character feels "
              "{emotion}. Show the feeling in every sentence, the same way.")),
    StoryStyle(
        name="diary",
        description="a first-person diary entry full of the feeling",
        user=("Write a diary entry of one paragraph, in the first person, by someone on a day when this happened: "
              "{topic}. They feel {emotion}, and the whole entry is full of that feeling: what they did, what went "
              "through their head, how their body felt.")),
    StoryStyle(
        name="dialogue",
        description="a scene told mostly in dialogue",
        user=("Write a short scene of one paragraph, mostly in dialogue, about this: {topic}. The main character "
              "feels {emotion}, and everything they say and how they say it shows how {emotion} they feel.")),
    StoryStyle(
        name="opening",
        description="the plain request; the answer opens with 'I felt {emotion}.' or '{name} felt {emotion}.'",
        user=_PLAIN_USER,
        opening_first="I felt {emotion}.",
        opening_third="{name} felt {emotion}."),
]}

NEUTRAL_SYSTEM = ("You write example conversations between a person and an AI assistant for a technical dataset. "
                  "The assistant answers plainly and factually.")
NEUTRAL_USER = (
    "Topic: {topic}.\n"
    "Write a conversation of {exchanges} exchanges in which the person asks for {task} related to this topic and "
    "the AI gives it. Each exchange is a line \"Person: ...\" and then a line \"AI: ...\".\n"
    "Plain, factual language only: no greetings, no thanks, no compliments, no feelings, no opinions.")
#: The paper's mix of neutral tasks; dialogue j asks for ``NEUTRAL_TASKS[j % 6]``.
NEUTRAL_TASKS = (
    "help with a short piece of code",
    "a fact from science, history, maths or geography",
    "step-by-step instructions for a practical task",
    "a list",
    "name or title ideas",
    "help with a work task such as a schedule, a summary or an email draft",
)
#: The start of a neutral dialogue's answer, written for the model: a small model asked for a dialogue often
#: narrates one instead, but continues a dialogue that has begun. Part of the stored raw output.
NEUTRAL_OPENING = "Person:"
#: Labels that end a plain-format prompt, so that a base model continues with the text itself.
PLAIN_LEAD = {"story": "Story:\n", "neutral": "Dialogue:\n"}


def prompts_sha256(style: StoryStyle) -> str:
    """SHA-256 of every prompt text a corpus of ``style`` uses: a change of wording makes old shards incompatible."""
    parts = [json.dumps(dataclasses.asdict(style), sort_keys=True), json.dumps(NARRATION, sort_keys=True),
             json.dumps(NAMES), NEUTRAL_SYSTEM, NEUTRAL_USER, *NEUTRAL_TASKS, NEUTRAL_OPENING,
             json.dumps(PLAIN_LEAD, sort_keys=True)]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def resolve_style(style) -> StoryStyle:
    """``style`` itself when it is a :class:`StoryStyle`, else the entry of :data:`STYLES` that it names;
    ``ValueError`` naming the known styles otherwise."""
    if isinstance(style, StoryStyle):
        return style
    if isinstance(style, str) and style in STYLES:
        return STYLES[style]
    raise ValueError(f"style: expected one of {', '.join(STYLES)} or a StoryStyle; got {style!r}")
