"""Word-level tokenizers for tests that plant words: every whitespace- or punctuation-separated word is one token, so
a test knows which id each word of its text gets (a bank vector can be the unembedding row of a word, a corpus test
can write stories from a fixed word list).

:func:`word_tokenizer` builds one from a vocabulary list; :func:`vocab_of` makes that list from texts.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence

__all__ = ["vocab_of", "word_tokenizer"]


def vocab_of(texts: Iterable[str], specials: Sequence[str] = ("[UNK]", "[PAD]")) -> List[str]:
    """``specials`` (ids 0, 1, …) followed by the distinct words of ``texts`` in sorted order, words as the
    ``Whitespace`` pre-tokenizer splits them (runs of letters, digits and ``_``, and runs of other symbols)."""
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.Whitespace()
    return list(specials) + sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t)})


def word_tokenizer(vocab: Sequence[str], *, unk: str = "[UNK]", pad: Optional[str] = None, eos: Optional[str] = None,
                   bos: Optional[str] = None, bos_on_raw_text: bool = False, chat_template: Optional[str] = None):
    """A ``PreTrainedTokenizerFast`` whose token ``i`` is ``vocab[i]``: ``WordLevel`` over the ``Whitespace``
    pre-tokenizer, words not in ``vocab`` becoming ``unk`` (which must be in it).

    ``pad``, ``eos`` and ``bos`` name the special tokens (each in ``vocab``; None: the tokenizer has none).
    ``bos_on_raw_text``: encoding with special tokens (the default of ``tokenizer(text)``) puts ``bos`` first, as
    Llama's tokenizer does. ``chat_template``: the Jinja template, or None for a tokenizer without one.
    """
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    ids = {token: i for i, token in enumerate(vocab)}
    if len(ids) != len(vocab):
        raise ValueError(f"vocab: expected distinct tokens; got {len(vocab) - len(ids)} repeated")
    for role, token in (("unk", unk), ("pad", pad), ("eos", eos), ("bos", bos)):
        if token is not None and token not in ids:
            raise ValueError(f"{role}: {token!r} is not in the vocabulary")
    backend = Tokenizer(models.WordLevel(ids, unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos_on_raw_text:
        if bos is None:
            raise ValueError("bos_on_raw_text: needs a bos token")
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, ids[bos])])
    special = {name: token for name, token in (("unk_token", unk), ("pad_token", pad), ("eos_token", eos),
                                               ("bos_token", bos)) if token is not None}
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **special)
    tokenizer.chat_template = chat_template
    return tokenizer
