// zmlx convert on a tiny fake transformers Lfm2Moe checkpoint: w1/w3/w2 ->
// gate/up/down (dense layers and stacked experts), the Conv1d kernel
// [D, 1, L] -> [D, L, 1], tied head, F32 expert_bias, and the 8-bit router
// override mlx-lm writes for this family; the result loads and runs.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>

#include "model_test_helpers.h"
#include "fake_checkpoint.h"
#include "test_helpers.h"
#include "zmlx/convert/convert.h"
#include "zmlx/core/dtype.h"
#include "zmlx/io/safetensors.h"
#include "zmlx/models/model.h"

namespace zmlx {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr int64_t kLayers = 4, kE = 4, kD = 128, kI = 64, kIn = 128, kH = 4, kKv = 2, kHd = 32, kV = 256, kLc = 3;
const std::vector<std::string> kTypes = {"conv", "conv", "full_attention", "conv"};

struct FakeLfm2 : test::FakeCheckpoint {
  static FakeLfm2 make(bool fused_names_gate_up = false) {
    FakeLfm2 m;
    std::mt19937 rng(17);
    m.add("model.embed_tokens.weight", {kV, kD}, rng, 1.0f);
    m.values["lm_head.weight"] = m.values["model.embed_tokens.weight"];  // tied copy, as HF may save it
    m.shapes["lm_head.weight"] = {kV, kD};
    m.dtypes["lm_head.weight"] = DType::BF16;
    m.add("model.embedding_norm.weight", {kD}, rng, 0.05f, 1.f);
    for (int64_t l = 0; l < kLayers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      m.add(p + "operator_norm.weight", {kD}, rng, 0.05f, 1.f);
      m.add(p + "ffn_norm.weight", {kD}, rng, 0.05f, 1.f);
      if (kTypes[size_t(l)] == "conv") {
        m.add(p + "conv.in_proj.weight", {3 * kD, kD}, rng, 0.09f);
        m.add(p + "conv.out_proj.weight", {kD, kD}, rng, 0.02f);
        m.add(p + "conv.conv.weight", {kD, 1, kLc}, rng, 0.5f);
      } else {
        m.add(p + "self_attn.q_proj.weight", {kH * kHd, kD}, rng, 0.09f);
        m.add(p + "self_attn.k_proj.weight", {kKv * kHd, kD}, rng, 0.09f);
        m.add(p + "self_attn.v_proj.weight", {kKv * kHd, kD}, rng, 0.09f);
        m.add(p + "self_attn.out_proj.weight", {kD, kH * kHd}, rng, 0.02f);
        m.add(p + "self_attn.q_layernorm.weight", {kHd}, rng, 0.05f, 1.f);
        m.add(p + "self_attn.k_layernorm.weight", {kHd}, rng, 0.05f, 1.f);
      }
      if (l == 0) {
        m.add(p + "feed_forward.w1.weight", {kIn, kD}, rng, 0.09f);
        m.add(p + "feed_forward.w3.weight", {kIn, kD}, rng, 0.09f);
        m.add(p + "feed_forward.w2.weight", {kD, kIn}, rng, 0.02f);
        continue;
      }
      m.add(p + "feed_forward.gate.weight", {kE, kD}, rng, 0.15f);
      m.add(p + "feed_forward.expert_bias", {kE}, rng, 0.02f, 0.f, DType::F32);
      for (int64_t e = 0; e < kE; ++e) {
        const std::string x = p + "feed_forward.experts." + std::to_string(e) + ".";
        m.add(x + (fused_names_gate_up ? "gate_proj" : "w1") + ".weight", {kI, kD}, rng, 0.09f);
        m.add(x + (fused_names_gate_up ? "up_proj" : "w3") + ".weight", {kI, kD}, rng, 0.09f);
        m.add(x + (fused_names_gate_up ? "down_proj" : "w2") + ".weight", {kD, kI}, rng, 0.02f);
      }
    }
    return m;
  }

  void write(const fs::path& dir) const {
    write_tensors(dir, 400000);
    json c = {{"architectures", {"Lfm2MoeForCausalLM"}}, {"model_type", "lfm2_moe"}, {"hidden_size", kD},
              {"num_hidden_layers", kLayers}, {"num_attention_heads", kH}, {"num_key_value_heads", kKv},
              {"num_experts", kE}, {"num_experts_per_tok", 2}, {"moe_intermediate_size", kI},
              {"intermediate_size", kIn}, {"num_dense_layers", 1}, {"vocab_size", kV}, {"layer_types", kTypes},
              {"conv_L_cache", kLc}, {"conv_bias", false}, {"norm_eps", 1e-5}, {"use_expert_bias", true},
              {"norm_topk_prob", true}, {"routed_scaling_factor", 1.0}, {"tie_word_embeddings", true},
              {"rope_parameters", {{"rope_type", "default"}, {"rope_theta", 1000000.0}}}, {"eos_token_id", 7},
              {"bos_token_id", 1}, {"torch_dtype", "bfloat16"}};
    std::ofstream(dir / "config.json") << c.dump(2);
  }
};

void run_convert(const fs::path& src, const fs::path& out, bool quantize) {
  convert::ConvertOptions o;
  o.source = src.string();
  o.output = out.string();
  o.quantize = quantize;
  o.progress = false;
  EXPECT_EQ(convert::convert(o).family, "lfm2_moe");
}

float bf16_at(const io::TensorInfo& t, int64_t i) { return bf16_to_f32(reinterpret_cast<const uint16_t*>(t.data)[i]); }

TEST(ConvertLfm2, Bf16NamesShapesAndValues) {
  test::TempDir tmp("convert_lfm2");
  const FakeLfm2 m = FakeLfm2::make();
  m.write(tmp.path / "hf");
  run_convert(tmp.path / "hf", tmp.path / "mlx", false);
  const io::WeightStore ws = io::WeightStore::open_dir((tmp.path / "mlx").string());
  EXPECT_FALSE(ws.has("lm_head.weight"));
  const io::TensorInfo& g0 = ws.get("model.layers.0.feed_forward.gate_proj.weight", DType::BF16, {kIn, kD});
  const io::TensorInfo& d0 = ws.get("model.layers.0.feed_forward.down_proj.weight", DType::BF16, {kD, kIn});
  EXPECT_EQ(bf16_at(g0, 77), m.values.at("model.layers.0.feed_forward.w1.weight")[77]);
  EXPECT_EQ(bf16_at(d0, 5), m.values.at("model.layers.0.feed_forward.w2.weight")[5]);
  const io::TensorInfo& up = ws.get("model.layers.3.feed_forward.switch_mlp.up_proj.weight", DType::BF16, {kE, kI, kD});
  const io::TensorInfo& dn = ws.get("model.layers.3.feed_forward.switch_mlp.down_proj.weight", DType::BF16, {kE, kD, kI});
  for (int64_t i : {int64_t(0), int64_t(1000), kI * kD - 1}) {
    EXPECT_EQ(bf16_at(up, 2 * kI * kD + i), m.values.at("model.layers.3.feed_forward.experts.2.w3.weight")[size_t(i)]);
    EXPECT_EQ(bf16_at(dn, 3 * kD * kI + i), m.values.at("model.layers.3.feed_forward.experts.3.w2.weight")[size_t(i)]);
  }
  const io::TensorInfo& cw = ws.get("model.layers.1.conv.conv.weight", DType::BF16, {kD, kLc, 1});
  for (int64_t i = 0; i < kD * kLc; ++i)
    ASSERT_EQ(bf16_at(cw, i), m.values.at("model.layers.1.conv.conv.weight")[size_t(i)]);
  const io::TensorInfo& b = ws.get("model.layers.2.feed_forward.expert_bias", DType::F32, {kE});
  EXPECT_EQ(std::memcmp(b.data, m.values.at("model.layers.2.feed_forward.expert_bias").data(), 4 * kE), 0);
}

TEST(ConvertLfm2, FourBitHasTheEightBitRouterAndRuns) {
  test::TempDir tmp("convert_lfm2_q");
  FakeLfm2::make().write(tmp.path / "hf");
  run_convert(tmp.path / "hf", tmp.path / "q", true);
  std::ifstream f(tmp.path / "q" / "config.json");
  const json c = json::parse(f);
  for (int64_t l = 1; l < kLayers; ++l) {
    const std::string k = "model.layers." + std::to_string(l) + ".feed_forward.gate";
    ASSERT_TRUE(c["quantization"].contains(k)) << k;
    EXPECT_EQ(c["quantization"][k]["bits"], 8);
    EXPECT_EQ(c["quantization"][k]["group_size"], 64);
  }
  const io::WeightStore ws = io::WeightStore::open_dir((tmp.path / "q").string());
  ws.get("model.layers.1.feed_forward.gate.weight", DType::U32, {kE, kD / 4});  // 8-bit: 4 values a word
  ws.get("model.layers.1.feed_forward.switch_mlp.gate_proj.weight", DType::U32, {kE, kI, kD / 8});
  auto be = make_cpu_backend();
  auto model = load_model((tmp.path / "q").string(), *be);
  EXPECT_EQ(model->layer_kinds()[2], "attention+moe");
  const std::vector<int32_t> ids = {1, 5, 9, 200, 31, 64};
  const auto a = test::last_logits(*model, *be, ids, ids.size());
  ASSERT_EQ(a.size(), size_t(kV));
  for (float x : a) ASSERT_TRUE(std::isfinite(x));
  EXPECT_EQ(a, test::last_logits(*model, *be, ids, 1));  // conv state + KV cache across steps
}

TEST(ConvertLfm2, GateUpDownExpertNamesAreAcceptedToo) {
  test::TempDir tmp("convert_lfm2_names");
  const FakeLfm2 m = FakeLfm2::make(/*fused_names_gate_up=*/true);
  m.write(tmp.path / "hf");
  run_convert(tmp.path / "hf", tmp.path / "mlx", false);
  const io::WeightStore ws = io::WeightStore::open_dir((tmp.path / "mlx").string());
  const io::TensorInfo& g = ws.get("model.layers.1.feed_forward.switch_mlp.gate_proj.weight", DType::BF16, {kE, kI, kD});
  EXPECT_EQ(bf16_at(g, kI * kD + 3), m.values.at("model.layers.1.feed_forward.experts.1.gate_proj.weight")[3]);
}

}  // namespace
}  // namespace zmlx
