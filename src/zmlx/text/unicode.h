// UTF-8 helpers and Unicode canonical normalization (NFC / NFD) for the
// tokenizer's normalizer. Tables come from nfc_tables.cpp (generated).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace zmlx::text {

// Decodes one code point at s[i], advancing i. Invalid bytes decode to
// U+FFFD and advance by one byte.
char32_t utf8_next(std::string_view s, size_t& i);
void utf8_append(std::string& out, char32_t cp);
std::vector<char32_t> utf8_to_codepoints(std::string_view s);
std::string codepoints_to_utf8(const std::vector<char32_t>& cps);

// Length of the UTF-8 sequence at s[i] when it is complete and valid;
// 0 when invalid; -1 when it is a valid but truncated prefix (s ends early).
int utf8_sequence_length(std::string_view s, size_t i);

// Replaces every maximal invalid subsequence by U+FFFD (as Rust's
// String::from_utf8_lossy and the WHATWG TextDecoder do).
std::string utf8_lossy(std::string_view s);

bool is_unicode_whitespace(char32_t c);  // the White_Space property

std::string nfc(std::string_view s);
std::string nfd(std::string_view s);

namespace detail {
struct CanonicalDecomposition {
  uint32_t cp, first, second;  // second == 0: singleton
  uint8_t composable;          // 1: (first, second) composes back to cp
};
struct CombiningClassRun {
  uint32_t first, last;
  uint8_t ccc;
};
extern const CanonicalDecomposition kCanonicalDecompositions[];
extern const size_t kCanonicalDecompositionCount;
extern const CombiningClassRun kCombiningClassRuns[];
extern const size_t kCombiningClassRunCount;
}  // namespace detail

}  // namespace zmlx::text
