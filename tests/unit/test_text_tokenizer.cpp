// Byte-level BPE on small hand-made tokenizer.json files, added-token
// matching, NFC, and the streaming decoder.
#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>

#include "zmlx/core/error.h"
#include "zmlx/text/chat_template.h"
#include "zmlx/text/tokenizer.h"
#include "zmlx/text/unicode.h"

using nlohmann::json;
using zmlx::text::StreamDecoder;
using zmlx::text::Tokenizer;

namespace {

// GPT-2 byte → character map, written out independently of the tokenizer.
std::string byte_char(int b) {
  bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
  int cp = b;
  if (!printable) {
    int n = 0;
    for (int k = 0; k < b; ++k) {
      bool p = (k >= 0x21 && k <= 0x7E) || (k >= 0xA1 && k <= 0xAC) || (k >= 0xAE && k <= 0xFF);
      n += !p;
    }
    cp = 256 + n;
  }
  std::string s;
  zmlx::text::utf8_append(s, static_cast<char32_t>(cp));
  return s;
}

// 256 byte tokens (ids 0..255) + the merges given (new ids from 256) + added tokens.
json tiny_tokenizer(const std::vector<std::pair<std::string, std::string>>& merges, json added = json::array(),
                    json normalizer = nullptr) {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[byte_char(b)] = b;
  json ms = json::array();
  int next = 256;
  for (const auto& [a, b] : merges) {
    ms.push_back(a + " " + b);
    if (!vocab.contains(a + b)) vocab[a + b] = next++;
  }
  for (auto& t : added) {
    if (!t.contains("id")) t["id"] = next++;
  }
  json split = {{"type", "Split"},
                {"pattern", {{"Regex", "(?i:'s|'t)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}}},
                {"behavior", "Isolated"},
                {"invert", false}};
  json bl = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", false}, {"use_regex", false}};
  return {{"added_tokens", added},
          {"normalizer", normalizer},
          {"pre_tokenizer", {{"type", "Sequence"}, {"pretokenizers", {split, bl}}}},
          {"decoder", bl},
          {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", ms}}}};
}

std::vector<std::string> pieces(const Tokenizer& t, const std::vector<int32_t>& ids) {
  std::vector<std::string> out;
  for (auto id : ids) out.push_back(t.piece(id));
  return out;
}

bool valid_utf8(const std::string& s) {
  for (size_t i = 0; i < s.size();) {
    int n = zmlx::text::utf8_sequence_length(s, i);
    if (n <= 0) return false;
    i += n;
  }
  return true;
}

}  // namespace

TEST(TextTokenizer, MergesApplyByRank) {
  // "abc": with (a,b) ranked first we get ab|c; with (b,c) first, a|bc.
  auto t1 = Tokenizer::from_json(tiny_tokenizer({{"a", "b"}, {"b", "c"}}));
  EXPECT_EQ(pieces(t1, t1.encode("abc")), (std::vector<std::string>{"ab", "c"}));
  auto t2 = Tokenizer::from_json(tiny_tokenizer({{"b", "c"}, {"a", "b"}}));
  EXPECT_EQ(pieces(t2, t2.encode("abc")), (std::vector<std::string>{"a", "bc"}));
  // Leftmost pair first among equal ranks: "aaa" → aa|a.
  auto t3 = Tokenizer::from_json(tiny_tokenizer({{"a", "a"}}));
  EXPECT_EQ(pieces(t3, t3.encode("aaa")), (std::vector<std::string>{"aa", "a"}));
}

TEST(TextTokenizer, WordsSplitByRegexAndByteLevel) {
  auto t = Tokenizer::from_json(
      tiny_tokenizer({{"h", "e"}, {"l", "l"}, {"he", "ll"}, {"hell", "o"}, {"Ġ", "w"}, {"Ġw", "o"}}));
  auto ids = t.encode("hello wo");
  EXPECT_EQ(pieces(t, ids), (std::vector<std::string>{"hello", "Ġwo"}));
  // Merges never cross pre-token boundaries: "hel lo" keeps "Ġ" + "l" + "o".
  EXPECT_EQ(pieces(t, t.encode("he llo")), (std::vector<std::string>{"he", "Ġ", "ll", "o"}));
  // Non-ASCII bytes map to their byte-level characters and decode back.
  std::string s = "é\n\tx  ";
  ids = t.encode(s);
  EXPECT_EQ(ids.size(), 7u);  // 2 bytes of é, \n, \t, x, two spaces
  EXPECT_EQ(t.decode(ids), s);
  EXPECT_EQ(t.token_bytes(ids[0]), std::string("\xC3"));
}

TEST(TextTokenizer, AddedTokensMatchedBeforeSplitting) {
  json added = json::array({
      {{"content", "<|end|>"}, {"special", true}, {"normalized", false}},
      {{"content", "<a>"}, {"special", false}, {"normalized", false}},
      {{"content", "<a><b>"}, {"special", false}, {"normalized", false}},
      {{"content", "[M]"}, {"special", true}, {"normalized", false}, {"lstrip", true}, {"rstrip", true}},
      {{"content", "tok"}, {"special", false}, {"normalized", false}, {"single_word", true}},
  });
  auto t = Tokenizer::from_json(tiny_tokenizer({{"x", "y"}}, added));
  int32_t end = *t.token_id("<|end|>"), a = *t.token_id("<a>"), ab = *t.token_id("<a><b>"), m = *t.token_id("[M]"),
          tok = *t.token_id("tok");
  EXPECT_TRUE(t.is_special(end));
  EXPECT_FALSE(t.is_special(a));
  auto xy = *t.token_id("xy");
  EXPECT_EQ(t.encode("xy<|end|>xy"), (std::vector<int32_t>{xy, end, xy}));
  // Longest match wins.
  EXPECT_EQ(t.encode("<a><b>"), (std::vector<int32_t>{ab}));
  EXPECT_EQ(t.encode("<a><c"), (std::vector<int32_t>{a, '<' /* byte ids = byte values for printable */, 'c'}));
  // lstrip / rstrip swallow the whitespace around the token.
  EXPECT_EQ(t.encode("xy  [M]  xy"), (std::vector<int32_t>{xy, m, xy}));
  // single_word: only matched when not inside a word.
  EXPECT_EQ(t.encode("xy tok xy").size(), 5u);  // xy, Ġ, tok, Ġ, xy (spaces stay separate pre-tokens)
  EXPECT_NE(std::find(t.encode("a tok").begin(), t.encode("a tok").end(), tok), t.encode("a tok").end());
  auto inside = t.encode("atokb");
  EXPECT_EQ(std::find(inside.begin(), inside.end(), tok), inside.end());
  // Decoding: specials can be skipped.
  EXPECT_EQ(t.decode(t.encode("xy<|end|>"), /*skip_special=*/true), "xy");
  EXPECT_EQ(t.decode(t.encode("xy<|end|>")), "xy<|end|>");
}

TEST(TextTokenizer, NfcNormalizerComposes) {
  auto t = Tokenizer::from_json(tiny_tokenizer({}, json::array(), json{{"type", "NFC"}}));
  // e + combining acute → é (2 bytes), not 3 bytes.
  EXPECT_EQ(t.encode("e\xCC\x81"), t.encode("\xC3\xA9"));
  EXPECT_EQ(t.encode("e\xCC\x81").size(), 2u);
  // Canonical reordering then composition: a + dot below + circumflex → ậ.
  EXPECT_EQ(zmlx::text::nfc("a\xCC\x82\xCC\xA3"), "\xE1\xBA\xAD");
  // Hangul jamo compose; singletons (Ohm sign → Omega) map.
  EXPECT_EQ(zmlx::text::nfc("\xE1\x84\x80\xE1\x85\xA1\xE1\x86\xA8"), "\xEA\xB0\x81");
  EXPECT_EQ(zmlx::text::nfc("\xE2\x84\xA6"), "\xCE\xA9");
  // Composition exclusions stay decomposed: U+0958 → U+0915 U+093C.
  EXPECT_EQ(zmlx::text::nfc("\xE0\xA5\x98"), "\xE0\xA4\x95\xE0\xA4\xBC");
}

TEST(TextTokenizer, StreamDecoderReleasesOnlyWholeCharacters) {
  auto t = Tokenizer::from_json(tiny_tokenizer({}, json::array({{{"content", "<s>"}, {"special", true}}})));
  std::string text = "héllo 你好 😀 👨‍👩‍👧 end";
  auto ids = t.encode(text);
  ASSERT_GT(ids.size(), 20u);  // one token per byte: multi-byte chars span several tokens
  StreamDecoder sd(t);
  std::string joined;
  int empty_pushes = 0;
  for (auto id : ids) {
    std::string piece = sd.push(id);
    EXPECT_TRUE(valid_utf8(piece)) << "broken UTF-8 released";
    empty_pushes += piece.empty();
    joined += piece;
  }
  joined += sd.flush();
  EXPECT_EQ(joined, text);
  EXPECT_GT(empty_pushes, 5);  // the continuation bytes were held back

  // A truncated character at the end becomes U+FFFD on flush; specials are skipped.
  StreamDecoder sd2(t);
  std::string out = sd2.push(*t.token_id("<s>"));
  out += sd2.push(0xE4);  // lead byte of a 3-byte character
  EXPECT_EQ(out, "");
  out += sd2.push('A');   // invalid continuation: the lead byte alone is replaced
  EXPECT_EQ(out, "\xEF\xBF\xBD" "A");
  out += sd2.push(0xF0);
  out += sd2.flush();
  EXPECT_EQ(out, "\xEF\xBF\xBD" "A\xEF\xBF\xBD");
}

TEST(TextTokenizer, ErrorsNameTheField) {
  json bad = tiny_tokenizer({});
  bad["model"]["merges"].push_back("q ZZZ");
  try {
    Tokenizer::from_json(bad);
    FAIL() << "expected zmlx::Error";
  } catch (const zmlx::Error& e) {
    EXPECT_NE(std::string(e.what()).find("merge"), std::string::npos) << e.what();
  }
  EXPECT_THROW(Tokenizer::from_dir("/nonexistent/dir"), zmlx::Error);
}

TEST(TextTokenizer, Encodes100KBWellUnderASecond) {
  auto dir = std::filesystem::temp_directory_path() / ("zmlx_tok_perf_" + std::to_string(::getpid()));
  zmlx::text::write_synthetic_tokenizer(dir.string(), "qwen3", 4096);
  auto t = Tokenizer::from_dir(dir.string());
  std::string chunk =
      "The assistant answers the question in 42 words.\n\tdef f(x): return x * 2  # code\n"
      "中文文本和日本語のテキスト。مرحبا بالعالم 😀👍🏽 <|im_start|>user\r\n   1234567890   ";
  std::string text;
  while (text.size() < 100 * 1024) text += chunk + std::to_string(text.size()) + " ";
  auto t0 = std::chrono::steady_clock::now();
  auto ids = t.encode(text);
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_LT(secs, 1.0) << "encoding 100 KB took " << secs << " s";
  EXPECT_GT(ids.size(), 10000u);
  EXPECT_EQ(t.decode(ids), zmlx::text::nfc(text));
  std::filesystem::remove_all(dir);
}
