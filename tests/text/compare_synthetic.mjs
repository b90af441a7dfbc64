// Writes synthetic tokenizers with `zmlx tokenize DIR --write-synthetic FAMILY:VOCAB`,
// loads each in Hugging Face tokenizers (JS) and compares encodings of the
// corpus with zmlx's, plus the special tokens' ids. Usage: node compare_synthetic.mjs ZMLX
import { Tokenizer } from "@huggingface/tokenizers";
import { execFileSync } from "child_process";
import fs from "fs";
import os from "os";
import path from "path";
import { corpus } from "./corpus.mjs";

const zmlx = process.argv[2];
const cases = [
  { spec: "qwen3_moe:151936", ids: { "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<think>": 151667, "</think>": 151668 } },
  { spec: "qwen3:4096", ids: { "<|endoftext|>": 4070, "<|im_start|>": 4071, "<|im_end|>": 4072, "</think>": 4095 } },
  { spec: "glm4_moe_lite:154880", ids: { "[gMASK]": 154822, "<sop>": 154824, "<|user|>": 154827, "<|assistant|>": 154828, "</arg_value>": 154850 } },
  { spec: "lfm2_moe:65536", ids: { "<|pad|>": 0, "<|startoftext|>": 1, "<|endoftext|>": 2, "<|im_start|>": 6, "<|im_end|>": 7 } },
];
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "zmlx-syn-"));
const input = path.join(tmp, "corpus.jsonl");
const texts = corpus.filter((s, k) => k % 3 === 0 && s.length < 400).concat(["The user asks the assistant.", "<|im_start|>user\nHi<|im_end|>", "[gMASK]<sop><|user|>Hi"]);
fs.writeFileSync(input, texts.map((s) => JSON.stringify(s)).join("\n") + "\n");
let allOk = true;
for (const c of cases) {
  const dir = path.join(tmp, c.spec.replace(":", "_"));
  execFileSync(zmlx, ["tokenize", dir, "--write-synthetic", c.spec]);
  const tj = JSON.parse(fs.readFileSync(path.join(dir, "tokenizer.json"), "utf8"));
  const tc = JSON.parse(fs.readFileSync(path.join(dir, "tokenizer_config.json"), "utf8"));
  const hf = new Tokenizer(tj, tc);
  const vocabSize = Number(c.spec.split(":")[1]);
  const ids = new Set([...Object.values(tj.model.vocab), ...tj.added_tokens.map((t) => t.id)]);
  let ok = ids.size === vocabSize && [...ids].reduce((a, b) => Math.max(a, b), 0) === vocabSize - 1;
  if (!ok) console.log(`${c.spec}: ids not contiguous 0..${vocabSize - 1} (${ids.size} distinct)`);
  for (const [tok, id] of Object.entries(c.ids)) {
    const got = hf.encode(tok, { add_special_tokens: false }).ids;
    if (got.length !== 1 || got[0] !== id) {
      ok = false;
      console.log(`${c.spec}: HF encodes ${tok} as ${JSON.stringify(got)}, expected [${id}]`);
    }
  }
  const out = execFileSync(zmlx, ["tokenize", dir, "--jsonl", input], { maxBuffer: 1 << 28 }).toString("utf8").split("\n").filter((l) => l);
  let eq = 0;
  texts.forEach((s, k) => {
    const h = hf.encode(s, { add_special_tokens: false }).ids;
    const z = JSON.parse(out[k]).ids;
    if (JSON.stringify(h) === JSON.stringify(z)) eq++;
    else if (eq > -5) console.log(`${c.spec}: MISMATCH for ${JSON.stringify(s).slice(0, 80)}\n  zmlx ${JSON.stringify(z).slice(0, 200)}\n  hf   ${JSON.stringify(h).slice(0, 200)}`);
  });
  // Common words should be single tokens.
  const the = hf.encode(" the", { add_special_tokens: false }).ids.length === 1;
  if (!the) console.log(`${c.spec}: " the" is not a single token`);
  ok = ok && eq === texts.length && the;
  console.log(`synthetic ${c.spec}: ${eq}/${texts.length} encodings equal to HF, specials ${ok ? "ok" : "WRONG"}`);
  allOk = allOk && ok;
}
fs.rmSync(tmp, { recursive: true, force: true });
process.exit(allOk ? 0 : 1);
