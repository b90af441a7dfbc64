#include "zmlx/text/unicode.h"

#include <algorithm>
#include <unordered_map>

namespace zmlx::text {

int utf8_sequence_length(std::string_view s, size_t i) {
  auto b0 = static_cast<unsigned char>(s[i]);
  if (b0 < 0x80) return 1;
  int n;
  unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    n = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    n = 3;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    n = 4;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  for (int k = 1; k < n; ++k) {
    if (i + k >= s.size()) return -1;
    auto b = static_cast<unsigned char>(s[i + k]);
    unsigned char l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
    if (b < l || b > h) return 0;
  }
  return n;
}

char32_t utf8_next(std::string_view s, size_t& i) {
  int n = utf8_sequence_length(s, i);
  if (n <= 0) {
    ++i;
    return 0xFFFD;
  }
  auto b0 = static_cast<unsigned char>(s[i]);
  char32_t cp = n == 1 ? b0 : n == 2 ? (b0 & 0x1F) : n == 3 ? (b0 & 0x0F) : (b0 & 0x07);
  for (int k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  i += n;
  return cp;
}

void utf8_append(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

std::vector<char32_t> utf8_to_codepoints(std::string_view s) {
  std::vector<char32_t> out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) out.push_back(utf8_next(s, i));
  return out;
}

std::string codepoints_to_utf8(const std::vector<char32_t>& cps) {
  std::string out;
  out.reserve(cps.size());
  for (char32_t c : cps) utf8_append(out, c);
  return out;
}

std::string utf8_lossy(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    int n = utf8_sequence_length(s, i);
    if (n > 0) {
      out.append(s.substr(i, n));
      i += n;
      continue;
    }
    // Maximal subpart: the lead byte plus the continuation bytes that were
    // still valid for it form one replaced unit.
    size_t j = i + 1;
    auto b0 = static_cast<unsigned char>(s[i]);
    if (b0 >= 0xC2 && b0 <= 0xF4) {
      unsigned char lo = 0x80, hi = 0xBF;
      if (b0 == 0xE0) lo = 0xA0;
      if (b0 == 0xED) hi = 0x9F;
      if (b0 == 0xF0) lo = 0x90;
      if (b0 == 0xF4) hi = 0x8F;
      int need = b0 <= 0xDF ? 1 : b0 <= 0xEF ? 2 : 3;
      for (int k = 0; k < need && j < s.size(); ++k, ++j) {
        auto b = static_cast<unsigned char>(s[j]);
        if (b < (k == 0 ? lo : 0x80) || b > (k == 0 ? hi : 0xBF)) break;
      }
    }
    out += "\xEF\xBF\xBD";
    i = j;
  }
  return out;
}

bool is_unicode_whitespace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
         c == 0x205F || c == 0x3000;
}

namespace {

constexpr char32_t kHangulS = 0xAC00, kHangulL = 0x1100, kHangulV = 0x1161, kHangulT = 0x11A7;
constexpr int kHangulLCount = 19, kHangulVCount = 21, kHangulTCount = 28;
constexpr int kHangulNCount = kHangulVCount * kHangulTCount, kHangulSCount = kHangulLCount * kHangulNCount;

struct Tables {
  std::unordered_map<char32_t, std::pair<char32_t, char32_t>> decomposition;
  std::unordered_map<uint64_t, char32_t> composition;
  Tables() {
    using namespace detail;
    decomposition.reserve(kCanonicalDecompositionCount);
    for (size_t i = 0; i < kCanonicalDecompositionCount; ++i) {
      const auto& d = kCanonicalDecompositions[i];
      decomposition[d.cp] = {d.first, d.second};
      if (d.composable) composition[(uint64_t(d.first) << 32) | d.second] = d.cp;
    }
  }
};

const Tables& tables() {
  static const Tables t;
  return t;
}

uint8_t combining_class(char32_t c) {
  if (c < 0x300) return 0;
  using namespace detail;
  const CombiningClassRun* end = kCombiningClassRuns + kCombiningClassRunCount;
  auto it = std::upper_bound(kCombiningClassRuns, end, c,
                             [](char32_t v, const CombiningClassRun& r) { return v < r.first; });
  if (it == kCombiningClassRuns) return 0;
  --it;
  return c <= it->last ? it->ccc : 0;
}

void decompose_into(char32_t c, std::vector<char32_t>& out, const Tables& t) {
  if (c >= kHangulS && c < kHangulS + kHangulSCount) {
    int s = static_cast<int>(c - kHangulS);
    out.push_back(kHangulL + s / kHangulNCount);
    out.push_back(kHangulV + (s % kHangulNCount) / kHangulTCount);
    if (s % kHangulTCount) out.push_back(kHangulT + s % kHangulTCount);
    return;
  }
  auto it = t.decomposition.find(c);
  if (it == t.decomposition.end()) {
    out.push_back(c);
    return;
  }
  decompose_into(it->second.first, out, t);
  if (it->second.second) decompose_into(it->second.second, out, t);
}

// Full canonical decomposition followed by canonical ordering.
std::vector<char32_t> canonical_decompose(std::string_view s) {
  const Tables& t = tables();
  std::vector<char32_t> out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) decompose_into(utf8_next(s, i), out, t);
  // Stable sort each run of non-starters by combining class.
  size_t i = 0;
  while (i < out.size()) {
    if (combining_class(out[i]) == 0) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < out.size() && combining_class(out[j]) != 0) ++j;
    if (j - i > 1)
      std::stable_sort(out.begin() + i, out.begin() + j, [](char32_t a, char32_t b) {
        return combining_class(a) < combining_class(b);
      });
    i = j;
  }
  return out;
}

bool needs_normalization(std::string_view s) {
  for (char c : s)
    if (static_cast<unsigned char>(c) >= 0x80) return true;
  return false;
}

}  // namespace

std::string nfd(std::string_view s) {
  if (!needs_normalization(s)) return std::string(s);
  return codepoints_to_utf8(canonical_decompose(s));
}

std::string nfc(std::string_view s) {
  if (!needs_normalization(s)) return std::string(s);
  const Tables& t = tables();
  std::vector<char32_t> d = canonical_decompose(s);
  std::vector<char32_t> out;
  out.reserve(d.size());
  long starter = -1;        // index in `out` of the last starter
  int last_ccc = -1;        // class of the last char appended after the starter
  for (char32_t c : d) {
    int cc = combining_class(c);
    if (starter >= 0) {
      char32_t st = out[starter];
      bool blocked = last_ccc != -1 && (last_ccc == 0 || last_ccc >= cc);
      if (!blocked) {
        // Hangul L+V and LV+T.
        if (st >= kHangulL && st < kHangulL + kHangulLCount && c >= kHangulV &&
            c < kHangulV + kHangulVCount && last_ccc == -1) {
          out[starter] = kHangulS + ((st - kHangulL) * kHangulVCount + (c - kHangulV)) * kHangulTCount;
          continue;
        }
        if (st >= kHangulS && st < kHangulS + kHangulSCount && (st - kHangulS) % kHangulTCount == 0 &&
            c > kHangulT && c < kHangulT + kHangulTCount && last_ccc == -1) {
          out[starter] = st + (c - kHangulT);
          continue;
        }
        auto it = t.composition.find((uint64_t(st) << 32) | c);
        if (it != t.composition.end()) {
          out[starter] = it->second;
          continue;
        }
      }
    }
    out.push_back(c);
    if (cc == 0) {
      starter = static_cast<long>(out.size()) - 1;
      last_ccc = -1;
    } else {
      last_ccc = cc;
    }
  }
  return codepoints_to_utf8(out);
}

}  // namespace zmlx::text
