#include "zmlx/models/config.h"

#include <filesystem>
#include <fstream>

#include "zmlx/core/error.h"

namespace zmlx {

namespace fs = std::filesystem;
using nlohmann::json;

std::optional<quant::QuantParams> QuantConfig::for_module(const std::string& path) const {
  if (!present) return std::nullopt;
  if (auto it = disabled.find(path); it != disabled.end()) return std::nullopt;
  if (auto it = overrides.find(path); it != overrides.end()) return it->second;
  return global;
}

static const char* json_type(const json& v) { return v.type_name(); }

int64_t ModelConfig::get_int(const std::string& key) const {
  ZMLX_CHECK(raw.contains(key), "{}: missing field '{}' (required for model_type '{}')", path, key,
             model_type);
  const json& v = raw[key];
  ZMLX_CHECK(v.is_number_integer() || (v.is_number_float() && v.get<double>() == double(int64_t(v.get<double>()))),
             "{}: field '{}' must be an integer, found {} ({})", path, key, json_type(v), v.dump());
  return v.is_number_integer() ? v.get<int64_t>() : int64_t(v.get<double>());
}
int64_t ModelConfig::get_int(const std::string& key, int64_t fallback) const {
  if (!raw.contains(key) || raw[key].is_null()) return fallback;
  return get_int(key);
}
double ModelConfig::get_float(const std::string& key) const {
  ZMLX_CHECK(raw.contains(key), "{}: missing field '{}'", path, key);
  const json& v = raw[key];
  ZMLX_CHECK(v.is_number(), "{}: field '{}' must be a number, found {} ({})", path, key, json_type(v),
             v.dump());
  return v.get<double>();
}
double ModelConfig::get_float(const std::string& key, double fallback) const {
  if (!raw.contains(key) || raw[key].is_null()) return fallback;
  return get_float(key);
}
bool ModelConfig::get_bool(const std::string& key, bool fallback) const {
  if (!raw.contains(key) || raw[key].is_null()) return fallback;
  const json& v = raw[key];
  ZMLX_CHECK(v.is_boolean(), "{}: field '{}' must be true or false, found {}", path, key, v.dump());
  return v.get<bool>();
}
std::string ModelConfig::get_string(const std::string& key, const std::string& fallback) const {
  if (!raw.contains(key) || raw[key].is_null()) return fallback;
  const json& v = raw[key];
  ZMLX_CHECK(v.is_string(), "{}: field '{}' must be a string, found {}", path, key, v.dump());
  return v.get<std::string>();
}
std::vector<int64_t> ModelConfig::get_int_list(const std::string& key) const {
  std::vector<int64_t> out;
  if (!raw.contains(key) || raw[key].is_null()) return out;
  const json& v = raw[key];
  ZMLX_CHECK(v.is_array(), "{}: field '{}' must be a list of integers, found {}", path, key, v.dump());
  for (auto& e : v) {
    ZMLX_CHECK(e.is_number_integer(), "{}: field '{}' must hold integers, found {}", path, key, e.dump());
    out.push_back(e.get<int64_t>());
  }
  return out;
}
bool ModelConfig::has(const std::string& key) const { return raw.contains(key) && !raw[key].is_null(); }
void ModelConfig::check_range(const std::string& key, int64_t v, int64_t lo, int64_t hi) const {
  ZMLX_CHECK(v >= lo && v <= hi, "{}: field '{}' = {} is outside the sane range [{}, {}]", path, key, v,
             lo, hi);
}

void ModelConfig::check_gqa_heads() const {
  ZMLX_CHECK(num_key_value_heads > 0 && num_attention_heads % num_key_value_heads == 0,
             "{}: num_attention_heads {} is not a multiple of num_key_value_heads {}", path, num_attention_heads,
             num_key_value_heads);
  ZMLX_CHECK(head_dim % 2 == 0, "{}: head_dim {} must be even for RoPE", path, head_dim);
}

static quant::QuantParams parse_qparams(const json& j, const std::string& where) {
  ZMLX_CHECK(j.is_object(), "{}: expected an object with group_size and bits, found {}", where, j.dump());
  ZMLX_CHECK(j.contains("bits") && j["bits"].is_number_integer(), "{}: 'bits' missing or not an integer",
             where);
  ZMLX_CHECK(j.contains("group_size") && j["group_size"].is_number_integer(),
             "{}: 'group_size' missing or not an integer", where);
  quant::QuantParams p{int(j["bits"].get<int64_t>()), int(j["group_size"].get<int64_t>())};
  ZMLX_CHECK(quant::supported(p), "{}: bits={} group_size={} unsupported (bits 2/4/8, group 32/64/128)",
             where, p.bits, p.group_size);
  if (j.contains("mode")) {
    ZMLX_CHECK(j["mode"] == "affine", "{}: quantization mode {} unsupported (only \"affine\")", where,
               j["mode"].dump());
  }
  return p;
}

static std::vector<int32_t> parse_id_list(const json& v, const std::string& where) {
  std::vector<int32_t> out;
  if (v.is_number_integer()) out.push_back(v.get<int32_t>());
  else if (v.is_array())
    for (auto& e : v) {
      ZMLX_CHECK(e.is_number_integer(), "{}: expected integer token ids, found {}", where, e.dump());
      out.push_back(e.get<int32_t>());
    }
  else if (!v.is_null())
    fail("{}: expected an integer or a list of integers, found {}", where, v.dump());
  return out;
}

ModelConfig parse_config(const json& j, const std::string& dir, const std::string& path) {
  ModelConfig c;
  c.dir = dir;
  c.path = path;
  ZMLX_CHECK(j.is_object(), "{}: top level must be a JSON object", path);
  c.raw = j;
  c.model_type = c.get_string("model_type", "");
  ZMLX_CHECK(!c.model_type.empty(), "{}: missing field 'model_type'", path);
  c.hidden_size = c.get_int("hidden_size");
  c.check_range("hidden_size", c.hidden_size, 8, 1 << 16);
  c.num_hidden_layers = c.get_int("num_hidden_layers");
  c.check_range("num_hidden_layers", c.num_hidden_layers, 1, 1024);
  c.vocab_size = c.get_int("vocab_size");
  c.check_range("vocab_size", c.vocab_size, 2, 1 << 24);
  c.num_attention_heads = c.get_int("num_attention_heads");
  c.check_range("num_attention_heads", c.num_attention_heads, 1, 1024);
  c.num_key_value_heads = c.get_int("num_key_value_heads", c.num_attention_heads);
  c.check_range("num_key_value_heads", c.num_key_value_heads, 1, c.num_attention_heads);
  c.head_dim = c.get_int("head_dim", c.hidden_size / c.num_attention_heads);
  c.intermediate_size = c.get_int("intermediate_size", 0);
  c.max_position_embeddings = c.get_int("max_position_embeddings", 1 << 20);
  c.rms_norm_eps = float(c.get_float("rms_norm_eps", c.get_float("norm_eps", 1e-6)));
  double theta = c.get_float("rope_theta", 0.0);
  if (theta == 0.0 && c.raw.contains("rope_parameters") && c.raw["rope_parameters"].is_object() &&
      c.raw["rope_parameters"].contains("rope_theta"))
    theta = c.raw["rope_parameters"]["rope_theta"].get<double>();
  c.rope_theta = float(theta == 0.0 ? 10000.0 : theta);
  c.tie_word_embeddings = c.get_bool("tie_word_embeddings", false);
  if (j.contains("bos_token_id") && j["bos_token_id"].is_number_integer())
    c.bos_token_id = j["bos_token_id"].get<int32_t>();
  if (j.contains("eos_token_id")) c.eos_token_ids = parse_id_list(j["eos_token_id"], path + ": eos_token_id");

  const char* qkey = j.contains("quantization") ? "quantization"
                     : j.contains("quantization_config") ? "quantization_config" : nullptr;
  if (qkey && !j[qkey].is_null()) {
    const json& q = j[qkey];
    std::string where = fmt::format("{}: {}", path, qkey);
    c.quant.present = true;
    c.quant.global = parse_qparams(q, where);
    for (auto& [k, v] : q.items()) {
      if (k == "bits" || k == "group_size" || k == "mode" || k == "quant_method") continue;
      if (v.is_boolean()) {
        if (!v.get<bool>()) c.quant.disabled[k] = true;
      } else if (v.is_object()) {
        c.quant.overrides[k] = parse_qparams(v, where + "." + k);
      }
    }
  }
  return c;
}

static json read_json_file(const std::string& path) {
  std::ifstream f(path);
  ZMLX_CHECK(f.good(), "cannot open {}", path);
  try {
    return json::parse(f);
  } catch (const json::parse_error& e) {
    fail("{}: invalid JSON: {}", path, e.what());
  }
}

ModelConfig load_config(const std::string& dir) {
  std::string path = (fs::path(dir) / "config.json").string();
  ZMLX_CHECK(fs::exists(path), "{}: no config.json in this directory", dir);
  ModelConfig c = parse_config(read_json_file(path), dir, path);
  std::string gen = (fs::path(dir) / "generation_config.json").string();
  if (fs::exists(gen)) {
    json g = read_json_file(gen);
    if (g.is_object() && g.contains("eos_token_id")) {
      auto ids = parse_id_list(g["eos_token_id"], gen + ": eos_token_id");
      if (!ids.empty()) c.eos_token_ids = ids;
    }
  }
  return c;
}

}  // namespace zmlx
