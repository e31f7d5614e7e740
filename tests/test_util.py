"""emokern.util: atomic writes, Agg figures, correlation, normalisation, suggestions."""

import json
import math
import os

import pytest
import torch

from emokern.util import figures, files, names, stats


def test_atomic_write_json_text_bytes_round_trip(tmp_path):
    p = files.atomic_write_json(tmp_path / "a" / "x.json", {"k": [1, 2]})
    assert json.loads(p.read_text()) == {"k": [1, 2]}
    assert files.atomic_write_text(tmp_path / "t.txt", "héllo").read_text(encoding="utf-8") == "héllo"
    assert files.atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    assert not list(tmp_path.rglob(files.TMP_GLOB))


def test_atomic_write_failure_keeps_old_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "x.json"
    files.atomic_write_json(target, {"old": True})
    with pytest.raises(ValueError):
        files.atomic_write_json(target, {"bad": math.nan})  # strict JSON: NaN refused
    with pytest.raises(RuntimeError):
        with files.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"old": True}
    assert not list(tmp_path.glob(files.TMP_GLOB))


def test_atomic_path_renames_what_a_path_writer_wrote(tmp_path):
    target = tmp_path / "deep" / "w.bin"
    with files.atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".w.bin.tmp-")
        with open(tmp, "wb") as f:
            f.write(b"abc")
        assert not target.exists()
    assert target.read_bytes() == b"abc"


def test_atomic_write_json_default_converts():
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        p = files.atomic_write_json(os.path.join(d, "t.json"), {"t": torch.tensor([1.5])}, default=lambda x: x.tolist())
        assert json.loads(p.read_text()) == {"t": [1.5]}


def test_agg_figure_leaves_backend_and_pyplot_alone(tmp_path):
    import matplotlib
    backend = matplotlib.get_backend()
    fig = figures.agg_figure(2, 1, dpi=50)
    fig.add_subplot().plot([0, 1], [1, 0])
    fig.savefig(tmp_path / "f.png", format="png")
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    assert matplotlib.get_backend() == backend
    assert tuple(fig.get_size_inches()) == (2, 1)


def test_pearson_values_and_undefined_cases():
    assert stats.pearson([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert stats.pearson([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    x, y = [0.1, 0.5, 0.2, 0.9, 0.4], [1.0, 2.0, 0.5, 3.0, 1.7]
    import numpy as np
    assert stats.pearson(x, y) == pytest.approx(float(np.corrcoef(x, y)[0, 1]), abs=1e-12)
    assert stats.pearson([1, 2], [1, 2]) is None            # fewer than 3 points
    assert stats.pearson([1, 1, 1], [1, 2, 3]) is None      # constant
    with pytest.raises(ValueError, match="one length"):
        stats.pearson([1, 2, 3], [1, 2])


def test_unit_rows_norms_and_zero_rows():
    v = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    u = stats.unit_rows(v)
    assert torch.allclose(u[0], torch.tensor([0.6, 0.8]))
    assert torch.equal(u[1], torch.zeros(2))


def test_did_you_mean():
    assert names.did_you_mean("hapy", ["happy", "sad"]) == "; did you mean 'happy'?"
    assert names.did_you_mean("zzz", ["happy", "sad"]) == ""
    assert names.close_names("desprate", ["desperate", "separate", "calm"], n=1) == ["desperate"]


def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path):
    import stat
    umask = os.umask(0o022)
    try:
        p = files.atomic_write_text(tmp_path / "perm.txt", "x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o644  # not mkstemp's 0o600


def test_temporary_leftovers_all_or_one_target(tmp_path):
    for name in (".a.json.tmp-1", ".a.json.tmp-2", ".b[1].txt.tmp-x", "a.json", ".hidden"):
        (tmp_path / name).write_text("")
    assert [p.name for p in files.temporary_leftovers(tmp_path)] == [".a.json.tmp-1", ".a.json.tmp-2", ".b[1].txt.tmp-x"]
    assert [p.name for p in files.temporary_leftovers(tmp_path, "a.json")] == [".a.json.tmp-1", ".a.json.tmp-2"]
    assert [p.name for p in files.temporary_leftovers(tmp_path, "b[1].txt")] == [".b[1].txt.tmp-x"]  # no glob classes
    assert files.temporary_leftovers(tmp_path / "missing") == []


def test_pearson_p_value_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    import numpy as np
    rng = np.random.default_rng(0)
    for n in (3, 5, 45, 400):
        x = rng.normal(size=n)
        y = 0.4 * x + rng.normal(size=n)
        want = scipy_stats.pearsonr(x, y)
        r = stats.pearson(x.tolist(), y.tolist())
        assert r == pytest.approx(want.statistic, abs=1e-14)
        assert stats.pearson_p_value(r, n) == pytest.approx(want.pvalue, rel=1e-9)
    assert stats.pearson_p_value(0.0, 10) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="n >= 3"):
        stats.pearson_p_value(0.5, 2)


def test_data_file_finds_packaged_and_user_files(tmp_path):
    from emokern.util import data_files
    assert data_files.data_file(None, "norms", "emotion_word_norms.tsv").is_file()
    (tmp_path / "norms").mkdir()
    (tmp_path / "norms" / "x.tsv").write_text("a")
    assert data_files.data_file(tmp_path, "norms", "x.tsv") == tmp_path / "norms" / "x.tsv"
    with pytest.raises(data_files.DataFileMissingError, match=r"emokern expects norms/y\.tsv .*emokern/data/norms/README"):
        data_files.data_file(tmp_path, "norms", "y.tsv")
    assert issubclass(data_files.DataFileMissingError, FileNotFoundError)


def test_pearson_clips_rounding_past_one():
    x = [0.1 * i for i in range(50)]
    r = stats.pearson(x, [3.0 * v + 1.0 for v in x])
    assert r is not None and -1.0 <= r <= 1.0 and r == pytest.approx(1.0)


def test_cache_argument_follows_the_forward_signature():
    from emokern.util.kv_cache import cache_argument

    class New:
        def forward(self, input_ids, cache=None):
            pass

    class Old:
        def forward(self, input_ids, past_key_values=None):
            pass

    assert cache_argument(New()) == "cache" and cache_argument(Old()) == "past_key_values"
