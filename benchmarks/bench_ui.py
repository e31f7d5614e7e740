"""Benchmark: how fast is ``emokern ui`` on the default model and bank, and what does the page cost against a plain
``model.generate``?

Measured, on the embedded SmolLM2-135M-Instruct with the ``make demo`` bank, bfloat16:

* **start** — ``python -m emokern ui`` spawned until ``GET /`` and ``GET /api/info`` both answer 200 (a usable page),
  ``--starts`` times;
* **in the page** — headless Chromium (Playwright, ``/usr/bin/chromium``) loads the page, types the prompt and
  presses Send; the page's own clock (``performance.now()``, a MutationObserver on the reply) gives the time from
  the click to the first reply token on screen (and, from the page's status line, the server's own count: from
  the moment the request's turn came to its first token), and reply tokens per second from the first token on screen to the
  last (``(n - 1) / t``), greedy (temperature 0), up to ``--tokens`` new tokens;
* **generate** — in this process, the same model (unpatched), the same chat-templated prompt ids, greedy
  ``model.generate``: time to first token = ``generate(max_new_tokens=1)``, tokens/s = ``(n - 1) / (t_n - t_1)``
  with ``n`` the page's reply length (``min_new_tokens`` forces the same length).

* **in process** — the same server code without a browser or a socket (Starlette's test client in this process,
  the model loaded here and patched), ``max_new_tokens=1``: the server's first-token time, alternating with
  ``generate(max_new_tokens=1)`` on the same patched model; then unpatched ``generate`` again. This separates what
  the server does from what the browser and the HTTP path add on the same cores.

Page and generate reps alternate (``--reps`` each); medians. The server and this process each use
``--threads`` torch threads and never run at the same time. Writes
``benchmarks/results/bench_ui_<machine>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_ops import device_name, machine_slug, versions  # noqa: E402

PROMPT = "My landlord says the rent is due tomorrow and I lost my job today. What should I do?"
ROOT = Path(__file__).resolve().parents[1]

OBSERVE = """() => {
  window.__bench = {click: performance.now(), first: null, last: null, n: 0};
  const box = document.getElementById('panes');
  new MutationObserver(() => {
    const n = box.querySelectorAll('.tok:not(.prompt)').length;
    if (n > window.__bench.n) {
      const t = performance.now();
      if (window.__bench.first === null) window.__bench.first = t;
      window.__bench.last = t; window.__bench.n = n;
    }
  }).observe(box, {childList: true, subtree: true});
}"""


def start_server(port: int, threads: int, bank: str):
    env = dict(os.environ, EMOKERN_UI_QUIET="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "emokern", "ui", "--port", str(port), "--threads", str(threads),
                             "--bank", bank], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"emokern ui exited: {proc.stdout.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/", timeout=1).status_code == 200 and \
                    httpx.get(url + "/api/info", timeout=5).status_code == 200:
                return proc, url, time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.05)


def stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def page_rep(browser, url: str, tokens: int) -> dict:
    page = browser.new_page()
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']")
    page.fill("#temperature", "0")
    page.fill("#max-new", str(tokens))
    page.fill("#prompt", PROMPT)
    page.evaluate(OBSERVE)
    page.click("#send")
    try:
        page.wait_for_function("document.querySelector('.pane .status') && "
                               "/ended|failed/.test(document.querySelector('.pane .status').textContent)",
                               timeout=300_000)
    except Exception:
        page.screenshot(path="/tmp/bench_ui_timeout.png")
        raise
    b = page.evaluate("() => window.__bench")
    status = page.inner_text(".pane .status")
    page.close()
    n = b["n"]
    server = re.search(r"first token (\d+) ms", status)
    return {"ttft_s": (b["first"] - b["click"]) / 1000, "n": n,
            "server_ttft_s": int(server.group(1)) / 1000 if server else None,
            "tokens_per_s": (n - 1) / ((b["last"] - b["first"]) / 1000) if n > 1 else None, "status": status}


@torch.no_grad()
def generate_rep(model, ids, n: int) -> dict:
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, do_sample=False)
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    total = time.perf_counter() - t0
    got = out.shape[1] - ids.shape[1]
    return {"ttft_s": ttft, "n": got, "tokens_per_s": (got - 1) / (total - ttft)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--starts", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--port", type=int, default=8799)
    ap.add_argument("--bank", default="emokern_out/bank/smollm2-135m-instruct.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from playwright.sync_api import sync_playwright

    from emokern.core.models import load_model
    from emokern.ui.backends import chat_prompt_ids

    starts = []
    for _ in range(args.starts):
        proc, url, seconds = start_server(args.port, args.threads, args.bank)
        starts.append(seconds)
        stop(proc)
    print(f"start to a usable page: {[round(s, 2) for s in starts]} s")

    model, tok = load_model(dtype=torch.bfloat16)
    ids = torch.tensor([chat_prompt_ids(tok, [{"role": "user", "content": PROMPT}])])
    proc, url, _ = start_server(args.port, args.threads, args.bank)
    page, gen = [], []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=os.environ.get("EMOKERN_CHROMIUM", "/usr/bin/chromium"))
            page_rep(browser, url, 8)  # warm-up: first request, first page load
            generate_rep(model, ids, 8)
            for rep in range(args.reps):
                page.append(page_rep(browser, url, args.tokens))
                gen.append(generate_rep(model, ids, page[-1]["n"]))
                print(f"rep {rep}: page {page[-1]['ttft_s'] * 1000:.0f} ms, {page[-1]['tokens_per_s']:.1f} tok/s "
                      f"({page[-1]['n']} tokens) | generate {gen[-1]['ttft_s'] * 1000:.0f} ms, "
                      f"{gen[-1]['tokens_per_s']:.1f} tok/s", flush=True)
            browser.close()
    finally:
        stop(proc)

    from starlette.testclient import TestClient

    from emokern.core.bank import VectorBank
    from emokern.ui.app import create_app
    from emokern.ui.backends import HFBackend

    backend = HFBackend(model, tok, VectorBank.load(args.bank))
    in_process = {"server_ttft_s": [], "patched_generate_ttft_s": [], "unpatched_generate_ttft_s": []}
    with TestClient(create_app(backend)) as client:
        for _ in range(args.reps):
            text = client.post("/api/generate", json={"messages": [{"role": "user", "content": PROMPT}],
                                                      "max_new_tokens": 1, "temperature": 0}).text
            done = [json.loads(b.split("data: ", 1)[1]) for b in text.split("\n\n") if b.startswith("event: done")]
            in_process["server_ttft_s"].append(done[0]["ttft_s"])
            in_process["patched_generate_ttft_s"].append(generate_rep(model, ids, 2)["ttft_s"])
    backend.close()
    for _ in range(args.reps):
        in_process["unpatched_generate_ttft_s"].append(generate_rep(model, ids, 2)["ttft_s"])
    in_process = {k: {"runs": v, "median": statistics.median(v)} for k, v in in_process.items()}
    print("in process:", {k: round(v["median"], 3) for k, v in in_process.items()})

    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    result = {
        "benchmark": "bench_ui", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name("cpu"), "threads": args.threads, "versions": versions(),
        "load_average_at_end": os.getloadavg(), "model": "smollm2-135m-instruct", "dtype": "bfloat16",
        "bank": args.bank, "prompt": PROMPT, "max_new_tokens": args.tokens, "reps": args.reps,
        "start_to_usable_page_s": {"runs": starts, "median": statistics.median(starts)},
        "page": {"runs": page, "ttft_s_median": med(page, "ttft_s"), "tokens_per_s_median": med(page, "tokens_per_s"),
                 "server_ttft_s_median": med(page, "server_ttft_s")},
        "generate": {"runs": gen, "ttft_s_median": med(gen, "ttft_s"),
                     "tokens_per_s_median": med(gen, "tokens_per_s")},
    }
    result["in_process_first_token"] = in_process
    result["page_over_generate_tokens_per_s"] = result["page"]["tokens_per_s_median"] / \
        result["generate"]["tokens_per_s_median"]
    out = ROOT / "benchmarks" / "results" / f"bench_ui_{machine_slug(device_name('cpu'))}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("page", "generate")} |
                     {"page_ttft_s": result["page"]["ttft_s_median"],
                      "page_tokens_per_s": result["page"]["tokens_per_s_median"],
                      "page_server_ttft_s": result["page"]["server_ttft_s_median"],
                      "generate_ttft_s": result["generate"]["ttft_s_median"],
                      "generate_tokens_per_s": result["generate"]["tokens_per_s_median"]}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
