"""emokern.core.trace_plots: the PNG line plot and the self-contained HTML heatmap of a Trace, on a small hand-built trace."""

import html
import json
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch

from emokern.core.trace import Trace
from emokern.core.trace_plots import plot_trace, scale_values, trace_heatmap_html, value_color

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
    out = plot_trace(trace, ["joy", "fear", "calm"], tmp_path / "nested" / "dir" / "plot.png", site="layer6.residual",
                     sequence=1, marks=[(8, "test failed"), (10, "hack")], title="a <title> & $money$")
    assert out == tmp_path / "nested" / "dir" / "plot.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000
    w, h = png_size(data)
    assert 600 <= w <= 3000 and 300 <= h <= 1500, (w, h)


def test_plot_zscore_window_and_long_sequences(tmp_path):
    trace = make_trace()
    out = plot_trace(trace, "anger", tmp_path / "z.png", zscore=True, window=3)
    assert out.read_bytes()[:4] == b"\x89PNG"
    # More than 60 tokens: index ticks instead of token labels, and a wider (but bounded) figure.
    long = Trace(torch.randn(1, 90, 1, 2), torch.zeros(1, 90, dtype=torch.long), [[f" t{i}" for i in range(90)]],
                 torch.arange(90).lt(50)[None], torch.zeros(1, 90, dtype=torch.bool), ["s"], ["joy", "fear"])
    data = plot_trace(long, ["joy", "fear"], tmp_path / "long.png").read_bytes()
    assert data[:4] == b"\x89PNG"
    assert png_size(data)[0] <= 2200


def test_plot_errors(tmp_path):
    trace = make_trace(calibrated=False)
    with pytest.raises(ValueError, match="calibration"):
        plot_trace(trace, ["joy"], tmp_path / "p.png", zscore=True)
    with pytest.raises(ValueError, match="token_index 12"):
        plot_trace(trace, ["joy"], tmp_path / "p.png", marks=[(12, "late")])
    with pytest.raises(ValueError, match="at least one emotion"):
        plot_trace(trace, [], tmp_path / "p.png")
    with pytest.raises(KeyError, match="did you mean 'joy'"):
        plot_trace(trace, ["joyy"], tmp_path / "p.png")
    with pytest.raises(IndexError, match="sequence 2"):
        plot_trace(trace, ["joy"], tmp_path / "p.png", sequence=2)
    assert not (tmp_path / "p.png").exists()


# ----------------------------------------------------------------------------------------------------------- HTML


@pytest.mark.parametrize("sequence", [0, 1])
def test_html_escapes_every_token_and_omits_padding(tmp_path, sequence):
    trace = make_trace()
    out = trace_heatmap_html(trace, "joy", tmp_path / "deep" / "h.html", sequence=sequence)
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
    page = trace_heatmap_html(make_trace(), "joy", tmp_path / "h.html", emotions=["fear", "calm"]).read_text()
    low = page.lower()
    for bad in ("<script src", "http", "<link", "url(", "@import", "<iframe", "<img"):
        assert bad not in low, bad
    # Without the emotion switcher there is no script at all.
    plain = trace_heatmap_html(make_trace(), "joy", tmp_path / "p.html").read_text()
    assert "<script" not in plain


def test_html_prompt_and_generated_are_separated(tmp_path):
    page = trace_heatmap_html(make_trace(), "joy", tmp_path / "h.html", sequence=1).read_text()
    i_prompt = page.index('<div class="part prompt">')
    i_div = page.index('<div class="divider">')
    i_gen = page.index('<div class="part generated">')
    assert i_prompt < i_div < i_gen
    assert "prompt · 6 tokens" in page and "generated · 3 tokens" in page
    assert page.index('data-t="8"') < i_div < page.index('data-t="9"')  # last prompt / first generated


def test_html_tooltip_lists_top_emotions(tmp_path):
    trace = make_trace()
    page = trace_heatmap_html(trace, "fear", tmp_path / "h.html", site=0, sequence=1, top_k=3, zscore=False).read_text()
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
    page = trace_heatmap_html(trace, "joy", tmp_path / "h.html", site="layer6.residual", zscore=False,
                              sinks=False).read_text()
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
    page = trace_heatmap_html(trace, "anger", tmp_path / "z.html", zscore=True, site=1).read_text()
    spans = parse(page)
    z = trace.values("anger", site=1, zscore=True)
    assert "z-score" in page
    assert f"anger (z-score): {float(z[2]):.3f}" in spans[2]["tip"]
    ztop = trace.top_emotions(5, site=1, zscore=True)
    assert all(f"{n}{v:.3f}" in spans[2]["tip"] for n, v in ztop[2])

    with pytest.raises(ValueError, match="no calibration statistics"):
        trace_heatmap_html(make_trace(calibrated=False), "anger", tmp_path / "bad.html", zscore=True)
    assert not (tmp_path / "bad.html").exists()


def test_html_window_smoothing_changes_colours(tmp_path):
    trace = make_trace()
    raw = parse(trace_heatmap_html(trace, "joy", tmp_path / "a.html", sequence=1, zscore=False, sinks=False).read_text())
    smooth = parse(trace_heatmap_html(trace, "joy", tmp_path / "b.html", sequence=1, window=3, zscore=False,
                                         sinks=False).read_text())
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
    page = trace_heatmap_html(trace, "joy", tmp_path / "h.html", emotions=["fear", "joy", "calm"], sequence=1,
                              zscore=False, sinks=False).read_text()
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
    page = trace_heatmap_html(make_trace(), "joy", tmp_path / "h.html", emotions=["fear"])
    shot = tmp_path / "shot.png"
    out = subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", "--window-size=1000,700",
                          f"--screenshot={shot}", page.resolve().as_uri()], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-2000:]
    assert shot.read_bytes()[:4] == b"\x89PNG"


def test_robust_ylim_ignores_a_few_extreme_values_only():
    from emokern.core.trace_plots import robust_ylim

    calm = torch.linspace(-1.0, 1.0, 50)
    assert robust_ylim([calm]) is None
    spiky = calm.clone()
    spiky[0] = -2000.0
    lo, hi = robust_ylim([spiky, calm])
    assert -2.0 < lo < -0.9 and 0.9 < hi < 2.0
    assert robust_ylim([torch.tensor([1.0, float("nan")])]) is None


# ------------------------------------------------------------------------------------------------ attention sinks

SINKS = (0, 1)  # planted in sequence 0; in sequence 1 at the first two real (non-padding) positions


def make_sink_trace(calibrated: bool = True) -> Trace:
    """``make_trace`` with its first two real positions 300x larger at every site and emotion (attention sinks)."""
    trace = make_trace(calibrated)
    trace.projections[0, list(SINKS)] *= 300.0
    trace.projections[1, [N_PAD, N_PAD + 1]] *= 300.0
    return trace


def capture_figures(monkeypatch):
    """Record every matplotlib Figure that plot_trace saves, so the test can read its axes."""
    from matplotlib.figure import Figure

    saved = []
    original = Figure.savefig

    def savefig(self, *args, **kwargs):
        saved.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return saved


def test_sinks_detected_on_a_planted_trace():
    trace = make_sink_trace()
    for site in (0, 1, "layer6.residual"):
        got = trace.sink_positions(site, 0)
        assert got.dtype == torch.bool and got.shape == (T,)
        assert torch.nonzero(got).flatten().tolist() == list(SINKS), site
        # Padding (100.0 garbage, larger than every real value) is never a sink; the planted ones after it are.
        assert torch.nonzero(trace.sink_positions(site, 1)).flatten().tolist() == [N_PAD, N_PAD + 1]
    # Trace.values(mask_sinks=True) blanks exactly those positions, before smoothing.
    v = trace.values("joy", site=1, mask_sinks=True)
    assert torch.isnan(v[list(SINKS)]).all() and not torch.isnan(v[2:T - 1]).any()
    sv = trace.values("joy", site=1, window=3, mask_sinks=True)
    assert float(sv[3]) == pytest.approx(float(trace.values("joy", site=1)[2:4].mean()))  # sink 1 left out


def test_only_the_first_position_is_a_sink_without_outliers():
    trace = make_trace()
    for b in range(B):
        first = N_PAD if b == 1 else 0
        for site in range(S):
            assert torch.nonzero(trace.sink_positions(site, b)).flatten().tolist() == [first], (b, site)
    g = torch.Generator().manual_seed(1)
    for K_ in (1, 2, 14, 171):  # ordinary Gaussian-ish traces of realistic length: only the first token
        proj = torch.randn(1, 400, 1, K_, generator=g) + 0.3
        plain = Trace(proj, torch.zeros(1, 400, dtype=torch.long), [["x"] * 400], torch.ones(1, 400, dtype=torch.bool),
                      torch.zeros(1, 400, dtype=torch.bool), ["s"], [f"e{k}" for k in range(K_)])
        assert torch.nonzero(plain.sink_positions()).flatten().tolist() == [0], K_


def test_sink_rule_is_exact():
    # Norm over K=2 emotions: (3, 4) has norm 5; the median of the valid positions' norms is 1.
    # position 0 is the first token (always a sink), the rule's outliers come after it
    proj = torch.tensor([[0.6, 0.8], [50.0, 0.0], [6.0, 8.0], [3.0, 4.0]] + [[0.6, 0.8]] * 7 + [[float("nan")] * 2])
    proj = proj[None, :, None, :]
    n = proj.shape[1]
    trace = Trace(proj, torch.zeros(1, n, dtype=torch.long), [["x"] * n], torch.ones(1, n, dtype=torch.bool),
                  torch.zeros(1, n, dtype=torch.bool), ["s"], ["a", "b"])
    assert torch.nonzero(trace.sink_positions()).flatten().tolist() == [0, 1]  # 50 > 10 * 1, but 10 is not > 10
    assert torch.nonzero(trace.sink_positions(factor=5)).flatten().tolist() == [0, 1, 2]  # 5 is not > 5
    assert torch.nonzero(trace.sink_positions(factor=4.9)).flatten().tolist() == [0, 1, 2, 3]
    trace.is_pad[0, 0] = True  # padding is never a sink (and leaves the median): the first real token is
    assert torch.nonzero(trace.sink_positions(factor=5)).flatten().tolist() == [1, 2]
    zero = Trace(torch.zeros(1, 6, 1, 2), torch.zeros(1, 6, dtype=torch.long), [["x"] * 6],
                 torch.ones(1, 6, dtype=torch.bool), torch.zeros(1, 6, dtype=torch.bool), ["s"], ["a", "b"])
    zero.projections[0, 3] = 5.0
    assert torch.nonzero(zero.sink_positions()).flatten().tolist() == [0]  # median 0: only the first token
    with pytest.raises(ValueError, match="factor"):
        trace.sink_positions(factor=0)


def test_html_colour_scale_ignores_sinks(tmp_path):
    trace = make_sink_trace()
    page = trace_heatmap_html(trace, "joy", tmp_path / "h.html", site=1, emotions=["fear"]).read_text()
    spans = parse(page)
    colours = {t: rgb(s["attrs"]) for t, s in spans.items()}
    # The largest non-sink value (a middle token) is fully coloured although the sinks are ~100x larger.
    assert colours[PEAK_T] == value_color(1.0)
    z = trace.values("joy", site=1, zscore=True)
    assert max(abs(float(z[t])) for t in SINKS) > 50 * abs(float(z[PEAK_T])) / 6
    nonsink = z.clone()
    nonsink[list(SINKS)] = float("nan")
    assert scale_values(trace.values("joy", site=1, zscore=True, mask_sinks=True))[1] == pytest.approx(
        torch.quantile(nonsink[~nonsink.isnan()].abs().double(), 0.99).item())
    # The sinks: grey (class, no inline colour), marked, their true value in the tooltip.
    for t in SINKS:
        attrs = spans[t]["attrs"]
        assert "sink" in attrs["class"].split() and colours[t] is None and attrs["data-sink"] == "1"
        assert float(attrs["data-v"]) == pytest.approx(float(z[t]), rel=1e-5)
        assert f"joy (z-score): {float(z[t]):.3f}" in spans[t]["tip"] and "attention sink" in spans[t]["tip"]
    assert ".tok.sink::before" in page and "2 attention-sink position(s)" in page
    assert all("sink" not in spans[t]["attrs"]["class"] for t in spans if t not in SINKS)
    # The emotion switcher scales every emotion without the sinks, and keeps their true values.
    payload = json.loads(re.search(r'<script type="application/json" id="emokern-data">(.*?)</script>', page,
                                   re.S).group(1))
    fear = trace.values("fear", site=1, zscore=True, mask_sinks=True)
    assert payload["series"]["fear"]["scale"] == pytest.approx(scale_values(fear)[1])
    assert payload["series"]["fear"]["scale"] < 10
    assert payload["series"]["fear"]["values"][0] == pytest.approx(float(trace.values("fear", site=1, zscore=True)[0]),
                                                                   rel=1e-5)
    # sinks=False: the old behaviour, where a sink sets the scale and the peak is pale.
    old = parse(trace_heatmap_html(trace, "joy", tmp_path / "old.html", site=1, sinks=False).read_text())
    assert strength(rgb(old[PEAK_T]["attrs"])) < strength(value_color(1.0)) / 4
    assert not any("sink" in s["attrs"]["class"] for s in old.values())


def test_html_sinks_stay_out_of_moving_averages(tmp_path):
    trace = make_sink_trace(calibrated=False)
    spans = parse(trace_heatmap_html(trace, "joy", tmp_path / "w.html", site=1, window=3, top_k=2).read_text())
    v = trace.values("joy", site=1)
    # Position 2's window is (0, 1, 2); both others are sinks, so it shows its own value.
    assert float(spans[2]["attrs"]["data-v"]) == pytest.approx(float(v[2]), rel=1e-5)
    assert float(spans[0]["attrs"]["data-v"]) == pytest.approx(float(v[0]), rel=1e-5)  # sink: unsmoothed
    assert "unsmoothed" in spans[0]["tip"]
    top0 = trace.top_emotions(2, site=1)[0]
    assert all(f"{n}{x:.3f}" in spans[0]["tip"] for n, x in top0)


def test_plot_ylim_excludes_sinks(tmp_path, monkeypatch):
    saved = capture_figures(monkeypatch)
    trace = make_sink_trace()
    plot_trace(trace, "joy", tmp_path / "p.png", site=1)
    ax = saved[-1].axes[0]
    lo, hi = ax.get_ylim()
    z = trace.values("joy", site=1, zscore=True)
    rest = z[2:T - 1]
    assert lo <= float(rest.min()) and float(rest.max()) <= hi  # every ordinary value is on the plot
    assert all(not lo <= float(z[t]) <= hi for t in SINKS)  # the sinks are not
    assert hi - lo < 3 * float(rest.max() - rest.min())
    texts = " ".join(t.get_text() for t in ax.texts)
    assert "2 attention-sink position(s) masked" in texts and "t=0, 1" in texts
    assert ax.get_ylabel() == "z-score vs neutral text"
    # The plotted line has gaps at the sinks.
    ydata = ax.lines[-1].get_ydata()
    assert all(math.isnan(float(ydata[t])) for t in SINKS)
    # sinks=False: the y-range has to reach a sink.
    plot_trace(trace, "joy", tmp_path / "old.png", site=1, sinks=False)
    lo, hi = saved[-1].axes[0].get_ylim()
    assert any(lo <= float(z[t]) <= hi for t in SINKS)


# ------------------------------------------------------------------------------------------- z-scores by default


def test_zscore_none_uses_zscores_iff_statistics_exist(tmp_path, monkeypatch):
    saved = capture_figures(monkeypatch)
    for calibrated in (True, False):
        trace = make_trace(calibrated)
        expect = trace.values("anger", site=1, zscore=calibrated)
        kind, label = ("z-score", "z-score vs neutral text") if calibrated else ("projection", "projection")
        assert trace.has_neutral_stats is calibrated
        spans = parse(page := trace_heatmap_html(trace, "anger", tmp_path / f"{calibrated}.html", site=1, sinks=False).read_text())
        assert f"anger ({kind}): {float(expect[2]):.3f}" in spans[2]["tip"]
        assert float(spans[2]["attrs"]["data-v"]) == pytest.approx(float(expect[2]), rel=1e-5)
        assert label in page
        assert ("z-score vs neutral text" in page) is calibrated
        plot_trace(trace, "anger", tmp_path / f"{calibrated}.png", site=1, sinks=False)
        ax = saved[-1].axes[0]
        assert ax.get_ylabel() == label
        assert list(ax.lines[-1].get_ydata()[: T - 1]) == pytest.approx(expect[: T - 1].tolist())
    # Explicit choices still win.
    calibrated = make_trace()
    page = trace_heatmap_html(calibrated, "anger", tmp_path / "raw.html", site=1, zscore=False, sinks=False).read_text()
    assert "z-score" not in page and "anger (projection)" in parse(page)[2]["tip"]
    plot_trace(calibrated, "anger", tmp_path / "raw.png", zscore=False, sinks=False)
    assert saved[-1].axes[0].get_ylabel() == "projection"


# ------------------------------------------------------------------------------------------------ decoded tokens


def test_decode_tokens_byte_level_split_characters():
    from emokern.testing.chat import tiny_chat_tokenizer

    tok = tiny_chat_tokenizer()  # byte-level: one token per byte, so é is 2 tokens and 日 is 3
    text = "<|user|>You said: Café 日本\n  ok<eos>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert any(len(p) == 1 and p in "ĠĊ" for p in tok.convert_ids_to_tokens(ids))  # raw pieces carry BPE markers
    out = Trace.decode_tokens(tok, ids)
    assert len(out) == len(ids)
    assert "".join(out) == text
    assert not any("\ufffd" in t or "Ġ" in t or "Ċ" in t for t in out)
    assert out[0] == "<|user|>" and out[-1] == "<eos>" and out[1:4] == ["Y", "o", "u"] and " " in out
    i = out.index("é")
    assert out[i - 1] == ""  # the first byte of the split character gets "", the completing one the character
    j = out.index("日")
    assert out[j - 2: j] == ["", ""] and out[j + 3] == "本" and "\n" in out
    # Bytes that never complete a character (cut at the end) still decode as tokenizer.decode does.
    assert "".join(Trace.decode_tokens(tok, ids[: j])) == tok.decode(ids[: j])


def test_patched_trace_tokens_are_decoded_text():
    import emokern
    from emokern.testing.chat import tiny_chat_bank, tiny_chat_model

    model, tok = tiny_chat_model()
    bank = tiny_chat_bank(model)
    prompt = "<|user|>Ça va? 日本 ✨\nYes<eos><|assistant|>"
    with emokern.patch(model, bank, tokenizer=tok, layers=[1]) as handle:
        out = handle.generate([prompt, "<|user|>hi<eos><|assistant|>"], max_new_tokens=2, do_sample=False)
    trace = out.trace
    W = out.prompt_width
    assert "".join(trace.tokens[0][:W]) == prompt
    assert not any("\ufffd" in t or "Ġ" in t or "Ċ" in t for t in trace.tokens[0][:W])
    assert "ç" not in tok.convert_ids_to_tokens(trace.token_ids[0, :W].tolist())  # the raw pieces were not text
    assert "日" in trace.tokens[0] and "\n" in trace.tokens[0]
    real = trace.tokens[1][:W][int(trace.is_pad[1].sum()):]
    assert "".join(real) == "<|user|>hi<eos><|assistant|>"


def test_site_index_projection_norms_and_masked_smooth():
    trace = make_trace()
    assert trace.site_index("layer6.residual") == trace.sites.index("layer6.residual")
    assert trace.site_index(None) == len(trace.sites) // 2 and trace.site_index(-1) == -1
    with pytest.raises(KeyError, match="not in this trace"):
        trace.site_index("nope")
    norms = trace.projection_norms(1, 0)
    assert norms.dtype == torch.float64
    assert torch.allclose(norms, trace.projections[0, :, 1].double().norm(dim=-1), equal_nan=True)
    mask = torch.zeros_like(trace.is_pad)
    t = int((~trace.is_pad[0]).nonzero()[0]) + 1  # a real token after the first
    mask[0, t] = True
    smoothed = trace.smooth(3, mask=mask)
    assert torch.isnan(smoothed.projections[0, t]).all()  # masked positions stay NaN everywhere
    assert torch.isnan(smoothed.projections[trace.is_pad]).all()
    # the masked value enters no average: the next position averages its own window without it
    series = trace.projections[0, :, 1, 0].clone()
    series[trace.is_pad[0]] = float("nan")
    series[t] = float("nan")
    assert torch.allclose(smoothed.projections[0, :, 1, 0], Trace.smooth_values(series, 3), equal_nan=True)
    assert torch.equal(trace.smooth(3).projections.isnan(), trace.smooth(3, mask=torch.zeros_like(mask)).projections.isnan())
