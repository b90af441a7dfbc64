// The OpenAI-compatible request types and their validation. Parsing never
// trusts the body: every field is checked for presence, type and range, and
// a problem becomes an ApiError (status + OpenAI's error shape) that names
// the offending parameter.
#pragma once
#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace zmlx::serve {

struct ApiError : std::runtime_error {
  int status;
  std::string type, param, code;
  ApiError(int status, std::string message, std::string param = "", std::string code = "",
           std::string type = "");
  // {"error": {"message", "type", "param", "code"}}
  nlohmann::json body() const;
};

// Shorthand for the common case.
[[noreturn]] void bad_request(const std::string& message, const std::string& param = "",
                              const std::string& code = "invalid_value");

// Hard ceiling on max_tokens before the per-model context check.
constexpr int64_t kMaxTokensCeiling = 1 << 20;

struct SamplingParams {
  std::string model;
  std::optional<int64_t> max_tokens;  // absent: the server picks (bounded by the context)
  float temperature = 1.f;            // OpenAI's default
  bool temperature_set = false;
  float top_p = 1.f, min_p = 0.f, repetition_penalty = 1.f;
  float frequency_penalty = 0.f, presence_penalty = 0.f;  // OpenAI's, over the output
  int top_k = 0;
  std::optional<uint64_t> seed;
  std::vector<std::string> stop;
  bool stream = false, include_usage = false;
};

struct ChatRequest : SamplingParams {
  // Normalised: [{role, content (string)}, ...], keys in order.
  nlohmann::ordered_json messages;
  nlohmann::ordered_json template_kwargs = nlohmann::ordered_json::object();
};

struct CompletionRequest : SamplingParams {
  std::string prompt;
  std::optional<std::vector<int32_t>> prompt_ids;  // prompt given as token ids
};

// Throws ApiError (400) for malformed JSON, wrong types, missing fields and
// out-of-range values.
ChatRequest parse_chat_request(const std::string& body);
CompletionRequest parse_completion_request(const std::string& body);

// A JSON object body (e.g. POST /instance); throws ApiError when it is not one.
nlohmann::json parse_json_object(const std::string& body);

// JSON text safe for any bytes (invalid UTF-8 becomes U+FFFD).
std::string dump(const nlohmann::json& j);
std::string dump(const nlohmann::ordered_json& j);

}  // namespace zmlx::serve
