// ModelConfig: config.json read into typed fields, with errors that name the
// file and the field. Fields shared by every family are typed members;
// family-specific ones are read through the typed getters, so a missing or
// mistyped field is always a clear error.
#pragma once
#include <nlohmann/json.hpp>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "zmlx/dist/placement.h"
#include "zmlx/quant/affine.h"

namespace zmlx {

// config["quantization"]: the global {group_size, bits} plus per-module
// overrides keyed by module path (a value of false means "not quantized").
struct QuantConfig {
  bool present = false;
  quant::QuantParams global;
  std::map<std::string, quant::QuantParams> overrides;
  std::map<std::string, bool> disabled;
  // The parameters the config prescribes for a module path.
  std::optional<quant::QuantParams> for_module(const std::string& path) const;
};

struct ModelConfig {
  std::string dir, path;  // model directory and config.json path
  nlohmann::json raw;
  std::string model_type;

  int64_t hidden_size = 0, num_hidden_layers = 0, vocab_size = 0;
  int64_t num_attention_heads = 0, num_key_value_heads = 0, head_dim = 0;
  int64_t intermediate_size = 0, max_position_embeddings = 0;
  float rms_norm_eps = 1e-6f, rope_theta = 10000.f;
  bool tie_word_embeddings = false;
  std::vector<int32_t> eos_token_ids;  // generation_config.json, else config.json
  std::optional<int32_t> bos_token_id;
  QuantConfig quant;
  // Multi-process runs: this rank's place (set by load_model; none by default).
  dist::Placement parallel;

  // Typed getters for family-specific fields; throw zmlx::Error naming the
  // file, the field and what was expected vs found.
  int64_t get_int(const std::string& key) const;
  int64_t get_int(const std::string& key, int64_t fallback) const;
  double get_float(const std::string& key) const;
  double get_float(const std::string& key, double fallback) const;
  bool get_bool(const std::string& key, bool fallback) const;
  std::string get_string(const std::string& key, const std::string& fallback) const;
  std::vector<int64_t> get_int_list(const std::string& key) const;  // missing -> empty
  bool has(const std::string& key) const;
  // Throws unless lo <= v <= hi (for sanity checks on sizes).
  void check_range(const std::string& key, int64_t v, int64_t lo, int64_t hi) const;
  // Grouped-query attention's shape: num_attention_heads a multiple of
  // num_key_value_heads, and an even head_dim (RoPE rotates pairs).
  void check_gqa_heads() const;
};

// Reads <dir>/config.json (+ generation_config.json for the EOS set).
ModelConfig load_config(const std::string& dir);
ModelConfig parse_config(const nlohmann::json& j, const std::string& dir, const std::string& path);

}  // namespace zmlx
