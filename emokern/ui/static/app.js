// emokern ui: the page's script (vanilla JS, no external code). It posts requests to /api/generate, reads the
// server-sent events as they stream, and draws tokens, colours, the chart and the hover panel. The colour scale and
// the attention-sink rule are those of the static heatmap (emokern/core/trace_plots.py, Trace.sink_positions).
"use strict";

const POS = [214, 39, 40], NEG = [31, 96, 180], DARK_TEXT_ABOVE = 0.55;
const CHART_COLOURS = ["#d62728", "#1f60b4", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf"];
const $ = (id) => document.getElementById(id);

const state = {
  info: null,
  history: [],          // the conversation sent with every request: [{role, content}]
  panes: [],            // the panes on screen (one, or two when comparing)
  colour: "",           // the emotion tokens are coloured by
  chart: [],            // up to 6 charted emotions
  running: [],          // AbortControllers of the streams in flight
  pinned: null,         // [pane, position] of the pinned hover panel
};

// ---------------------------------------------------------------------------------------------- messages
function showMessage(text) {
  $("message-text").textContent = text;
  $("message").hidden = false;
}
function clearMessage() { $("message").hidden = true; }
$("message-close").onclick = clearMessage;

// ---------------------------------------------------------------------------------------------- scale and sinks
// The q-quantile with linear interpolation (torch.quantile's default), as scale_values in trace_plots.py.
function quantile(sorted, q) {
  if (!sorted.length) return 0;
  const pos = q * (sorted.length - 1), lo = Math.floor(pos), hi = Math.ceil(pos);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo);
}
function colourFor(s) {
  const end = s >= 0 ? POS : NEG, a = Math.min(1, Math.abs(s));
  return end.map((c) => Math.floor(255 + (c - 255) * a + 0.5));
}
// Trace.sink_positions: the first valid position, and any whose projection norm exceeds factor x the (lower) median.
function sinkMask(norms, factor) {
  const valid = [];
  norms.forEach((n, i) => { if (n !== null && n !== undefined && Number.isFinite(n)) valid.push(i); });
  const sink = norms.map(() => false);
  if (!valid.length) return sink;
  sink[valid[0]] = true;
  const sorted = valid.map((i) => norms[i]).sort((a, b) => a - b);
  const m = sorted[Math.floor((sorted.length - 1) / 2)];
  if (!(m > 0)) return sink;
  valid.forEach((i) => { if (norms[i] > factor * m) sink[i] = true; });
  return sink;
}

// ---------------------------------------------------------------------------------------------- a pane
class Pane {
  constructor(title) {
    const el = $("pane-template").content.firstElementChild.cloneNode(true);
    this.el = el;
    el.querySelector(".pane-title").textContent = title;
    this.tokensEl = el.querySelector(".tokens");
    this.tokens = [];     // token texts by position
    this.z = [];          // per position: K values or null (not read yet / never read)
    this.norm = [];
    this.spans = [];
    this.nPrompt = 0;
    this.id = null;
    this.alert = null;
    this.dirty = false;
    this.tokensEl.addEventListener("mouseover", (e) => onTokenHover(this, e));
    this.tokensEl.addEventListener("mouseout", () => { if (!state.pinned) hideHover(); });
    this.tokensEl.addEventListener("click", (e) => onTokenClick(this, e));
  }
  status(text) { this.el.querySelector(".status").textContent = text; }
  start(data) {
    this.id = data.id;
    this.tokensEl.textContent = "";
    this.spans = [];
    this.tokens = [];
    const label = document.createElement("span");
    label.className = "part-label";
    label.textContent = `prompt · ${data.prompt_tokens.length} tokens (chat template included)`;
    this.tokensEl.appendChild(label);
    data.prompt_tokens.forEach((t) => this.addToken(t, true));
    this.nPrompt = data.prompt_tokens.length;
    const rule = document.createElement("span");
    rule.className = "reply-start";
    this.tokensEl.appendChild(rule);
    const reply = document.createElement("span");
    reply.className = "part-label";
    reply.textContent = "reply";
    this.tokensEl.appendChild(reply);
  }
  addToken(text, prompt) {
    const i = this.tokens.length;
    this.tokens.push(text);
    this.z.push(null);
    this.norm.push(null);
    const span = document.createElement("span");
    span.className = "tok pending" + (prompt ? " prompt" : "");
    span.dataset.i = String(i);
    span.textContent = visible(text);
    this.spans.push(span);
    this.tokensEl.appendChild(span);
    if (!prompt) this.tokensEl.scrollTop = this.tokensEl.scrollHeight;
  }
  readout(data) {
    data.z.forEach((row, j) => { this.z[data.start + j] = row; this.norm[data.start + j] = data.norm[j]; });
    this.schedule();
  }
  finish(data) {
    // the final token texts (Trace.decode_tokens of the whole sequence) replace the streamed ones
    data.tokens.forEach((t, i) => {
      if (i < this.spans.length) { this.tokens[i] = t; this.spans[i].textContent = visible(t); }
      else this.addToken(t, i < data.n_prompt);
    });
    const tps = data.tokens_per_s === null ? "–" : data.tokens_per_s.toFixed(1);
    this.status(`${data.n_generated} tokens · first token ${(data.ttft_s * 1000).toFixed(0)} ms · ${tps} tokens/s` +
                ` · ended: ${data.stop}`);
    const ex = this.el.querySelector(".exports");
    ex.hidden = false;
    this.updateExports();
    this.schedule();
  }
  updateExports() {
    if (!this.id) return;
    this.el.querySelector(".export-json").href = `/api/trace/${this.id}.json`;
    const others = state.chart.filter((e) => e !== state.colour).join(",");
    this.el.querySelector(".export-html").href =
      `/api/trace/${this.id}.html?emotion=${encodeURIComponent(state.colour)}&emotions=${encodeURIComponent(others)}`;
  }
  setAlert(data) {
    this.alert = data;
    const line = this.el.querySelector(".alert-line");
    line.hidden = false;
    line.textContent = `alert: ${data.emotion} above z ${data.z} for ${data.tokens} tokens at token #${data.position}` +
      ` (layer ${data.layer})${data.stopped ? " — the reply was stopped" : ""}`;
    this.schedule();
  }
  schedule() {  // redraw at most once per frame however many events arrive
    if (this.dirty) return;
    this.dirty = true;
    requestAnimationFrame(() => { this.dirty = false; this.draw(); });
  }
  series(k) { return this.z.map((row) => (row && row[k] !== null && row[k] !== undefined ? row[k] : null)); }
  draw() {
    const info = state.info, k = info.emotions.indexOf(state.colour);
    const sink = sinkMask(this.norm, info.sink_factor);
    this.sink = sink;
    const v = k >= 0 ? this.series(k) : this.z.map(() => null);
    const abs = v.filter((x, i) => x !== null && !sink[i]).map(Math.abs).sort((a, b) => a - b);
    let scale = quantile(abs, 0.99);
    if (!(scale > 0)) scale = abs.length && abs[abs.length - 1] > 0 ? abs[abs.length - 1] : 1;
    this.scale = scale;
    const ak = state.alertRule ? info.emotions.indexOf(state.alertRule.emotion) : -1;
    this.spans.forEach((span, i) => {
      const prompt = i < this.nPrompt;
      let cls = "tok" + (prompt ? " prompt" : "");
      span.style.background = ""; span.style.color = "";
      if (sink[i]) cls += " sink";
      else if (v[i] === null) cls += " pending";
      else {
        const s = Math.max(-1, Math.min(1, v[i] / scale)), c = colourFor(s);
        span.style.background = `rgb(${c[0]},${c[1]},${c[2]})`;
        if (Math.abs(s) > DARK_TEXT_ABOVE) span.style.color = "#fff";
      }
      if (ak >= 0 && !prompt && this.z[i] && this.z[i][ak] !== null && this.z[i][ak] > state.alertRule.z) cls += " over";
      if (this.alert && this.alert.position === i) cls += " fired";
      if (state.pinned && state.pinned[0] === this && state.pinned[1] === i) cls += " pinned";
      span.className = cls;
    });
    drawChart(this);
    drawTop(this);
    const shown = state.pinned || state.hovered;
    if (shown && shown[0] === this && !$("hover").hidden) showHover(this, shown[1], this.spans[shown[1]]);
  }
}

function visible(t) { return t.replace(/\n/g, "↵\n").replace(/\t/g, "→"); }

// ---------------------------------------------------------------------------------------------- chart
function drawChart(pane) {
  const svg = pane.el.querySelector(".chart"), W = 600, H = 180, pad = 4;
  const info = state.info, T = pane.tokens.length;
  const lines = state.chart.map((name) => [name, pane.series(info.emotions.indexOf(name))]);
  const vals = [];
  lines.forEach(([, s]) => s.forEach((x, i) => { if (x !== null && !pane.sink[i]) vals.push(x); }));
  let lo = Math.min(0, ...vals), hi = Math.max(0, ...vals);
  if (!(hi > lo)) { lo = -1; hi = 1; }
  const x = (i) => pad + (T > 1 ? (i / (T - 1)) * (W - 2 * pad) : 0);
  const y = (v) => H - pad - ((v - lo) / (hi - lo)) * (H - 2 * pad);
  let out = "";
  if (pane.nPrompt > 0 && T > 0) {
    const xr = x(Math.min(pane.nPrompt, T - 1)) - (T > 1 ? (W - 2 * pad) / (T - 1) / 2 : 0);
    out += `<rect x="0" y="0" width="${xr}" height="${H}" fill="#eef0f4"/>`;
    out += `<text x="6" y="14" font-size="11" fill="#777">prompt</text>`;
    out += `<line x1="${xr}" x2="${xr}" y1="0" y2="${H}" stroke="#999" stroke-dasharray="4 3"/>`;
    out += `<text x="${xr + 6}" y="14" font-size="11" fill="#777">reply</text>`;
  }
  out += `<line x1="0" x2="${W}" y1="${y(0)}" y2="${y(0)}" stroke="#bbb"/>`;
  out += `<text x="${W - 4}" y="${y(hi) + 10}" font-size="10" fill="#777" text-anchor="end">${hi.toFixed(1)}</text>`;
  out += `<text x="${W - 4}" y="${y(lo) - 3}" font-size="10" fill="#777" text-anchor="end">${lo.toFixed(1)}</text>`;
  lines.forEach(([, s], n) => {
    let d = "", pen = false;
    s.forEach((v, i) => {
      if (v === null || pane.sink[i]) { pen = false; return; }  // sinks and unread positions leave a gap
      d += `${pen ? "L" : "M"}${x(i).toFixed(1)},${y(v).toFixed(1)}`;
      pen = true;
    });
    out += `<path d="${d}" fill="none" stroke="${CHART_COLOURS[n]}" stroke-width="1.5" vector-effect="non-scaling-stroke"/>`;
  });
  svg.innerHTML = out;
  pane.el.querySelector(".legend").innerHTML = state.chart.map((name, n) =>
    `<span style="--c:${CHART_COLOURS[n]}">${escapeHtml(name)}</span>`).join("") +
    `<span class="hint">${info.values === "zscore" ? "z-score vs neutral text" : "projection"}, layer ${info.readout_layer}; attention sinks left out</span>`;
}

// The reply's top emotions: mean value over the reply's read, non-sink positions.
function drawTop(pane) {
  const info = state.info, K = info.emotions.length, sum = new Array(K).fill(0);
  let n = 0;
  for (let i = pane.nPrompt; i < pane.z.length; i++) {
    const row = pane.z[i];
    if (!row || pane.sink[i]) continue;
    row.forEach((v, k) => { sum[k] += v === null ? 0 : v; });
    n++;
  }
  const box = pane.el.querySelector(".top");
  if (!n) { box.textContent = ""; return; }
  const mean = sum.map((s, k) => [info.emotions[k], s / n]).sort((a, b) => b[1] - a[1]).slice(0, 8);
  const big = Math.max(...mean.map((m) => Math.abs(m[1])), 1e-9);
  box.innerHTML = `<b>reply's top emotions</b> (mean over ${n} tokens): ` + mean.map(([name, v]) =>
    `<span class="top-item"><span class="bar${v < 0 ? " neg" : ""}" style="width:${(30 * Math.abs(v) / big).toFixed(0)}px"></span>` +
    `${escapeHtml(name)} ${v.toFixed(2)}</span>`).join(" · ");
}

function escapeHtml(s) {
  return s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

// ---------------------------------------------------------------------------------------------- hover panel
function tokenIndex(e) {
  const t = e.target.closest(".tok");
  return t ? Number(t.dataset.i) : null;
}
function onTokenHover(pane, e) {
  if (state.pinned) return;
  const i = tokenIndex(e);
  if (i !== null) { state.hovered = [pane, i]; showHover(pane, i, e.target.closest(".tok")); }
}
function onTokenClick(pane, e) {  // click or tap pins the panel; a second click unpins it
  const i = tokenIndex(e);
  if (i === null) return;
  e.stopPropagation();
  if (state.pinned && state.pinned[0] === pane && state.pinned[1] === i) { unpin(); return; }
  state.pinned = [pane, i];
  showHover(pane, i, e.target.closest(".tok"));
  $("hover").classList.add("pinned");
  state.panes.forEach((p) => p.schedule());
}
function unpin() {
  state.pinned = null;
  $("hover").classList.remove("pinned");
  hideHover();
  state.panes.forEach((p) => p.schedule());
}
document.addEventListener("click", (e) => { if (state.pinned && !e.target.closest("#hover")) unpin(); });
function hideHover() { $("hover").hidden = true; state.hovered = null; }
function showHover(pane, i, span) {
  const info = state.info, box = $("hover"), row = pane.z[i];
  const kind = info.values === "zscore" ? "z" : "projection";
  let html = `<div>#${i} <b>${escapeHtml(JSON.stringify(pane.tokens[i]))}</b> · ${i < pane.nPrompt ? "prompt" : "reply"}</div>`;
  if (pane.sink && pane.sink[i]) html += `<div><i>attention sink: grey, off the colour scale</i></div>`;
  if (!row) {
    html += `<div><i>${i === pane.tokens.length - 1 && i >= pane.nPrompt ? "the last token is never fed back to the model: no readout" : "no readout yet"}</i></div>`;
  } else {
    const k = info.emotions.indexOf(state.colour);
    if (k >= 0) html += `<div>${escapeHtml(state.colour)} (${kind}): <b>${row[k] === null ? "n/a" : row[k].toFixed(2)}</b></div>`;
    const top = row.map((v, j) => [info.emotions[j], v]).filter((p) => p[1] !== null).sort((a, b) => b[1] - a[1]).slice(0, 5);
    html += `<table><caption style="text-align:left">top 5</caption>` + top.map(([name, v]) =>
      `<tr${name === state.colour ? ' class="sel"' : ""}><td>${escapeHtml(name)}</td><td class="v">${v.toFixed(2)}</td></tr>`).join("") + `</table>`;
  }
  box.innerHTML = html;
  box.hidden = false;
  const r = span.getBoundingClientRect();
  const left = Math.min(window.innerWidth - 270, Math.max(4, r.left));
  const top = r.bottom + 6 + 180 > window.innerHeight ? Math.max(4, r.top - box.offsetHeight - 6) : r.bottom + 6;
  box.style.left = `${left}px`;
  box.style.top = `${top}px`;
}

// ---------------------------------------------------------------------------------------------- controls
function emotionOk(name) { return state.info.emotions.includes(name); }

function renderChips() {
  $("chart-chips").innerHTML = "";
  state.chart.forEach((name, n) => {
    const chip = document.createElement("span");
    chip.className = "chip";
    chip.style.setProperty("--c", CHART_COLOURS[n]);
    chip.textContent = name;
    const x = document.createElement("button");
    x.type = "button"; x.textContent = "×"; x.title = `remove ${name}`;
    x.onclick = () => { state.chart = state.chart.filter((e) => e !== name); renderChips(); redrawAll(); };
    chip.appendChild(x);
    $("chart-chips").appendChild(chip);
  });
}
function redrawAll() { state.panes.forEach((p) => { p.updateExports(); p.schedule(); }); }

$("chart-add").addEventListener("change", (e) => {
  const name = e.target.value.trim();
  if (!name) return;
  if (!emotionOk(name)) { showMessage(`unknown emotion ${JSON.stringify(name)}: pick one of the ${state.info.emotions.length} in the list`); return; }
  if (state.chart.includes(name)) { e.target.value = ""; return; }
  if (state.chart.length >= 6) { showMessage("the chart shows up to 6 emotions: remove one first"); return; }
  state.chart.push(name);
  e.target.value = "";
  renderChips();
  redrawAll();
});
$("colour-emotion").addEventListener("change", (e) => {
  const name = e.target.value.trim();
  if (!emotionOk(name)) { showMessage(`unknown emotion ${JSON.stringify(name)}: pick one of the ${state.info.emotions.length} in the list`); e.target.value = state.colour; return; }
  clearMessage();
  state.colour = name;
  redrawAll();
});

function addSteerRow(emotion = "", strength = 0.25, mode = "add") {
  const row = document.createElement("div");
  row.className = "steer-row";
  row.innerHTML = `<input class="emotion" list="emotion-list" autocomplete="off" spellcheck="false" placeholder="emotion">
    <select class="mode"><option>add</option><option>ablate</option><option>clamp</option><option>set</option><option>scale</option></select>
    <button type="button" class="remove" title="remove">×</button><br>
    <input type="range" class="strength" min="-1" max="1" step="0.01">
    <input type="number" class="strength-num" step="0.01">`;
  row.querySelector(".emotion").value = emotion;
  row.querySelector(".mode").value = mode;
  const range = row.querySelector(".strength"), num = row.querySelector(".strength-num");
  range.value = String(strength); num.value = String(strength);
  range.addEventListener("input", () => { num.value = range.value; });
  num.addEventListener("input", () => { range.value = num.value; });
  const sync = () => { const m = row.querySelector(".mode").value; range.disabled = num.disabled = m === "ablate"; };
  row.querySelector(".mode").addEventListener("change", sync);
  sync();
  row.querySelector(".remove").onclick = () => row.remove();
  $("steer-rows").appendChild(row);
  return row;
}
$("steer-add").onclick = () => addSteerRow();

function parseLayers(text) {
  const out = [];
  for (const part of text.split(",").map((s) => s.trim()).filter(Boolean)) {
    const m = part.match(/^(\d+)\s*-\s*(\d+)$/);
    if (m) { for (let l = Number(m[1]); l <= Number(m[2]); l++) out.push(l); }
    else if (/^\d+$/.test(part)) out.push(Number(part));
    else throw new Error(`layers: ${JSON.stringify(part)} is not a layer number or a range such as 17-19`);
  }
  return out;
}

// The steering items of the form (null: nothing steered). Strength units: the layer's residual norm. A clamp keeps
// the projection within +-|strength|.
function steering() {
  const items = [];
  const layersText = $("steer-layers").value.trim();
  const layers = layersText ? parseLayers(layersText) : null;
  const scope = $("steer-scope").value;
  for (const row of document.querySelectorAll(".steer-row")) {
    const name = row.querySelector(".emotion").value.trim();
    if (!name) continue;
    const mode = row.querySelector(".mode").value;
    const raw = row.querySelector(".strength-num").value;
    const s = Number(raw);
    if (mode !== "ablate" && (raw.trim() === "" || !Number.isFinite(s))) throw new Error(`steering ${name}: the strength must be a number`);
    if (mode !== "ablate" && s === 0 && mode !== "set") continue;  // a zero push changes nothing: leave it out
    const value = mode === "ablate" ? null : mode === "clamp" ? [-Math.abs(s), Math.abs(s)] : s;
    const item = { emotions: { [name]: value }, mode, scope };
    if (layers) item.layers = layers;
    items.push(item);
  }
  return items.length ? items : null;
}

function alertRule() {
  if (!$("alert-on").checked) return null;
  return { emotion: $("alert-emotion").value.trim(), z: Number($("alert-z").value),
           tokens: Number($("alert-tokens").value), stop: $("alert-stop").checked };
}

// ---------------------------------------------------------------------------------------------- running requests
function readInt(id) {
  const v = $(id).value.trim();
  return /^-?\d+$/.test(v) ? Number(v) : v === "" ? null : v;  // the server says what is wrong with a non-integer
}

async function run(pane, body, controller) {
  pane.status("sending…");
  let resp;
  try {
    resp = await fetch("/api/generate", { method: "POST", headers: { "Content-Type": "application/json" },
                                          body: JSON.stringify(body), signal: controller.signal });
  } catch (err) {
    if (err.name === "AbortError") { pane.status("stopped"); return null; }
    throw new Error(`the server cannot be reached (${err.message})`);
  }
  if (!resp.ok) {
    let message = `the server answered ${resp.status}`;
    try { message = (await resp.json()).error || message; } catch (_) { /* not JSON: keep the status line */ }
    throw new Error(message);
  }
  const reader = resp.body.getReader(), decoder = new TextDecoder();
  let buffer = "", done = null;
  try {
    for (;;) {
      const { value, done: end } = await reader.read();
      if (end) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let event = "message", data = "";
        for (const line of block.split("\n")) {
          if (line.startsWith("event: ")) event = line.slice(7);
          else if (line.startsWith("data: ")) data += line.slice(6);
        }
        const d = data ? JSON.parse(data) : {};
        if (event === "queued") pane.status(`waiting: ${d.ahead} request(s) ahead — ${state.info.queue}`);
        else if (event === "start") { pane.start(d); pane.status("generating…"); }
        else if (event === "token") pane.addToken(d.text, false);
        else if (event === "readout") pane.readout(d);
        else if (event === "alert") pane.setAlert(d);
        else if (event === "done") { pane.finish(d); done = d; }
        else if (event === "error") throw new Error(d.message);
      }
    }
  } catch (err) {
    if (err.name === "AbortError") { pane.status("stopped"); return null; }
    throw err;
  }
  return done;
}

function requestBody(steer) {
  return {
    messages: state.history.concat([{ role: "user", content: $("prompt").value }]),
    steer, alert: alertRule(),
    max_new_tokens: readInt("max-new"), temperature: Number($("temperature").value),
    seed: readInt("seed"),
  };
}

function setBusy(busy) {
  $("send").disabled = busy; $("compare").disabled = busy; $("stop").disabled = !busy;
}

async function submit(compare) {
  clearMessage();
  const text = $("prompt").value;
  if (!text.trim()) { showMessage("type a message first"); return; }
  let steer;
  try { steer = steering(); } catch (err) { showMessage(err.message); return; }
  state.alertRule = alertRule();
  const panes = compare ? [new Pane("unsteered"), new Pane(steer ? "steered" : "steered (no steering set)")]
                        : [new Pane(steer ? "steered" : "unsteered")];
  state.panes = panes;
  $("panes").innerHTML = "";
  $("panes").classList.toggle("compare", compare);
  panes.forEach((p) => $("panes").appendChild(p.el));
  hideHover(); state.pinned = null;
  setBusy(true);
  const bodies = compare ? [requestBody(null), requestBody(steer)] : [requestBody(steer)];
  const controllers = bodies.map(() => new AbortController());
  state.running = controllers;
  // both sides of a comparison are sent at once: the HF backend runs them one after the other (its queue), a vLLM
  // server in one batch; they share the seed, so they differ only by the steering
  const results = await Promise.all(bodies.map((b, n) => run(panes[n], b, controllers[n]).catch((err) => {
    panes[n].status("failed");
    showMessage(err.message);
    return null;
  })));
  setBusy(false);
  state.running = [];
  const last = results[results.length - 1];
  if (last) {  // the conversation goes on from the (steered) reply
    state.history.push({ role: "user", content: text }, { role: "assistant", content: last.reply });
    $("prompt").value = "";
  }
}

$("prompt-form").addEventListener("submit", (e) => { e.preventDefault(); submit(false); });
$("compare").onclick = () => submit(true);
$("stop").onclick = () => state.running.forEach((c) => c.abort());
$("new-chat").onclick = () => {
  state.history = []; state.panes = []; $("panes").innerHTML = ""; clearMessage();
  $("seed").value = String(Math.floor(Math.random() * 1e6));
};
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); if (!$("send").disabled) submit(false); }
});

// ---------------------------------------------------------------------------------------------- start
async function init() {
  let info;
  try {
    const resp = await fetch("/api/info");
    info = await resp.json();
  } catch (err) {
    showMessage(`the server cannot be reached (${err.message})`);
    return;
  }
  state.info = info;
  $("model-line").textContent = `${info.model} · ${info.emotions.length} emotions · readout layer ${info.readout_layer}` +
    ` · ${info.backend === "hf" ? "Hugging Face (in this process)" : "vLLM server"}`;
  $("queue-note").textContent = info.queue;
  $("value-kind").textContent = `${info.values === "zscore" ? "z-score vs neutral text" : "raw projection"} at layer ` +
    `${info.readout_layer}; white at 0, saturating at the 99th percentile of |value|; grey ▴: attention sink`;
  $("emotion-list").innerHTML = info.emotions.map((e) => `<option value="${escapeHtml(e)}">`).join("");
  const pick = (wanted) => wanted.filter(emotionOk);
  state.colour = pick(["desperate"])[0] || info.emotions[0];
  $("colour-emotion").value = state.colour;
  state.chart = pick(["desperate", "calm", "happy", "afraid"]);
  if (!state.chart.length) state.chart = info.emotions.slice(0, Math.min(4, info.emotions.length));
  renderChips();
  $("steer-layers").value = String(info.steer_layer);
  $("alert-emotion").value = state.colour;
  $("max-new").max = String(info.limits.max_new_tokens);
  $("seed").value = String(Math.floor(Math.random() * 1e6));
  addSteerRow(pick(["calm"])[0] || info.emotions[0], 0);
  document.body.dataset.ready = "1";
}
init();
