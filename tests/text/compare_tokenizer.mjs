// Compares `zmlx tokenize --jsonl` with Hugging Face tokenizers (JS) on the
// real Qwen3 tokenizer over the corpus; also checks decode(encode(s)) == s
// (up to the NFC normalizer) and zmlx's decode against HF's. Usage: node compare_tokenizer.mjs ZMLX MODEL_DIR
import { Tokenizer } from "@huggingface/tokenizers";
import { execFileSync } from "child_process";
import fs from "fs";
import os from "os";
import path from "path";
import { corpus } from "./corpus.mjs";

const [zmlx, modelDir] = process.argv.slice(2);
if (!zmlx || !modelDir) {
  console.error("usage: node compare_tokenizer.mjs ZMLX MODEL_DIR");
  process.exit(2);
}
const tj = JSON.parse(fs.readFileSync(path.join(modelDir, "tokenizer.json"), "utf8"));
const tc = JSON.parse(fs.readFileSync(path.join(modelDir, "tokenizer_config.json"), "utf8"));
const hf = new Tokenizer(tj, tc);

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "zmlx-tok-"));
const input = path.join(tmp, "corpus.jsonl");
fs.writeFileSync(input, corpus.map((s) => JSON.stringify(s)).join("\n") + "\n");
const t0 = Date.now();
const out = execFileSync(zmlx, ["tokenize", modelDir, "--jsonl", input], { maxBuffer: 1 << 28 }).toString("utf8");
const zmlxMs = Date.now() - t0;
const lines = out.split("\n").filter((l) => l.length > 0);
const nonEmpty = corpus;

let idsEqual = 0, roundTrip = 0, decodeEqual = 0, failures = 0;
const report = (what, s, a, b) => {
  if (++failures <= 15) console.log(`MISMATCH ${what} for ${JSON.stringify(s).slice(0, 120)}\n  zmlx: ${JSON.stringify(a).slice(0, 300)}\n  hf:   ${JSON.stringify(b).slice(0, 300)}`);
};
if (lines.length !== nonEmpty.length) {
  console.log(`zmlx printed ${lines.length} lines for ${nonEmpty.length} strings`);
  process.exit(1);
}
nonEmpty.forEach((s, k) => {
  const z = JSON.parse(lines[k]);
  const h = hf.encode(s, { add_special_tokens: false }).ids;
  if (JSON.stringify(z.ids) === JSON.stringify(h)) idsEqual++;
  else report("ids", s, z.ids, h);
  // The NFC normalizer is part of encoding, so the round trip gives NFC(s).
  if (z.decoded === s.normalize("NFC")) roundTrip++;
  else report("round trip", s, z.decoded, s.normalize("NFC"));
  const hd = h.length ? hf.decode(h, { skip_special_tokens: false }) : "";
  if (z.decoded === hd) decodeEqual++;
  else report("decode", s, z.decoded, hd);
});
const n = nonEmpty.length;
console.log(`tokenizer: ${idsEqual}/${n} token lists equal to HF tokenizers`);
console.log(`tokenizer: ${roundTrip}/${n} decode(encode(s)) == NFC(s)`);
console.log(`tokenizer: ${decodeEqual}/${n} decodes equal to HF decode`);
console.log(`tokenizer: zmlx tokenize --jsonl took ${zmlxMs} ms for ${n} strings (${corpus.reduce((a, s) => a + s.length, 0)} UTF-16 units, incl. loading)`);
fs.rmSync(tmp, { recursive: true, force: true });
process.exit(idsEqual === n && roundTrip === n && decodeEqual === n ? 0 : 1);
