"""``report.html``: one self-contained page per experiment run, for reading what the JSON holds.

The page shows the run's headline numbers (``result["summary"]``, nested dicts as tables), every PNG the run wrote,
links to its JSON files, and the transcripts behind the numbers: the rollouts of ``rollouts.json`` (blackmail,
sycophancy: condition, prompt, the rule verdict and its reasons, the judge's, the text) or the episodes of
``episodes.json`` (reward hacking: label, evidence, every turn's reply and test feedback), filterable by condition
and label. Images are linked by file name, so the page works wherever the folder is copied. No scripts from outside.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Iterable, List, Mapping

__all__ = ["write_experiment_page"]

_STYLE = """body{font-family:sans-serif;margin:2em;max-width:1300px} table{border-collapse:collapse;margin:.4em 0}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:left;vertical-align:top;font-size:14px}
th{background:#f2f2f2} img{max-width:100%;border:1px solid #ddd;margin:.5em 0}
details{border:1px solid #ddd;border-radius:4px;margin:4px 0;padding:2px 8px} summary{cursor:pointer}
pre{white-space:pre-wrap;font-size:13px;background:#fafafa;padding:6px} .label{font-weight:bold}
.filters{position:sticky;top:0;background:white;padding:6px 0;border-bottom:1px solid #ddd}"""

_FILTER_SCRIPT = """<script>
function applyFilters(){const c=document.getElementById('fc').value,l=document.getElementById('fl').value;
document.querySelectorAll('details.item').forEach(d=>{d.style.display=((!c||d.dataset.condition===c)&&
(!l||d.dataset.label===l))?'':'none'})}</script>"""

MAX_ITEMS = 2000  # transcripts shown at most (a full-size run has thousands; the JSON keeps them all)


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _value_html(value: Any) -> str:
    if isinstance(value, Mapping):
        if not value:
            return "—"
        rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_value_html(v)}</td></tr>" for k, v in value.items())
        return f"<table>{rows}</table>"
    if isinstance(value, list):
        if value and all(not isinstance(v, (Mapping, list)) for v in value):
            return _esc(", ".join(str(v) for v in value))
        return "<br>".join(_value_html(v) for v in value) or "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value is None else _esc(value)


def _rollout_label(record: Mapping) -> str:
    rules = record.get("rules") or {}
    if "label" in rules:
        return str(rules["label"])
    flags = [k for k, v in rules.items() if v is True]
    return "+".join(flags) if flags else "none"


def _rollout_items(records: Iterable[Mapping]) -> List[dict]:
    items = []
    for r in records:
        rules = {k: v for k, v in (r.get("rules") or {}).items() if k != "label"}
        body = f"<p><b>rules</b>: {_value_html(rules)}</p>"
        if "judge" in r:
            body += f"<p><b>judge</b>: {_value_html(r['judge'])}</p>"
        body += f"<pre>{_esc(r.get('text', ''))}</pre>"
        items.append({"condition": str(r.get("condition")), "label": _rollout_label(r),
                      "title": f"{r.get('prompt', '')} · sample {r.get('sample', '')}", "body": body})
    return items


def _episode_items(episodes: Iterable[Mapping]) -> List[dict]:
    items = []
    for e in episodes:
        body = f"<p><b>evidence</b>: {_value_html(e.get('evidence') or [])}</p>"
        if "judge" in e:
            body += f"<p><b>judge</b>: {_value_html(e['judge'])}</p>"
        for t in e.get("turns", []):
            tests = t.get("tests") or {}
            state = "no code" if t.get("code") is None else ("tests passed" if tests.get("passed") else
                                                            f"{len(tests.get('failed', []))} test(s) failed")
            body += f"<h4>turn {t.get('turn')}: {_esc(state)}</h4><pre>{_esc(t.get('reply', ''))}</pre>"
            if t.get("feedback"):
                body += f"<p>feedback to the model:</p><pre>{_esc(t['feedback'])}</pre>"
        items.append({"condition": str(e.get("condition")), "label": str(e.get("label")),
                      "title": str(e.get("id")), "body": body})
    return items


def _items_html(items: List[dict], what: str) -> str:
    shown = items[:MAX_ITEMS]
    conditions = sorted({i["condition"] for i in items})
    labels = sorted({i["label"] for i in items})
    options = lambda xs: "".join(f"<option>{_esc(x)}</option>" for x in xs)  # noqa: E731
    head = (f"<h2>{_esc(what)} ({len(items)}{'' if len(shown) == len(items) else f', first {len(shown)} shown'})"
            f"</h2><div class='filters'>condition <select id='fc' onchange='applyFilters()'><option value=''>all"
            f"</option>{options(conditions)}</select> label <select id='fl' onchange='applyFilters()'>"
            f"<option value=''>all</option>{options(labels)}</select></div>")
    body = "".join(
        f"<details class='item' data-condition='{_esc(i['condition'])}' data-label='{_esc(i['label'])}'><summary>"
        f"<span class='label'>{_esc(i['label'])}</span> · {_esc(i['condition'])} · {_esc(i['title'])}</summary>"
        f"{i['body']}</details>" for i in shown)
    return head + body


def write_experiment_page(out_dir, result: Mapping) -> Path:
    """Write ``out_dir/report.html`` for ``result`` (what ``run_experiment`` returns); returns its path."""
    out_dir = Path(out_dir)
    outputs = result.get("outputs") or {}
    files = [Path(p) for p in (outputs.values() if isinstance(outputs, Mapping) else outputs)]
    images = "".join(f"<img src='{_esc(p.name)}' alt='{_esc(p.stem)}'>" for p in files if p.suffix == ".png")
    links = "".join(f"<li><a href='{_esc(p.name)}'>{_esc(p.name)}</a></li>"
                    for p in [out_dir / "result.json", out_dir / "config.json"] + files if p.suffix == ".json")
    items_html = ""
    if (out_dir / "rollouts.json").is_file():
        records = json.loads((out_dir / "rollouts.json").read_text()).get("rollouts", [])
        items_html = _items_html(_rollout_items(records), "rollouts")
    elif (out_dir / "episodes.json").is_file():
        items_html = _items_html(_episode_items(json.loads((out_dir / "episodes.json").read_text())), "episodes")
    name = result.get("experiment", "experiment")
    meta = {k: result.get(k) for k in ("model", "size", "seed", "seconds")}
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>emokern {_esc(name)}</title>"
            f"<style>{_STYLE}</style>{_FILTER_SCRIPT}</head><body><h1>emokern experiment: {_esc(name)}</h1>"
            f"{_value_html(meta)}<h2>Summary</h2>{_value_html(result.get('summary', {}))}<h2>Plots</h2>{images}"
            f"<h2>Files</h2><ul>{links}</ul><h2>Options</h2>{_value_html(result.get('options', {}))}"
            f"{items_html}</body></html>")
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
