// A compiled PCRE2 pattern (UTF + UCP) used by the pre-tokenizer, with the
// `\s` class rewritten to Oniguruma's (the Unicode White_Space property),
// which is what Hugging Face tokenizers use.
#pragma once
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace zmlx::text {

class Regex {
 public:
  explicit Regex(const std::string& pattern);  // throws zmlx::Error naming the pattern
  ~Regex();
  Regex(Regex&&) noexcept;
  Regex& operator=(Regex&&) noexcept;

  // Non-overlapping matches, left to right, as [begin, end) byte offsets.
  // `text` must be valid UTF-8.
  std::vector<std::pair<size_t, size_t>> find_all(std::string_view text) const;
  const std::string& pattern() const { return pattern_; }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::string pattern_;
};

// Rewrites `\s` / `\S` into explicit White_Space classes (PCRE2's UCP `\s`
// also matches U+180E, Oniguruma's does not).
std::string oniguruma_compatible_pattern(const std::string& pattern);

}  // namespace zmlx::text
