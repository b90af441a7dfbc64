// Drives a running `zmlx serve` with the official OpenAI client, plus raw
// HTTP for the framing and bad-input checks. Exits non-zero on any failure.
import OpenAI from "openai";
import net from "node:net";
import assert from "node:assert/strict";

const BASE = process.env.ZMLX_BASE_URL;
const MODEL = process.env.ZMLX_MODEL;
const MODEL_PATH = process.env.ZMLX_MODEL_PATH;
const client = new OpenAI({ baseURL: BASE + "/v1", apiKey: "unused", maxRetries: 0, timeout: 120000 });
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

let failures = 0;
async function check(name, fn) {
  try {
    await fn();
    console.log("ok   " + name);
  } catch (e) {
    failures++;
    console.error("FAIL " + name + ": " + (e && e.stack ? e.stack : e));
  }
}

const chat = (content, extra = {}) => ({
  model: MODEL, messages: [{ role: "user", content }], max_tokens: 24, temperature: 0, ...extra,
});

async function collectStream(params) {
  const stream = await client.chat.completions.create({ ...params, stream: true, stream_options: { include_usage: true } });
  let text = "", finish = null, usage = null, chunks = 0, role = null;
  for await (const c of stream) {
    chunks++;
    if (c.usage) usage = c.usage;
    for (const ch of c.choices) {
      if (ch.delta.role) role = ch.delta.role;
      if (ch.delta.content) text += ch.delta.content;
      if (ch.finish_reason) finish = ch.finish_reason;
    }
  }
  return { text, finish, usage, chunks, role };
}

async function raw(method, path, body, headers = {}) {
  const res = await fetch(BASE + path, {
    method, body, headers: body !== undefined ? { "Content-Type": "application/json", ...headers } : headers,
  });
  const text = await res.text();
  let json = null;
  try { json = JSON.parse(text); } catch (e) { /* not JSON */ }
  return { status: res.status, text, json, headers: res.headers };
}

function assertOpenAIError(r, status) {
  assert.equal(r.status, status, `status ${r.status} (want ${status}): ${r.text}`);
  assert.ok(r.json && r.json.error, "no error object: " + r.text);
  for (const k of ["message", "type", "param", "code"]) assert.ok(k in r.json.error, "error lacks " + k + ": " + r.text);
  assert.equal(typeof r.json.error.message, "string");
  assert.ok(r.json.error.message.length > 0);
}

async function healthy() {
  const r = await raw("GET", "/health");
  assert.equal(r.status, 200);
}

async function state() {
  return (await raw("GET", "/state")).json;
}

async function waitIdle(ms = 10000) {
  const t0 = Date.now();
  for (;;) {
    const s = await state();
    const inst = s.instances.find((i) => i.model === MODEL);
    if (inst && !inst.busy && inst.queued === 0) return inst;
    if (Date.now() - t0 > ms) throw new Error("instance still busy after " + ms + " ms: " + JSON.stringify(inst));
    await sleep(50);
  }
}

// ---------------- the API through the official client ----------------

let reference = null;

await check("models.list names the loaded model", async () => {
  const list = await client.models.list();
  const ids = list.data.map((m) => m.id);
  assert.ok(ids.includes(MODEL), JSON.stringify(ids));
  for (const m of list.data) assert.equal(m.object, "model");
});

await check("chat, non-streaming: message, finish_reason, usage", async () => {
  const r = await client.chat.completions.create(chat("Hello there"));
  assert.equal(r.object, "chat.completion");
  assert.equal(r.choices.length, 1);
  assert.equal(r.choices[0].message.role, "assistant");
  assert.equal(typeof r.choices[0].message.content, "string");
  assert.ok(r.choices[0].message.content.length > 0);
  assert.ok(["stop", "length"].includes(r.choices[0].finish_reason));
  assert.ok(r.usage.prompt_tokens > 0 && r.usage.completion_tokens > 0);
  assert.equal(r.usage.total_tokens, r.usage.prompt_tokens + r.usage.completion_tokens);
  if (r.choices[0].finish_reason === "length") assert.equal(r.usage.completion_tokens, 24);
  reference = r;
});

await check("chat, greedy is deterministic", async () => {
  const r = await client.chat.completions.create(chat("Hello there"));
  assert.equal(r.choices[0].message.content, reference.choices[0].message.content);
});

await check("chat, streaming: role, deltas, finish_reason, usage; same text as non-streaming", async () => {
  const s = await collectStream(chat("Hello there"));
  assert.equal(s.role, "assistant");
  assert.equal(s.text, reference.choices[0].message.content);
  assert.equal(s.finish, reference.choices[0].finish_reason);
  assert.ok(s.chunks >= 3, "chunks " + s.chunks);
  assert.deepEqual(
    { p: s.usage.prompt_tokens, c: s.usage.completion_tokens },
    { p: reference.usage.prompt_tokens, c: reference.usage.completion_tokens });
});

await check("chat, streaming raw framing: data: lines, usage chunk with empty choices, [DONE] last", async () => {
  const r = await raw("POST", "/v1/chat/completions",
    JSON.stringify({ ...chat("Hello there", { max_tokens: 6 }), stream: true, stream_options: { include_usage: true } }));
  assert.equal(r.status, 200);
  assert.match(r.headers.get("content-type"), /text\/event-stream/);
  const events = r.text.split("\n\n").filter((e) => e.length);
  assert.equal(events[events.length - 1], "data: [DONE]");
  for (const e of events) assert.ok(e.startsWith("data: ") || e.startsWith(": "), "bad event " + JSON.stringify(e));
  const objs = events.slice(0, -1).filter((e) => e.startsWith("data: ")).map((e) => JSON.parse(e.slice(6)));
  const last = objs[objs.length - 1];
  assert.deepEqual(last.choices, []);
  assert.equal(last.usage.completion_tokens, 6);
  const fin = objs[objs.length - 2];
  assert.equal(fin.choices[0].finish_reason, "length");
  for (const o of objs.slice(0, -1)) assert.equal(o.usage, null);
  // Without include_usage: no usage chunk.
  const r2 = await raw("POST", "/v1/chat/completions", JSON.stringify({ ...chat("Hello there", { max_tokens: 3 }), stream: true }));
  assert.ok(!r2.text.includes('"usage":{'), r2.text);
  assert.ok(r2.text.endsWith("data: [DONE]\n\n"));
});

await check("chat, stop string cuts the reply and finishes with 'stop'", async () => {
  const full = reference.choices[0].message.content;
  // A stop string from the middle of the greedy reply.
  let stop = null;
  for (let i = Math.floor(full.length / 3); i < full.length - 2; i++) {
    const cand = full.slice(i, i + 2);
    if (cand.trim().length === 2 && full.indexOf(cand) === i) { stop = cand; break; }
  }
  assert.ok(stop, "no usable stop string in " + JSON.stringify(full));
  const expect = full.slice(0, full.indexOf(stop));
  const r = await client.chat.completions.create(chat("Hello there", { stop }));
  assert.equal(r.choices[0].message.content, expect);
  assert.equal(r.choices[0].finish_reason, "stop");
  const s = await collectStream(chat("Hello there", { stop: [stop, "zzzzqqq"] }));
  assert.equal(s.text, expect);
  assert.equal(s.finish, "stop");
});

await check("chat, seeds: same seed same text; temperature>0 honoured", async () => {
  const p = chat("Tell me a story", { temperature: 1.0, top_p: 0.95, top_k: 50, min_p: 0.01, seed: 1234, max_tokens: 20 });
  const a = await client.chat.completions.create(p);
  const b = await client.chat.completions.create(p);
  assert.equal(a.choices[0].message.content, b.choices[0].message.content);
  const outs = new Set();
  // The tiny random model's distribution is peaked: sample hot, unfiltered, to see seeds differ.
  const hot = chat("Tell me a story", { temperature: 2.0, max_tokens: 20 });
  for (const seed of [1, 2, 3, 4]) outs.add((await client.chat.completions.create({ ...hot, seed })).choices[0].message.content);
  assert.ok(outs.size > 1, "four seeds gave one text");
});

await check("chat, multi-turn history and max_completion_tokens", async () => {
  const r = await client.chat.completions.create({
    model: MODEL, temperature: 0, max_completion_tokens: 5,
    messages: [
      { role: "system", content: "You are terse." },
      { role: "user", content: "Hi" },
      { role: "assistant", content: "Hello." },
      { role: "user", content: [{ type: "text", text: "And now?" }] },
    ],
  });
  assert.equal(r.usage.completion_tokens <= 5, true);
  assert.ok(r.usage.prompt_tokens > 10);
});

await check("completions, non-streaming and streaming agree", async () => {
  const p = { model: MODEL, prompt: "Once upon a time", max_tokens: 16, temperature: 0 };
  const r = await client.completions.create(p);
  assert.equal(r.object, "text_completion");
  assert.ok(r.choices[0].text.length > 0);
  assert.ok(["stop", "length"].includes(r.choices[0].finish_reason));
  assert.ok(r.usage.completion_tokens > 0);
  const stream = await client.completions.create({ ...p, stream: true, stream_options: { include_usage: true } });
  let text = "", usage = null, finish = null;
  for await (const c of stream) {
    if (c.usage) usage = c.usage;
    for (const ch of c.choices) { text += ch.text; if (ch.finish_reason) finish = ch.finish_reason; }
  }
  assert.equal(text, r.choices[0].text);
  assert.equal(finish, r.choices[0].finish_reason);
  assert.equal(usage.completion_tokens, r.usage.completion_tokens);
});

await check("concurrent clients all get complete, correct answers", async () => {
  const prompts = ["alpha", "beta gamma", "delta", "epsilon zeta eta", "theta", "iota kappa"];
  const sequential = [];
  for (const p of prompts) sequential.push((await client.chat.completions.create(chat(p, { max_tokens: 32 }))).choices[0].message.content);
  const runs = prompts.map((p, i) => i % 2
    ? collectStream(chat(p, { max_tokens: 32 })).then((s) => s.text)
    : client.chat.completions.create(chat(p, { max_tokens: 32 })).then((r) => r.choices[0].message.content));
  // And the same prompts again, at the same time, from separate clients.
  const others = prompts.map((p) => new OpenAI({ baseURL: BASE + "/v1", apiKey: "x", maxRetries: 0 })
    .chat.completions.create(chat(p, { max_tokens: 32 })).then((r) => r.choices[0].message.content));
  const got = await Promise.all([...runs, ...others]);
  for (let i = 0; i < got.length; i++) assert.equal(got[i], sequential[i % prompts.length], "client " + i);
});

await check("a client disconnecting mid-stream cancels its generation", async () => {
  await waitIdle();
  const before = (await state()).instances.find((i) => i.model === MODEL).requests_served;
  const ac = new AbortController();
  const stream = await client.chat.completions.create(
    { ...chat("a long answer please", { max_tokens: 3500 }), stream: true }, { signal: ac.signal });
  let n = 0;
  try {
    for await (const c of stream) { if (c.choices[0]?.delta?.content && ++n >= 3) ac.abort(); }
  } catch (e) { /* aborted */ }
  const inst = await waitIdle(5000);  // a full 3500-token run would take far longer
  assert.equal(inst.requests_served, before + 1);
  const last = inst.recent_requests[inst.recent_requests.length - 1];
  assert.equal(last.finish_reason, "cancelled");
  assert.ok(last.completion_tokens < 3500, JSON.stringify(last));
});

await check("a queued client that leaves is dropped; the slot frees", async () => {
  await waitIdle();
  const ac1 = new AbortController(), ac2 = new AbortController();
  const long = client.chat.completions.create(
    { ...chat("first, long", { max_tokens: 3500 }), stream: true }, { signal: ac1.signal });
  const s1 = await long;
  const it1 = s1[Symbol.asyncIterator]();
  await it1.next();
  const queued = client.chat.completions.create({ ...chat("second", { max_tokens: 3500 }) }, { signal: ac2.signal })
    .catch((e) => e);
  await sleep(300);
  const mid = (await state()).instances.find((i) => i.model === MODEL);
  assert.equal(mid.queued, 1, "expected one queued request: " + JSON.stringify(mid));
  ac2.abort();
  await queued;
  ac1.abort();
  try { await it1.next(); } catch (e) { /* aborted */ }
  await waitIdle(5000);
  const r = await client.chat.completions.create(chat("Hello there"));
  assert.equal(r.choices[0].message.content, reference.choices[0].message.content);
});

// ---------------- bad input ----------------

await check("malformed JSON -> 400", async () => {
  assertOpenAIError(await raw("POST", "/v1/chat/completions", "{not json"), 400);
  assertOpenAIError(await raw("POST", "/v1/chat/completions", ""), 400);
  assertOpenAIError(await raw("POST", "/v1/chat/completions", "[1,2]"), 400);
  assertOpenAIError(await raw("POST", "/v1/completions", '{"model": "x",'), 400);
  assertOpenAIError(await raw("POST", "/instance", "nope"), 400);
});

await check("wrong types and missing fields -> 400 naming the parameter", async () => {
  const cases = [
    [{ messages: [{ role: "user", content: "hi" }] }, "model"],
    [{ model: MODEL }, "messages"],
    [{ model: MODEL, messages: "hi" }, "messages"],
    [{ model: MODEL, messages: [] }, "messages"],
    [{ model: MODEL, messages: [{ content: "hi" }] }, "messages[0].role"],
    [{ model: MODEL, messages: [{ role: "wizard", content: "hi" }] }, "messages[0].role"],
    [{ model: MODEL, messages: [{ role: "user" }] }, "messages[0].content"],
    [{ model: MODEL, messages: [{ role: "user", content: 42 }] }, "messages[0].content"],
    [{ model: MODEL, messages: ["hi"] }, "messages[0]"],
    [{ model: 7, messages: [{ role: "user", content: "hi" }] }, "model"],
    [{ ...chat("hi"), max_tokens: "ten" }, "max_tokens"],
    [{ ...chat("hi"), max_tokens: 1.5 }, "max_tokens"],
    [{ ...chat("hi"), max_tokens: -1 }, "max_tokens"],
    [{ ...chat("hi"), max_tokens: 0 }, "max_tokens"],
    [{ ...chat("hi"), max_tokens: 1e15 }, "max_tokens"],
    [{ ...chat("hi"), max_tokens: 100000 }, "max_tokens"],
    [{ ...chat("hi"), temperature: "hot" }, "temperature"],
    [{ ...chat("hi"), temperature: 7 }, "temperature"],
    [{ ...chat("hi"), top_p: 0 }, "top_p"],
    [{ ...chat("hi"), stop: 5 }, "stop"],
    [{ ...chat("hi"), stop: ["a", 1] }, "stop"],
    [{ ...chat("hi"), stream: "yes" }, "stream"],
    [{ ...chat("hi"), stream_options: 3 }, "stream_options"],
    [{ ...chat("hi"), seed: "s" }, "seed"],
    [{ ...chat("hi"), n: 3 }, "n"],
  ];
  for (const [body, param] of cases) {
    const r = await raw("POST", "/v1/chat/completions", JSON.stringify(body));
    assertOpenAIError(r, 400);
    assert.equal(r.json.error.param, param, JSON.stringify(body) + " -> " + r.text);
  }
  for (const [body, param] of [
    [{ model: MODEL }, "prompt"],
    [{ model: MODEL, prompt: "" }, "prompt"],
    [{ model: MODEL, prompt: 12 }, "prompt"],
    [{ model: MODEL, prompt: "hi", max_tokens: 1e9 }, "max_tokens"],
    [{ model: MODEL, prompt: [99999999] }, "prompt"],
  ]) {
    const r = await raw("POST", "/v1/completions", JSON.stringify(body));
    assertOpenAIError(r, 400);
    assert.equal(r.json.error.param, param, JSON.stringify(body) + " -> " + r.text);
  }
});

await check("the official client sees these as BadRequestError", async () => {
  await assert.rejects(client.chat.completions.create({ model: MODEL, messages: [] }),
    (e) => e instanceof OpenAI.BadRequestError && e.status === 400);
});

await check("unknown model -> 404 model_not_found (client: NotFoundError)", async () => {
  const r = await raw("POST", "/v1/chat/completions", JSON.stringify({ ...chat("hi"), model: "no-such-model" }));
  assertOpenAIError(r, 404);
  assert.equal(r.json.error.code, "model_not_found");
  await assert.rejects(client.chat.completions.create({ ...chat("hi"), model: "no-such-model" }),
    (e) => e instanceof OpenAI.NotFoundError);
  await assert.rejects(client.completions.create({ model: "no-such-model", prompt: "x" }),
    (e) => e instanceof OpenAI.NotFoundError);
});

await check("unknown routes and wrong methods -> 404 / 405 JSON", async () => {
  assertOpenAIError(await raw("GET", "/v1/nope"), 404);
  assertOpenAIError(await raw("POST", "/v1/embeddings", "{}"), 404);
  assertOpenAIError(await raw("GET", "/no/such/page.html"), 404);
  assertOpenAIError(await raw("GET", "/../../etc/passwd"), 404);
  assertOpenAIError(await raw("GET", "/v1/chat/completions"), 405);
  assertOpenAIError(await raw("DELETE", "/instance/inst-999"), 404);
});

function rawSocket(payload, { readMs = 3000 } = {}) {
  const u = new URL(BASE);
  return new Promise((resolve) => {
    const sock = net.connect(Number(u.port), u.hostname);
    let data = "";
    sock.on("connect", () => sock.write(payload, () => {}));
    sock.on("data", (d) => { data += d.toString(); });
    sock.on("error", () => {});
    sock.on("close", () => resolve(data));
    setTimeout(() => { sock.destroy(); resolve(data); }, readMs);
  });
}

await check("oversized body -> 413 (before reading it)", async () => {
  const head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" +
    "Content-Length: " + (64 * 1024 * 1024) + "\r\n\r\n{";
  const resp = await rawSocket(head);
  assert.match(resp, /^HTTP\/1\.1 413 /, resp);
  const body = JSON.parse(resp.slice(resp.indexOf("\r\n\r\n") + 4));
  assert.ok(body.error && body.error.message);
});

await check("oversized headers, garbage request line -> 431 / 400", async () => {
  const big = "GET /health HTTP/1.1\r\nX-Big: " + "a".repeat(100 * 1024) + "\r\n\r\n";
  assert.match(await rawSocket(big), /^HTTP\/1\.1 431 /);
  assert.match(await rawSocket("HELLO\r\n\r\n"), /^HTTP\/1\.1 400 /);
  assert.match(await rawSocket("\x00\x01\x02 garbage\r\n\r\n"), /^HTTP\/1\.1 400 /);
});

await check("the node keeps serving after all the bad input", async () => {
  await healthy();
  const r = await client.chat.completions.create(chat("Hello there"));
  assert.equal(r.choices[0].message.content, reference.choices[0].message.content);
});

// ---------------- state, load and unload ----------------

await check("GET /state: instance with family, backend, parallelism, patch, memory, tok/s", async () => {
  const s = await state();
  const inst = s.instances.find((i) => i.model === MODEL);
  assert.equal(inst.family, "qwen3_moe");
  assert.match(inst.backend, /cpu/);
  assert.equal(inst.parallelism, "none");
  assert.equal(typeof inst.patch, "object");
  assert.ok("enabled" in inst.patch || Object.keys(inst.patch).length > 0);
  assert.ok(inst.memory.process_rss_bytes > 0 && inst.memory.weights_bytes > 0);
  assert.ok(inst.recent_decode_tps > 0);
  assert.ok(inst.recent_requests.length > 0);
});

await check("GET /models lists the models directory", async () => {
  const m = (await raw("GET", "/models")).json;
  assert.ok(m.local.some((x) => x.id === MODEL), JSON.stringify(m));
  assert.ok(Array.isArray(m.hf_cache));
});

await check("DELETE /instance unloads; POST /instance loads again", async () => {
  const inst = (await state()).instances.find((i) => i.model === MODEL);
  const del = await raw("DELETE", "/instance/" + inst.id);
  assert.equal(del.status, 200, del.text);
  let models = await client.models.list();
  assert.ok(!models.data.some((m) => m.id === MODEL));
  await assert.rejects(client.chat.completions.create(chat("hi")), (e) => e instanceof OpenAI.NotFoundError);
  const bad = await raw("POST", "/instance", JSON.stringify({ model: "/definitely/not/a/model" }));
  assertOpenAIError(bad, 404);
  assertOpenAIError(await raw("POST", "/instance", JSON.stringify({ model: 5 })), 400);
  const load = await raw("POST", "/instance", JSON.stringify({ model: MODEL_PATH }));
  assert.equal(load.status, 201, load.text);
  assert.equal(load.json.model, MODEL);
  const again = await raw("POST", "/instance", JSON.stringify({ model: MODEL_PATH }));
  assert.equal(again.status, 200);
  assert.equal(again.json.already_loaded, true);
  models = await client.models.list();
  assert.ok(models.data.some((m) => m.id === MODEL));
  const r = await client.chat.completions.create(chat("Hello there"));
  assert.equal(r.choices[0].message.content, reference.choices[0].message.content);
});

await check("unloading mid-stream ends that stream with an error event; the node reloads fine", async () => {
  const inst = (await state()).instances.find((i) => i.model === MODEL);
  const stream = await client.chat.completions.create({ ...chat("long", { max_tokens: 3500 }), stream: true });
  let n = 0, deleted = false, error = null;
  try {
    for await (const c of stream) {
      if (c.choices[0]?.delta?.content && ++n === 3) {
        const del = await raw("DELETE", "/instance/" + inst.id);
        assert.equal(del.status, 200);
        deleted = true;
      }
    }
  } catch (e) { error = e; }
  assert.ok(deleted);
  assert.ok(error && /unloaded/.test(error.message), "expected an error event, got " + error);
  const load = await raw("POST", "/instance", JSON.stringify({ model: MODEL_PATH }));
  assert.equal(load.status, 201, load.text);
  const r = await client.chat.completions.create(chat("Hello there"));
  assert.equal(r.choices[0].message.content, reference.choices[0].message.content);
});

await check("the dashboard is served at /", async () => {
  const r = await raw("GET", "/");
  assert.equal(r.status, 200);
  assert.match(r.headers.get("content-type"), /text\/html/);
  assert.match(r.text, /app\.js/);
  const js = await raw("GET", "/app.js");
  assert.equal(js.status, 200);
  assert.match(js.headers.get("content-type"), /javascript/);
});

if (failures) {
  console.error(failures + " check(s) failed");
  process.exit(1);
}
console.log("all node checks passed");
