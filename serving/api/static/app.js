// The live view: streams a completion from this server's own OpenAI-compatible API and colours every
// token by the depth it exited at; with speculative decoding on, the drafts the full model kept are underlined
// (the stream's per-token `accepted` flags). Plain JavaScript, nothing fetched from anywhere else. The API key, if
// any, lives only in this page's memory (the input field). URLs are relative: the page works under any
// Serve route prefix.
"use strict";

const $ = (id) => document.getElementById(id);
let model = null; // {id, num_layers, exit_points, default_exit, draft_depths, default_speculative}
let running = [];

function layers() {
  return model ? model.num_layers : 1;
}

// Shallow exits (compute saved) blue, full depth orange; light enough to read black text on.
function colour(layer) {
  const t = (layer - 1) / Math.max(1, layers() - 1);
  return `hsl(${Math.round(210 - 180 * t)} 85% 78%)`;
}

function headers() {
  const h = { "content-type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.authorization = `Bearer ${key}`;
  return h;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function failure(response) {
  let detail = "";
  try {
    const body = await response.json();
    detail = body.error ? body.error.message : JSON.stringify(body);
  } catch (_) {
    detail = response.statusText;
  }
  const retry = response.headers.get("retry-after");
  return new Error(`HTTP ${response.status}: ${detail}${retry ? ` (retry after ${retry} s)` : ""}`);
}

async function loadModel() {
  const response = await fetch("v1/models", { headers: headers() });
  if (!response.ok) throw await failure(response);
  const m = (await response.json()).data[0];
  model = { id: m.id, ...m.adept };
  $("model").textContent = `${m.id}: ${model.num_layers} layers in ${model.num_layer_groups} layer groups, exit points ${model.exit_points.join(", ")}`;
  const defaults = model.default_exit || {};
  if (defaults.threshold !== undefined) {
    $("threshold").value = defaults.threshold;
    $("threshold-value").value = defaults.threshold;
  }
  fillSpeculative();
  $("panel-early").querySelector(".settings").textContent = describe(controls());
  drawLegend();
  syncSpeculative();
}

// The draft depths with exit heads on this server ('auto' picks auto_draft_depth); its default speculative
// decoding, if on.
function fillSpeculative() {
  const depths = model.draft_depths || [];
  const select = $("draft-depth");
  select.innerHTML = "";
  for (const d of depths) {
    const option = document.createElement("option");
    option.value = option.textContent = String(d);
    select.append(option);
  }
  const defaults = model.default_speculative || {};
  if (depths.length) {
    const auto = depths.includes(model.auto_draft_depth) ? model.auto_draft_depth : depths[depths.length - 1];
    select.value = String(depths.includes(defaults.draft_depth) ? defaults.draft_depth : auto);
  }
  if (defaults.num_tokens > 0) $("draft-tokens").value = defaults.num_tokens;
  $("speculative").checked = depths.length > 0 && defaults.num_tokens > 0;
  $("speculative").disabled = !depths.length;
}

function serverSpeculates() {
  return Boolean(model && model.default_speculative && model.default_speculative.num_tokens > 0);
}

// A speculative request takes no exit controls (its tokens are full depth's): those are off while it is on.
function syncSpeculative() {
  const on = $("speculative").checked;
  for (const id of ["policy", "threshold", "threshold-default", "max-depth", "backfill"]) $(id).disabled = on;
  for (const id of ["draft-depth", "draft-tokens"]) $(id).disabled = !on;
  const key = $("legend-speculative");
  if (key) key.hidden = !on;
}

function drawLegend() {
  const n = layers();
  const stops = Array.from({ length: 6 }, (_, i) => colour(1 + ((n - 1) * i) / 5)).join(", ");
  $("legend").innerHTML = "";
  const left = document.createElement("span");
  left.textContent = "exit layer 1";
  const bar = document.createElement("span");
  bar.className = "bar";
  bar.style.background = `linear-gradient(to right, ${stops})`;
  const right = document.createElement("span");
  right.textContent = `${n} (full depth)`;
  // speculative decoding: every token is full depth's; the underline tells a kept draft from the model's own
  const key = document.createElement("span");
  key.id = "legend-speculative";
  key.className = "key";
  const sample = (label, kept) => {
    const tok = document.createElement("span");
    tok.className = kept ? "tok draft" : "tok";
    tok.style.background = colour(n);
    tok.textContent = label;
    return tok;
  };
  key.append(sample("draft kept", true), " ", sample("the model's own token", false));
  $("legend").append(left, bar, right, key);
}

function controls() {
  if ($("speculative").checked) {
    const speculative = { draft_depth: Number($("draft-depth").value) };
    if ($("draft-tokens").value !== "") speculative.num_tokens = Number($("draft-tokens").value);
    return { speculative };
  }
  const adept = {};
  if (serverSpeculates()) adept.speculative = { num_tokens: 0 }; // this run decodes plainly
  if ($("policy").value) adept.policy = $("policy").value;
  if (!$("threshold-default").checked) adept.threshold = Number($("threshold").value);
  if ($("max-depth").value) adept.max_depth = Number($("max-depth").value);
  if ($("backfill").value) adept.backfill = $("backfill").value;
  return adept;
}

function describe(adept) {
  const parts = [];
  for (const [k, v] of Object.entries(adept)) {
    if (k !== "speculative") parts.push(`${k} ${v}`);
    else if (v.num_tokens !== 0) parts.push(`up to ${v.num_tokens ?? "default"} drafts from depth ${v.draft_depth}`);
  }
  return parts.length ? parts.join(", ") : "server defaults";
}

// Whether a run with these controls decodes speculatively.
function speculating(adept) {
  const own = adept.speculative && adept.speculative.num_tokens;
  return (own ?? (model.default_speculative || {}).num_tokens ?? 0) > 0;
}

function request(adept) {
  const chat = $("mode").value === "chat";
  const body = {
    model: model.id,
    max_tokens: $("max-tokens").value === "" ? null : Number($("max-tokens").value),
    temperature: 0,
    stream: true,
    stream_options: { include_usage: true },
    adept,
  };
  // A speculative chunk carries a round's tokens: their log-probability entries give each token's text.
  if (speculating(adept)) body.logprobs = chat ? true : 0;
  if (chat) body.messages = [{ role: "user", content: $("prompt").value }];
  else body.prompt = $("prompt").value;
  return { chat, body, url: chat ? "v1/chat/completions" : "v1/completions" };
}

function resetPanel(panel, speculative) {
  panel.querySelector("[data-text]").innerHTML = "";
  panel.querySelector("[data-speculative]").hidden = !speculative;
  panel.querySelector("[data-histogram]").innerHTML = "";
  for (const dd of panel.querySelectorAll("[data-figure]")) dd.textContent = "–";
  // Layer numbers under the histogram's exit points (the only depths a token can leave at): once per run.
  const axis = panel.querySelector("[data-axis]");
  axis.innerHTML = "";
  for (let layer = 1; layer <= layers(); layer++) {
    const cell = document.createElement("span");
    if (model.exit_points.includes(layer)) cell.textContent = String(layer);
    axis.append(cell);
  }
}

function figures(panel, state, now) {
  const set = (name, value) => (panel.querySelector(`[data-figure="${name}"]`).textContent = value);
  if (state.first === null) return;
  set("tps", (state.tokens / ((now - state.started) / 1000)).toFixed(1));
  set("ttft", `${Math.round(state.first - state.started)} ms`);
  set("depth", (state.depthSum / state.tokens).toFixed(1));
  const saved = state.usage
    ? 1 - state.usage.layers_computed / state.usage.layers_total
    : 1 - state.depthSum / (state.tokens * layers());
  set("saved", `${(100 * saved).toFixed(1)}%`);
  set("tokens", String(state.tokens));
  const u = state.usage;
  set("kept", u && u.draft_tokens ? `${u.accepted_tokens} of ${u.draft_tokens}` : String(state.kept));
}

// One token's span (or, where the chunk's text does not split into its tokens' texts, the chunk's): coloured
// by the deepest exit; `accepted` (speculative): per token, a draft the full model kept, underlined.
function tokenSpan(piece, exits, accepted) {
  const span = document.createElement("span");
  const deepest = Math.max(...exits);
  span.className = "tok";
  span.textContent = piece;
  span.dataset.exitLayer = String(deepest);
  span.style.background = colour(deepest);
  let title = `exit layer ${exits.join(", ")} of ${layers()}`;
  if (accepted) {
    const kept = accepted.filter(Boolean).length;
    span.dataset.accepted = kept === accepted.length ? "true" : kept ? "partly" : "false";
    if (kept) span.classList.add(kept === accepted.length ? "draft" : "partly");
    if (accepted.length > 1) title += `; ${kept} of these ${accepted.length} tokens: drafts the full model kept`;
    else title += kept ? "; a draft the full model kept" : "; the model's own token";
  }
  span.title = title;
  return span;
}

function tokenTexts(choice, chat) {
  const lp = choice && choice.logprobs;
  if (!lp) return null;
  return chat ? (lp.content || []).map((e) => e.token) : lp.tokens || null;
}

function histogram(panel, counts) {
  const box = panel.querySelector("[data-histogram]");
  const max = Math.max(1, ...counts);
  box.innerHTML = "";
  for (let layer = 1; layer <= layers(); layer++) {
    const bar = document.createElement("div");
    bar.className = "b";
    bar.style.height = `${(100 * counts[layer]) / max}%`;
    bar.style.background = colour(layer);
    bar.title = `exit layer ${layer}: ${counts[layer]} tokens`;
    box.append(bar);
  }
}

async function stream(panel, adept, signal) {
  resetPanel(panel, speculating(adept));
  const { chat, body, url } = request(adept);
  const text = panel.querySelector("[data-text]");
  const counts = new Array(layers() + 1).fill(0);
  const state = { started: performance.now(), first: null, tokens: 0, depthSum: 0, kept: 0, usage: null };
  const response = await fetch(url, { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  if (!response.ok) throw await failure(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, end).trim();
      buffer = buffer.slice(end + 2);
      if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
      const event = JSON.parse(line.slice(6));
      if (event.error) throw new Error(`the server stopped this stream: ${event.error.message}`);
      if (event.usage) state.usage = event.usage;
      const choice = event.choices && event.choices[0];
      const piece = choice ? (chat ? (choice.delta && choice.delta.content) || "" : choice.text || "") : "";
      const exits = (event.adept && event.adept.exit_layers) || [];
      const accepted = event.adept && event.adept.accepted; // speculative requests only
      if (exits.length) {
        const texts = tokenTexts(choice, chat);
        if (exits.length > 1 && texts && texts.length === exits.length && texts.join("") === piece) {
          texts.forEach((t, i) => text.append(tokenSpan(t, [exits[i]], accepted && [accepted[i]])));
        } else {
          text.append(tokenSpan(piece, exits, accepted));
        }
        if (accepted) state.kept += accepted.filter(Boolean).length;
        state.first = state.first ?? performance.now();
        state.tokens += exits.length;
        for (const d of exits) {
          state.depthSum += d;
          counts[d] += 1;
        }
        histogram(panel, counts);
      } else if (piece) {
        text.append(document.createTextNode(piece)); // text without a token of its own (end of stream)
      }
      figures(panel, state, performance.now());
    }
  }
  figures(panel, state, performance.now());
}

async function run(event) {
  event.preventDefault();
  showError("");
  const status = $("status");
  try {
    if (!model) await loadModel();
  } catch (e) {
    showError(String(e.message || e));
    return;
  }
  const compare = $("compare").checked;
  $("panel-full").hidden = !compare;
  const adept = controls();
  const early = $("panel-early");
  early.querySelector("h2").firstChild.textContent = speculating(adept) ? "Speculative " : "Early exit ";
  early.querySelector(".settings").textContent = describe(adept);
  running = [new AbortController(), new AbortController()];
  $("run").disabled = true;
  $("stop").disabled = false;
  status.textContent = "streaming…";
  const jobs = [stream($("panel-early"), adept, running[0].signal)];
  const full = serverSpeculates() ? { policy: "none", speculative: { num_tokens: 0 } } : { policy: "none" };
  if (compare) jobs.push(stream($("panel-full"), full, running[1].signal));
  const results = await Promise.allSettled(jobs);
  const failed = results.filter((r) => r.status === "rejected" && r.reason.name !== "AbortError");
  if (failed.length) showError(failed.map((r) => String(r.reason.message || r.reason)).join("\n"));
  status.textContent = failed.length ? "failed" : "done";
  $("run").disabled = false;
  $("stop").disabled = true;
}

function addFullDepthPanel() {
  const panel = $("panel-early").cloneNode(true);
  panel.id = "panel-full";
  panel.hidden = true;
  panel.querySelector("h2").firstChild.textContent = "Full depth ";
  panel.querySelector(".settings").textContent = "policy none";
  $("panels").append(panel);
}

addFullDepthPanel();
syncSpeculative();
$("form").addEventListener("submit", run);
$("stop").addEventListener("click", () => running.forEach((c) => c.abort()));
$("speculative").addEventListener("change", () => {
  syncSpeculative();
  if (model) $("panel-early").querySelector(".settings").textContent = describe(controls());
});
$("threshold").addEventListener("input", () => {
  $("threshold-value").value = $("threshold").value;
  $("threshold-default").checked = false;
});
$("api-key").addEventListener("change", () => {
  model = null;
  loadModel().catch((e) => showError(String(e.message || e)));
});
loadModel().catch((e) => showError(String(e.message || e)));
