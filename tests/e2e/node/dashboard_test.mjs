// Drives the `zmlx serve` dashboard (web/index.html + app.js) in headless
// Chromium through playwright-core: model listing, unload + load through the
// panel, the instance card (patch report), a streamed chat reply with TTFT and
// tokens/s, Stop on a long generation, multi-turn history, and the phone
// layout. Screenshots go to $ZMLX_ARTIFACTS (default ./artifacts/).
// Usage: node dashboard_test.mjs BASE_URL      (exits non-zero on any failure)
// Env: ZMLX_MODEL (default "tiny"), ZMLX_CHROMIUM (default /usr/bin/chromium),
//      ZMLX_SKIP_BROWSER=1 to skip when no browser is wanted (otherwise a
//      missing browser is a failure: scripts/setup.sh installs it).
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const BASE = (process.argv[2] || process.env.ZMLX_BASE_URL || "").replace(/\/$/, "");
const MODEL = process.env.ZMLX_MODEL || "tiny";
const CHROMIUM = process.env.ZMLX_CHROMIUM || "/usr/bin/chromium";
const ARTIFACTS = path.resolve(process.env.ZMLX_ARTIFACTS || path.join(HERE, "artifacts"));
const T = 30000; // per-wait timeout, ms

if (process.env.ZMLX_SKIP_BROWSER === "1") {
  console.log("skip dashboard browser test (ZMLX_SKIP_BROWSER=1)");
  process.exit(0);
}
if (!BASE) {
  console.error("FAIL dashboard: no base URL (pass it as the first argument or ZMLX_BASE_URL)");
  process.exit(1);
}
if (!fs.existsSync(CHROMIUM)) {
  console.error(`FAIL dashboard: no browser at ${CHROMIUM}; run scripts/setup.sh (installs the Debian package chromium), ` +
    "set ZMLX_CHROMIUM, or set ZMLX_SKIP_BROWSER=1 to skip this test");
  process.exit(1);
}
const { chromium } = await import("playwright-core");
fs.mkdirSync(ARTIFACTS, { recursive: true });

const started = Date.now();
let failures = 0;
const shots = [];

class Fail extends Error {}
const must = (cond, msg) => { if (!cond) throw new Fail(msg); };

async function shot(page, name) {
  const file = path.join(ARTIFACTS, name + ".png");
  await page.screenshot({ path: file });
  shots.push(file);
}

// Waits for fn() (run in this process, may be async) to return a truthy value.
async function until(what, fn, timeout = T) {
  const end = Date.now() + timeout;
  let last;
  for (;;) {
    try { last = await fn(); if (last) return last; } catch (e) { last = e; }
    if (Date.now() > end) throw new Fail(`timed out after ${timeout / 1000} s waiting for ${what}` + (last instanceof Error ? ` (${last.message})` : ""));
    await new Promise((r) => setTimeout(r, 100));
  }
}

const text = (page, sel) => page.locator(sel).innerText();
const stateJson = async () => (await fetch(BASE + "/state")).json();

// Runs the steps of one scenario in order; the first miss ends the scenario
// (later steps depend on it) with a screenshot of the page as it was.
async function scenario(name, page, steps) {
  for (const [step, fn] of steps) {
    try {
      await fn();
      console.log(`ok   dashboard ${name}: ${step}`);
    } catch (e) {
      failures++;
      console.error(`FAIL dashboard ${name}: ${step}: ${e instanceof Fail ? e.message : (e && e.stack) || e}`);
      try { await shot(page, `FAIL-${name}`); } catch (e2) { /* page gone */ }
      return;
    }
  }
}

// Page errors and console errors fail the test (a 404 favicon does not).
function watchErrors(page, sink) {
  page.on("pageerror", (e) => sink.push("page error: " + e.message));
  page.on("console", (m) => {
    if (m.type() !== "error") return;
    if (/favicon\.ico/.test(m.location().url || "")) return;
    sink.push("console error: " + m.text());
  });
}

// Options of the model picker as {label, value}.
const pickerOptions = (page) => page.$$eval("#model-picker option", (os) => os.map((o) => ({ label: o.textContent, value: o.value })));
// The instance card as {name, rows: {dt: dd}}, or null.
const instanceCard = (page) => page.$$eval("#instances .inst", (cards) => cards.map((c) => {
  const rows = {};
  const dts = c.querySelectorAll("dt");
  for (const dt of dts) rows[dt.textContent] = dt.nextElementSibling ? dt.nextElementSibling.textContent : "";
  return { name: c.querySelector(".name").textContent, rows };
}));

// The dashboard's per-reply tok/s is measured from chunk arrival times in the
// browser; when SSE chunks arrive together it can be absurd. Not a failure:
// a warning line comparing it with the node's own recent decode rate.
async function warnTps(meta, label) {
  const m = meta.match(/([0-9.]+) tok\/s/);
  const node = (await stateJson()).instances[0];
  const ref = node ? node.recent_decode_tps : 0;
  if (m && ref > 0 && parseFloat(m[1]) > 10 * ref) {
    console.log(`warn dashboard ${label}: the reply shows ${m[1]} tok/s, the node's recent decode rate is ${ref.toFixed(1)} tok/s`);
  }
}

// Sends a message through the composer, via Enter or the Send button.
async function typeAndSend(page, msg, how) {
  await page.locator("#input").fill(msg);
  if (how === "enter") await page.locator("#input").press("Enter");
  else await page.locator("#send-btn").click();
}

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  headless: true,
  // playwright-core gives each launch a fresh temporary --user-data-dir (and
  // refuses one in args), removed again on close.
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage"],
  timeout: 60000,
});
console.log(`ok   dashboard: ${CHROMIUM} ${browser.version()} up; screenshots in ${ARTIFACTS}`);

try {
  // ---------------- laptop: 1280x800 ----------------
  {
    const ctx = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    const page = await ctx.newPage();
    page.setDefaultTimeout(T);
    const errors = [];
    watchErrors(page, errors);
    const chatBodies = [];
    page.on("request", (r) => { if (r.url().endsWith("/v1/chat/completions")) chatBodies.push(r.postDataJSON()); });
    let modelPath = "";
    let reply1 = "";

    await scenario("laptop", page, [
      ["page loads and the node shows online", async () => {
        const res = await page.goto(BASE + "/", { waitUntil: "load" });
        must(res && res.ok(), `GET / answered ${res && res.status()}`);
        must((await page.title()) === "zmlx node", `title is "${await page.title()}"`);
        await until('#node-status "online"', async () => /^online/.test(await text(page, "#node-status")));
      }],
      [`the model picker lists ${MODEL} (models dir)`, async () => {
        const opt = await until(`an option "${MODEL}" in #model-picker`,
          async () => (await pickerOptions(page)).find((o) => o.label === MODEL));
        modelPath = opt.value;
        must(modelPath.endsWith("/" + MODEL), `option value is "${modelPath}"`);
      }],
      [`${MODEL} is loaded: instance card with family, backend and patch report`, async () => {
        const card = await until(`an instance card for ${MODEL}`,
          async () => (await instanceCard(page)).find((c) => c.name.startsWith(MODEL + " ")));
        for (const k of ["family", "backend", "parallelism", "patch", "weights", "process RSS", "requests"]) {
          must(card.rows[k] && card.rows[k].trim() && card.rows[k] !== "undefined", `instance row "${k}" is "${card.rows[k]}"`);
        }
        must(card.rows.family === "qwen3_moe", `family is "${card.rows.family}"`);
        must((await page.locator("#chat-model").inputValue()) === MODEL, "chat model select is not " + MODEL);
        console.log(`     instance: ${card.name} | backend ${card.rows.backend} | patch: ${card.rows.patch}`);
        await shot(page, "01-laptop-loaded");
      }],
      ["Unload through the instance card", async () => {
        await page.locator("#instances .inst button", { hasText: "Unload" }).click();
        await until('"No model loaded." in the panel', async () => (await text(page, "#instances")).includes("No model loaded."));
        must((await page.locator("#chat-model").innerText()).includes("(no model loaded)"), "chat model select still lists a model");
        must((await stateJson()).instances.length === 0, "GET /state still lists an instance");
      }],
      ["Load through the picker: load message with the patch summary, card back", async () => {
        await page.locator("#model-picker").selectOption({ label: MODEL });
        must((await page.locator("#model-path").inputValue()) === "", "the path box is not empty");
        await page.locator("#load-btn").click();
        const msg = await until("#load-msg to report the load", async () => {
          const m = await text(page, "#load-msg");
          if (/^(Loaded|Already loaded)/.test(m)) return m;
          if (m && !/^Loading/.test(m)) throw new Fail("load failed: " + m);
          return null;
        });
        must(new RegExp(`^Loaded ${MODEL} in [0-9.]+ s — \\S`).test(msg), `load message is "${msg}"`);
        const card = await until(`the instance card for ${MODEL}`,
          async () => (await instanceCard(page)).find((c) => c.name.startsWith(MODEL + " ")));
        must(card.rows.patch && card.rows.patch.trim(), "no patch report on the card");
        must(msg.endsWith(card.rows.patch), `load message "${msg}" does not end with the patch report "${card.rows.patch}"`);
        must((await page.locator("#chat-model").inputValue()) === MODEL, "chat model select is not " + MODEL);
        const st = await stateJson();
        must(st.instances.length === 1 && st.instances[0].model === MODEL, "GET /state: " + JSON.stringify(st.instances.map((i) => i.model)));
        console.log(`     ${msg}`);
        await shot(page, "02-laptop-reloaded");
      }],
      ["first message (Enter): streamed reply, TTFT and tok/s shown", async () => {
        await page.locator("#opt-max").fill("64");
        await typeAndSend(page, "Hello, who are you?", "enter");
        await until("the user bubble", async () => (await page.locator(".msg.user").count()) === 1);
        must((await text(page, ".msg.user >> nth=0")) === "Hello, who are you?", "user bubble text: " + await text(page, ".msg.user >> nth=0"));
        const meta = await until("the reply's meta line", async () => {
          const m = await page.locator(".msg.assistant .meta").first().innerText();
          return m ? m : null;
        });
        reply1 = await text(page, ".msg.assistant >> nth=0 >> .body");
        must(reply1.trim().length > 0, "the reply text is empty (meta: " + meta + ")");
        must(/TTFT [0-9.]+ s/.test(meta), `no TTFT in "${meta}"`);
        must(/[0-9.]+ tok\/s/.test(meta), `no tok/s in "${meta}"`);
        must(/\b\d+ tokens\b/.test(meta), `no token count in "${meta}"`);
        must(/finish: (stop|length)/.test(meta), `no finish reason in "${meta}"`);
        must(await page.locator("#send-btn").isVisible(), "Send is not back after the reply");
        must(await page.locator("#stop-btn").isHidden(), "Stop is still shown after the reply");
        const body = chatBodies.at(-1);
        must(body && body.stream === true && body.max_tokens === 64 && body.model === MODEL, "request: " + JSON.stringify(body));
        await warnTps(meta, "reply 1");
        console.log(`     reply 1: ${JSON.stringify(reply1.slice(0, 60))}… | ${meta}`);
        await shot(page, "03-laptop-reply");
      }],
      ["second message (Send button): both turns shown and sent as history", async () => {
        await typeAndSend(page, "Tell me more.", "click");
        await until("the second reply's meta line", async () =>
          (await page.locator(".msg.assistant").count()) === 2 && (await page.locator(".msg.assistant >> nth=1 >> .meta").innerText()));
        const users = await page.locator(".msg.user").allInnerTexts();
        must(users.length === 2 && users[0] === "Hello, who are you?" && users[1] === "Tell me more.", "user bubbles: " + JSON.stringify(users));
        must((await text(page, ".msg.assistant >> nth=0 >> .body")) === reply1, "the first reply changed");
        must((await text(page, ".msg.assistant >> nth=1 >> .body")).trim().length > 0, "the second reply is empty");
        const msgs = chatBodies.at(-1).messages;
        must(msgs.length === 3 && msgs[0].role === "user" && msgs[1].role === "assistant" && msgs[2].role === "user" &&
          msgs[2].content === "Tell me more." && msgs[1].content.trim().length > 0,
          "the second request's messages: " + JSON.stringify(msgs.map((m) => [m.role, m.content.slice(0, 20)])));
        const meta2 = await text(page, ".msg.assistant >> nth=1 >> .meta");
        await warnTps(meta2, "reply 2");
        console.log(`     reply 2: ${meta2}`);
        await shot(page, "04-laptop-multiturn");
      }],
      ["Stop during a long generation (max tokens 3500)", async () => {
        await page.locator("#clear-btn").click();
        must((await page.locator(".msg").count()) === 0, "New chat left messages");
        await page.locator("#opt-max").fill("3500");
        await typeAndSend(page, "Write a very long story.", "click");
        must(await page.locator("#stop-btn").isVisible(), "Stop is not shown while generating");
        await until("streamed text in the reply", async () => (await text(page, ".msg.assistant >> nth=0 >> .body")).trim().length > 0);
        await shot(page, "05-laptop-streaming");
        must(await page.locator("#stop-btn").isVisible(), "the generation ended before Stop could be pressed");
        await page.locator("#stop-btn").click();
        const meta = await until("the stopped reply's meta", async () => page.locator(".msg.assistant .meta").first().innerText());
        must(/\bstopped\b/.test(meta), `meta after Stop is "${meta}" (finished before Stop?)`);
        must(await page.locator("#send-btn").isVisible(), "Send is not back after Stop");
        await until("the node to be idle again after Stop", async () => {
          const i = (await stateJson()).instances[0];
          return i && !i.busy && i.queued === 0;
        });
        const vp = page.viewportSize();
        for (const sel of ["#input", "#send-btn"]) {
          const b = await page.locator(sel).boundingBox();
          must(b && b.y + b.height <= vp.height + 0.5, `${sel} left the viewport after a long reply: ${JSON.stringify(b)}`);
        }
        console.log(`     stopped after ${(await text(page, ".msg.assistant >> nth=0 >> .body")).length} chars | ${meta}`);
        await shot(page, "06-laptop-stopped");
      }],
      ["no page or console errors", async () => {
        must(errors.length === 0, errors.join("; "));
      }],
    ]);
    await ctx.close();
  }

  // ---------------- phone: 390x844 ----------------
  {
    const W = 390, H = 844;
    const ctx = await browser.newContext({ viewport: { width: W, height: H }, deviceScaleFactor: 2, isMobile: true, hasTouch: true });
    const page = await ctx.newPage();
    page.setDefaultTimeout(T);
    const errors = [];
    watchErrors(page, errors);
    const inView = async (sel) => {
      const b = await page.locator(sel).boundingBox();
      must(b, `${sel} has no box (not rendered)`);
      must(await page.locator(sel).isVisible(), `${sel} is not visible`);
      must(b.x >= 0 && b.y >= 0 && b.x + b.width <= W + 0.5 && b.y + b.height <= H + 0.5,
        `${sel} is outside the ${W}x${H} viewport: ${JSON.stringify(b)}`);
      return b;
    };
    await scenario("phone", page, [
      ["page loads and the node shows online", async () => {
        const res = await page.goto(BASE + "/", { waitUntil: "load" });
        must(res && res.ok(), `GET / answered ${res && res.status()}`);
        await until('#node-status "online"', async () => /^online/.test(await text(page, "#node-status")));
      }],
      ["chat input and Send are visible in the viewport, nothing overflows sideways", async () => {
        const inp = await inView("#input");
        const btn = await inView("#send-btn");
        must(inp.width >= 150, `the input is only ${inp.width}px wide`);
        must(btn.x >= inp.x + inp.width - 0.5, "Send overlaps the input");
        const sw = await page.evaluate(() => document.documentElement.scrollWidth);
        must(sw <= W, `the page is ${sw}px wide in a ${W}px viewport (horizontal overflow)`);
        must(await page.locator("#panel").isHidden(), "the models panel is open by default on a phone");
        await inView("#toggle-panel");
        await shot(page, "07-phone");
      }],
      ["Models button opens the panel with the loaded model; composer still usable", async () => {
        await page.locator("#toggle-panel").tap();
        must(await page.locator("#panel").isVisible(), "the panel did not open");
        must((await page.locator("#toggle-panel").getAttribute("aria-expanded")) === "true", "aria-expanded not true");
        await until(`the instance card for ${MODEL}`, async () => (await instanceCard(page)).find((c) => c.name.startsWith(MODEL + " ")));
        await inView("#input");
        await inView("#send-btn");
        await shot(page, "08-phone-panel");
        await page.locator("#toggle-panel").tap();
        must(await page.locator("#panel").isHidden(), "the panel did not close");
      }],
      ["a message sent by tapping Send gets a reply", async () => {
        await until("the chat model select", async () => (await page.locator("#chat-model").inputValue()) === MODEL);
        await page.locator("#input").fill("Hi from a phone");
        await page.locator("#send-btn").tap();
        const meta = await until("the reply's meta line", async () => page.locator(".msg.assistant .meta").first().innerText());
        must((await text(page, ".msg.assistant >> nth=0 >> .body")).trim().length > 0, "empty reply (meta: " + meta + ")");
        must(/TTFT/.test(meta) && /tok\/s/.test(meta), `meta is "${meta}"`);
        await shot(page, "09-phone-reply");
      }],
      ["after a long reply the input and Send stay on screen (messages scroll, not the page)", async () => {
        const sw = await page.evaluate(() => document.documentElement.scrollWidth);
        must(sw <= W, `after a reply the page is ${sw}px wide (horizontal overflow)`);
        const sh = await page.evaluate(() => document.documentElement.scrollHeight);
        await inView("#input");
        await inView("#send-btn");
        must(sh <= H + 1, `after a reply the page is ${sh}px tall in a ${H}px viewport`);
      }],
      ["no page or console errors", async () => {
        must(errors.length === 0, errors.join("; "));
      }],
    ]);
    await ctx.close();
  }
} finally {
  await browser.close();
}

const secs = ((Date.now() - started) / 1000).toFixed(1);
console.log(`     screenshots: ${shots.map((s) => path.relative(process.cwd(), s)).join(" ")}`);
if (failures) {
  console.error(`dashboard: ${failures} scenario(s) failed (${secs} s); screenshots in ${ARTIFACTS}`);
  process.exit(1);
}
console.log(`ok   dashboard: all checks passed in ${secs} s`);
