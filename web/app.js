// zmlx dashboard: model picker, load/unload, instance state, and a streaming
// chat with markdown rendering. Plain browser JavaScript, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { history: [], busy: false, controller: null, instances: [] };

// ---------- markdown (a small, safe subset; HTML in the text is escaped) ----------

function escapeHtml(s) {
  return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
}

function renderInline(text) {
  // Code spans first, so their contents are left alone.
  const parts = text.split(/(`[^`\n]+`)/g);
  return parts.map((part) => {
    if (part.length > 1 && part.startsWith("`") && part.endsWith("`")) {
      return "<code>" + escapeHtml(part.slice(1, -1)) + "</code>";
    }
    let s = escapeHtml(part);
    s = s.replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>");
    s = s.replace(/__([^_\n]+)__/g, "<strong>$1</strong>");
    s = s.replace(/(^|[^*])\*([^*\n]+)\*/g, "$1<em>$2</em>");
    s = s.replace(/~~([^~\n]+)~~/g, "<del>$1</del>");
    s = s.replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g,
      (m, label, url) => '<a href="' + url + '" target="_blank" rel="noopener noreferrer">' + label + "</a>");
    return s;
  }).join("");
}

// Renders markdown that may still be arriving: an unclosed code fence is
// shown as an open code block.
function renderMarkdown(src) {
  const lines = src.replace(/\r\n?/g, "\n").split("\n");
  const out = [];
  let para = [];
  let list = null; // {tag, items}
  const flushPara = () => {
    if (para.length) out.push("<p>" + para.map(renderInline).join("<br>") + "</p>");
    para = [];
  };
  const flushList = () => {
    if (list) out.push("<" + list.tag + ">" + list.items.map((i) => "<li>" + renderInline(i) + "</li>").join("") + "</" + list.tag + ">");
    list = null;
  };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = line.match(/^\s*```\s*([\w+-]*)\s*$/);
    if (fence) {
      flushPara(); flushList();
      const code = [];
      i++;
      while (i < lines.length && !/^\s*```\s*$/.test(lines[i])) code.push(lines[i++]);
      const lang = fence[1] ? ' class="lang-' + escapeHtml(fence[1]) + '"' : "";
      out.push("<pre><code" + lang + ">" + escapeHtml(code.join("\n")) + "</code></pre>");
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    if (heading) {
      flushPara(); flushList();
      const level = Math.min(heading[1].length + 1, 6);
      out.push("<h" + level + ">" + renderInline(heading[2]) + "</h" + level + ">");
      continue;
    }
    const bullet = line.match(/^\s*[-*+]\s+(.*)$/);
    const numbered = line.match(/^\s*\d+[.)]\s+(.*)$/);
    if (bullet || numbered) {
      flushPara();
      const tag = bullet ? "ul" : "ol";
      if (list && list.tag !== tag) flushList();
      if (!list) list = { tag, items: [] };
      list.items.push((bullet || numbered)[1]);
      continue;
    }
    const quote = line.match(/^>\s?(.*)$/);
    if (quote) {
      flushPara(); flushList();
      out.push("<blockquote>" + renderInline(quote[1]) + "</blockquote>");
      continue;
    }
    if (/^\s*([-*_])\s*\1\s*\1[\s\1]*$/.test(line)) {
      flushPara(); flushList();
      out.push("<hr>");
      continue;
    }
    if (line.trim() === "") { flushPara(); flushList(); continue; }
    if (list) flushList();
    para.push(line);
  }
  flushPara(); flushList();
  return out.join("");
}

// ---------- API helpers ----------

async function api(method, path, body) {
  const res = await fetch(path, {
    method,
    headers: body ? { "Content-Type": "application/json" } : {},
    body: body ? JSON.stringify(body) : undefined,
  });
  let data = null;
  try { data = await res.json(); } catch (e) { /* not JSON */ }
  if (!res.ok) throw new Error((data && data.error && data.error.message) || res.status + " " + res.statusText);
  return data;
}

function fmtBytes(b) {
  if (!b) return "0 B";
  const u = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (b >= 1000 && i < u.length - 1) { b /= 1000; i++; }
  return b.toFixed(b >= 100 ? 0 : 1) + " " + u[i];
}

// ---------- models panel ----------

async function refreshAvailable() {
  try {
    const m = await api("GET", "/models");
    const picker = $("model-picker");
    const prev = picker.value;
    picker.innerHTML = "";
    const add = (label, items) => {
      if (!items.length) return;
      const g = document.createElement("optgroup");
      g.label = label;
      for (const it of items) {
        const o = document.createElement("option");
        o.value = it.path; o.textContent = it.id;
        g.appendChild(o);
      }
      picker.appendChild(g);
    };
    add("models directory", m.local || []);
    add("Hugging Face cache", m.hf_cache || []);
    if (!picker.options.length) {
      const o = document.createElement("option");
      o.value = ""; o.textContent = "(no models found; type a path below)";
      picker.appendChild(o);
    }
    if (prev) picker.value = prev;
  } catch (e) {
    $("load-msg").textContent = "Could not list models: " + e.message;
  }
}

function renderInstances(list) {
  const box = $("instances");
  if (!list.length) { box.innerHTML = '<p class="muted">No model loaded.</p>'; return; }
  box.innerHTML = "";
  for (const inst of list) {
    const div = document.createElement("div");
    div.className = "inst";
    const rows = [
      ["family", inst.family],
      ["backend", inst.backend],
      ["parallelism", inst.parallelism],
      ["patch", inst.patch_summary],
      ["weights", fmtBytes(inst.memory.weights_bytes)],
      ["process RSS", fmtBytes(inst.memory.process_rss_bytes)],
      ["recent decode", inst.recent_decode_tps ? inst.recent_decode_tps.toFixed(1) + " tok/s" : "–"],
      ["requests", inst.requests_served + (inst.queued ? " (" + inst.queued + " queued)" : "") + (inst.busy ? ", busy" : "")],
    ];
    div.innerHTML = '<div class="name"></div><dl></dl>';
    div.querySelector(".name").textContent = inst.model + "  ·  " + inst.id;
    const dl = div.querySelector("dl");
    for (const [k, v] of rows) {
      const dt = document.createElement("dt"); dt.textContent = k;
      const dd = document.createElement("dd"); dd.textContent = v;
      dl.append(dt, dd);
    }
    const btn = document.createElement("button");
    btn.className = "ghost"; btn.textContent = "Unload";
    btn.onclick = async () => {
      btn.disabled = true;
      try { await api("DELETE", "/instance/" + encodeURIComponent(inst.id)); } catch (e) { $("load-msg").textContent = e.message; }
      refreshState();
    };
    div.appendChild(btn);
    box.appendChild(div);
  }
}

function renderChatModels(list) {
  const sel = $("chat-model");
  const prev = sel.value;
  sel.innerHTML = "";
  for (const inst of list) {
    const o = document.createElement("option");
    o.value = inst.model; o.textContent = inst.model;
    sel.appendChild(o);
  }
  if (!list.length) {
    const o = document.createElement("option");
    o.value = ""; o.textContent = "(no model loaded)";
    sel.appendChild(o);
  }
  if (prev && list.some((i) => i.model === prev)) sel.value = prev;
}

async function refreshState() {
  try {
    const s = await api("GET", "/state");
    state.instances = s.instances;
    $("node-status").textContent = "online · RSS " + fmtBytes(s.memory.process_rss_bytes);
    $("node-status").className = "pill ok";
    renderInstances(s.instances);
    renderChatModels(s.instances);
  } catch (e) {
    $("node-status").textContent = "offline";
    $("node-status").className = "pill bad";
  }
}

async function loadModel() {
  const ref = $("model-path").value.trim() || $("model-picker").value;
  if (!ref) { $("load-msg").textContent = "Pick a model or type a path."; return; }
  $("load-btn").disabled = true;
  $("load-msg").textContent = "Loading " + ref + " …";
  try {
    const inst = await api("POST", "/instance", { model: ref });
    $("load-msg").textContent = (inst.already_loaded ? "Already loaded: " : "Loaded ") + inst.model +
      " in " + inst.load_seconds.toFixed(2) + " s — " + inst.patch_summary;
    await refreshState();
    $("chat-model").value = inst.model;
  } catch (e) {
    $("load-msg").textContent = e.message;
  } finally {
    $("load-btn").disabled = false;
  }
}

// ---------- chat ----------

function addBubble(role, text) {
  const hint = document.querySelector(".messages .hint");
  if (hint) hint.remove();
  const div = document.createElement("div");
  div.className = "msg " + role;
  const body = document.createElement("div");
  body.className = "body";
  if (role === "assistant") body.innerHTML = renderMarkdown(text); else body.textContent = text;
  div.appendChild(body);
  $("messages").appendChild(div);
  scrollDown();
  return div;
}

function scrollDown() {
  const m = $("messages");
  m.scrollTop = m.scrollHeight;
}

function setBusy(b) {
  state.busy = b;
  $("send-btn").hidden = b;
  $("stop-btn").hidden = !b;
}

// Reads an SSE response body, calling onEvent with each parsed JSON event.
async function readSse(res, onEvent) {
  const reader = res.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let idx;
    while ((idx = buf.search(/\r?\n\r?\n/)) >= 0) {
      const block = buf.slice(0, idx);
      buf = buf.slice(idx).replace(/^\r?\n\r?\n/, "");
      const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      onEvent(JSON.parse(data));
    }
  }
}

async function send(text) {
  const model = $("chat-model").value;
  if (!model) { addBubble("error", "Load a model first."); return; }
  state.history.push({ role: "user", content: text });
  addBubble("user", text);
  const bubble = addBubble("assistant", "");
  const body = bubble.querySelector(".body");
  body.classList.add("cursor");
  const meta = document.createElement("div");
  meta.className = "meta";
  bubble.appendChild(meta);

  const messages = [];
  const sys = $("opt-system").value.trim();
  if (sys) messages.push({ role: "system", content: sys });
  messages.push(...state.history);
  const req = {
    model, messages, stream: true, stream_options: { include_usage: true },
    max_tokens: Math.max(1, parseInt($("opt-max").value, 10) || 512),
    temperature: Math.max(0, parseFloat($("opt-temp").value) || 0),
    chat_template_kwargs: { enable_thinking: $("opt-think").checked },
  };
  state.controller = new AbortController();
  setBusy(true);
  const t0 = performance.now();
  let tFirst = 0, tLast = 0, reply = "", usage = null, finish = null, stopped = false, timings = null;
  let pending = false;
  const paint = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; body.innerHTML = renderMarkdown(reply); scrollDown(); });
  };
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(req), signal: state.controller.signal,
    });
    if (!res.ok) {
      let msg = res.status + " " + res.statusText;
      try { msg = (await res.json()).error.message; } catch (e) { /* keep status */ }
      throw new Error(msg);
    }
    await readSse(res, (ev) => {
      if (ev.error) throw new Error(ev.error.message);
      if (ev.usage) usage = ev.usage;
      if (ev.zmlx) timings = ev.zmlx;  // the node's own timing of this generation
      for (const c of ev.choices || []) {
        const piece = c.delta && c.delta.content;
        if (piece) {
          if (!tFirst) tFirst = performance.now();
          tLast = performance.now();
          reply += piece;
          paint();
        }
        if (c.finish_reason) finish = c.finish_reason;
      }
    });
  } catch (e) {
    if (e.name === "AbortError") stopped = true;
    else { bubble.className = "msg error"; reply += (reply ? "\n\n" : "") + "**Error:** " + e.message; }
  } finally {
    state.controller = null;
    setBusy(false);
  }
  body.classList.remove("cursor");
  body.innerHTML = renderMarkdown(reply);
  if (reply && bubble.className !== "msg error") state.history.push({ role: "assistant", content: reply });
  const parts = [];
  if (tFirst) parts.push("TTFT " + ((tFirst - t0) / 1000).toFixed(2) + " s");
  const n = usage ? usage.completion_tokens : null;
  // tok/s: the node's decode rate when it sent one (chunks can arrive bunched,
  // so arrival times overstate it); else measured here from chunk arrivals.
  if (timings && timings.decode_tps > 0) parts.push(timings.decode_tps.toFixed(1) + " tok/s");
  else if (n && tLast > tFirst && n > 1) parts.push(((n - 1) / ((tLast - tFirst) / 1000)).toFixed(1) + " tok/s");
  if (n) parts.push(n + " tokens");
  if (stopped) parts.push("stopped");
  else if (finish) parts.push("finish: " + finish);
  meta.textContent = parts.join(" · ");
  scrollDown();
  refreshState();
}

function init() {
  $("load-btn").onclick = loadModel;
  $("stop-btn").onclick = () => { if (state.controller) state.controller.abort(); };
  $("clear-btn").onclick = () => {
    state.history = [];
    $("messages").innerHTML = '<p class="muted hint">New chat.</p>';
  };
  $("toggle-panel").onclick = () => {
    const open = $("panel").classList.toggle("open");
    $("toggle-panel").setAttribute("aria-expanded", String(open));
  };
  $("composer").onsubmit = (e) => {
    e.preventDefault();
    const text = $("input").value.trim();
    if (!text || state.busy) return;
    $("input").value = "";
    send(text);
  };
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  refreshAvailable();
  refreshState();
  setInterval(refreshState, 3000);
}

init();
