"""Corpora shipped inside the package: a generated corpus packed into one gzip file, and unpacked again.

The main job's corpus takes longer to generate on two CPU cores than a first run should, so the project ships the
one it generated with ``emokern corpus`` on the embedded model (its manifest records the model fingerprint, the
recipe and the seed) and the main job unpacks it; ``emokern demo --regenerate`` (or ``emokern corpus``) makes it anew::

    path = pack_corpus("emokern_out/corpus", "emokern/data/corpora/smollm2-135m-instruct-standard.jsonl.gz")
    unpack_corpus(packaged_corpus("smollm2-135m-instruct", "standard"), "emokern_out/corpus")
    StoryCorpus.load("emokern_out/corpus")

File format: gzip-compressed JSON lines; the first line is ``{"emokern_packed_corpus": 1, "manifest": {...}}`` (the
corpus's ``manifest.json``), every other line one shard record in job order, without its ``raw`` field (the model's
output before clean-up; the stored ``text`` is what extraction reads). Unpacking writes ``manifest.json`` and one
shard file per chunk, exactly as :func:`emokern.extraction.corpus.generate_corpus` would have, so everything downstream
(:class:`emokern.extraction.corpus.StoryCorpus`, the bank's corpus identity) treats it like a corpus generated here. The gzip
header carries no time stamp, so packing the same corpus twice gives the same bytes.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from importlib.resources import files
from pathlib import Path
from typing import Optional

from emokern.extraction.corpus import MANIFEST, SHARDS, StoryCorpus, plan_from_manifest
from emokern.util.files import atomic_write_bytes, atomic_write_text

__all__ = ["PACKED_FORMAT", "pack_corpus", "packaged_corpus", "unpack_corpus"]

PACKED_FORMAT = 1
_DIR = ("data", "corpora")


def packaged_corpus(model_name: str, preset: str) -> Optional[Path]:
    """The packed corpus shipped for embedded model ``model_name`` and corpus ``preset``, or ``None``."""
    path = Path(str(files("emokern").joinpath(*_DIR, f"{model_name}-{preset}.jsonl.gz")))
    return path if path.is_file() else None


def pack_corpus(corpus_dir: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Pack the complete corpus in ``corpus_dir`` into ``path`` (see the module docstring); returns ``path``.

    Raises ``RuntimeError`` (from :meth:`StoryCorpus.load`) when the corpus is incomplete.
    """
    corpus = StoryCorpus.load(corpus_dir)
    lines = [json.dumps({"emokern_packed_corpus": PACKED_FORMAT, "manifest": corpus.manifest}, ensure_ascii=False)]
    lines += [json.dumps({k: v for k, v in r.items() if k != "raw"}, ensure_ascii=False) for r in corpus.records]
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9, mtime=0) as f:
        f.write(("\n".join(lines) + "\n").encode("utf-8"))
    return atomic_write_bytes(path, buffer.getvalue())


def unpack_corpus(path: str | os.PathLike, out_dir: str | os.PathLike) -> StoryCorpus:
    """Write the packed corpus ``path`` into ``out_dir`` as a corpus directory and return it loaded.

    ``out_dir`` must not hold a corpus yet (no ``manifest.json``, no shards): ``FileExistsError`` otherwise, so
    that nothing generated is ever overwritten. ``ValueError`` when ``path`` is not a packed corpus or its records
    are not exactly its manifest's jobs.
    """
    path, out_dir = Path(path), Path(out_dir)
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as exc:
        raise ValueError(f"path: expected a packed corpus (gzip JSON lines); cannot read {path} ({exc})") from exc
    if not lines or lines[0].get("emokern_packed_corpus") != PACKED_FORMAT:
        raise ValueError(f"path: expected a packed corpus of format {PACKED_FORMAT}; {path} starts with "
                         f"{str(lines[0])[:80] if lines else 'nothing'}")
    manifest, records = lines[0]["manifest"], lines[1:]
    if (out_dir / MANIFEST).exists() or any((out_dir / SHARDS).glob("*.jsonl")):
        raise FileExistsError(f"out_dir: {out_dir} already holds a corpus; unpack into an empty directory")
    chunks = plan_from_manifest(manifest)
    expected = [j.key for c in chunks for j in c.jobs]
    if [r.get("key") for r in records] != expected:
        raise ValueError(f"path: the records of {path} are not the jobs its manifest plans ({len(records)} records, "
                         f"{len(expected)} jobs)")
    (out_dir / SHARDS).mkdir(parents=True, exist_ok=True)
    at = 0
    for chunk in chunks:
        shard = records[at:at + len(chunk.jobs)]
        at += len(chunk.jobs)
        atomic_write_text(out_dir / SHARDS / chunk.shard_name,
                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in shard))
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return StoryCorpus.load(out_dir)
