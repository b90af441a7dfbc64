// The tokenizer conformance corpus: hand-picked hard cases plus generated
// combinations (deterministic), 300+ strings in all.
const hand = [
  "", " ", "  ", "\t", "\n", "\r\n", "\n\n\n", " \n \n", "a", "Hello world", "Hello, world!",
  "The quick brown fox jumps over the lazy dog.", "I'm sure you'll see we've done it; they'd agree, it's fine.",
  "I'M SURE YOU'LL SEE WE'VE DONE IT", "don't DON'T Don'T", "'s 't 're 've 'm 'll 'd", "ſ 'ſ 'S 'K", "'S",
  "12345", "3.14159", "1,000,000", "0x7fffffff", "2024-01-15T12:34:56Z", "v1.2.3-rc.4", "٠١٢٣٤٥٦٧٨٩", "①②③ ⅠⅡⅢ ½ ¾",
  "１２３ ＡＢＣ", "x²+y²=z²", "    leading spaces", "trailing spaces    ", "tabs\tbetween\twords", "\t\tindented",
  "mixed \t \t whitespace", "line1\nline2\r\nline3\rline4", "end with newline\n", "   \n   \n", "a  b   c    d",
  "def f(x):\n    return x * 2\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
  "#include <stdio.h>\nint main() { printf(\"%d\\n\", 42); }", "SELECT * FROM users WHERE id = 1;",
  "const x = () => { return `template ${value}`; };", "<div class=\"a\">Hello &amp; bye</div>",
  "{\"key\": [1, 2, {\"nested\": null}]}", "https://example.com/path?query=1&x=y#frag", "user@example.com",
  "C:\\Users\\name\\file.txt", "$ ls -la | grep foo > out.txt 2>&1", "!!!???...,,,;;;", "----====____",
  "你好，世界！", "我喜欢吃苹果和香蕉。", "日本語のテキストです。カタカナとひらがな。", "한국어 텍스트입니다. 안녕하세요!",
  "مرحبا بالعالم", "السلام عليكم ورحمة الله", "שלום עולם", "Привет, мир! Как дела?", "Γειά σου Κόσμε",
  "हिन्दी पाठ नमस्ते", "ภาษาไทย สวัสดี", "Tiếng Việt có dấu: Xin chào", "Ελληνικά και English mixed 中文",
  "café naïve résumé façade", "cafe\u0301 nai\u0308ve", "e\u0301\u0302 a\u0323\u0302", "\u1100\u1161\u11a8 \u1100\u1161",
  "Å Å Å", "\u212b \u2126 \u00c5", "ﬁ ﬂ ﬀ", "\u0958\u0959 क़", "\u0344 \u0301\u0308",
  "😀", "😀😃😄", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇺🇸🇯🇵", "I ❤️ NY", "emoji😀in😃text", "😀 😀  😀",
  "👩🏽‍💻 coding", "✨🎉🔥💯", "🧑‍🤝‍🧑", "\u200b zero width \u200b", "\u200d\u200c", "\ufeffBOM at start",
  "\u00a0nbsp\u00a0here", "\u3000ideographic space\u3000", "\u2028line sep\u2029para sep", "\u0085next line",
  "\u180emongolian vowel sep", "\u001c\u001d\u001e\u001f separators", "\u0000null\u0001ctrl\u007f",
  "\ufffd replacement \ufffd", "Ã©Ã¨ mojibake Ã¢â‚¬â„¢", "\u00ff\u00fe\u00fd", "ÿþ garbage-looking", "\\x80\\xff",
  "<|im_start|>user\nHello<|im_end|>", "<|im_start|>assistant\n<think>\nreasoning\n</think>\n\nanswer<|im_end|>",
  "<|endoftext|>", "text<|endoftext|>more", " <|im_end|> ", "<|im_start|><|im_end|><|im_start|>",
  "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>", "<tool_response>ok</tool_response>",
  "<think></think>", "< |im_start| >", "<|im_start", "im_start|>", "<|IM_START|>", "<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>",
  "<|vision_start|><|image_pad|><|vision_end|>", "<<|im_end|>>", "<|im_end|><|im_end|>",
];

// Deterministic generator (LCG) for combinations.
let seed = 12345;
const rnd = (n) => {
  seed = (seed * 1103515245 + 12345) % 2147483648;
  return seed % n;
};
const parts = [
  "hello", " world", "the", " ", "  ", "\t", "\n", "\r\n", "123", "4567", " 89", "中文", "字", "😀", "👍🏽",
  "é", "e\u0301", "!", "?", "...", "'s", "'LL", "<|im_end|>", "<think>", "مرحبا", "한국", "Привет", "x",
  "_", "-", "==", "()", "{}", "\u00a0", "\u3000", "ß", "ﬁ", "1.5", "$", "%", "#", "@", "\\", "\"", "'",
];
const gen = [];
for (let k = 0; k < 200; ++k) {
  const n = 1 + rnd(12);
  let s = "";
  for (let j = 0; j < n; ++j) s += parts[rnd(parts.length)];
  gen.push(s);
}
// Runs of digits, spaces, newlines of many lengths.
for (let n = 1; n <= 12; ++n) {
  gen.push("9".repeat(n));
  gen.push(" ".repeat(n) + "x");
  gen.push("x" + " ".repeat(n));
  gen.push("\n".repeat(n) + "y");
  gen.push("a" + "\t".repeat(n) + "b");
}
// Long texts.
const para = "Tokenizers split text into words and sub-words. 分词器把文本切成词。 Numbers like 1234567 and 3.14 appear too! 😀\n";
gen.push(para.repeat(40));
gen.push("a".repeat(3000));
gen.push(" ".repeat(1000));
gen.push("🙂".repeat(300));
gen.push(Array.from({ length: 400 }, (_, i) => String.fromCodePoint(0x4e00 + ((i * 37) % 2000))).join(""));
gen.push(Array.from({ length: 300 }, (_, i) => String.fromCodePoint(0x20 + ((i * 7919) % 0x5e))).join(""));

export const corpus = [...hand, ...gen];
