// zmlx convert on a tiny fake transformers Glm4MoeLite checkpoint: the MTP
// layer is dropped, kv_b_proj becomes embed_q / unembed_out, experts are
// stacked (per-expert and fused sources), the router stays bf16 and the
// e_score_correction_bias F32; the converted model loads and runs, and its
// embed_q / unembed_out agree with zmlx's own load-time split of kv_b_proj.
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

constexpr int64_t kLayers = 3, kE = 4, kD = 128, kH = 2, kQl = 64, kL = 64, kDn = 64, kDr = 32, kDv = 64, kI = 64,
                  kIn = 128, kV = 256;

struct FakeGlm : test::FakeCheckpoint {
  static FakeGlm make(uint32_t seed = 9) {
    FakeGlm m;
    std::mt19937 rng(seed);
    m.add("model.embed_tokens.weight", {kV, kD}, rng, 1.0f);
    m.add("lm_head.weight", {kV, kD}, rng);
    m.add("model.norm.weight", {kD}, rng, 0.05f, 1.f);
    for (int64_t l = 0; l <= kLayers; ++l) {  // layer kLayers: the MTP layer
      const std::string p = "model.layers." + std::to_string(l) + ".";
      m.add(p + "input_layernorm.weight", {kD}, rng, 0.05f, 1.f);
      m.add(p + "post_attention_layernorm.weight", {kD}, rng, 0.05f, 1.f);
      m.add(p + "self_attn.q_a_proj.weight", {kQl, kD}, rng, 0.09f);
      m.add(p + "self_attn.q_a_layernorm.weight", {kQl}, rng, 0.05f, 1.f);
      m.add(p + "self_attn.q_b_proj.weight", {kH * (kDn + kDr), kQl}, rng, 0.12f);
      m.add(p + "self_attn.kv_a_proj_with_mqa.weight", {kL + kDr, kD}, rng, 0.09f);
      m.add(p + "self_attn.kv_a_layernorm.weight", {kL}, rng, 0.05f, 1.f);
      m.add(p + "self_attn.kv_b_proj.weight", {kH * (kDn + kDv), kL}, rng, 0.12f);
      m.add(p + "self_attn.o_proj.weight", {kD, kH * kDv}, rng, 0.01f);
      if (l == 0) {
        m.add(p + "mlp.gate_proj.weight", {kIn, kD}, rng, 0.09f);
        m.add(p + "mlp.up_proj.weight", {kIn, kD}, rng, 0.09f);
        m.add(p + "mlp.down_proj.weight", {kD, kIn}, rng, 0.01f);
        continue;
      }
      m.add(p + "mlp.gate.weight", {kE, kD}, rng, 0.15f);
      m.add(p + "mlp.gate.e_score_correction_bias", {kE}, rng, 0.02f, 0.f, DType::F32);
      for (int64_t e = 0; e < kE; ++e) {
        const std::string x = p + "mlp.experts." + std::to_string(e) + ".";
        m.add(x + "gate_proj.weight", {kI, kD}, rng, 0.09f);
        m.add(x + "up_proj.weight", {kI, kD}, rng, 0.09f);
        m.add(x + "down_proj.weight", {kD, kI}, rng, 0.01f);
      }
      for (const char* s : {"gate_proj", "up_proj"}) m.add(p + "mlp.shared_experts." + s + ".weight", {kI, kD}, rng, 0.09f);
      m.add(p + "mlp.shared_experts.down_proj.weight", {kD, kI}, rng, 0.01f);
    }
    {  // the MTP layer's own extras
      const std::string p = "model.layers." + std::to_string(kLayers) + ".";
      m.add(p + "eh_proj.weight", {kD, 2 * kD}, rng);
      m.add(p + "enorm.weight", {kD}, rng);
      m.add(p + "hnorm.weight", {kD}, rng);
      m.add(p + "shared_head.norm.weight", {kD}, rng);
    }
    return m;
  }

  static json config() {
    return json{{"architectures", {"Glm4MoeLiteForCausalLM"}}, {"model_type", "glm4_moe_lite"},
                {"hidden_size", kD}, {"num_hidden_layers", kLayers}, {"num_attention_heads", kH},
                {"num_key_value_heads", kH}, {"q_lora_rank", kQl}, {"kv_lora_rank", kL},
                {"qk_nope_head_dim", kDn}, {"qk_rope_head_dim", kDr}, {"v_head_dim", kDv},
                {"n_routed_experts", kE}, {"num_experts_per_tok", 2}, {"n_shared_experts", 1},
                {"moe_intermediate_size", kI}, {"intermediate_size", kIn}, {"first_k_dense_replace", 1},
                {"moe_layer_freq", 1}, {"n_group", 1}, {"topk_group", 1}, {"norm_topk_prob", true},
                {"routed_scaling_factor", 1.8}, {"rms_norm_eps", 1e-5}, {"rope_theta", 1000000.0},
                {"rope_scaling", nullptr}, {"vocab_size", kV}, {"tie_word_embeddings", false},
                {"num_nextn_predict_layers", 1}, {"eos_token_id", {250, 251}}, {"torch_dtype", "bfloat16"}};
  }

  // fused: experts as transformers 5 keeps them in memory (gate_up_proj [E, 2I, D], down_proj [E, D, I]).
  void write(const fs::path& dir, bool fused) const {
    if (!fused) {
      write_tensors(dir, 300000);
    } else {
      FakeCheckpoint out;
      for (auto& [n, v] : values) {
        if (n.find(".mlp.experts.") != std::string::npos) continue;
        out.values[n] = v;
        out.shapes[n] = shapes.at(n);
        out.dtypes[n] = dtypes.at(n);
      }
      for (int64_t l = 1; l <= kLayers; ++l) {
        const std::string p = "model.layers." + std::to_string(l) + ".mlp.experts.";
        std::vector<float> gu, dn;
        for (int64_t e = 0; e < kE; ++e) {
          const std::string x = p + std::to_string(e) + ".";
          for (const char* s : {"gate_proj", "up_proj"}) {
            auto& v = values.at(x + s + ".weight");
            gu.insert(gu.end(), v.begin(), v.end());
          }
          auto& d = values.at(x + "down_proj.weight");
          dn.insert(dn.end(), d.begin(), d.end());
        }
        out.values[p + "gate_up_proj"] = gu;
        out.shapes[p + "gate_up_proj"] = {kE, 2 * kI, kD};
        out.values[p + "down_proj"] = dn;
        out.shapes[p + "down_proj"] = {kE, kD, kI};
        out.dtypes[p + "gate_up_proj"] = out.dtypes[p + "down_proj"] = DType::BF16;
      }
      out.write_tensors(dir, 300000);
    }
    std::ofstream(dir / "config.json") << config().dump(2);
  }
};

std::string run_convert(const fs::path& src, const fs::path& out, bool quantize) {
  convert::ConvertOptions o;
  o.source = src.string();
  o.output = out.string();
  o.quantize = quantize;
  o.progress = false;
  return convert::convert(o).family;
}

TEST(ConvertGlm, Bf16LayoutValuesAndMtpDropped) {
  test::TempDir tmp("convert_glm");
  const FakeGlm m = FakeGlm::make();
  m.write(tmp.path / "hf", /*fused=*/false);
  EXPECT_EQ(run_convert(tmp.path / "hf", tmp.path / "mlx", /*quantize=*/false), "glm4_moe_lite");
  const io::WeightStore ws = io::WeightStore::open_dir((tmp.path / "mlx").string());
  for (auto& n : ws.names()) {
    EXPECT_EQ(n.find("kv_b_proj"), std::string::npos) << n;
    EXPECT_EQ(n.rfind("model.layers." + std::to_string(kLayers) + ".", 0), std::string::npos) << "MTP kept: " << n;
    EXPECT_EQ(n.find(".experts."), std::string::npos) << n;
  }
  // embed_q[h][c][i] = kv_b[h*(dn+dv) + i][c]; unembed_out[h][i][c] = kv_b[h*(dn+dv) + dn + i][c].
  for (int64_t l = 0; l < kLayers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".self_attn.";
    const auto& kvb = m.values.at(p + "kv_b_proj.weight");
    const io::TensorInfo& eq = ws.get(p + "embed_q.weight", DType::BF16, {kH, kL, kDn});
    const io::TensorInfo& uo = ws.get(p + "unembed_out.weight", DType::BF16, {kH, kDv, kL});
    const uint16_t* e = reinterpret_cast<const uint16_t*>(eq.data);
    const uint16_t* u = reinterpret_cast<const uint16_t*>(uo.data);
    for (int64_t h = 0; h < kH; ++h)
      for (int64_t c = 0; c < kL; ++c) {
        for (int64_t i = 0; i < kDn; ++i)
          ASSERT_EQ(bf16_to_f32(e[(h * kL + c) * kDn + i]), kvb[size_t((h * (kDn + kDv) + i) * kL + c)]);
        for (int64_t i = 0; i < kDv; ++i)
          ASSERT_EQ(bf16_to_f32(u[(h * kDv + i) * kL + c]), kvb[size_t((h * (kDn + kDv) + kDn + i) * kL + c)]);
      }
  }
  // Router bf16, bias F32 exactly, experts stacked in expert order.
  const io::TensorInfo& b = ws.get("model.layers.2.mlp.gate.e_score_correction_bias", DType::F32, {kE});
  EXPECT_EQ(std::memcmp(b.data, m.values.at("model.layers.2.mlp.gate.e_score_correction_bias").data(), 4 * kE), 0);
  ws.get("model.layers.2.mlp.gate.weight", DType::BF16, {kE, kD});
  const io::TensorInfo& up = ws.get("model.layers.1.mlp.switch_mlp.up_proj.weight", DType::BF16, {kE, kI, kD});
  EXPECT_EQ(bf16_to_f32(reinterpret_cast<const uint16_t*>(up.data)[3 * kI * kD + 5]),
            m.values.at("model.layers.1.mlp.experts.3.up_proj.weight")[5]);
}

TEST(ConvertGlm, FourBitLoadsRunsAndFusedSourceMatches) {
  test::TempDir tmp("convert_glm4");
  const FakeGlm m = FakeGlm::make();
  m.write(tmp.path / "hf", false);
  m.write(tmp.path / "hf_fused", true);
  run_convert(tmp.path / "hf", tmp.path / "q", true);
  run_convert(tmp.path / "hf_fused", tmp.path / "qf", true);
  const io::WeightStore a = io::WeightStore::open_dir((tmp.path / "q").string()),
                        b = io::WeightStore::open_dir((tmp.path / "qf").string());
  ASSERT_EQ(a.names(), b.names());
  for (auto& n : a.names()) {
    ASSERT_EQ(a.get(n).nbytes, b.get(n).nbytes) << n;
    EXPECT_EQ(std::memcmp(a.get(n).data, b.get(n).data, a.get(n).nbytes), 0) << n;
  }
  EXPECT_TRUE(a.has("model.layers.1.self_attn.embed_q.scales"));
  EXPECT_FALSE(a.has("model.layers.1.mlp.gate.scales"));  // MoEGate is never quantized
  auto be = make_cpu_backend();
  auto model = load_model((tmp.path / "q").string(), *be);
  EXPECT_EQ(model->layer_kinds().size(), size_t(kLayers));
  std::vector<int32_t> ids = {3, 17, 99, 200, 5};
  const auto logits = test::last_logits(*model, *be, ids, ids.size());
  ASSERT_EQ(logits.size(), size_t(kV));
  for (float x : logits) ASSERT_TRUE(std::isfinite(x));
}

TEST(ConvertGlm, ConvertedSplitEqualsLoadTimeSplitOfKvBProj) {
  // bf16 conversion vs the same checkpoint in the legacy MLX layout (kv_b_proj
  // kept, split by the loader): two independent implementations of the
  // sanitize step must give the same weights, hence bit-identical logits.
  test::TempDir tmp("convert_glm_legacy");
  const FakeGlm m = FakeGlm::make(13);
  m.write(tmp.path / "hf", false);
  run_convert(tmp.path / "hf", tmp.path / "mlx", false);
  const fs::path legacy = tmp.path / "legacy";
  fs::create_directories(legacy);
  fs::copy_file(tmp.path / "mlx" / "config.json", legacy / "config.json");
  const io::WeightStore ws = io::WeightStore::open_dir((tmp.path / "mlx").string());
  std::vector<io::TensorSpec> specs;
  for (auto& n : ws.names())
    if (n.find(".embed_q.") == std::string::npos && n.find(".unembed_out.") == std::string::npos)
      specs.push_back({n, ws.get(n).dtype, ws.get(n).shape});
  for (int64_t l = 0; l < kLayers; ++l)
    specs.push_back({"model.layers." + std::to_string(l) + ".self_attn.kv_b_proj.weight", DType::BF16,
                     {kH * (kDn + kDv), kL}});
  io::write_model_weights(legacy.string(), specs, [&](const io::TensorSpec& s, uint8_t* dst) {
    if (ws.has(s.name)) {
      std::memcpy(dst, ws.get(s.name).data, s.nbytes());
      return;
    }
    const auto& v = m.values.at(s.name);
    for (size_t i = 0; i < v.size(); ++i) reinterpret_cast<uint16_t*>(dst)[i] = f32_to_bf16_bits(v[i]);
  }, uint64_t(1) << 30);
  auto be = make_cpu_backend();
  auto a = load_model((tmp.path / "mlx").string(), *be);
  auto b = load_model(legacy.string(), *be);
  const std::vector<int32_t> ids = {1, 2, 3, 50, 60, 70, 80};
  const auto la = test::prefill_then_greedy_logits(*a, *be, ids, 3), lb = test::prefill_then_greedy_logits(*b, *be, ids, 3);
  ASSERT_EQ(la.size(), lb.size());
  EXPECT_EQ(std::memcmp(la.data(), lb.data(), la.size() * 4), 0);
}

}  // namespace
}  // namespace zmlx
