// zmlx convert on a tiny fake Hugging Face qwen3_moe checkpoint (2 layers,
// 4 experts, random weights): keys, shapes, dtypes, config, and the values
// (bit-exact bf16 with --dtype bf16; quantized = quantize(bf16(source)) and
// dequantization within the quantization error).
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "zmlx/convert/convert.h"
#include "zmlx/core/dtype.h"
#include "zmlx/core/error.h"
#include "zmlx/io/safetensors.h"
#include "zmlx/quant/affine.h"

#include "test_helpers.h"
#include "model_test_helpers.h"
#include "zmlx/models/model.h"

namespace fs = std::filesystem;
using nlohmann::json;
using namespace zmlx;
using namespace zmlx::io;

namespace {

using zmlx::test::TempDir;

constexpr int64_t kLayers = 2, kExperts = 4, kHidden = 128, kInter = 64, kHeads = 4, kKv = 2, kHeadDim = 32,
                  kVocab = 256;

// A fake HF checkpoint: tensors as fp32 values (already representable in the stored dtype).
struct FakeHf {
  std::map<std::string, std::vector<int64_t>> shapes;
  std::map<std::string, std::vector<float>> values;
  DType dtype = DType::F32;
  bool tied = false;

  void add(const std::string& name, std::vector<int64_t> shape, std::mt19937& rng, float scale = 0.05f,
           float offset = 0.0f) {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    std::normal_distribution<float> nd(0.0f, scale);
    std::vector<float> v(static_cast<size_t>(n));
    for (auto& x : v) {
      x = nd(rng) + offset;
      if (dtype == DType::BF16) x = round_bf16(x);
      if (dtype == DType::F16) x = f16_to_f32(f32_to_f16_bits(x));
    }
    shapes[name] = shape;
    values[name] = std::move(v);
  }

  static FakeHf make(DType dtype, bool tied, uint32_t seed = 42) {
    FakeHf m;
    m.dtype = dtype;
    m.tied = tied;
    std::mt19937 rng(seed);
    m.add("model.embed_tokens.weight", {kVocab, kHidden}, rng);
    if (!tied) m.add("lm_head.weight", {kVocab, kHidden}, rng);
    m.add("model.norm.weight", {kHidden}, rng, 0.1f, 1.0f);
    for (int64_t l = 0; l < kLayers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      m.add(p + "input_layernorm.weight", {kHidden}, rng, 0.1f, 1.0f);
      m.add(p + "post_attention_layernorm.weight", {kHidden}, rng, 0.1f, 1.0f);
      m.add(p + "self_attn.q_proj.weight", {kHeads * kHeadDim, kHidden}, rng);
      m.add(p + "self_attn.k_proj.weight", {kKv * kHeadDim, kHidden}, rng);
      m.add(p + "self_attn.v_proj.weight", {kKv * kHeadDim, kHidden}, rng);
      m.add(p + "self_attn.o_proj.weight", {kHidden, kHeads * kHeadDim}, rng);
      m.add(p + "self_attn.q_norm.weight", {kHeadDim}, rng, 0.1f, 1.0f);
      m.add(p + "self_attn.k_norm.weight", {kHeadDim}, rng, 0.1f, 1.0f);
      m.add(p + "mlp.gate.weight", {kExperts, kHidden}, rng);
      for (int64_t e = 0; e < kExperts; ++e) {
        const std::string x = p + "mlp.experts." + std::to_string(e) + ".";
        // An outlier in some rows exercises both signs of the scale.
        m.add(x + "gate_proj.weight", {kInter, kHidden}, rng, 0.05f, e % 2 ? 0.02f : -0.02f);
        m.add(x + "up_proj.weight", {kInter, kHidden}, rng);
        m.add(x + "down_proj.weight", {kHidden, kInter}, rng);
      }
    }
    return m;
  }

  json config() const {
    return json{{"architectures", {"Qwen3MoeForCausalLM"}},
                {"model_type", "qwen3_moe"},
                {"hidden_size", kHidden},
                {"num_hidden_layers", kLayers},
                {"num_attention_heads", kHeads},
                {"num_key_value_heads", kKv},
                {"head_dim", kHeadDim},
                {"num_experts", kExperts},
                {"num_experts_per_tok", 2},
                {"moe_intermediate_size", kInter},
                {"intermediate_size", 256},
                {"vocab_size", kVocab},
                {"rms_norm_eps", 1e-6},
                {"rope_theta", 1000000.0},
                {"norm_topk_prob", true},
                {"tie_word_embeddings", tied},
                {"torch_dtype", dtype == DType::F32 ? "float32" : dtype == DType::F16 ? "float16" : "bfloat16"},
                {"_name_or_path", "/somewhere/else"}};
  }

  void store(const std::string& name, const std::vector<float>& v, uint8_t* dst) const {
    for (size_t i = 0; i < v.size(); ++i) {
      if (dtype == DType::F32) std::memcpy(dst + 4 * i, &v[i], 4);
      else {
        uint16_t b = dtype == DType::BF16 ? f32_to_bf16_bits(v[i]) : f32_to_f16_bits(v[i]);
        std::memcpy(dst + 2 * i, &b, 2);
      }
    }
  }

  // Writes the checkpoint; `fused` stores the experts the transformers-5 way
  // (experts.gate_up_proj [E, 2I, D], experts.down_proj [E, D, I]).
  void write(const fs::path& dir, bool fused = false, uint64_t shard_bytes = 200000) const {
    std::map<std::string, std::vector<float>> out;
    std::map<std::string, std::vector<int64_t>> out_shapes;
    for (auto& [n, v] : values) {
      if (fused && n.find(".mlp.experts.") != std::string::npos) continue;
      out[n] = v;
      out_shapes[n] = shapes.at(n);
    }
    if (fused) {
      for (int64_t l = 0; l < kLayers; ++l) {
        const std::string p = "model.layers." + std::to_string(l) + ".mlp.experts.";
        std::vector<float> gu, dn;
        for (int64_t e = 0; e < kExperts; ++e) {
          const std::string x = p + std::to_string(e) + ".";
          auto& g = values.at(x + "gate_proj.weight");
          auto& u = values.at(x + "up_proj.weight");
          auto& d = values.at(x + "down_proj.weight");
          gu.insert(gu.end(), g.begin(), g.end());
          gu.insert(gu.end(), u.begin(), u.end());
          dn.insert(dn.end(), d.begin(), d.end());
        }
        out[p + "gate_up_proj"] = gu;
        out_shapes[p + "gate_up_proj"] = {kExperts, 2 * kInter, kHidden};
        out[p + "down_proj"] = dn;
        out_shapes[p + "down_proj"] = {kExperts, kHidden, kInter};
      }
    }
    std::vector<TensorSpec> specs;
    for (auto& [n, s] : out_shapes) specs.push_back({n, dtype, s});
    write_model_weights(dir.string(), specs, [&](const TensorSpec& s, uint8_t* dst) { store(s.name, out.at(s.name), dst); },
                        shard_bytes, false, {{"format", "pt"}});
    std::ofstream(dir / "config.json") << config().dump(2);
    std::ofstream(dir / "generation_config.json") << R"({"eos_token_id": [151645, 151643]})";
    std::ofstream(dir / "tokenizer.json") << R"({"model": {"type": "BPE"}})";
    std::ofstream(dir / "tokenizer_config.json") << "{}";
    std::ofstream(dir / "chat_template.jinja") << "{{ messages }}";
  }

  // bf16(source) of a logical MLX tensor, following the key mapping.
  std::vector<float> expected(const std::string& mlx_name) const {
    const std::string sw = ".mlp.switch_mlp.";
    auto pos = mlx_name.find(sw);
    if (pos == std::string::npos) {
      std::vector<float> v = values.at(mlx_name);
      for (auto& x : v) x = round_bf16(x);
      return v;
    }
    std::string proj = mlx_name.substr(pos + sw.size());  // "gate_proj.weight"
    std::vector<float> v;
    for (int64_t e = 0; e < kExperts; ++e) {
      auto& src = values.at(mlx_name.substr(0, pos) + ".mlp.experts." + std::to_string(e) + "." + proj);
      for (float x : src) v.push_back(round_bf16(x));
    }
    return v;
  }
};

std::vector<uint8_t> bytes_of(const TensorInfo& t) { return std::vector<uint8_t>(t.data, t.data + t.nbytes); }

template <typename T>
std::vector<T> as(const TensorInfo& t) {
  std::vector<T> v(t.nbytes / sizeof(T));
  std::memcpy(v.data(), t.data, t.nbytes);
  return v;
}

json read_json(const fs::path& p) {
  std::ifstream f(p);
  return json::parse(f);
}

// Logical MLX weights of the fake model: name -> shape, and whether quantizable.
std::map<std::string, std::pair<std::vector<int64_t>, bool>> logical_weights(bool tied) {
  std::map<std::string, std::pair<std::vector<int64_t>, bool>> w;
  w["model.embed_tokens.weight"] = {{kVocab, kHidden}, true};
  if (!tied) w["lm_head.weight"] = {{kVocab, kHidden}, true};
  w["model.norm.weight"] = {{kHidden}, false};
  for (int64_t l = 0; l < kLayers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    w[p + "input_layernorm.weight"] = {{kHidden}, false};
    w[p + "post_attention_layernorm.weight"] = {{kHidden}, false};
    w[p + "self_attn.q_norm.weight"] = {{kHeadDim}, false};
    w[p + "self_attn.k_norm.weight"] = {{kHeadDim}, false};
    w[p + "self_attn.q_proj.weight"] = {{kHeads * kHeadDim, kHidden}, true};
    w[p + "self_attn.k_proj.weight"] = {{kKv * kHeadDim, kHidden}, true};
    w[p + "self_attn.v_proj.weight"] = {{kKv * kHeadDim, kHidden}, true};
    w[p + "self_attn.o_proj.weight"] = {{kHidden, kHeads * kHeadDim}, true};
    w[p + "mlp.gate.weight"] = {{kExperts, kHidden}, true};
    w[p + "mlp.switch_mlp.gate_proj.weight"] = {{kExperts, kInter, kHidden}, true};
    w[p + "mlp.switch_mlp.up_proj.weight"] = {{kExperts, kInter, kHidden}, true};
    w[p + "mlp.switch_mlp.down_proj.weight"] = {{kExperts, kHidden, kInter}, true};
  }
  return w;
}

convert::ConvertResult run_convert(const fs::path& src, const fs::path& out, bool quantize, int bits = 4,
                                   int group = 64, int router_bits = 0) {
  convert::ConvertOptions o;
  o.source = src.string();
  o.output = out.string();
  o.quantize = quantize;
  o.q = {bits, group};
  o.router_bits = router_bits;
  o.progress = false;
  return convert::convert(o);
}

// Checks one quantized module against bf16(source): bit-identical to
// quantize_row on the expected logical tensor, and dequantization within the
// quantization error of every element.
void check_quantized(const WeightStore& out, const std::string& module, const std::vector<int64_t>& shape,
                     const std::vector<float>& want, quant::QuantParams q) {
  const int64_t cols = shape.back(), rows = int64_t(want.size()) / cols;
  std::vector<int64_t> wshape = shape, sshape = shape;
  wshape.back() = cols * q.bits / 32;
  sshape.back() = cols / q.group_size;
  auto w = as<uint32_t>(out.get(module + ".weight", DType::U32, wshape));
  auto s = as<uint16_t>(out.get(module + ".scales", DType::BF16, sshape));
  auto b = as<uint16_t>(out.get(module + ".biases", DType::BF16, sshape));
  const int64_t wpr = cols * q.bits / 32, gpr = cols / q.group_size;
  std::vector<uint32_t> ew(static_cast<size_t>(wpr));
  std::vector<uint16_t> es(static_cast<size_t>(gpr)), eb(static_cast<size_t>(gpr));
  std::vector<float> deq(static_cast<size_t>(cols));
  double max_err_over_scale = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const float* wr = want.data() + r * cols;
    quant::quantize_row(wr, cols, q, ew.data(), es.data(), eb.data());
    ASSERT_EQ(0, std::memcmp(ew.data(), &w[size_t(r * wpr)], size_t(wpr) * 4)) << module << " row " << r;
    ASSERT_EQ(0, std::memcmp(es.data(), &s[size_t(r * gpr)], size_t(gpr) * 2)) << module << " row " << r;
    ASSERT_EQ(0, std::memcmp(eb.data(), &b[size_t(r * gpr)], size_t(gpr) * 2)) << module << " row " << r;
    quant::dequantize_row(&w[size_t(r * wpr)], &s[size_t(r * gpr)], &b[size_t(r * gpr)], cols, q, deq.data());
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t g = c / q.group_size;
      const float scale = std::abs(bf16_to_f32(s[size_t(r * gpr + g)]));
      const float bias = std::abs(bf16_to_f32(b[size_t(r * gpr + g)]));
      const float n_bins = float((1 << q.bits) - 1);
      // |scale| for the rounding/clamp, plus the bf16 rounding of scale and bias.
      const float bound = scale * (1.0f + n_bins / 128.0f) + bias / 128.0f + 1e-7f;
      const float err = std::abs(deq[size_t(c)] - wr[c]);
      ASSERT_LE(err, bound) << module << " row " << r << " col " << c;
      max_err_over_scale = std::max(max_err_over_scale, double(err / scale));
    }
  }
  EXPECT_GT(max_err_over_scale, 0.0) << module;  // really lossy: the test would see a wrong layout
}

}  // namespace

TEST(Convert, Qwen3MoeFourBitWithEightBitRouter) {
  TempDir d;
  FakeHf hf = FakeHf::make(DType::F32, /*tied=*/false);
  hf.write(d.path / "hf");
  ASSERT_TRUE(fs::exists(d.path / "hf" / "model.safetensors.index.json"));  // sharded source
  auto res = run_convert(d.path / "hf", d.path / "mlx", true, 4, 64, /*router_bits=*/8);
  EXPECT_EQ(res.family, "qwen3_moe");

  const fs::path out = d.path / "mlx";
  WeightStore ws = WeightStore::open_dir(out.string());
  std::set<std::string> want_keys;
  for (auto& [name, info] : logical_weights(false)) {
    if (info.second) {
      std::string m = name.substr(0, name.size() - 7);
      want_keys.insert({m + ".weight", m + ".scales", m + ".biases"});
    } else {
      want_keys.insert(name);
    }
  }
  auto names = ws.names();
  EXPECT_EQ(std::set<std::string>(names.begin(), names.end()), want_keys);

  for (auto& [name, info] : logical_weights(false)) {
    const auto& [shape, quantizable] = info;
    const std::string module = name.substr(0, name.size() - 7);
    if (!quantizable) {
      const TensorInfo& t = ws.get(name, DType::BF16, shape);
      auto got = as<uint16_t>(t);
      auto want = hf.expected(name);
      for (size_t i = 0; i < want.size(); ++i) ASSERT_EQ(bf16_to_f32(got[i]), want[i]) << name << " " << i;
      continue;
    }
    const bool router = name.ends_with("mlp.gate.weight");
    check_quantized(ws, module, shape, hf.expected(name), {router ? 8 : 4, 64});
  }

  json cfg = read_json(out / "config.json");
  json q = {{"group_size", 64},
            {"bits", 4},
            {"mode", "affine"},
            {"model.layers.0.mlp.gate", {{"group_size", 64}, {"bits", 8}}},
            {"model.layers.1.mlp.gate", {{"group_size", 64}, {"bits", 8}}}};
  EXPECT_EQ(cfg["quantization"], q);
  EXPECT_EQ(cfg["quantization_config"], q);
  EXPECT_EQ(cfg["torch_dtype"], "bfloat16");
  EXPECT_EQ(cfg["model_type"], "qwen3_moe");
  EXPECT_EQ(cfg["num_experts"], kExperts);
  EXPECT_FALSE(cfg.contains("_name_or_path"));
  for (const char* f : {"generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"})
    EXPECT_TRUE(fs::exists(out / f)) << f;
  EXPECT_FALSE(fs::exists(out / "special_tokens_map.json"));  // absent in the source

  json idx = read_json(out / "model.safetensors.index.json");
  EXPECT_EQ(idx["weight_map"].size(), want_keys.size());
  SafetensorsFile one((out / "model.safetensors").string());
  EXPECT_EQ(one.metadata().at("format"), "mlx");
}

TEST(Convert, Bf16IsExactAndHasNoQuantization) {
  TempDir d;
  FakeHf hf = FakeHf::make(DType::F32, false, 7);
  hf.write(d.path / "hf");
  run_convert(d.path / "hf", d.path / "mlx", /*quantize=*/false);
  WeightStore ws = WeightStore::open_dir((d.path / "mlx").string());
  auto lw = logical_weights(false);
  EXPECT_EQ(ws.names().size(), lw.size());
  for (auto& [name, info] : lw) {
    auto got = as<uint16_t>(ws.get(name, DType::BF16, info.first));
    auto want = hf.expected(name);
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < want.size(); ++i) ASSERT_EQ(got[i], f32_to_bf16_bits(want[i])) << name << " " << i;
  }
  json cfg = read_json(d.path / "mlx" / "config.json");
  EXPECT_FALSE(cfg.contains("quantization"));
  EXPECT_FALSE(cfg.contains("quantization_config"));
}

TEST(Convert, FusedExpertsGiveTheSameOutput) {
  TempDir d;
  FakeHf hf = FakeHf::make(DType::BF16, false, 9);
  hf.write(d.path / "per_expert");
  hf.write(d.path / "fused", /*fused=*/true);
  for (bool quantize : {false, true}) {
    const std::string tag = quantize ? "q" : "bf16";
    run_convert(d.path / "per_expert", d.path / ("a_" + tag), quantize);
    run_convert(d.path / "fused", d.path / ("b_" + tag), quantize);
    WeightStore a = WeightStore::open_dir((d.path / ("a_" + tag)).string());
    WeightStore b = WeightStore::open_dir((d.path / ("b_" + tag)).string());
    ASSERT_EQ(a.names(), b.names());
    for (auto& n : a.names()) EXPECT_EQ(bytes_of(a.get(n)), bytes_of(b.get(n))) << n;
  }
  // BF16 source: the bf16 output is the source bits.
  WeightStore a = WeightStore::open_dir((d.path / "a_bf16").string());
  auto up = as<uint16_t>(a.get("model.layers.1.mlp.switch_mlp.up_proj.weight"));
  const auto& src = hf.values.at("model.layers.1.mlp.experts.3.up_proj.weight");
  for (size_t i = 0; i < src.size(); ++i) ASSERT_EQ(up[3 * kInter * kHidden + i], f32_to_bf16_bits(src[i]));
}

TEST(Convert, F16SourceAndTiedEmbeddings) {
  TempDir d;
  FakeHf hf = FakeHf::make(DType::F16, /*tied=*/true, 11);
  hf.write(d.path / "hf");
  run_convert(d.path / "hf", d.path / "mlx", false);
  WeightStore ws = WeightStore::open_dir((d.path / "mlx").string());
  EXPECT_FALSE(ws.has("lm_head.weight"));
  auto got = as<uint16_t>(ws.get("model.embed_tokens.weight"));
  auto want = hf.expected("model.embed_tokens.weight");
  for (size_t i = 0; i < want.size(); ++i) ASSERT_EQ(got[i], f32_to_bf16_bits(want[i]));

  // A tied source that still ships lm_head.weight: dropped, like mlx-lm's sanitize.
  FakeHf hf2 = FakeHf::make(DType::F32, true, 12);
  std::mt19937 rng(1);
  hf2.add("lm_head.weight", {kVocab, kHidden}, rng);
  hf2.write(d.path / "hf2");
  run_convert(d.path / "hf2", d.path / "mlx2", true);
  EXPECT_FALSE(WeightStore::open_dir((d.path / "mlx2").string()).has("lm_head.weight"));
  EXPECT_FALSE(WeightStore::open_dir((d.path / "mlx2").string()).has("lm_head.scales"));
}

TEST(Convert, GroupSizeThatDoesNotDivideKeepsBf16) {
  TempDir d;
  FakeHf hf = FakeHf::make(DType::F32, false, 13);
  hf.write(d.path / "hf");
  auto res = run_convert(d.path / "hf", d.path / "mlx", true, 8, 128);
  WeightStore ws = WeightStore::open_dir((d.path / "mlx").string());
  // down_proj's input is moe_intermediate_size = 64 < 128: left in bf16, as mlx-lm's predicate does.
  EXPECT_TRUE(ws.has("model.layers.0.mlp.switch_mlp.down_proj.weight"));
  EXPECT_EQ(ws.get("model.layers.0.mlp.switch_mlp.down_proj.weight").dtype, DType::BF16);
  EXPECT_FALSE(ws.has("model.layers.0.mlp.switch_mlp.down_proj.scales"));
  EXPECT_EQ(res.unquantized_linears.size(), size_t(kLayers));
  check_quantized(ws, "model.layers.1.mlp.switch_mlp.up_proj", {kExperts, kInter, kHidden},
                  hf.expected("model.layers.1.mlp.switch_mlp.up_proj.weight"), {8, 128});
  json cfg = read_json(d.path / "mlx" / "config.json");
  EXPECT_EQ(cfg["quantization"], (json{{"group_size", 128}, {"bits", 8}, {"mode", "affine"}}));
}

// --quant-router-bits writes the router as mlx-lm's quant_predicate does:
// {"group_size": 64, "bits": N} whatever the global group size.
TEST(Convert, RouterOverrideUsesGroup64) {
  TempDir d;
  FakeHf hf = FakeHf::make(DType::F32, false, 17);
  hf.write(d.path / "hf");
  run_convert(d.path / "hf", d.path / "mlx", true, 2, 32, /*router_bits=*/8);
  WeightStore ws = WeightStore::open_dir((d.path / "mlx").string());
  for (int64_t l = 0; l < kLayers; ++l) {
    const std::string m = "model.layers." + std::to_string(l) + ".mlp.gate";
    check_quantized(ws, m, {kExperts, kHidden}, hf.expected(m + ".weight"), {8, 64});
  }
  check_quantized(ws, "model.layers.0.self_attn.o_proj", {kHidden, kHeads * kHeadDim},
                  hf.expected("model.layers.0.self_attn.o_proj.weight"), {2, 32});
  json cfg = read_json(d.path / "mlx" / "config.json");
  EXPECT_EQ(cfg["quantization"]["model.layers.1.mlp.gate"], (json{{"group_size", 64}, {"bits", 8}}));
  EXPECT_EQ(cfg["quantization"]["bits"], 2);
  EXPECT_EQ(cfg["quantization"]["group_size"], 32);
}

namespace {
std::string convert_error(const fs::path& src, const fs::path& out, bool quantize = true) {
  try {
    run_convert(src, out, quantize);
  } catch (const zmlx::Error& e) {
    return e.what();
  }
  return "";
}
}  // namespace

TEST(Convert, ClearErrors) {
  TempDir d;
  FakeHf hf = FakeHf::make(DType::F32, false, 21);

  // Missing expert.
  FakeHf missing = hf;
  missing.values.erase("model.layers.1.mlp.experts.2.up_proj.weight");
  missing.shapes.erase("model.layers.1.mlp.experts.2.up_proj.weight");
  missing.write(d.path / "missing");
  std::string e = convert_error(d.path / "missing", d.path / "o1");
  EXPECT_NE(e.find("model.layers.1.mlp.experts.2.up_proj.weight"), std::string::npos) << e;

  // Unknown tensor.
  FakeHf extra = hf;
  std::mt19937 rng(3);
  extra.add("model.layers.0.mlp.shared_expert.up_proj.weight", {kInter, kHidden}, rng);
  extra.write(d.path / "extra");
  e = convert_error(d.path / "extra", d.path / "o2");
  EXPECT_NE(e.find("model.layers.0.mlp.shared_expert.up_proj.weight"), std::string::npos) << e;
  EXPECT_NE(e.find("not part of the qwen3_moe layout"), std::string::npos) << e;

  // Wrong expert shape vs config.
  FakeHf wrong = hf;
  for (int64_t x = 0; x < kExperts; ++x) {
    std::string n = "model.layers.0.mlp.experts." + std::to_string(x) + ".down_proj.weight";
    wrong.shapes[n] = {kInter, kHidden};
  }
  wrong.write(d.path / "wrong");
  e = convert_error(d.path / "wrong", d.path / "o3");
  EXPECT_NE(e.find("model.layers.0.mlp.experts.0.down_proj.weight"), std::string::npos) << e;
  EXPECT_NE(e.find("expected [128, 64]"), std::string::npos) << e;

  // Unsupported family, already-quantized source, non-empty output.
  hf.write(d.path / "good");
  json cfg = hf.config();
  cfg["model_type"] = "llama";
  std::ofstream(d.path / "good" / "config.json") << cfg.dump();
  e = convert_error(d.path / "good", d.path / "o4");
  EXPECT_NE(e.find("model_type 'llama' is not supported"), std::string::npos) << e;
  EXPECT_NE(e.find("qwen3_moe"), std::string::npos) << e;
  cfg = hf.config();
  cfg["quantization_config"] = {{"quant_method", "fp8"}};
  std::ofstream(d.path / "good" / "config.json") << cfg.dump();
  e = convert_error(d.path / "good", d.path / "o5");
  EXPECT_NE(e.find("quantization_config"), std::string::npos) << e;
  std::ofstream(d.path / "good" / "config.json") << hf.config().dump();
  fs::create_directories(d.path / "busy");
  std::ofstream(d.path / "busy" / "x") << "x";
  e = convert_error(d.path / "good", d.path / "busy");
  EXPECT_NE(e.find("already exists"), std::string::npos) << e;
  EXPECT_EQ(convert_error(d.path / "good", d.path / "o6"), "");  // and the good one converts

  // Missing source.
  e = convert_error(d.path / "nowhere", d.path / "o7");
  EXPECT_NE(e.find("not found"), std::string::npos) << e;
}

// The generic machinery with a test family: transposed pieces (as GLM's
// kv_b_proj -> embed_q needs), an F32 Keep tensor, and a Linear built from
// transposed blocks.
namespace {
convert::Plan plan_test(const convert::PlanInput& in) {
  convert::Plan p;
  using convert::Role;
  // w: F32 [2, 32, 64] -> m.weight [2, 64, 32], each expert block transposed.
  convert::OutputTensor m{"m.weight", {2, 64, 32}, {}, Role::Linear};
  for (int e = 0; e < 2; ++e) m.pieces.push_back({"w", e * 32 * 64, 32 * 64, /*transpose_rows=*/32});
  p.tensors.push_back(m);
  convert::OutputTensor keep{"norm.weight", {64}, {{"n"}}, Role::Keep};
  p.tensors.push_back(keep);
  convert::OutputTensor f32{"gate.e_score_correction_bias", {5}, {{"b"}}, Role::Keep};
  f32.keep_dtype = DType::F32;
  p.tensors.push_back(f32);
  p.ignored["junk"] = "not needed";
  return p;
}
}  // namespace

TEST(Convert, GenericTransposeAndF32Keep) {
  TempDir d;
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::map<std::string, std::vector<float>> v;
  std::map<std::string, std::vector<int64_t>> shapes = {{"w", {2, 32, 64}}, {"n", {64}}, {"b", {5}}, {"junk", {3}}};
  for (auto& [n, s] : shapes) {
    int64_t k = 1;
    for (auto x : s) k *= x;
    for (int64_t i = 0; i < k; ++i) v[n].push_back(nd(rng) * 0.1f + 0.001f * float(i));
  }
  std::vector<TensorSpec> specs;
  for (auto& [n, s] : shapes) specs.push_back({n, DType::F32, s});
  fs::create_directories(d.path / "src");
  write_safetensors((d.path / "src" / "model.safetensors").string(), specs,
                    [&](const TensorSpec& s, uint8_t* dst) { std::memcpy(dst, v[s.name].data(), s.nbytes()); });
  std::ofstream(d.path / "src" / "config.json") << R"({"model_type": "test_family"})";

  convert::Family fam{"test_family", "Test", &plan_test};
  convert::ConvertOptions o;
  o.source = (d.path / "src").string();
  o.output = (d.path / "out").string();
  o.q = {4, 32};
  o.progress = false;
  convert::convert_as(o, fam);
  WeightStore ws = WeightStore::open_dir(o.output);

  std::vector<float> want(2 * 64 * 32);
  for (int e = 0; e < 2; ++e)
    for (int r = 0; r < 64; ++r)
      for (int c = 0; c < 32; ++c) want[(e * 64 + r) * 32 + c] = round_bf16(v["w"][(e * 32 + c) * 64 + r]);
  check_quantized(ws, "m", {2, 64, 32}, want, {4, 32});

  auto b = as<float>(ws.get("gate.e_score_correction_bias", DType::F32, {5}));
  EXPECT_EQ(b, v["b"]);  // exact fp32, not rounded to bf16
  auto n = as<uint16_t>(ws.get("norm.weight", DType::BF16, {64}));
  for (int i = 0; i < 64; ++i) EXPECT_EQ(n[i], f32_to_bf16_bits(v["n"][i]));
  EXPECT_FALSE(ws.has("junk"));

  // Without the ignore entry, the unused source is an error naming it.
  fs::remove_all(d.path / "out");
  convert::Family strict{"test_family", "Test", [](const convert::PlanInput& in) {
                           convert::Plan p = plan_test(in);
                           p.ignored.clear();
                           return p;
                         }};
  try {
    convert::convert_as(o, strict);
    ADD_FAILURE() << "expected an error";
  } catch (const zmlx::Error& e) {
    EXPECT_NE(std::string(e.what()).find("junk"), std::string::npos) << e.what();
  }
}

namespace zmlx {
namespace {

// Dense Qwen3 (Qwen3ForCausalLM): a small random transformers-layout
// checkpoint. The bf16 conversion must keep every tensor bit for bit (the
// source is bf16 already); the 4-bit one must load and stay close.
TEST(Convert, DenseQwen3) {
  test::TempDir d;
  const int64_t D = 64, L = 2, H = 4, Hkv = 2, hd = 32, I = 128, V = 300;
  const fs::path hf = d.path / "hf";
  fs::create_directories(hf);
  json cfg = {{"model_type", "qwen3"}, {"architectures", {"Qwen3ForCausalLM"}}, {"hidden_size", D},
              {"num_hidden_layers", L}, {"num_attention_heads", H}, {"num_key_value_heads", Hkv},
              {"head_dim", hd}, {"intermediate_size", I}, {"vocab_size", V}, {"rms_norm_eps", 1e-6},
              {"rope_theta", 1000000.0}, {"tie_word_embeddings", true}, {"max_position_embeddings", 512},
              {"torch_dtype", "bfloat16"}};
  std::ofstream(hf / "config.json") << cfg.dump(2);
  std::vector<io::TensorSpec> specs = {{"model.embed_tokens.weight", DType::BF16, {V, D}},
                                       {"model.norm.weight", DType::BF16, {D}}};
  for (int64_t l = 0; l < L; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    for (auto [n, r, c] : std::vector<std::tuple<std::string, int64_t, int64_t>>{
             {"self_attn.q_proj.weight", H * hd, D}, {"self_attn.k_proj.weight", Hkv * hd, D},
             {"self_attn.v_proj.weight", Hkv * hd, D}, {"self_attn.o_proj.weight", D, H * hd},
             {"mlp.gate_proj.weight", I, D}, {"mlp.up_proj.weight", I, D}, {"mlp.down_proj.weight", D, I}})
      specs.push_back({p + n, DType::BF16, {r, c}});
    for (const char* n : {"input_layernorm.weight", "post_attention_layernorm.weight"})
      specs.push_back({p + n, DType::BF16, {D}});
    for (const char* n : {"self_attn.q_norm.weight", "self_attn.k_norm.weight"})
      specs.push_back({p + n, DType::BF16, {hd}});
  }
  std::mt19937 rng(5);
  io::write_model_weights(hf.string(), specs, [&](const io::TensorSpec& t, uint8_t* dst) {
    const bool norm = t.shape.size() == 1;
    std::normal_distribution<float> nd(norm ? 1.f : 0.f, norm ? 0.1f : 0.08f);
    auto* o = reinterpret_cast<uint16_t*>(dst);
    for (size_t i = 0; i < t.nbytes() / 2; ++i) o[i] = f32_to_bf16_bits(nd(rng));
  }, 1ull << 30, false, {});
  auto cpu = make_cpu_backend();
  std::vector<int32_t> ids = {5, 17, 299, 42, 7};
  std::vector<float> ref;
  for (bool quantize : {false, true}) {
    convert::ConvertOptions o;
    o.source = hf.string();
    o.output = (d.path / (quantize ? "q4" : "bf16")).string();
    o.quantize = quantize;
    o.progress = false;
    convert::convert(o);
    auto m = load_model(o.output, *cpu);
    EXPECT_EQ(m->family(), "qwen3");
    const auto got = test::last_logits(*m, *cpu, ids, ids.size());
    if (!quantize) {
      WeightStore src = WeightStore::open_dir(hf.string()), out = WeightStore::open_dir(o.output);
      for (auto& t : specs)
        EXPECT_EQ(bytes_of(src.get(t.name)), bytes_of(out.get(t.name))) << t.name << " changed in bf16";
      ref = got;
      continue;
    }
    // 4-bit noise on a 2-layer random net moves logits by ~25 % (rel L2); a
    // wrong layout (transposed, misnamed, unscaled) moves them by ~100 %.
    double num = 0, den = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      ASSERT_TRUE(std::isfinite(got[i]));
      num += double(got[i] - ref[i]) * (got[i] - ref[i]), den += double(ref[i]) * ref[i];
    }
    EXPECT_LT(std::sqrt(num / den), 0.5) << "4-bit conversion strays too far from bf16";
  }
}

}  // namespace
}  // namespace zmlx
