// Byte-level BPE tokenizer read from a checkpoint's tokenizer.json (+
// tokenizer_config.json), producing exactly the ids Hugging Face tokenizers
// produce.
#pragma once
#include <nlohmann/json.hpp>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace zmlx::text {

class Tokenizer {
 public:
  // Reads <dir>/tokenizer.json and, if present, <dir>/tokenizer_config.json
  // and <dir>/chat_template.jinja. Errors name the file and field.
  static Tokenizer from_dir(const std::string& dir);
  static Tokenizer from_json(const nlohmann::json& tokenizer_json,
                             const nlohmann::json& tokenizer_config = nlohmann::json::object());

  Tokenizer();
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  // Special/added tokens in the text are matched first (as HF does).
  std::vector<int32_t> encode(std::string_view text) const;
  std::string decode(const std::vector<int32_t>& ids, bool skip_special = false) const;
  // Raw bytes the token stands for (byte-level decoded); specials give their text.
  std::string token_bytes(int32_t id) const;
  // The vocabulary string as written in tokenizer.json (e.g. "Ġhello").
  std::string piece(int32_t id) const;
  std::optional<int32_t> token_id(std::string_view token) const;
  bool is_special(int32_t id) const;
  size_t vocab_size() const;  // highest id + 1

  // From tokenizer_config.json (empty / nullopt when absent).
  const std::string& chat_template() const;
  std::optional<std::string> bos_token() const;
  std::optional<std::string> eos_token() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Streams decoded text, releasing bytes only at UTF-8 character boundaries so
// a streamed reply never shows a broken character.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tok, bool skip_special = true);
  std::string push(int32_t id);  // the newly completed text (may be empty)
  std::string flush();           // whatever remains (invalid tail as U+FFFD)
 private:
  const Tokenizer* tok_;
  bool skip_special_;
  std::string pending_;
};

}  // namespace zmlx::text
