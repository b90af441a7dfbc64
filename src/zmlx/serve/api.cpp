#include "zmlx/serve/api.h"

#include <fmt/format.h>

#include <cmath>

namespace zmlx::serve {

using json = nlohmann::json;
using ojson = nlohmann::ordered_json;

static std::string default_type(int status) {
  if (status == 404) return "not_found_error";
  if (status >= 500) return "server_error";
  return "invalid_request_error";
}

ApiError::ApiError(int s, std::string message, std::string p, std::string c, std::string t)
    : std::runtime_error(std::move(message)), status(s), type(t.empty() ? default_type(s) : std::move(t)),
      param(std::move(p)), code(std::move(c)) {}

json ApiError::body() const {
  json e = {{"message", what()}, {"type", type}, {"param", nullptr}, {"code", nullptr}};
  if (!param.empty()) e["param"] = param;
  if (!code.empty()) e["code"] = code;
  return {{"error", e}};
}

void bad_request(const std::string& message, const std::string& param, const std::string& code) {
  throw ApiError(400, message, param, code);
}

std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }
std::string dump(const ojson& j) { return j.dump(-1, ' ', false, ojson::error_handler_t::replace); }

static const char* type_name(const ojson& v) { return v.type_name(); }

static std::string fmt_type(const char* name, const char* want, const ojson& v) {
  return std::string("'") + name + "' must be " + want + ", got " + type_name(v);
}

// A number outside its range: the bounds as a reader writes them ("0", "2",
// "1048576") and the value as sent. number() and integer() share it.
template <typename T>
[[noreturn]] static void out_of_range(const char* name, T lo, T hi, const ojson& v) {
  bad_request(fmt::format("'{}' must be between {} and {}, got {}", name, lo, hi, v.dump()), name);
}

namespace {

ojson parse_object(const std::string& body) {
  if (body.empty()) bad_request("the request body is empty; send a JSON object", "", "invalid_json");
  ojson j = ojson::parse(body, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) bad_request("the request body is not valid JSON", "", "invalid_json");
  if (!j.is_object())
    bad_request(std::string("the request body must be a JSON object, not ") + type_name(j), "", "invalid_json");
  return j;
}

// Field present and not null.
const ojson* field(const ojson& o, const char* name) {
  auto it = o.find(name);
  if (it == o.end() || it->is_null()) return nullptr;
  return &*it;
}

double number(const ojson& o, const char* name, double lo, double hi) {
  const ojson& v = *field(o, name);
  if (!v.is_number()) bad_request(fmt_type(name, "a number", v), name, "invalid_type");
  double d = v.get<double>();
  if (!std::isfinite(d) || d < lo || d > hi) out_of_range(name, lo, hi, v);
  return d;
}

}  // namespace


static int64_t integer(const ojson& o, const char* name, int64_t lo, int64_t hi) {
  const ojson& v = *field(o, name);
  bool integral = v.is_number_integer() ||
                  (v.is_number_float() && std::isfinite(v.get<double>()) && std::floor(v.get<double>()) == v.get<double>() &&
                   std::fabs(v.get<double>()) < 9e15);
  if (!integral) bad_request(fmt_type(name, "an integer", v), name, "invalid_type");
  int64_t x;
  if (v.is_number_unsigned()) {
    uint64_t u = v.get<uint64_t>();
    x = u > uint64_t(INT64_MAX) ? INT64_MAX : int64_t(u);
  } else if (v.is_number_integer()) {
    x = v.get<int64_t>();
  } else {
    x = int64_t(v.get<double>());
  }
  if (x < lo || x > hi) out_of_range(name, lo, hi, v);
  return x;
}

static bool boolean(const ojson& o, const char* name) {
  const ojson& v = *field(o, name);
  if (!v.is_boolean()) bad_request(fmt_type(name, "a boolean", v), name, "invalid_type");
  return v.get<bool>();
}

static void parse_sampling(const ojson& o, SamplingParams& p) {
  const ojson* m = field(o, "model");
  if (!m) bad_request("'model' is required", "model", "missing_required_parameter");
  if (!m->is_string()) bad_request(fmt_type("model", "a string", *m), "model", "invalid_type");
  p.model = m->get<std::string>();
  if (p.model.empty()) bad_request("'model' must not be empty", "model");

  for (const char* name : {"max_completion_tokens", "max_tokens"})
    if (field(o, name)) {
      p.max_tokens = integer(o, name, 1, kMaxTokensCeiling);
      break;
    }
  if (field(o, "temperature")) {
    p.temperature = float(number(o, "temperature", 0, 2));
    p.temperature_set = true;
  }
  if (field(o, "top_p")) {
    p.top_p = float(number(o, "top_p", 0, 1));
    if (p.top_p <= 0) bad_request("'top_p' must be greater than 0", "top_p");
  }
  if (field(o, "top_k")) {
    int64_t k = integer(o, "top_k", -1, 1 << 24);
    p.top_k = k < 0 ? 0 : int(k);  // -1 means off (vLLM convention)
  }
  if (field(o, "min_p")) p.min_p = float(number(o, "min_p", 0, 1));
  if (field(o, "repetition_penalty")) {
    p.repetition_penalty = float(number(o, "repetition_penalty", 0, 10));
    if (p.repetition_penalty <= 0) bad_request("'repetition_penalty' must be greater than 0", "repetition_penalty");
  }
  if (field(o, "frequency_penalty")) p.frequency_penalty = float(number(o, "frequency_penalty", -2, 2));
  if (field(o, "presence_penalty")) p.presence_penalty = float(number(o, "presence_penalty", -2, 2));
  if (field(o, "seed")) p.seed = uint64_t(integer(o, "seed", INT64_MIN, INT64_MAX));
  if (field(o, "n") && integer(o, "n", 1, 128) != 1) bad_request("only n=1 is supported", "n", "unsupported_value");
  if (const ojson* s = field(o, "stop")) {
    auto add = [&](const ojson& v) {
      if (!v.is_string()) bad_request(fmt_type("stop", "a string or a list of strings", v), "stop", "invalid_type");
      std::string str = v.get<std::string>();
      if (!str.empty()) p.stop.push_back(std::move(str));
    };
    if (s->is_array()) {
      if (s->size() > 16) bad_request("'stop' may hold at most 16 strings", "stop");
      for (auto& v : *s) add(v);
    } else {
      add(*s);
    }
  }
  if (field(o, "stream")) p.stream = boolean(o, "stream");
  if (const ojson* so = field(o, "stream_options")) {
    if (!so->is_object()) bad_request(fmt_type("stream_options", "an object", *so), "stream_options", "invalid_type");
    if (field(*so, "include_usage")) {
      const ojson& v = (*so)["include_usage"];
      if (!v.is_boolean())
        bad_request(fmt_type("stream_options.include_usage", "a boolean", v), "stream_options.include_usage",
                    "invalid_type");
      p.include_usage = v.get<bool>();
    }
  }
}

static std::string message_content(const ojson& m, size_t i, const std::string& role) {
  std::string param = "messages[" + std::to_string(i) + "].content";
  auto it = m.find("content");
  if (it == m.end() || it->is_null()) {
    if (role == "assistant") return "";  // e.g. an assistant turn that only called tools
    bad_request("'" + param + "' is required", param, "missing_required_parameter");
  }
  if (it->is_string()) return it->get<std::string>();
  if (it->is_array()) {
    std::string text;
    for (size_t k = 0; k < it->size(); ++k) {
      const ojson& part = (*it)[k];
      std::string pp = param + "[" + std::to_string(k) + "]";
      if (!part.is_object()) bad_request(fmt_type(pp.c_str(), "an object", part), pp, "invalid_type");
      auto t = part.find("type");
      if (t == part.end() || !t->is_string()) bad_request("'" + pp + ".type' must be a string", pp + ".type", "invalid_type");
      if (*t != "text") bad_request("only text content parts are supported, got '" + t->get<std::string>() + "'", pp + ".type", "unsupported_value");
      auto tx = part.find("text");
      if (tx == part.end() || !tx->is_string()) bad_request("'" + pp + ".text' must be a string", pp + ".text", "invalid_type");
      text += tx->get<std::string>();
    }
    return text;
  }
  bad_request(fmt_type(param.c_str(), "a string or a list of content parts", *it), param, "invalid_type");
}

ChatRequest parse_chat_request(const std::string& body) {
  ojson o = parse_object(body);
  ChatRequest r;
  parse_sampling(o, r);
  const ojson* msgs = field(o, "messages");
  if (!msgs) bad_request("'messages' is required", "messages", "missing_required_parameter");
  if (!msgs->is_array()) bad_request(fmt_type("messages", "an array", *msgs), "messages", "invalid_type");
  if (msgs->empty()) bad_request("'messages' must contain at least one message", "messages", "empty_array");
  r.messages = ojson::array();
  for (size_t i = 0; i < msgs->size(); ++i) {
    const ojson& m = (*msgs)[i];
    std::string p = "messages[" + std::to_string(i) + "]";
    if (!m.is_object()) bad_request(fmt_type(p.c_str(), "an object", m), p, "invalid_type");
    auto role = m.find("role");
    if (role == m.end() || role->is_null()) bad_request("'" + p + ".role' is required", p + ".role", "missing_required_parameter");
    if (!role->is_string()) bad_request(fmt_type((p + ".role").c_str(), "a string", *role), p + ".role", "invalid_type");
    std::string rs = role->get<std::string>();
    if (rs == "developer") rs = "system";
    if (rs != "system" && rs != "user" && rs != "assistant" && rs != "tool")
      bad_request("'" + p + ".role' must be one of system, developer, user, assistant, tool; got '" + rs + "'",
                  p + ".role");
    ojson nm = ojson::object();
    nm["role"] = rs;
    nm["content"] = message_content(m, i, rs);
    r.messages.push_back(std::move(nm));
  }
  if (const ojson* kw = field(o, "chat_template_kwargs")) {
    if (!kw->is_object())
      bad_request(fmt_type("chat_template_kwargs", "an object", *kw), "chat_template_kwargs", "invalid_type");
    r.template_kwargs = *kw;
  }
  return r;
}

CompletionRequest parse_completion_request(const std::string& body) {
  ojson o = parse_object(body);
  CompletionRequest r;
  parse_sampling(o, r);
  const ojson* p = field(o, "prompt");
  if (!p) bad_request("'prompt' is required", "prompt", "missing_required_parameter");
  auto ids_of = [&](const ojson& arr) {
    std::vector<int32_t> ids;
    for (auto& v : arr) {
      if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > INT32_MAX)
        bad_request("'prompt' token ids must be non-negative integers", "prompt", "invalid_type");
      ids.push_back(int32_t(v.get<int64_t>()));
    }
    return ids;
  };
  if (p->is_string()) {
    r.prompt = p->get<std::string>();
  } else if (p->is_array() && p->size() == 1 && (*p)[0].is_string()) {
    r.prompt = (*p)[0].get<std::string>();
  } else if (p->is_array() && !p->empty() && (*p)[0].is_number()) {
    r.prompt_ids = ids_of(*p);
  } else if (p->is_array() && p->size() == 1 && (*p)[0].is_array()) {
    r.prompt_ids = ids_of((*p)[0]);
  } else if (p->is_array() && p->size() > 1) {
    bad_request("only one prompt per request is supported", "prompt", "unsupported_value");
  } else {
    bad_request(fmt_type("prompt", "a string (or a list of token ids)", *p), "prompt", "invalid_type");
  }
  if (r.prompt_ids && r.prompt_ids->empty()) bad_request("'prompt' must not be empty", "prompt");
  if (!r.prompt_ids && r.prompt.empty()) bad_request("'prompt' must not be empty", "prompt");
  if (field(o, "echo") && boolean(o, "echo")) bad_request("echo=true is not supported", "echo", "unsupported_value");
  return r;
}

json parse_json_object(const std::string& body) {
  if (body.empty()) bad_request("the request body is empty; send a JSON object", "", "invalid_json");
  json j = json::parse(body, nullptr, false);
  if (j.is_discarded()) bad_request("the request body is not valid JSON", "", "invalid_json");
  if (!j.is_object()) bad_request(std::string("the request body must be a JSON object, not ") + j.type_name(), "", "invalid_json");
  return j;
}

}  // namespace zmlx::serve
