"""Tests of emokern.core.emotions: the shipped list of the paper's 171 emotion words."""

import emokern.core.emotions as emotions
from emokern.core.emotions import load_emotions


def test_171_unique_words():
    words = load_emotions()
    assert len(words) == 171 == emotions.N_EMOTIONS
    assert len(set(words)) == 171
    for w in ("desperate", "calm", "blissful", "hostile", "happy", "afraid", "at ease"):
        assert w in words
    assert all(w == w.strip() and w for w in words)
    assert words == sorted(words)


def test_emotions_lazy_constant():
    assert emotions.EMOTIONS == tuple(load_emotions())
    assert emotions.EMOTIONS is emotions.EMOTIONS  # one shared tuple
    fresh = load_emotions()
    fresh.append("x")
    assert len(load_emotions()) == 171  # callers get copies


def test_norms_rate_108_of_the_emotion_words(tmp_path):
    import pytest
    from emokern.util.data_files import DataFileMissingError

    norms = emotions.load_norms()
    assert len(norms) == 108 and {n.word for n in norms} <= set(load_emotions())
    assert all(1 <= n.valence <= 9 and 1 <= n.arousal <= 9 for n in norms)
    assert {n.match for n in norms} <= {"exact", "sense", "lemma", "derived"}
    with pytest.raises(DataFileMissingError, match="norms/emotion_word_norms.tsv"):
        emotions.load_norms(data_dir=tmp_path)
