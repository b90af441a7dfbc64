// Renders Hugging Face chat templates (the Jinja subset real templates use).
#pragma once
#include <nlohmann/json.hpp>

#include <memory>
#include <string>

namespace zmlx::text {

class Tokenizer;

class ChatTemplate {
 public:
  // Parses the template; a construct the renderer does not support is a
  // zmlx::Error naming the construct and its line.
  explicit ChatTemplate(const std::string& source);
  ~ChatTemplate();
  ChatTemplate(ChatTemplate&&) noexcept;
  ChatTemplate& operator=(ChatTemplate&&) noexcept;

  // `context` holds the template variables: messages, add_generation_prompt,
  // tools, bos_token, eos_token, enable_thinking, ...
  std::string render(const nlohmann::json& context) const;
  // Same, keeping the context's key order (what `tojson` prints follows it,
  // as Python dicts do); prefer this for JSON read from files.
  std::string render(const nlohmann::ordered_json& context) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The prompt text for `messages` (a JSON array of {role, content, ...}) with
// the tokenizer's own template; `extra` adds/overrides variables
// (e.g. {"enable_thinking": false}, {"tools": [...]}).
std::string apply_chat_template(const Tokenizer& tok, const nlohmann::json& messages,
                                bool add_generation_prompt,
                                const nlohmann::json& extra = nlohmann::json::object());
// Same with key order preserved (tools' JSON schemas print in file order).
std::string apply_chat_template(const Tokenizer& tok, const nlohmann::ordered_json& messages,
                                bool add_generation_prompt, const nlohmann::ordered_json& extra);

// Writes tokenizer.json, tokenizer_config.json (with chat_template) and
// special_tokens_map.json for a synthetic model of `family` ("qwen3_moe",
// "glm4_moe_lite", "lfm2_moe", "qwen3", ...): a small valid byte-level BPE
// vocabulary plus the family's special tokens at their real ids, so that a
// synthetic model with `vocab_size` rows chats like the real one.
void write_synthetic_tokenizer(const std::string& dir, const std::string& family,
                               int64_t vocab_size);

}  // namespace zmlx::text
