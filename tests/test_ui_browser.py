"""``emokern ui`` end to end in a real browser: headless Chromium from Debian (``/usr/bin/chromium``; ``.ci/run``
installs it) driven by Playwright's Python package, against a real server on the tiny random chat model.

Each step writes a screenshot into the test's ``tmp_path``. Skipped, with the reason, when Chromium or Playwright is
missing."""

import json
import os
import shutil

import httpx
import pytest

from emokern.ui.app import create_app
from emokern.ui.backends import HFBackend
from emokern.ui.requests import Limits
from emokern.testing.chat import tiny_chat_bank, tiny_chat_model
from tests.ui_server import serve

CHROMIUM = os.environ.get("EMOKERN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                                                                  "(pip install playwright)")
if not os.path.exists(CHROMIUM):
    pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium; or set EMOKERN_CHROMIUM)",
                allow_module_level=True)

pytestmark = pytest.mark.usefixtures("one_thread")
TIMEOUT = 30_000  # ms; the tiny model answers in well under a second


@pytest.fixture(scope="module")
def server():
    model, tok = tiny_chat_model()
    backend = HFBackend(model, tok, tiny_chat_bank(model), model_name="tiny",
                        limits=Limits(max_prompt_tokens=300, max_new_tokens=64))
    with serve(create_app(backend)) as url:
        yield url, backend
    backend.close()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1300, "height": 900}, accept_downloads=True)
    pg = context.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(server[0])
    pg.wait_for_selector("body[data-ready='1']", timeout=TIMEOUT)
    yield pg
    context.close()
    assert not errors, errors  # no script error on any step


def setup(pg, *, max_new=16):
    pg.fill("#temperature", "0")
    pg.fill("#max-new", str(max_new))
    pg.fill("#colour-emotion", "calm")
    pg.dispatch_event("#colour-emotion", "change")


def send(pg, prompt, button="#send"):
    pg.fill("#prompt", prompt)
    pg.click(button)
    pg.wait_for_function("document.querySelectorAll('.pane').length > 0 && [...document.querySelectorAll("
                         "'.pane .status')].every(s => /ended|failed|stopped/.test(s.textContent))", timeout=TIMEOUT)


def reply_text(pane) -> str:
    return pane.evaluate("p => [...p.querySelectorAll('.tok:not(.prompt)')].map(s => s.textContent).join('')")


def set_strength(pg, emotion, value):
    row = pg.locator(".steer-row").first
    row.locator(".emotion").fill(emotion)
    row.locator(".strength").fill(str(value))  # the slider; the number box follows it


def test_type_stream_colour_steer_hover_export(page, server, tmp_path):
    pg = page
    pg.screenshot(path=str(tmp_path / "0-loaded.png"))
    setup(pg)
    # tokens stream in: count reply tokens while the reply is being written
    pg.fill("#prompt", "Tell me about your day.")
    pg.click("#send")
    pg.wait_for_selector(".pane .tok:not(.prompt)", timeout=TIMEOUT)
    pg.wait_for_function("document.querySelector('.pane .status').textContent.includes('ended')", timeout=TIMEOUT)
    pane = pg.locator(".pane").first
    assert pane.locator(".tok:not(.prompt)").count() == 16
    coloured = pane.evaluate("p => [...p.querySelectorAll('.tok')].filter(s => s.style.background).length")
    assert coloured >= pane.locator(".tok").count() - 2  # all but the sink(s) and the never-read last token
    assert pane.locator(".tok.sink").count() >= 1
    assert "16 tokens" in pane.locator(".status").inner_text()
    assert pane.locator(".chart path").count() == 4 and pane.locator(".top").inner_text().startswith("reply's top")
    pg.screenshot(path=str(tmp_path / "1-streamed.png"))
    unsteered = reply_text(pane)

    # move the slider: the steered reply differs; compare shows both with the same seed
    set_strength(pg, "happy", 1)
    pg.fill("#steer-layers", "1-2")
    assert pg.input_value(".steer-row .strength-num") == "1"
    pg.click("#new-chat")  # the same single-turn prompt again (Send continued the conversation)
    send(pg, "Tell me about your day.", "#compare")
    panes = pg.locator(".pane")
    assert panes.count() == 2
    assert panes.nth(0).locator(".pane-title").inner_text() == "unsteered"
    assert reply_text(panes.nth(0)) == unsteered  # the same prompt, seed and no steering
    assert reply_text(panes.nth(1)) != unsteered
    pg.screenshot(path=str(tmp_path / "2-compare-steered.png"))

    # hover a reply token: its top emotions
    # (a token that ends inside a multi-byte character shows no text, so pick one that shows some)
    # (a reply of the random model may be all broken bytes: then a prompt token, past the sink)
    i = panes.nth(1).evaluate("""p => {
        const toks = [...p.querySelectorAll('.tok')], last = toks.length - 1;
        const ok = (s) => s.offsetWidth > 4 && !s.classList.contains('sink') && Number(s.dataset.i) < last;
        return (toks.filter((s) => !s.classList.contains('prompt')).find(ok) || toks.find(ok)).dataset.i; }""")
    panes.nth(1).locator(f".tok[data-i='{i}']").hover(timeout=5000)
    hover = pg.locator("#hover")
    hover.wait_for(state="visible", timeout=TIMEOUT)
    assert "top 5" in hover.inner_text() and "calm (z)" in hover.inner_text()
    pg.screenshot(path=str(tmp_path / "3-hover.png"))

    # export the trace: JSON and the heatmap page
    with pg.expect_download(timeout=TIMEOUT) as dl:
        panes.nth(1).locator(".export-json").click()
    path = tmp_path / "trace.json"
    dl.value.save_as(path)
    data = json.loads(path.read_text())
    exported_reply = "".join(t for t, p in zip(data["tokens"][0], data["is_prompt"][0]) if not p)
    assert exported_reply == reply_text(panes.nth(1)).replace("↵", "")
    with pg.expect_download(timeout=TIMEOUT) as dl:
        panes.nth(1).locator(".export-html").click()
    html_path = tmp_path / "heatmap.html"
    dl.value.save_as(html_path)
    assert "<code id=\"emokern-emotion\">calm</code>" in html_path.read_text()
    heat = pg.context.new_page()
    heat.goto(html_path.as_uri())
    heat.screenshot(path=str(tmp_path / "4-exported-heatmap.png"))
    # the page colours every token as the static heatmap does (same scale, same sinks); the page's z-scores are
    # rounded to 4 decimals, so a channel may differ by one or two
    style = "s => [s.dataset.t ?? s.dataset.i, s.classList.contains('sink'), getComputedStyle(s).backgroundColor]"
    static = heat.eval_on_selector_all(".tok", f"els => els.map({style})")
    live = panes.nth(1).locator(".tok").evaluate_all(f"els => els.map({style})")
    heat.close()
    assert [(t, sink) for t, sink, _ in static] == [(t, sink) for t, sink, _ in live]
    assert sum(sink for _, sink, _ in live) >= 1

    def rgb(css):
        return [int(x) for x in css[css.index("(") + 1:css.index(")")].split(",")[:3]]

    for (_, sink, a), (_, _, b) in zip(static, live):
        if not sink:
            assert max(abs(x - y) for x, y in zip(rgb(a), rgb(b))) <= 2, (a, b)


def test_bad_input_shows_a_message_and_the_page_keeps_working(page, tmp_path):
    pg = page
    setup(pg, max_new=4)
    set_strength(pg, "calmm", 0.5)
    send(pg, "Hello")
    msg = pg.locator("#message")
    assert msg.is_visible() and "did you mean 'calm'" in msg.inner_text()
    pg.screenshot(path=str(tmp_path / "1-unknown-emotion.png"))
    row = pg.locator(".steer-row").first
    row.locator(".emotion").fill("calm")
    row.locator(".strength-num").fill("500")
    send(pg, "Hello")
    assert "at most 100" in msg.inner_text()
    pg.fill("#colour-emotion", "nonsense")
    pg.dispatch_event("#colour-emotion", "change")
    assert "unknown emotion" in msg.inner_text()
    row.locator(".strength-num").fill("0.5")
    pg.fill("#prompt", "x" * 400)  # past the server's 300 prompt tokens
    pg.click("#send")
    pg.wait_for_function("document.getElementById('message').textContent.includes('too long')", timeout=TIMEOUT)
    assert "Traceback" not in pg.content()
    pg.screenshot(path=str(tmp_path / "2-too-long.png"))
    send(pg, "Hello again")
    assert "ended" in pg.locator(".pane .status").inner_text()
    assert not msg.is_visible()


def test_two_tabs_steering_differently_get_their_own_results(browser, server, tmp_path):
    url, backend = server
    payload = {"messages": [{"role": "user", "content": "What a day."}], "temperature": 0, "max_new_tokens": 16,
               "seed": 3}
    with httpx.Client(timeout=60) as c:  # each setting alone, for reference
        refs = {}
        for name, steer in (("calm", [{"emotions": {"calm": 1.5}, "layers": [1, 2]}]),
                            ("sad", [{"emotions": {"sad": -1.5}, "layers": [1, 2]}])):
            text = c.post(f"{url}/api/generate", json=dict(payload, steer=steer)).text
            done = [json.loads(b.split("data: ", 1)[1]) for b in text.strip().split("\n\n")
                    if b.startswith("event: done")]
            refs[name] = done[0]["tokens"]
    assert refs["calm"] != refs["sad"]
    context = browser.new_context(viewport={"width": 1300, "height": 900})
    tabs = []
    for name, strength in (("calm", 1.5), ("sad", -1.5)):
        pg = context.new_page()
        pg.goto(url)
        pg.wait_for_selector("body[data-ready='1']", timeout=TIMEOUT)
        setup(pg)
        pg.fill("#seed", "3")
        set_strength(pg, name, strength)
        pg.fill("#steer-layers", "1,2")
        pg.fill("#prompt", "What a day.")
        tabs.append(pg)
    # sent one right after the other (the second waits in the queue if the first still runs); each tab must get
    # what its own steering gives alone
    for pg in tabs:
        pg.click("#send")
    for pg, name in zip(tabs, ("calm", "sad")):
        pg.wait_for_function("document.querySelector('.pane .status') && "
                             "document.querySelector('.pane .status').textContent.includes('ended')", timeout=TIMEOUT)
        tokens = pg.evaluate("() => [...document.querySelectorAll('.pane .tok')].map(s => s.textContent)")
        assert "".join(tokens) == "".join(t.replace("\n", "↵\n").replace("\t", "→") for t in refs[name])
        pg.screenshot(path=str(tmp_path / f"tab-{name}.png"))
    context.close()


def test_alert_highlights_and_stops(page, tmp_path):
    pg = page
    setup(pg)
    pg.check("#alert-on")
    pg.fill("#alert-emotion", "calm")
    pg.fill("#alert-z", "-1000")  # crossed by every token: fires at the first reply token read back
    pg.fill("#alert-tokens", "2")
    pg.check("#alert-stop")
    send(pg, "Hello")
    pane = pg.locator(".pane").first
    line = pane.locator(".alert-line")
    assert line.is_visible() and "calm above z -1000 for 2 tokens" in line.inner_text()
    assert "the reply was stopped" in line.inner_text() and "ended: alert" in pane.locator(".status").inner_text()
    assert pane.locator(".tok.fired").count() == 1
    assert pane.locator(".tok.over").count() == 2  # the two reply tokens read before it stopped
    assert pane.locator(".tok:not(.prompt)").count() == 3
    pg.screenshot(path=str(tmp_path / "alert.png"))
