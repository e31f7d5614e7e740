"""emokern.viz: the PNG line plot and the self-contained HTML heatmap of a Trace, on a small hand-built trace."""

import html
import json
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch

from emokern.trace import Trace
from emokern.viz import scale_values, trace_heatmap_html, value_color

pytest.importorskip("matplotlib")

B, T, S, K = 2, 12, 2, 4
NAMES = ["joy", "fear", "anger", "calm"]
SITES = ["layer3.residual", "layer6.residual"]
N_PAD = 3  # left padding of sequence 1
PROMPT_LEN = (7, 6)  # prompt tokens per sequence (padding excluded)
PEAK_T = 4  # position of joy's maximum in sequence 0 at site 1

TOKENS = [
    ["<s>", "Hello", " world", "&", " amp;", "\n", "  indented", "<b>", " a&b", "\nnext", "   x", "end"],
    ["<pad>", "<pad>", "<pad>", "Q", ":", " why", "<", "&&", "\n\n", " fine", "!", " done"],
]


def make_trace(calibrated: bool = True) -> Trace:
    g = torch.Generator().manual_seed(0)
    proj = torch.randn(B, T, S, K, generator=g)
    proj[0, PEAK_T, 1, 0] = 6.0  # joy's unique maximum
    proj[1, :N_PAD] = 100.0  # garbage under the padding: must neither show nor set the scale
    proj[:, -1] = float("nan")  # the last generated token was never fed through the model
    is_pad = torch.zeros(B, T, dtype=torch.bool)
    is_pad[1, :N_PAD] = True
    is_prompt = torch.zeros(B, T, dtype=torch.bool)
    is_prompt[0, : PROMPT_LEN[0]] = True
    is_prompt[1, N_PAD: N_PAD + PROMPT_LEN[1]] = True
    token_ids = torch.arange(B * T).reshape(B, T)
    mean = std = None
    if calibrated:
        mean = torch.linspace(-0.5, 0.5, S * K).reshape(S, K)
        std = torch.linspace(0.5, 2.0, S * K).reshape(S, K)
    return Trace(proj, token_ids, [list(t) for t in TOKENS], is_prompt, is_pad, SITES, NAMES, mean, std)


class TokenSpans(HTMLParser):
    """Collects, per token span (``data-t``): its attributes, its visible text and its tooltip text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tokens = {}
        self._cur = None
        self._depth = 0
        self._tip_depth = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if self._cur is None:
            if tag == "span" and "data-t" in attrs:
                self._cur = {"attrs": attrs, "text": "", "tip": ""}
                self.tokens[int(attrs["data-t"])] = self._cur
                self._depth = 1
            return
        if tag == "br":
            return
        self._depth += 1
        if tag == "span" and "tip" in (attrs.get("class") or "").split() and self._tip_depth is None:
            self._tip_depth = self._depth

    def handle_endtag(self, tag):
        if self._cur is None or tag == "br":
            return
        if self._tip_depth == self._depth:
            self._tip_depth = None
        self._depth -= 1
        if self._depth == 0:
            self._cur = None

    def handle_data(self, data):
        if self._cur is not None:
            self._cur["tip" if self._tip_depth is not None else "text"] += data


def parse(page: str) -> dict:
    p = TokenSpans()
    p.feed(page)
    return p.tokens


def rgb(attrs: dict):
    m = re.search(r"background:rgb\((\d+),(\d+),(\d+)\)", attrs.get("style") or "")
    return tuple(int(x) for x in m.groups()) if m else None


def strength(c) -> int:
    return 0 if c is None else 3 * 255 - sum(c)


# ------------------------------------------------------------------------------------------------------------ PNG


def png_size(data: bytes):
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plot_writes_a_png(tmp_path):
    trace = make_trace()
    out = trace.plot(["joy", "fear", "calm"], tmp_path / "nested" / "dir" / "plot.png", site="layer6.residual",
                     sequence=1, marks=[(8, "test failed"), (10, "hack")], title="a <title> & $money$")
    assert out == tmp_path / "nested" / "dir" / "plot.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000
    w, h = png_size(data)
    assert 600 <= w <= 3000 and 300 <= h <= 1500, (w, h)


def test_plot_zscore_window_and_long_sequences(tmp_path):
    trace = make_trace()
    out = trace.plot("anger", tmp_path / "z.png", zscore=True, window=3)
    assert out.read_bytes()[:4] == b"\x89PNG"
    # More than 60 tokens: index ticks instead of token labels, and a wider (but bounded) figure.
    long = Trace(torch.randn(1, 90, 1, 2), torch.zeros(1, 90, dtype=torch.long), [[f" t{i}" for i in range(90)]],
                 torch.arange(90).lt(50)[None], torch.zeros(1, 90, dtype=torch.bool), ["s"], ["joy", "fear"])
    data = long.plot(["joy", "fear"], tmp_path / "long.png").read_bytes()
    assert data[:4] == b"\x89PNG"
    assert png_size(data)[0] <= 2200


def test_plot_errors(tmp_path):
    trace = make_trace(calibrated=False)
    with pytest.raises(ValueError, match="calibration"):
        trace.plot(["joy"], tmp_path / "p.png", zscore=True)
    with pytest.raises(ValueError, match="token_index 12"):
        trace.plot(["joy"], tmp_path / "p.png", marks=[(12, "late")])
    with pytest.raises(ValueError, match="at least one emotion"):
        trace.plot([], tmp_path / "p.png")
    with pytest.raises(KeyError, match="did you mean 'joy'"):
        trace.plot(["joyy"], tmp_path / "p.png")
    with pytest.raises(IndexError, match="sequence 2"):
        trace.plot(["joy"], tmp_path / "p.png", sequence=2)
    assert not (tmp_path / "p.png").exists()


# ----------------------------------------------------------------------------------------------------------- HTML


@pytest.mark.parametrize("sequence", [0, 1])
def test_html_escapes_every_token_and_omits_padding(tmp_path, sequence):
    trace = make_trace()
    out = trace.heatmap_html("joy", tmp_path / "deep" / "h.html", sequence=sequence)
    page = out.read_text(encoding="utf-8")
    assert out == tmp_path / "deep" / "h.html"
    assert page.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in page
    spans = parse(page)
    expected = [t for t in range(T) if not bool(trace.is_pad[sequence, t])]
    assert sorted(spans) == expected
    for t in expected:
        tok = TOKENS[sequence][t]
        # Every line of the token's text, escaped, is in the page; leading spaces appear as that many "·".
        lead = len(tok) - len(tok.lstrip(" "))
        for line in tok[lead:].split("\n"):
            assert html.escape(line) in page
        visible = "·" * lead + tok[lead:].replace("\n", "↵")
        assert spans[t]["text"] == visible, (t, tok)
    # Markup in tokens is escaped, never live.
    assert "<b>" not in page and "<s>" not in page and "a&b" not in page
    if sequence == 0:
        assert "&lt;b&gt;" in page and "a&amp;b" in page and "&lt;s&gt;" in page
        assert '<span class="ws">↵</span><br>next' in page
        assert '<span class="ws">··</span>indented' in page
    else:
        assert "&lt;pad&gt;" not in page and "pad" not in "".join(s["text"] for s in spans.values())
        assert '<span class="ws">↵</span><br><span class="ws">↵</span><br>' in page
        assert "100.000" not in page  # the padding's values are nowhere


def test_html_is_self_contained(tmp_path):
    page = make_trace().heatmap_html("joy", tmp_path / "h.html", emotions=["fear", "calm"]).read_text()
    low = page.lower()
    for bad in ("<script src", "http", "<link", "url(", "@import", "<iframe", "<img"):
        assert bad not in low, bad
    # Without the emotion switcher there is no script at all.
    plain = make_trace().heatmap_html("joy", tmp_path / "p.html").read_text()
    assert "<script" not in plain


def test_html_prompt_and_generated_are_separated(tmp_path):
    page = make_trace().heatmap_html("joy", tmp_path / "h.html", sequence=1).read_text()
    i_prompt = page.index('<div class="part prompt">')
    i_div = page.index('<div class="divider">')
    i_gen = page.index('<div class="part generated">')
    assert i_prompt < i_div < i_gen
    assert "prompt · 6 tokens" in page and "generated · 3 tokens" in page
    assert page.index('data-t="8"') < i_div < page.index('data-t="9"')  # last prompt / first generated


def test_html_tooltip_lists_top_emotions(tmp_path):
    trace = make_trace()
    page = trace.heatmap_html("fear", tmp_path / "h.html", site=0, sequence=1, top_k=3).read_text()
    spans = parse(page)
    top = trace.top_emotions(3, site=0, sequence=1)
    vals = trace.values("fear", site=0, sequence=1)
    for t, span in spans.items():
        tip = span["tip"]
        assert f"#{t}" in tip
        if math.isnan(float(vals[t])):
            assert "not processed" in tip and "n/a" in tip
            continue
        assert f"fear (projection): {float(vals[t]):.3f}" in tip
        assert f"top {len(top[t])}" in tip
        for name, v in top[t]:
            assert f"{name}{v:.3f}" in tip
        # Only the top 3 of 4 emotions are listed.
        missing = set(NAMES) - {n for n, _ in top[t]} - {"fear"}
        assert all(n not in tip for n in missing)


def test_html_colours_follow_the_99th_percentile_scale(tmp_path):
    trace = make_trace()
    page = trace.heatmap_html("joy", tmp_path / "h.html", site="layer6.residual").read_text()
    spans = parse(page)
    colours = {t: rgb(s["attrs"]) for t, s in spans.items()}
    # The maximum is the most saturated token, at full strength; nothing else reaches it.
    assert colours[PEAK_T] == value_color(1.0) == (214, 39, 40)
    assert all(strength(c) < strength(colours[PEAK_T]) for t, c in colours.items() if t != PEAK_T)
    # Every colour is value / p99(|value|), clipped, blended from white.
    v = trace.values("joy", site=1, sequence=0)
    valid = v[~v.isnan()]
    p99 = torch.quantile(valid.abs().double(), 0.99).item()
    assert scale_values(v)[1] == pytest.approx(p99)
    for t in range(T - 1):
        assert colours[t] == value_color(max(-1.0, min(1.0, float(v[t]) / p99))), t
        assert float(spans[t]["attrs"]["data-v"]) == pytest.approx(float(v[t]), rel=1e-5)
    # Negative values are blue-ish, positive red-ish, and the unprocessed last token is uncoloured.
    neg = [t for t in range(T - 1) if v[t] < -0.3]
    assert neg and all(colours[t][2] > colours[t][0] for t in neg)
    assert colours[T - 1] is None and "nan" in spans[T - 1]["attrs"]["class"]
    assert value_color(0.0) == (255, 255, 255)


def test_html_zscore_needs_calibration(tmp_path):
    trace = make_trace()
    page = trace.heatmap_html("anger", tmp_path / "z.html", zscore=True, site=1).read_text()
    spans = parse(page)
    z = trace.values("anger", site=1, zscore=True)
    assert "z-score" in page
    assert f"anger (z-score): {float(z[2]):.3f}" in spans[2]["tip"]
    ztop = trace.top_emotions(5, site=1, zscore=True)
    assert all(f"{n}{v:.3f}" in spans[2]["tip"] for n, v in ztop[2])

    with pytest.raises(ValueError, match="no calibration statistics"):
        make_trace(calibrated=False).heatmap_html("anger", tmp_path / "bad.html", zscore=True)
    assert not (tmp_path / "bad.html").exists()


def test_html_window_smoothing_changes_colours(tmp_path):
    trace = make_trace()
    raw = parse(trace.heatmap_html("joy", tmp_path / "a.html", sequence=1).read_text())
    smooth = parse(trace.heatmap_html("joy", tmp_path / "b.html", sequence=1, window=3).read_text())
    assert sorted(raw) == sorted(smooth)
    changed = [t for t in raw if rgb(raw[t]["attrs"]) != rgb(smooth[t]["attrs"])]
    assert len(changed) >= 5
    # First real token: the rest of its window is padding, which is masked, so it keeps its raw value.
    sv = trace.values("joy", sequence=1, window=3)
    assert float(sv[N_PAD]) == pytest.approx(float(trace.values("joy", sequence=1)[N_PAD]))
    assert float(smooth[N_PAD + 2]["attrs"]["data-v"]) == pytest.approx(float(sv[N_PAD + 2]), rel=1e-5)
    # The tooltip's top emotions come from the same smoothed series.
    # (Trace.smooth does not mask padding; position N_PAD + 4's window holds no padding, so it agrees there.)
    top = trace.smooth(3).top_emotions(5, sequence=1)
    t = N_PAD + 4
    assert all(f"{n}{v:.3f}" in smooth[t]["tip"] for n, v in top[t])


def test_html_emotion_switcher_embeds_values(tmp_path):
    trace = make_trace()
    page = trace.heatmap_html("joy", tmp_path / "h.html", emotions=["fear", "joy", "calm"], sequence=1).read_text()
    assert '<select id="emokern-select">' in page
    assert re.findall(r'<option value="([^"]+)"', page) == ["joy", "fear", "calm"]
    m = re.search(r'<script type="application/json" id="emokern-data">(.*?)</script>', page, re.S)
    payload = json.loads(m.group(1))
    assert set(payload["series"]) == {"joy", "fear", "calm"}
    fear = trace.values("fear", sequence=1)
    got = payload["series"]["fear"]["values"]
    assert got[:N_PAD] == [None] * N_PAD and got[-1] is None
    assert got[N_PAD:-1] == pytest.approx(fear[N_PAD:-1].tolist(), abs=1e-5)
    assert payload["series"]["fear"]["scale"] == pytest.approx(scale_values(fear)[1])


def test_html_script_payload_cannot_close_the_script(tmp_path):
    trace = make_trace()
    trace.names = ["joy", "</script><b>x", "anger", "calm"]
    page = trace_heatmap_html(trace, "joy", tmp_path / "h.html", emotions=["</script><b>x"])
    text = page.read_text()
    assert "</script><b>" not in text
    assert "&lt;/script&gt;&lt;b&gt;x" in text  # the option label, escaped
    assert text.count("</script>") == 2


def test_html_renders_in_headless_chromium(tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no chromium on PATH (`which chromium` found nothing); not installing a browser for this test")
    page = make_trace().heatmap_html("joy", tmp_path / "h.html", emotions=["fear"])
    shot = tmp_path / "shot.png"
    out = subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", "--window-size=1000,700",
                          f"--screenshot={shot}", page.resolve().as_uri()], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-2000:]
    assert shot.read_bytes()[:4] == b"\x89PNG"


def test_robust_ylim_ignores_a_few_extreme_values_only():
    from emokern.viz import robust_ylim

    calm = torch.linspace(-1.0, 1.0, 50)
    assert robust_ylim([calm]) is None
    spiky = calm.clone()
    spiky[0] = -2000.0
    lo, hi = robust_ylim([spiky, calm])
    assert -2.0 < lo < -0.9 and 0.9 < hi < 2.0
    assert robust_ylim([torch.tensor([1.0, float("nan")])]) is None
