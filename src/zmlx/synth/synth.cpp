#include "zmlx/synth/synth.h"

#include <nlohmann/json.hpp>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <numeric>
#include <map>
#include <mutex>

#include "zmlx/core/dtype.h"
#include "zmlx/core/error.h"
#include "zmlx/io/safetensors.h"
#include "zmlx/quant/affine.h"
#include "zmlx/text/chat_template.h"
#include "zmlx/text/tokenizer.h"

namespace zmlx::synth {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// ------------------------------------------------------------------ random

struct SplitMix {
  uint64_t s;
  explicit SplitMix(uint64_t seed) : s(seed) {}
  uint64_t next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  float uniform() { return float(next() >> 40) * (1.0f / 16777216.0f); }  // [0, 1)
  float normal() {  // Irwin–Hall approximation: cheap and deterministic
    float s4 = uniform() + uniform() + uniform() + uniform();
    return (s4 - 2.0f) * 1.7320508f;
  }
};

uint64_t hash_str(const std::string& s, uint64_t seed) {
  uint64_t h = 1469598103934665603ull ^ (seed * 0x9e3779b97f4a7c15ull);
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

// ------------------------------------------------------------------ plan

// How a module's values are produced.
enum class Kind { Random, Embedding, LmHeadFromEmbedding, Norm, F32Vector };  // F32Vector: tensor named `path` exactly

struct ModulePlan {
  std::string path;
  Kind kind = Kind::Random;
  int64_t experts = 0, rows = 0, cols = 0;
  float std = 0.02f;            // Random / Embedding: target std of the values
  int bits = 4, group = 64;     // bits 0: dense bf16
  std::string embed_path;       // LmHeadFromEmbedding
  float beta = 0, noise = 0;    // LmHeadFromEmbedding: beta·embed[π(v)] + noise
  std::vector<int32_t> usable;  // LmHeadFromEmbedding: ids π permutes (others: noise only)
};

struct Plan {
  json config;
  std::vector<ModulePlan> modules;
  std::string family;
};

// Appends module plans with the scaling rules every family shares: inputs
// project with std 1/sqrt(fan_in); blocks write back into the residual with
// `gamma` of its size, so the current token's embedding stays dominant.
struct PlanBuilder {
  Plan& p;
  int bits, group;
  static constexpr float gamma = 0.05f;

  void linear(std::string path, int64_t rows, int64_t cols, float std, int64_t experts = 0, int b = -1) {
    ModulePlan m;
    m.path = std::move(path);
    m.rows = rows;
    m.cols = cols;
    m.std = std;
    m.experts = experts;
    m.bits = b < 0 ? bits : b;
    m.group = group;
    p.modules.push_back(m);
  }
  void input_proj(std::string path, int64_t rows, int64_t cols, int64_t experts = 0) {
    linear(std::move(path), rows, cols, 1.0f / std::sqrt(float(cols)), experts);
  }
  void output_proj(std::string path, int64_t rows, int64_t cols, int64_t experts = 0) {
    linear(std::move(path), rows, cols, gamma / std::sqrt(float(cols)), experts);
  }
  void norm(std::string path, int64_t n) {
    ModulePlan m;
    m.path = std::move(path);
    m.kind = Kind::Norm;
    m.cols = n;
    p.modules.push_back(m);
  }
  // Embedding rows are regenerated when lm_head is built from them, so the
  // table stays quantized even for bf16 models.
  void embedding(int64_t vocab, int64_t dim) {
    ModulePlan m;
    m.path = "model.embed_tokens";
    m.kind = Kind::Embedding;
    m.rows = vocab;
    m.cols = dim;
    m.std = 1.0f;
    m.bits = bits == 0 ? 4 : bits;
    m.group = group;
    p.modules.push_back(m);
  }
  // A dense SwiGLU MLP (gate_proj / up_proj / down_proj) under `prefix`.
  void swiglu_mlp(const std::string& prefix, int64_t inter, int64_t dim) {
    input_proj(prefix + ".gate_proj", inter, dim);
    input_proj(prefix + ".up_proj", inter, dim);
    linear(prefix + ".down_proj", dim, inter, 2.0f * gamma / std::sqrt(float(inter)));
  }
  // Router + stacked experts under `prefix` (router bits: 0 = dense bf16, -1 = as the model).
  void moe(const std::string& prefix, int64_t experts, int64_t inter, int64_t dim, int router_bits) {
    linear(prefix + ".gate", experts, dim, 2.0f / std::sqrt(float(dim)), 0, router_bits);
    input_proj(prefix + ".switch_mlp.gate_proj", inter, dim, experts);
    input_proj(prefix + ".switch_mlp.up_proj", inter, dim, experts);
    linear(prefix + ".switch_mlp.down_proj", dim, inter, 2.0f * gamma / std::sqrt(float(inter)), experts);
  }
};

// Standard deviation of a uniform integer in [0, n].
float uniform_int_std(int n) { return std::sqrt(float((n + 1) * (n + 1) - 1) / 12.0f); }

// Random quantized row: uniform codes, per-group scale of random sign whose
// magnitude gives the target std, bias centring the values on zero.
void random_quant_row(const ModulePlan& m, uint64_t seed, int64_t row, uint32_t* w, uint16_t* s, uint16_t* b) {
  SplitMix rng(hash_str(m.path, seed) ^ (uint64_t(row) * 0xd1b54a32d192ed03ull));
  const int n = (1 << m.bits) - 1;
  const int64_t groups = m.cols / m.group, words = m.cols * m.bits / 32;
  const float mag = m.std / uniform_int_std(n);
  for (int64_t g = 0; g < groups; ++g) {
    float scale = mag * (0.8f + 0.4f * rng.uniform());
    if (rng.next() & 1) scale = -scale;  // MLX scales may be negative
    s[g] = f32_to_bf16_bits(scale);
    b[g] = f32_to_bf16_bits(-scale * float(n) / 2.0f);
  }
  for (int64_t i = 0; i < words; ++i) w[i] = uint32_t(rng.next());
}

void random_dense_row(const ModulePlan& m, uint64_t seed, int64_t row, uint16_t* out) {
  SplitMix rng(hash_str(m.path, seed) ^ (uint64_t(row) * 0xd1b54a32d192ed03ull));
  for (int64_t c = 0; c < m.cols; ++c) out[c] = f32_to_bf16_bits(m.std * rng.normal());
}

// A full module's tensors, produced on first request and dropped once all of
// its parts have been written (write order is sorted, so parts are adjacent).
struct Produced {
  std::vector<uint8_t> weight, scales, biases;
  int parts_left = 0;
};

class Producer {
 public:
  Producer(const Plan& plan, uint64_t seed) : plan_(plan), seed_(seed) {
    for (auto& m : plan_.modules) by_path_[m.path] = &m;
  }

  std::vector<io::TensorSpec> specs() const {
    std::vector<io::TensorSpec> out;
    for (auto& m : plan_.modules) {
      auto shp = [&](std::vector<int64_t> s) {
        if (m.experts > 0) s.insert(s.begin(), m.experts);
        return s;
      };
      if (m.kind == Kind::Norm) {
        out.push_back({m.path + ".weight", DType::BF16, {m.cols}});
      } else if (m.kind == Kind::F32Vector) {
        out.push_back({m.path, DType::F32, {m.cols}});
      } else if (m.bits == 0) {
        out.push_back({m.path + ".weight", DType::BF16, shp({m.rows, m.cols})});
      } else {
        out.push_back({m.path + ".weight", DType::U32, shp({m.rows, m.cols * m.bits / 32})});
        out.push_back({m.path + ".scales", DType::BF16, shp({m.rows, m.cols / m.group})});
        out.push_back({m.path + ".biases", DType::BF16, shp({m.rows, m.cols / m.group})});
      }
    }
    return out;
  }

  void fill(const io::TensorSpec& spec, uint8_t* dst) {
    if (auto it = by_path_.find(spec.name); it != by_path_.end() && it->second->kind == Kind::F32Vector) {
      const ModulePlan& m = *it->second;
      SplitMix rng(hash_str(m.path, seed_));
      auto* o = reinterpret_cast<float*>(dst);
      for (int64_t i = 0; i < m.cols; ++i) o[i] = m.std * rng.normal();
      return;
    }
    const size_t dot = spec.name.rfind('.');
    const std::string path = spec.name.substr(0, dot), part = spec.name.substr(dot + 1);
    const ModulePlan& m = *by_path_.at(path);
    if (m.kind == Kind::Norm) {
      SplitMix rng(hash_str(m.path, seed_));
      auto* o = reinterpret_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < m.cols; ++i) o[i] = f32_to_bf16_bits(1.0f + 0.05f * rng.normal());
      return;
    }
    if (m.bits == 0) {  // dense: rows are independent, produce in place
      auto* o = reinterpret_cast<uint16_t*>(dst);
      const int64_t R = (m.experts > 0 ? m.experts : 1) * m.rows;
#pragma omp parallel for schedule(static)
      for (int64_t r = 0; r < R; ++r) random_dense_row(m, seed_, r, o + r * m.cols);
      return;
    }
    if (m.kind == Kind::Random) {  // quantized random: parts are independent streams
      produce_random(m, part, dst);
      return;
    }
    Produced& p = produced_[path];
    if (p.parts_left == 0) {
      produce_structured(m, p);
      p.parts_left = 3;
    }
    const std::vector<uint8_t>& src = part == "weight" ? p.weight : part == "scales" ? p.scales : p.biases;
    std::memcpy(dst, src.data(), src.size());
    if (--p.parts_left == 0) produced_.erase(path);
  }

 private:
  void produce_random(const ModulePlan& m, const std::string& part, uint8_t* dst) {
    const int64_t R = (m.experts > 0 ? m.experts : 1) * m.rows;
    const int64_t words = m.cols * m.bits / 32, groups = m.cols / m.group;
#pragma omp parallel
    {
      std::vector<uint32_t> w(static_cast<size_t>(words));
      std::vector<uint16_t> s(static_cast<size_t>(groups)), b(static_cast<size_t>(groups));
#pragma omp for schedule(static)
      for (int64_t r = 0; r < R; ++r) {
        random_quant_row(m, seed_, r, w.data(), s.data(), b.data());
        if (part == "weight") std::memcpy(dst + r * words * 4, w.data(), size_t(words) * 4);
        else if (part == "scales") std::memcpy(dst + r * groups * 2, s.data(), size_t(groups) * 2);
        else std::memcpy(dst + r * groups * 2, b.data(), size_t(groups) * 2);
      }
    }
  }

  void produce_structured(const ModulePlan& m, Produced& p) {
    const int64_t words = m.cols * m.bits / 32, groups = m.cols / m.group;
    p.weight.resize(size_t(m.rows * words * 4));
    p.scales.resize(size_t(m.rows * groups * 2));
    p.biases.resize(size_t(m.rows * groups * 2));
    auto* W = reinterpret_cast<uint32_t*>(p.weight.data());
    auto* S = reinterpret_cast<uint16_t*>(p.scales.data());
    auto* B = reinterpret_cast<uint16_t*>(p.biases.data());
    if (m.kind == Kind::Embedding) {
#pragma omp parallel for schedule(static)
      for (int64_t r = 0; r < m.rows; ++r) random_quant_row(m, seed_, r, W + r * words, S + r * groups, B + r * groups);
      return;
    }
    // lm_head row v = beta · embed[π(v)] + noise, re-quantized with MLX's
    // algorithm. π permutes the usable ids (real tokens, not specials or
    // reserved fillers), whose rows carry the structure; other rows are noise,
    // so greedy decoding emits readable pieces.
    const ModulePlan& e = *by_path_.at(m.embed_path);
    const int64_t V = m.rows;
    std::vector<int64_t> slot(static_cast<size_t>(V), -1);
    const auto& U = m.usable;
    for (size_t i = 0; i < U.size(); ++i)
      if (U[i] >= 0 && U[i] < V) slot[size_t(U[i])] = int64_t(i);
    const uint64_t n = std::max<uint64_t>(1, U.size());
    uint64_t a = 0x9e3779b1ull % n;
    while (n > 1 && std::gcd(a, n) != 1) ++a;
    const quant::QuantParams qp{m.bits, m.group};
    const int64_t ew = e.cols * e.bits / 32, eg = e.cols / e.group;
#pragma omp parallel
    {
      std::vector<uint32_t> w(static_cast<size_t>(ew));
      std::vector<uint16_t> s(static_cast<size_t>(eg)), b(static_cast<size_t>(eg));
      std::vector<float> x(static_cast<size_t>(m.cols));
#pragma omp for schedule(static)
      for (int64_t v = 0; v < V; ++v) {
        const int64_t i = slot[size_t(v)];
        if (i >= 0) {
          const int64_t src = U[size_t((a * uint64_t(i) + 7) % n)];
          random_quant_row(e, seed_, src, w.data(), s.data(), b.data());
          quant::dequantize_row(w.data(), s.data(), b.data(), e.cols, {e.bits, e.group}, x.data());
        } else {
          std::fill(x.begin(), x.end(), 0.f);
        }
        SplitMix rng(hash_str(m.path, seed_) ^ (uint64_t(v) * 0xd1b54a32d192ed03ull));
        for (auto& xi : x) xi = round_bf16(m.beta * xi + m.noise * rng.normal());
        quant::quantize_row(x.data(), m.cols, qp, W + v * words, S + v * groups, B + v * groups);
      }
    }
  }

  const Plan& plan_;
  uint64_t seed_;
  std::map<std::string, const ModulePlan*> by_path_;
  std::map<std::string, Produced> produced_;
};

// ------------------------------------------------------------------ families

json qwen3_moe_config(const std::string& preset) {
  json c;
  if (preset == "full") {  // Qwen/Qwen3-30B-A3B (spec §1.1)
    c = {{"hidden_size", 2048}, {"num_hidden_layers", 48}, {"num_attention_heads", 32},
         {"num_key_value_heads", 4}, {"head_dim", 128}, {"num_experts", 128},
         {"num_experts_per_tok", 8}, {"moe_intermediate_size", 768}, {"intermediate_size", 6144},
         {"vocab_size", 151936}, {"max_position_embeddings", 40960}, {"max_window_layers", 48}};
  } else if (preset == "tiny") {
    c = {{"hidden_size", 128}, {"num_hidden_layers", 4}, {"num_attention_heads", 4},
         {"num_key_value_heads", 2}, {"head_dim", 32}, {"num_experts", 8},
         {"num_experts_per_tok", 2}, {"moe_intermediate_size", 64}, {"intermediate_size", 256},
         {"vocab_size", 2048}, {"max_position_embeddings", 4096}, {"max_window_layers", 4}};
  } else {
    fail("synth: unknown preset '{}' (tiny, full)", preset);
  }
  c.update(json{{"architectures", {"Qwen3MoeForCausalLM"}}, {"model_type", "qwen3_moe"},
                {"attention_bias", false}, {"attention_dropout", 0.0}, {"bos_token_id", 151643},
                {"eos_token_id", 151645}, {"decoder_sparse_step", 1}, {"hidden_act", "silu"},
                {"initializer_range", 0.02}, {"mlp_only_layers", json::array()}, {"norm_topk_prob", true},
                {"output_router_logits", false}, {"rms_norm_eps", 1e-6}, {"rope_scaling", nullptr},
                {"rope_theta", 1000000.0}, {"router_aux_loss_coef", 0.001}, {"sliding_window", nullptr},
                {"tie_word_embeddings", false}, {"torch_dtype", "bfloat16"}, {"use_cache", true},
                {"use_sliding_window", false}, {"transformers_version", "4.51.0"}});
  return c;
}

Plan qwen3_moe_plan(const json& c, int bits, int group, int router_bits) {
  Plan p;
  p.family = c.value("model_type", std::string("qwen3_moe"));
  p.config = c;
  const bool all_dense = p.family == "qwen3";  // the dense Qwen3 family: a SwiGLU MLP in every layer
  auto I = [&](const char* k) { return c.at(k).get<int64_t>(); };
  const int64_t D = I("hidden_size"), L = I("num_hidden_layers"), H = I("num_attention_heads"),
                Hkv = I("num_key_value_heads"), hd = c.value("head_dim", D / H),
                E = all_dense ? 0 : I("num_experts"), Im = all_dense ? 0 : I("moe_intermediate_size"),
                V = I("vocab_size");
  const std::vector<int64_t> mlp_only = c.value("mlp_only_layers", std::vector<int64_t>{});
  const int64_t sparse_step = std::max<int64_t>(1, c.value("decoder_sparse_step", int64_t(1)));
  PlanBuilder pb{p, bits, group};
  pb.embedding(V, D);
  for (int64_t l = 0; l < L; ++l) {
    const std::string pre = "model.layers." + std::to_string(l);
    pb.norm(pre + ".input_layernorm", D);
    pb.norm(pre + ".post_attention_layernorm", D);
    pb.input_proj(pre + ".self_attn.q_proj", H * hd, D);
    pb.input_proj(pre + ".self_attn.k_proj", Hkv * hd, D);
    pb.input_proj(pre + ".self_attn.v_proj", Hkv * hd, D);
    pb.output_proj(pre + ".self_attn.o_proj", D, H * hd);
    pb.norm(pre + ".self_attn.q_norm", hd);
    pb.norm(pre + ".self_attn.k_norm", hd);
    // mlp_only_layers / decoder_sparse_step (and the dense family): a dense SwiGLU MLP
    const bool dense = all_dense || std::find(mlp_only.begin(), mlp_only.end(), l) != mlp_only.end() ||
                       (l + 1) % sparse_step != 0;
    if (dense)
      pb.swiglu_mlp(pre + ".mlp", I("intermediate_size"), D);
    else
      pb.moe(pre + ".mlp", E, Im, D, router_bits ? router_bits : -1);
  }
  pb.norm("model.norm", D);
  ModulePlan head;
  head.path = "lm_head";
  head.kind = Kind::LmHeadFromEmbedding;
  head.rows = V;
  head.cols = D;
  head.bits = bits == 0 ? 4 : bits;
  head.group = group;
  head.embed_path = "model.embed_tokens";
  head.beta = 16.0f / float(D);                  // matching-row logit ≈ 16
  head.noise = 2.0f / std::sqrt(float(D));       // other logits ≈ N(0, 2)
  if (!c.value("tie_word_embeddings", false)) p.modules.push_back(head);  // tied: the embedding is the head
  return p;
}

// LFM2-MoE (spec §3.1 shapes for `full`).
json lfm2_moe_config(const std::string& preset) {
  json c;
  std::vector<int64_t> attn;
  if (preset == "full") {  // LiquidAI/LFM2-8B-A1B
    c = {{"hidden_size", 2048}, {"num_hidden_layers", 24}, {"num_attention_heads", 32}, {"num_key_value_heads", 8},
         {"num_experts", 32}, {"num_experts_per_tok", 4}, {"moe_intermediate_size", 1792},
         {"intermediate_size", 7168}, {"num_dense_layers", 2}, {"vocab_size", 65536},
         {"max_position_embeddings", 128000}};
    attn = {2, 6, 10, 14, 18, 21};
  } else if (preset == "tiny") {
    c = {{"hidden_size", 128}, {"num_hidden_layers", 6}, {"num_attention_heads", 4}, {"num_key_value_heads", 2},
         {"num_experts", 8}, {"num_experts_per_tok", 2}, {"moe_intermediate_size", 64}, {"intermediate_size", 256},
         {"num_dense_layers", 2}, {"vocab_size", 2048}, {"max_position_embeddings", 4096}};
    attn = {2, 5};
  } else {
    fail("synth: unknown preset '{}' (tiny, full)", preset);
  }
  c.update(json{{"architectures", {"Lfm2MoeForCausalLM"}}, {"model_type", "lfm2_moe"}, {"full_attn_idxs", attn},
                {"conv_L_cache", 3}, {"conv_bias", false}, {"use_expert_bias", true}, {"norm_topk_prob", true},
                {"routed_scaling_factor", 1.0}, {"norm_eps", 1e-5}, {"rope_theta", 1000000.0},
                {"tie_word_embeddings", true}, {"bos_token_id", 1}, {"eos_token_id", 7}, {"pad_token_id", 0},
                {"hidden_act", "silu"}, {"torch_dtype", "bfloat16"}, {"use_cache", true},
                {"transformers_version", "4.57.0"}});
  return c;
}

// layer_types from full_attn_idxs and num_hidden_layers (unless given).
void lfm2_fill_layer_types(json& c) {
  const int64_t L = c.at("num_hidden_layers").get<int64_t>();
  const std::vector<int64_t> attn = c.value("full_attn_idxs", std::vector<int64_t>{});
  json lt = json::array();
  for (int64_t l = 0; l < L; ++l)
    lt.push_back(std::find(attn.begin(), attn.end(), l) != attn.end() ? "full_attention" : "conv");
  c["layer_types"] = lt;
}

Plan lfm2_moe_plan(const json& c, int bits, int group, int router_bits) {
  Plan p;
  p.family = "lfm2_moe";
  p.config = c;
  auto I = [&](const char* k) { return c.at(k).get<int64_t>(); };
  const int64_t D = I("hidden_size"), L = I("num_hidden_layers"), H = I("num_attention_heads"),
                Hkv = I("num_key_value_heads"), hd = D / H, E = I("num_experts"), Im = I("moe_intermediate_size"),
                In = I("intermediate_size"), V = I("vocab_size"), n_dense = c.value("num_dense_layers", int64_t(0)),
                Lc = c.value("conv_L_cache", int64_t(3));
  const json& lt = c.at("layer_types");
  ZMLX_CHECK(lt.is_array() && int64_t(lt.size()) == L, "synth: layer_types must list {} layers", L);
  PlanBuilder pb{p, bits, group};
  pb.embedding(V, D);  // tied head: logits peak on the current token's own row
  for (int64_t l = 0; l < L; ++l) {
    const std::string pre = "model.layers." + std::to_string(l);
    pb.norm(pre + ".operator_norm", D);
    pb.norm(pre + ".ffn_norm", D);
    if (lt[size_t(l)] == "full_attention") {
      pb.input_proj(pre + ".self_attn.q_proj", H * hd, D);
      pb.input_proj(pre + ".self_attn.k_proj", Hkv * hd, D);
      pb.input_proj(pre + ".self_attn.v_proj", Hkv * hd, D);
      pb.output_proj(pre + ".self_attn.out_proj", D, H * hd);
      pb.norm(pre + ".self_attn.q_layernorm", hd);
      pb.norm(pre + ".self_attn.k_layernorm", hd);
    } else {
      pb.input_proj(pre + ".conv.in_proj", 3 * D, D);
      pb.linear(pre + ".conv.out_proj", D, D, 4.0f * PlanBuilder::gamma / std::sqrt(float(D)));
      pb.linear(pre + ".conv.conv", Lc, 1, 0.5f, D, 0);  // dense bf16 [D, L, 1]
    }
    if (l < n_dense) {
      pb.swiglu_mlp(pre + ".feed_forward", In, D);
      continue;
    }
    pb.moe(pre + ".feed_forward", E, Im, D, bits == 0 ? 0 : router_bits);
    ModulePlan bias;
    bias.path = pre + ".feed_forward.expert_bias";
    bias.kind = Kind::F32Vector;
    bias.cols = E;
    bias.std = 0.02f;
    p.modules.push_back(bias);
  }
  pb.norm("model.embedding_norm", D);
  return p;
}

// GLM-4.7-Flash (spec §2.1 shapes for `full`).
json glm4_moe_lite_config(const std::string& preset) {
  json c;
  if (preset == "full") {  // zai-org/GLM-4.7-Flash
    c = {{"hidden_size", 2048}, {"num_hidden_layers", 47}, {"num_attention_heads", 20}, {"num_key_value_heads", 20},
         {"q_lora_rank", 768}, {"kv_lora_rank", 512}, {"qk_nope_head_dim", 192}, {"qk_rope_head_dim", 64},
         {"v_head_dim", 256}, {"n_routed_experts", 64}, {"num_experts_per_tok", 4}, {"n_shared_experts", 1},
         {"moe_intermediate_size", 1536}, {"intermediate_size", 10240}, {"first_k_dense_replace", 1},
         {"vocab_size", 154880}, {"max_position_embeddings", 202752}};
  } else if (preset == "tiny") {  // every dimension a multiple of 64 where it is quantised along
    c = {{"hidden_size", 128}, {"num_hidden_layers", 4}, {"num_attention_heads", 4}, {"num_key_value_heads", 4},
         {"q_lora_rank", 64}, {"kv_lora_rank", 64}, {"qk_nope_head_dim", 64}, {"qk_rope_head_dim", 32},
         {"v_head_dim", 64}, {"n_routed_experts", 8}, {"num_experts_per_tok", 2}, {"n_shared_experts", 1},
         {"moe_intermediate_size", 64}, {"intermediate_size", 256}, {"first_k_dense_replace", 1},
         {"vocab_size", 2048}, {"max_position_embeddings", 4096}};
  } else {
    fail("synth: unknown preset '{}' (tiny, full)", preset);
  }
  c.update(json{{"architectures", {"Glm4MoeLiteForCausalLM"}}, {"model_type", "glm4_moe_lite"},
                {"attention_bias", false}, {"attention_dropout", 0.0}, {"hidden_act", "silu"},
                {"initializer_range", 0.02}, {"moe_layer_freq", 1}, {"n_group", 1}, {"topk_group", 1},
                {"norm_topk_prob", true}, {"routed_scaling_factor", 1.8}, {"scoring_func", "sigmoid"},
                {"topk_method", "noaux_tc"}, {"num_nextn_predict_layers", 1}, {"rms_norm_eps", 1e-5},
                {"rope_scaling", nullptr}, {"rope_theta", 1000000.0}, {"rope_interleave", true},
                {"tie_word_embeddings", false}, {"torch_dtype", "bfloat16"}, {"use_cache", true},
                {"transformers_version", "5.0.0"}});
  return c;
}

Plan glm4_moe_lite_plan(const json& c, int bits, int group) {
  Plan p;
  p.family = "glm4_moe_lite";
  p.config = c;
  auto I = [&](const char* k) { return c.at(k).get<int64_t>(); };
  const int64_t D = I("hidden_size"), L = I("num_hidden_layers"), H = I("num_attention_heads"),
                ql = c.at("q_lora_rank").is_null() ? 0 : I("q_lora_rank"), kvl = I("kv_lora_rank"),
                dn = I("qk_nope_head_dim"), dr = I("qk_rope_head_dim"), dv = I("v_head_dim"),
                E = I("n_routed_experts"), Im = I("moe_intermediate_size"), In = I("intermediate_size"),
                V = I("vocab_size"), n_shared = c.value("n_shared_experts", int64_t(0)),
                first_dense = c.contains("first_k_dense_replace") && !c["first_k_dense_replace"].is_null()
                                  ? I("first_k_dense_replace") : 1,  // mlx-lm's default
                freq = std::max<int64_t>(1, c.value("moe_layer_freq", int64_t(1)));
  // transformers-5 style mlp_layer_types ("dense" / "sparse") wins when given.
  const json lt = c.value("mlp_layer_types", json());
  auto dense_layer = [&](int64_t l) {
    if (lt.is_array() && l < int64_t(lt.size())) return lt[size_t(l)] == "dense";
    return l < first_dense || l % freq != 0;
  };
  PlanBuilder pb{p, bits, group};
  pb.embedding(V, D);
  for (int64_t l = 0; l < L; ++l) {
    const std::string pre = "model.layers." + std::to_string(l), a = pre + ".self_attn";
    pb.norm(pre + ".input_layernorm", D);
    pb.norm(pre + ".post_attention_layernorm", D);
    if (ql > 0) {
      pb.input_proj(a + ".q_a_proj", ql, D);
      pb.norm(a + ".q_a_layernorm", ql);
      pb.input_proj(a + ".q_b_proj", H * (dn + dr), ql);
    } else {
      pb.input_proj(a + ".q_proj", H * (dn + dr), D);
    }
    pb.input_proj(a + ".kv_a_proj_with_mqa", kvl + dr, D);
    pb.norm(a + ".kv_a_layernorm", kvl);
    pb.input_proj(a + ".embed_q", kvl, dn, H);      // per head [kv_lora, nope]
    pb.input_proj(a + ".unembed_out", dv, kvl, H);  // per head [v, kv_lora]
    pb.output_proj(a + ".o_proj", D, H * dv);
    if (dense_layer(l)) {
      pb.swiglu_mlp(pre + ".mlp", In, D);
      continue;
    }
    pb.moe(pre + ".mlp", E, Im, D, /*router_bits=*/0);  // the router stays bf16 (spec §2.3)
    ModulePlan bias;
    bias.path = pre + ".mlp.gate.e_score_correction_bias";
    bias.kind = Kind::F32Vector;
    bias.cols = E;
    bias.std = 0.02f;
    p.modules.push_back(bias);
    if (n_shared > 0) pb.swiglu_mlp(pre + ".mlp.shared_experts", Im * n_shared, D);
  }
  // GLM's blocks write back more than Qwen's (routed experts × 1.8 plus a
  // shared expert, a 10240-wide dense layer): halve every write-back so the
  // current token's embedding still dominates after 47 layers and greedy
  // decoding keeps a clear margin.
  for (auto& m : p.modules)
    if (m.path.ends_with(".o_proj") || m.path.ends_with(".down_proj")) m.std *= 0.5f;
  pb.norm("model.norm", D);
  ModulePlan head;
  head.path = "lm_head";
  head.kind = Kind::LmHeadFromEmbedding;
  head.rows = V;
  head.cols = D;
  head.bits = bits == 0 ? 4 : bits;
  head.group = group;
  head.embed_path = "model.embed_tokens";
  head.beta = 16.0f / float(D);
  head.noise = 2.0f / std::sqrt(float(D));
  p.modules.push_back(head);
  return p;
}

json parse_set_value(const std::string& v) {
  try {
    return json::parse(v);
  } catch (...) {
    return json(v);
  }
}

// True for complete, printable UTF-8 (so a random model's output stays readable).
bool printable_utf8(const std::string& s) {
  if (s.empty()) return false;
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    int n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (n == 0 || i + size_t(n) > s.size()) return false;
    if (n == 1 && c < 0x20 && c != '\n') return false;
    if (n == 1 && c == 0x7f) return false;
    for (int k = 1; k < n; ++k)
      if ((static_cast<unsigned char>(s[i + size_t(k)]) >> 6) != 2) return false;
    i += size_t(n);
  }
  return true;
}

void write_json(const fs::path& path, const json& j) {
  std::ofstream f(path);
  ZMLX_CHECK(f.good(), "cannot write {}", path.string());
  f << j.dump(4) << "\n";
}

}  // namespace

// The dense Qwen3 family (Qwen3-0.6B shapes for `full`): runs unpatched by default.
json qwen3_config(const std::string& preset) {
  json c;
  if (preset == "full") {  // Qwen/Qwen3-0.6B
    c = {{"hidden_size", 1024}, {"num_hidden_layers", 28}, {"num_attention_heads", 16}, {"num_key_value_heads", 8},
         {"head_dim", 128}, {"intermediate_size", 3072}, {"vocab_size", 151936}, {"max_position_embeddings", 40960},
         {"tie_word_embeddings", true}};
  } else if (preset == "tiny") {
    c = {{"hidden_size", 128}, {"num_hidden_layers", 4}, {"num_attention_heads", 4}, {"num_key_value_heads", 2},
         {"head_dim", 32}, {"intermediate_size", 256}, {"vocab_size", 2048}, {"max_position_embeddings", 4096},
         {"tie_word_embeddings", false}};
  } else {
    fail("synth: unknown preset '{}' (tiny, full)", preset);
  }
  c.update(json{{"architectures", {"Qwen3ForCausalLM"}}, {"model_type", "qwen3"}, {"attention_bias", false},
                {"attention_dropout", 0.0}, {"bos_token_id", 151643}, {"eos_token_id", 151645}, {"hidden_act", "silu"},
                {"initializer_range", 0.02}, {"rms_norm_eps", 1e-6}, {"rope_scaling", nullptr},
                {"rope_theta", 1000000.0}, {"sliding_window", nullptr}, {"torch_dtype", "bfloat16"},
                {"use_cache", true}, {"use_sliding_window", false}, {"transformers_version", "4.51.0"}});
  return c;
}

std::vector<std::string> synth_archs() { return {"qwen3_moe", "qwen3", "lfm2_moe", "glm4_moe_lite"}; }

std::string synth_model(const SynthOptions& o) {
  ZMLX_CHECK(!o.out.empty(), "synth: --out DIR is required");
  ZMLX_CHECK(o.arch == "qwen3_moe" || o.arch == "qwen3" || o.arch == "lfm2_moe" || o.arch == "glm4_moe_lite",
             "synth: unknown --arch '{}' (supported: qwen3_moe, qwen3, lfm2_moe, glm4_moe_lite)", o.arch);
  ZMLX_CHECK(o.bits == 0 || quant::supported({o.bits, o.group_size}),
             "synth: --bits {} --group-size {} unsupported (bits 2/4/8 or 0 for bf16; groups 32/64/128)", o.bits,
             o.group_size);
  ZMLX_CHECK(o.router_bits == 0 || quant::supported({o.router_bits, o.group_size}), "synth: --router-bits {} unsupported",
             o.router_bits);
  const bool lfm2 = o.arch == "lfm2_moe", glm = o.arch == "glm4_moe_lite";
  json config = o.arch == "qwen3" ? qwen3_config(o.preset)
                : lfm2          ? lfm2_moe_config(o.preset)
                : glm           ? glm4_moe_lite_config(o.preset)
                                : qwen3_moe_config(o.preset);
  bool set_layer_types = false;
  for (auto& [k, v] : o.sets) {
    config[k] = parse_set_value(v);
    set_layer_types |= k == "layer_types";
  }
  if (lfm2 && !set_layer_types) lfm2_fill_layer_types(config);
  const int qbits = o.bits == 0 ? 4 : o.bits;  // embedding/lm_head stay quantized in bf16 mode
  // LFM2's router is 8-bit in the real checkpoint (a per-module override).
  const int router_bits = lfm2 && o.bits != 0 && o.router_bits == 0 ? 8 : o.router_bits;
  ZMLX_CHECK(router_bits == 0 || quant::supported({router_bits, o.group_size}), "synth: router bits {} unsupported",
             router_bits);
  ZMLX_CHECK(!glm || o.router_bits == 0, "synth: glm4_moe_lite's router is always bf16 (no --router-bits)");
  Plan plan = lfm2 ? lfm2_moe_plan(config, o.bits, o.group_size, router_bits)
              : glm ? glm4_moe_lite_plan(config, o.bits, o.group_size)
                    : qwen3_moe_plan(config, o.bits, o.group_size, o.router_bits);
  for (auto& m : plan.modules)
    if (m.kind != Kind::Norm && m.kind != Kind::F32Vector && m.bits != 0)
      ZMLX_CHECK(m.cols % m.group == 0, "synth: {} has {} input features, not a multiple of group size {}", m.path,
                 m.cols, m.group);

  json quant = {{"group_size", o.group_size}, {"bits", qbits}};
  if (lfm2) {
    if (router_bits && o.bits != 0)
      for (int64_t l = config.value("num_dense_layers", int64_t(0)); l < config["num_hidden_layers"].get<int64_t>(); ++l)
        quant["model.layers." + std::to_string(l) + ".feed_forward.gate"] = {{"group_size", o.group_size},
                                                                               {"bits", router_bits}};
  } else if (o.router_bits) {
    for (int64_t l = 0; l < config["num_hidden_layers"].get<int64_t>(); ++l)
      quant["model.layers." + std::to_string(l) + ".mlp.gate"] = {{"group_size", o.group_size}, {"bits", o.router_bits}};
  }
  config["quantization"] = quant;
  config["quantization_config"] = quant;

  fs::create_directories(o.out);
  if (o.tokenizer_dir.empty()) {
    text::write_synthetic_tokenizer(o.out, plan.family, config["vocab_size"].get<int64_t>());
  } else {
    for (const char* f : {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                          "vocab.json", "merges.txt"}) {
      fs::path src = fs::path(o.tokenizer_dir) / f;
      if (fs::exists(src)) fs::copy_file(src, fs::path(o.out) / f, fs::copy_options::overwrite_existing);
    }
    ZMLX_CHECK(fs::exists(fs::path(o.out) / "tokenizer.json"), "synth: --tokenizer {} has no tokenizer.json",
               o.tokenizer_dir);
  }
  // The special ids come from the tokenizer actually written: a vocabulary
  // too small for the real ids keeps the specials at its top.
  const text::Tokenizer tok = text::Tokenizer::from_dir(o.out);
  for (auto& m : plan.modules)
    if (m.kind == Kind::LmHeadFromEmbedding)
      for (int64_t id = 0; id < m.rows && id < int64_t(tok.vocab_size()); ++id)
        if (!tok.is_special(int32_t(id)) && tok.piece(int32_t(id)).rfind("<|reserved", 0) != 0 &&
            printable_utf8(tok.token_bytes(int32_t(id))))
          m.usable.push_back(int32_t(id));
  const auto eos = tok.token_id("<|im_end|>"), eot = tok.token_id("<|endoftext|>");
  if (eos) config["eos_token_id"] = *eos;
  if (eot) config["bos_token_id"] = *eot;
  if (lfm2)  // spec §3.4: BOS <|startoftext|>, EOS <|im_end|> only
    if (auto bos = tok.token_id("<|startoftext|>")) config["bos_token_id"] = *bos;
  json eos_list = json::array();
  if (eos) eos_list.push_back(*eos);
  if (eot && !lfm2) eos_list.push_back(*eot);
  if (glm) {  // spec §2.4: no BOS; EOS {<|endoftext|>, <|user|>, <|observation|>}; pad <|endoftext|>
    config.erase("bos_token_id");
    eos_list = json::array();
    for (const char* t : {"<|endoftext|>", "<|user|>", "<|observation|>"})
      if (auto id = tok.token_id(t)) eos_list.push_back(*id);
    config["eos_token_id"] = eos_list;
    if (eot) config["pad_token_id"] = *eot;
  }
  write_json(fs::path(o.out) / "config.json", config);
  json gen = {{"eos_token_id", eos_list},
              {"do_sample", true}, {"temperature", 0.6}, {"top_k", 20}, {"top_p", 0.95}};
  if (config.contains("bos_token_id")) gen["bos_token_id"] = config["bos_token_id"];
  write_json(fs::path(o.out) / "generation_config.json", gen);

  Producer producer(plan, o.seed);
  io::write_model_weights(o.out, producer.specs(),
                          [&](const io::TensorSpec& s, uint8_t* dst) { producer.fill(s, dst); },
                          uint64_t(5) << 30, o.progress);
  return o.out;
}

}  // namespace zmlx::synth
