// Byte-level BPE as Hugging Face tokenizers runs it:
//   added tokens (matched on the raw text) → normalizer → added tokens marked
//   `normalized` → pre-tokenizer (Split regex / ByteLevel / Digits) → BPE
//   merges by rank on each pre-token word (cached) → ids.
#include "zmlx/text/tokenizer.h"

#include <algorithm>
#include <fstream>
#include <mutex>
#include <queue>
#include <sstream>
#include <unordered_map>

#include "zmlx/core/error.h"
#include "zmlx/text/regex.h"
#include "zmlx/text/unicode.h"

namespace zmlx::text {

namespace {

using json = nlohmann::json;

// GPT-2's reversible byte ↔ printable-character map: printable Latin-1 bytes
// stand for themselves, the rest are shifted to U+0100 and up.
struct ByteMap {
  std::string byte_to_char[256];
  std::unordered_map<char32_t, uint8_t> char_to_byte;
  ByteMap() {
    int shifted = 0;
    for (int b = 0; b < 256; ++b) {
      bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      char32_t cp = printable ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + shifted++);
      utf8_append(byte_to_char[b], cp);
      char_to_byte[cp] = static_cast<uint8_t>(b);
    }
  }
};
const ByteMap& byte_map() {
  static const ByteMap m;
  return m;
}

constexpr const char* kGpt2Pattern =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

struct AddedToken {
  int32_t id = 0;
  std::string content;
  bool special = false, lstrip = false, rstrip = false, single_word = false, normalized = false;
};

// One normalizer step.
struct NormalizerStep {
  enum Kind { NFC, NFD, Replace, Prepend, Lowercase } kind;
  std::string a, b;  // Replace: pattern → content; Prepend: a
};

// One pre-tokenizer step, applied to every piece produced so far.
struct PreTokStep {
  enum Kind { Split, ByteLevel, Digits } kind;
  std::shared_ptr<Regex> regex;    // Split (regex pattern) or ByteLevel(use_regex)
  std::string literal;             // Split with a String pattern
  std::string behavior = "Isolated";
  bool invert = false;
  bool add_prefix_space = false;   // ByteLevel
  bool individual_digits = false;  // Digits
};

bool is_word_char(char32_t c) {
  if (c < 0x80) return std::isalnum(static_cast<int>(c)) || c == '_';
  return !is_unicode_whitespace(c) && c != 0xFFFD;  // letters/digits of other scripts (approximate)
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  ZMLX_CHECK(f.good(), "cannot open {}", path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

bool file_exists(const std::string& path) { return std::ifstream(path).good(); }

std::optional<std::string> token_text(const json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string())
    return v["content"].get<std::string>();
  return std::nullopt;
}

}  // namespace

struct Tokenizer::Impl {
  std::unordered_map<std::string, int32_t> vocab;
  std::vector<std::string> id_to_piece;  // vocab + added tokens
  std::vector<uint8_t> special;          // per id
  std::vector<uint8_t> added;            // per id: an added token (decoded as its text)
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;  // (left,right) → (rank, merged id)
  std::vector<AddedToken> added_tokens;
  std::unordered_map<unsigned char, std::vector<size_t>> raw_trie, normalized_trie;  // first byte → tokens, longest first
  std::vector<NormalizerStep> normalizer;
  std::vector<PreTokStep> pre_tokenizer;
  bool byte_level_input = false;   // a ByteLevel pre-tokenizer maps bytes to characters
  bool byte_level_decoder = false;
  bool byte_fallback = false;
  bool ignore_merges = false;
  std::optional<int32_t> unk_id;
  int32_t byte_char_id[256];
  int32_t byte_fallback_id[256];
  std::string chat_template;
  std::optional<std::string> bos, eos;

  mutable std::mutex cache_mu;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache;

  void load(const json& tj, const json& cfg);
  void load_normalizer(const json& n);
  void load_pre_tokenizer(const json& p);
  void load_decoder(const json& d);

  void add_id(int32_t id, const std::string& piece) {
    if (id >= static_cast<int32_t>(id_to_piece.size())) {
      id_to_piece.resize(id + 1);
      special.resize(id + 1, 0);
      added.resize(id + 1, 0);
    }
    id_to_piece[id] = piece;
  }

  std::string normalize(std::string_view s) const;
  std::vector<std::string> pre_tokenize(std::string s) const;
  void bpe_word(const std::string& word, std::vector<int32_t>& out) const;
  void bpe_uncached(const std::string& word, std::vector<int32_t>& out) const;
  // Splits `s` at the added tokens of `trie`; plain segments go to `plain`.
  template <typename Plain>
  void split_added(std::string_view s, const std::unordered_map<unsigned char, std::vector<size_t>>& trie,
                   std::vector<int32_t>& out, Plain&& plain) const;
  void encode_plain(std::string_view s, std::vector<int32_t>& out) const;
};

void Tokenizer::Impl::load_normalizer(const json& n) {
  if (n.is_null()) return;
  std::string type = n.value("type", "");
  if (type == "Sequence") {
    for (const auto& s : n.at("normalizers")) load_normalizer(s);
  } else if (type == "NFC") {
    normalizer.push_back({NormalizerStep::NFC, "", ""});
  } else if (type == "NFD") {
    normalizer.push_back({NormalizerStep::NFD, "", ""});
  } else if (type == "Lowercase") {
    normalizer.push_back({NormalizerStep::Lowercase, "", ""});
  } else if (type == "Prepend") {
    normalizer.push_back({NormalizerStep::Prepend, n.at("prepend").get<std::string>(), ""});
  } else if (type == "Replace" && n.at("pattern").contains("String")) {
    normalizer.push_back({NormalizerStep::Replace, n["pattern"]["String"].get<std::string>(),
                          n.at("content").get<std::string>()});
  } else {
    fail("tokenizer.json: normalizer {} is not supported", n.dump());
  }
}

void Tokenizer::Impl::load_pre_tokenizer(const json& p) {
  if (p.is_null()) return;
  std::string type = p.value("type", "");
  if (type == "Sequence") {
    for (const auto& s : p.at("pretokenizers")) load_pre_tokenizer(s);
  } else if (type == "Split") {
    PreTokStep st;
    st.kind = PreTokStep::Split;
    const json& pat = p.at("pattern");
    if (pat.contains("Regex")) {
      st.regex = std::make_shared<Regex>(pat["Regex"].get<std::string>());
    } else if (pat.contains("String")) {
      st.literal = pat["String"].get<std::string>();
      ZMLX_CHECK(!st.literal.empty(), "tokenizer.json: pre_tokenizer Split with an empty String pattern");
    } else {
      fail("tokenizer.json: pre_tokenizer Split pattern {} is not supported", pat.dump());
    }
    st.behavior = p.value("behavior", "Isolated");
    st.invert = p.value("invert", false);
    static const char* kBehaviors[] = {"Isolated", "Removed", "MergedWithPrevious", "MergedWithNext",
                                       "Contiguous"};
    ZMLX_CHECK(std::find(std::begin(kBehaviors), std::end(kBehaviors), st.behavior) != std::end(kBehaviors),
               "tokenizer.json: pre_tokenizer Split behavior {:?} is not supported", st.behavior);
    pre_tokenizer.push_back(std::move(st));
  } else if (type == "ByteLevel") {
    PreTokStep st;
    st.kind = PreTokStep::ByteLevel;
    st.add_prefix_space = p.value("add_prefix_space", false);
    if (p.value("use_regex", true)) st.regex = std::make_shared<Regex>(kGpt2Pattern);
    byte_level_input = true;
    pre_tokenizer.push_back(std::move(st));
  } else if (type == "Digits") {
    PreTokStep st;
    st.kind = PreTokStep::Digits;
    st.individual_digits = p.value("individual_digits", false);
    st.regex = std::make_shared<Regex>(st.individual_digits ? "\\p{N}" : "\\p{N}+");
    st.behavior = "Isolated";
    pre_tokenizer.push_back(std::move(st));
  } else {
    fail("tokenizer.json: pre_tokenizer type {:?} is not supported", type);
  }
}

void Tokenizer::Impl::load_decoder(const json& d) {
  if (d.is_null()) return;
  std::string type = d.value("type", "");
  if (type == "ByteLevel") {
    byte_level_decoder = true;
  } else if (type == "Sequence") {
    for (const auto& s : d.at("decoders")) load_decoder(s);
  } else if (type == "ByteFallback" || type == "Fuse") {
    // byte tokens <0xXX> decode to their byte (token_bytes); fusing is implicit
  } else {
    fail("tokenizer.json: decoder type {:?} is not supported", type);
  }
}

void Tokenizer::Impl::load(const json& tj, const json& cfg) {
  ZMLX_CHECK(tj.is_object() && tj.contains("model"), "tokenizer.json: no \"model\" field");
  const json& m = tj["model"];
  std::string type = m.value("type", "BPE");
  ZMLX_CHECK(type == "BPE", "tokenizer.json: model.type {:?} is not supported (only BPE)", type);
  ZMLX_CHECK(m.value("continuing_subword_prefix", json()).is_null() ||
                 m["continuing_subword_prefix"].get<std::string>().empty(),
             "tokenizer.json: model.continuing_subword_prefix is not supported");
  ZMLX_CHECK(m.value("end_of_word_suffix", json()).is_null() || m["end_of_word_suffix"].get<std::string>().empty(),
             "tokenizer.json: model.end_of_word_suffix is not supported");
  byte_fallback = m.value("byte_fallback", false);
  ignore_merges = m.value("ignore_merges", false);

  ZMLX_CHECK(m.contains("vocab") && m["vocab"].is_object(), "tokenizer.json: model.vocab missing");
  vocab.reserve(m["vocab"].size() * 2);
  for (auto it = m["vocab"].begin(); it != m["vocab"].end(); ++it) {
    int64_t id = it.value().get<int64_t>();
    ZMLX_CHECK(id >= 0 && id < (1 << 30), "tokenizer.json: model.vocab[{:?}] = {} out of range", it.key(), id);
    vocab[it.key()] = static_cast<int32_t>(id);
    add_id(static_cast<int32_t>(id), it.key());
  }
  if (m.contains("unk_token") && m["unk_token"].is_string()) {
    auto it = vocab.find(m["unk_token"].get<std::string>());
    if (it != vocab.end()) unk_id = it->second;
  }

  if (m.contains("merges")) {
    const json& ms = m["merges"];
    merges.reserve(ms.size() * 2);
    int32_t rank = 0;
    for (const auto& e : ms) {
      std::string a, b;
      if (e.is_string()) {
        const std::string& s = e.get_ref<const std::string&>();
        size_t sp = s.find(' ', 1);
        ZMLX_CHECK(sp != std::string::npos, "tokenizer.json: merge {:?} has no space", s);
        a = s.substr(0, sp);
        b = s.substr(sp + 1);
      } else {
        ZMLX_CHECK(e.is_array() && e.size() == 2, "tokenizer.json: merge {} is not a pair", e.dump());
        a = e[0].get<std::string>();
        b = e[1].get<std::string>();
      }
      auto ia = vocab.find(a), ib = vocab.find(b), im = vocab.find(a + b);
      ZMLX_CHECK(ia != vocab.end() && ib != vocab.end() && im != vocab.end(),
                 "tokenizer.json: merge #{} ({:?} {:?}) uses a token missing from the vocab", rank, a, b);
      uint64_t key = (uint64_t(uint32_t(ia->second)) << 32) | uint32_t(ib->second);
      merges.emplace(key, std::make_pair(rank, im->second));  // first (lowest) rank wins
      ++rank;
    }
  }

  if (tj.contains("added_tokens") && tj["added_tokens"].is_array()) {
    for (const auto& a : tj["added_tokens"]) {
      AddedToken t;
      t.id = a.at("id").get<int32_t>();
      t.content = a.at("content").get<std::string>();
      t.special = a.value("special", false);
      t.lstrip = a.value("lstrip", false);
      t.rstrip = a.value("rstrip", false);
      t.single_word = a.value("single_word", false);
      t.normalized = a.value("normalized", !t.special);
      ZMLX_CHECK(!t.content.empty(), "tokenizer.json: added token {} has empty content", t.id);
      add_id(t.id, t.content);
      special[t.id] = t.special;
      added[t.id] = 1;
      added_tokens.push_back(std::move(t));
    }
  }

  load_normalizer(tj.value("normalizer", json()));
  load_pre_tokenizer(tj.value("pre_tokenizer", json()));
  load_decoder(tj.value("decoder", json()));

  // Tries: normalized tokens are matched on normalized text, so index them by
  // their normalized form.
  for (size_t i = 0; i < added_tokens.size(); ++i) {
    auto& t = added_tokens[i];
    if (t.normalized) {
      t.content = normalize(t.content);
      normalized_trie[static_cast<unsigned char>(t.content[0])].push_back(i);
    } else {
      raw_trie[static_cast<unsigned char>(t.content[0])].push_back(i);
    }
  }
  for (auto* trie : {&raw_trie, &normalized_trie})
    for (auto& [k, v] : *trie)
      std::stable_sort(v.begin(), v.end(), [&](size_t a, size_t b) {
        return added_tokens[a].content.size() > added_tokens[b].content.size();
      });

  const ByteMap& bm = byte_map();
  for (int b = 0; b < 256; ++b) {
    auto it = vocab.find(bm.byte_to_char[b]);
    byte_char_id[b] = it == vocab.end() ? -1 : it->second;
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    auto fb = vocab.find(name);
    byte_fallback_id[b] = fb == vocab.end() ? -1 : fb->second;
  }

  // tokenizer_config.json
  if (cfg.is_object()) {
    if (cfg.contains("chat_template")) {
      const json& ct = cfg["chat_template"];
      if (ct.is_string()) {
        chat_template = ct.get<std::string>();
      } else if (ct.is_array()) {
        for (const auto& e : ct)
          if (e.value("name", "") == "default") chat_template = e.at("template").get<std::string>();
        ZMLX_CHECK(!chat_template.empty() || ct.empty(),
                   "tokenizer_config.json: chat_template list has no entry named \"default\"");
      }
    }
    if (cfg.contains("bos_token")) bos = token_text(cfg["bos_token"]);
    if (cfg.contains("eos_token")) eos = token_text(cfg["eos_token"]);
  }
}

std::string Tokenizer::Impl::normalize(std::string_view s) const {
  std::string out(s);
  for (const auto& st : normalizer) {
    switch (st.kind) {
      case NormalizerStep::NFC: out = nfc(out); break;
      case NormalizerStep::NFD: out = nfd(out); break;
      case NormalizerStep::Lowercase:
        for (auto& c : out)
          if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
        break;
      case NormalizerStep::Prepend:
        if (!out.empty()) out = st.a + out;
        break;
      case NormalizerStep::Replace: {
        std::string r;
        size_t pos = 0, f;
        while ((f = out.find(st.a, pos)) != std::string::npos) {
          r.append(out, pos, f - pos);
          r += st.b;
          pos = f + st.a.size();
        }
        r.append(out, pos, std::string::npos);
        out = std::move(r);
        break;
      }
    }
  }
  return out;
}

std::vector<std::string> Tokenizer::Impl::pre_tokenize(std::string s) const {
  std::vector<std::string> pieces{std::move(s)};
  for (const auto& st : pre_tokenizer) {
    std::vector<std::string> next;
    for (auto& piece : pieces) {
      if (st.kind == PreTokStep::ByteLevel) {
        std::string p = std::move(piece);
        if (st.add_prefix_space && (p.empty() || p[0] != ' ')) p.insert(p.begin(), ' ');
        if (!st.regex) {
          next.push_back(std::move(p));
          continue;
        }
        for (auto [b, e] : st.regex->find_all(p)) next.push_back(p.substr(b, e - b));
        continue;
      }
      // Split / Digits: matched spans, then combined by `behavior`.
      std::vector<std::pair<size_t, size_t>> matches;
      if (st.regex) {
        matches = st.regex->find_all(piece);
      } else {
        for (size_t pos = 0; (pos = piece.find(st.literal, pos)) != std::string::npos; pos += st.literal.size())
          matches.emplace_back(pos, pos + st.literal.size());
      }
      struct Seg {
        size_t b, e;
        bool match;
      };
      std::vector<Seg> segs;
      size_t pos = 0;
      for (auto [b, e] : matches) {
        if (b > pos) segs.push_back({pos, b, st.invert});
        segs.push_back({b, e, !st.invert});
        pos = e;
      }
      if (pos < piece.size()) segs.push_back({pos, piece.size(), st.invert});
      std::vector<std::pair<size_t, size_t>> out;
      const std::string& bh = st.behavior;
      for (size_t i = 0; i < segs.size(); ++i) {
        const Seg& g = segs[i];
        if (bh == "Isolated") {
          out.emplace_back(g.b, g.e);
        } else if (bh == "Removed") {
          if (!g.match) out.emplace_back(g.b, g.e);
        } else if (bh == "MergedWithPrevious") {
          if (g.match && !out.empty() && out.back().second == g.b) out.back().second = g.e;
          else out.emplace_back(g.b, g.e);
        } else if (bh == "MergedWithNext") {
          if (i > 0 && segs[i - 1].match && !out.empty() && out.back().second == g.b) out.back().second = g.e;
          else out.emplace_back(g.b, g.e);
        } else {  // Contiguous
          if (g.match && i > 0 && segs[i - 1].match && !out.empty()) out.back().second = g.e;
          else out.emplace_back(g.b, g.e);
        }
      }
      for (auto [b, e] : out)
        if (e > b) next.push_back(piece.substr(b, e - b));
    }
    pieces = std::move(next);
  }
  return pieces;
}

void Tokenizer::Impl::bpe_uncached(const std::string& word, std::vector<int32_t>& out) const {
  // Initial symbols: one per byte (byte-level) or per character.
  std::vector<int32_t> sym;
  sym.reserve(word.size());
  std::string mapped;  // the word as written in the vocab (for ignore_merges)
  if (byte_level_input) {
    const ByteMap& bm = byte_map();
    for (unsigned char b : word) {
      int32_t id = byte_char_id[b];
      ZMLX_CHECK(id >= 0, "tokenizer.json: byte-level vocab has no token for byte 0x{:02X}", b);
      sym.push_back(id);
      if (ignore_merges) mapped += bm.byte_to_char[b];
    }
  } else {
    mapped = word;
    for (size_t i = 0; i < word.size();) {
      size_t st = i;
      utf8_next(word, i);
      auto it = vocab.find(word.substr(st, i - st));
      if (it != vocab.end()) {
        sym.push_back(it->second);
      } else if (byte_fallback && byte_fallback_id[0] >= 0) {
        for (size_t k = st; k < i; ++k) sym.push_back(byte_fallback_id[static_cast<unsigned char>(word[k])]);
      } else if (unk_id) {
        sym.push_back(*unk_id);
      }
    }
  }
  if (ignore_merges) {
    auto it = vocab.find(mapped);
    if (it != vocab.end()) {
      out.push_back(it->second);
      return;
    }
  }
  const size_t n = sym.size();
  if (n <= 1) {
    out.insert(out.end(), sym.begin(), sym.end());
    return;
  }
  // Linked list over the symbols plus a heap of candidate merges ordered by
  // (rank, position); stale heap entries are skipped when popped.
  std::vector<int> prev(n), next(n);
  for (size_t i = 0; i < n; ++i) {
    prev[i] = static_cast<int>(i) - 1;
    next[i] = i + 1 < n ? static_cast<int>(i + 1) : -1;
  }
  struct Cand {
    int32_t rank;
    int pos;
    int32_t left, right;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  auto push = [&](int i) {
    int j = next[i];
    if (i < 0 || j < 0) return;
    auto it = merges.find((uint64_t(uint32_t(sym[i])) << 32) | uint32_t(sym[j]));
    if (it != merges.end()) heap.push({it->second.first, i, sym[i], sym[j]});
  };
  for (size_t i = 0; i + 1 < n; ++i) push(static_cast<int>(i));
  std::vector<uint8_t> alive(n, 1);
  while (!heap.empty()) {
    Cand c = heap.top();
    heap.pop();
    int i = c.pos;
    if (!alive[i] || sym[i] != c.left) continue;
    int j = next[i];
    if (j < 0 || sym[j] != c.right) continue;
    auto it = merges.find((uint64_t(uint32_t(c.left)) << 32) | uint32_t(c.right));
    sym[i] = it->second.second;
    alive[j] = 0;
    next[i] = next[j];
    if (next[j] >= 0) prev[next[j]] = i;
    if (prev[i] >= 0) push(prev[i]);
    push(i);
  }
  for (int i = 0; i >= 0; i = next[i]) out.push_back(sym[i]);
}

void Tokenizer::Impl::bpe_word(const std::string& word, std::vector<int32_t>& out) const {
  if (word.size() > 256) {  // long runs are rare and not worth caching
    bpe_uncached(word, out);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(cache_mu);
    auto it = cache.find(word);
    if (it != cache.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> ids;
  bpe_uncached(word, ids);
  out.insert(out.end(), ids.begin(), ids.end());
  std::lock_guard<std::mutex> lock(cache_mu);
  if (cache.size() > 200000) cache.clear();
  cache.emplace(word, std::move(ids));
}

template <typename Plain>
void Tokenizer::Impl::split_added(std::string_view s,
                                  const std::unordered_map<unsigned char, std::vector<size_t>>& trie,
                                  std::vector<int32_t>& out, Plain&& plain) const {
  if (trie.empty()) {
    plain(s);
    return;
  }
  size_t start_offset = 0;  // end of the previous emitted token
  size_t i = 0;
  while (i < s.size()) {
    auto it = trie.find(static_cast<unsigned char>(s[i]));
    const AddedToken* hit = nullptr;
    if (it != trie.end())
      for (size_t k : it->second) {
        const auto& t = added_tokens[k];
        if (s.compare(i, t.content.size(), t.content) == 0) {
          hit = &t;
          break;
        }
      }
    if (!hit) {
      ++i;
      continue;
    }
    size_t b = i, e = i + hit->content.size();
    i = e;
    if (b < start_offset) continue;  // overlaps a previous token's rstrip
    if (hit->single_word) {
      bool word_before = false, word_after = false;
      if (b > 0) {
        size_t k = b - 1;
        while (k > 0 && (static_cast<unsigned char>(s[k]) & 0xC0) == 0x80) --k;
        size_t kk = k;
        word_before = is_word_char(utf8_next(s, kk));
      }
      if (e < s.size()) {
        size_t k = e;
        word_after = is_word_char(utf8_next(s, k));
      }
      if (word_before || word_after) continue;
    }
    if (hit->lstrip) {
      size_t nb = b;
      while (nb > start_offset) {
        size_t k = nb - 1;
        while (k > 0 && (static_cast<unsigned char>(s[k]) & 0xC0) == 0x80) --k;
        size_t kk = k;
        if (!is_unicode_whitespace(utf8_next(s, kk))) break;
        nb = k;
      }
      b = nb;
    }
    if (hit->rstrip) {
      while (e < s.size()) {
        size_t k = e;
        if (!is_unicode_whitespace(utf8_next(s, k))) break;
        e = k;
      }
      i = e;
    }
    if (b > start_offset) plain(s.substr(start_offset, b - start_offset));
    out.push_back(hit->id);
    start_offset = e;
  }
  if (start_offset < s.size()) plain(s.substr(start_offset));
}

void Tokenizer::Impl::encode_plain(std::string_view s, std::vector<int32_t>& out) const {
  std::string norm = normalize(s);
  split_added(norm, normalized_trie, out, [&](std::string_view seg) {
    for (const auto& word : pre_tokenize(std::string(seg))) bpe_word(word, out);
  });
}

// ---- Tokenizer ----

Tokenizer::Tokenizer() : impl_(std::make_unique<Impl>()) {}
Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

Tokenizer Tokenizer::from_json(const nlohmann::json& tokenizer_json, const nlohmann::json& tokenizer_config) {
  Tokenizer t;
  t.impl_->load(tokenizer_json, tokenizer_config);
  return t;
}

Tokenizer Tokenizer::from_dir(const std::string& dir) {
  std::string tj_path = dir + "/tokenizer.json";
  ZMLX_CHECK(file_exists(tj_path), "{}: not found (a byte-level BPE tokenizer.json is required)", tj_path);
  json tj, cfg = json::object();
  try {
    tj = json::parse(read_file(tj_path));
  } catch (const json::exception& e) {
    fail("{}: invalid JSON: {}", tj_path, e.what());
  }
  std::string cfg_path = dir + "/tokenizer_config.json";
  if (file_exists(cfg_path)) {
    try {
      cfg = json::parse(read_file(cfg_path));
    } catch (const json::exception& e) {
      fail("{}: invalid JSON: {}", cfg_path, e.what());
    }
  }
  Tokenizer t;
  try {
    t.impl_->load(tj, cfg);
  } catch (const json::exception& e) {
    fail("{}: unexpected field type: {}", tj_path, e.what());
  }
  std::string jinja = dir + "/chat_template.jinja";
  if (file_exists(jinja)) t.impl_->chat_template = read_file(jinja);
  return t;
}

std::vector<int32_t> Tokenizer::encode(std::string_view text) const {
  std::vector<int32_t> out;
  std::string valid = utf8_lossy(text);
  impl_->split_added(valid, impl_->raw_trie, out, [&](std::string_view seg) { impl_->encode_plain(seg, out); });
  return out;
}

std::string Tokenizer::token_bytes(int32_t id) const {
  const Impl& m = *impl_;
  ZMLX_CHECK(id >= 0 && id < static_cast<int32_t>(m.id_to_piece.size()), "token id {} out of range [0, {})", id,
             m.id_to_piece.size());
  const std::string& p = m.id_to_piece[id];
  if (m.added[id]) return p;
  if (p.size() == 6 && p.compare(0, 3, "<0x") == 0 && p[5] == '>' && m.byte_fallback)
    return std::string(1, static_cast<char>(std::stoi(p.substr(3, 2), nullptr, 16)));
  if (!m.byte_level_decoder) return p;
  const ByteMap& bm = byte_map();
  std::string out;
  for (size_t i = 0; i < p.size();) {
    size_t st = i;
    char32_t c = utf8_next(p, i);
    auto it = bm.char_to_byte.find(c);
    if (it != bm.char_to_byte.end()) out += static_cast<char>(it->second);
    else out.append(p, st, i - st);
  }
  return out;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special) const {
  std::string bytes;
  for (int32_t id : ids) {
    if (skip_special && is_special(id)) continue;
    bytes += token_bytes(id);
  }
  return utf8_lossy(bytes);
}

std::string Tokenizer::piece(int32_t id) const {
  ZMLX_CHECK(id >= 0 && id < static_cast<int32_t>(impl_->id_to_piece.size()), "token id {} out of range [0, {})",
             id, impl_->id_to_piece.size());
  return impl_->id_to_piece[id];
}

std::optional<int32_t> Tokenizer::token_id(std::string_view token) const {
  for (const auto& t : impl_->added_tokens)
    if (t.content == token) return t.id;
  auto it = impl_->vocab.find(std::string(token));
  if (it == impl_->vocab.end()) return std::nullopt;
  return it->second;
}

bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && id < static_cast<int32_t>(impl_->special.size()) && impl_->special[id];
}

size_t Tokenizer::vocab_size() const { return impl_->id_to_piece.size(); }
const std::string& Tokenizer::chat_template() const { return impl_->chat_template; }
std::optional<std::string> Tokenizer::bos_token() const { return impl_->bos; }
std::optional<std::string> Tokenizer::eos_token() const { return impl_->eos; }

// ---- StreamDecoder ----

StreamDecoder::StreamDecoder(const Tokenizer& tok, bool skip_special) : tok_(&tok), skip_special_(skip_special) {}

std::string StreamDecoder::push(int32_t id) {
  if (skip_special_ && tok_->is_special(id)) return {};
  pending_ += tok_->token_bytes(id);
  // Release everything up to the last complete character; a truncated but
  // still valid sequence at the end waits for the next token.
  size_t i = 0, cut = 0;
  while (i < pending_.size()) {
    int n = utf8_sequence_length(pending_, i);
    if (n < 0) break;
    i += n > 0 ? n : 1;
    if (n == 0)  // invalid: its maximal subpart is decided by utf8_lossy below
      while (i < pending_.size() && (static_cast<unsigned char>(pending_[i]) & 0xC0) == 0x80 &&
             utf8_sequence_length(pending_, i) == 0)
        ++i;
    cut = i;
  }
  std::string out = utf8_lossy(std::string_view(pending_).substr(0, cut));
  pending_.erase(0, cut);
  return out;
}

std::string StreamDecoder::flush() {
  std::string out = utf8_lossy(pending_);
  pending_.clear();
  return out;
}

}  // namespace zmlx::text
