// GLM-4.7-Flash (spec §2): the MLA and router ops against plain references
// at awkward sizes, and the tiny synthetic model end to end: determinism,
// absorbed vs expanded MLA, chunked prefill vs step decode, patched ==
// unpatched bit for bit, the patch counts on the real 47-layer structure, and
// the legacy kv_b_proj checkpoint layout.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <numeric>
#include <random>

#include "model_test_helpers.h"
#include "test_helpers.h"
#include "thread_ranks_test_helpers.h"
#include "zmlx/core/error.h"
#include "zmlx/gen/generator.h"
#include "zmlx/gen/sampler.h"
#include "zmlx/io/safetensors.h"
#include "zmlx/models/families.h"
#include "zmlx/models/model.h"
#include "zmlx/patch/patch.h"
#include "zmlx/quant/affine.h"
#include "zmlx/synth/synth.h"
#include "zmlx/text/chat_template.h"
#include "zmlx/text/prompt_prefix.h"
#include "zmlx/text/tokenizer.h"

namespace zmlx {
namespace {

namespace fs = std::filesystem;

float bf(uint16_t b) { return bf16_to_f32(b); }

std::string synth_glm(const std::string& name, std::vector<std::pair<std::string, std::string>> sets = {},
                      uint64_t seed = 7) {
  return test::synth_temp("glm4_moe_lite", "glm_" + name, seed, std::move(sets));
}

using test::ids_of;

// Relative L2 distance of two logit vectors.
double rel_l2(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += double(a[i] - b[i]) * (a[i] - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

// Dequantised value of one element of a stacked weight (fp32 scale·q + bias).
std::vector<float> dequant_matrix(const Weight& w, int64_t e) {
  std::vector<float> out(size_t(w.rows * w.cols));
  for (int64_t r = 0; r < w.rows; ++r) {
    const int64_t row = e * w.rows + r;
    if (w.quantized)
      quant::dequantize_row(w.w.ptr<uint32_t>() + row * w.words_per_row(),
                            w.scales.ptr<uint16_t>() + row * w.groups_per_row(),
                            w.biases.ptr<uint16_t>() + row * w.groups_per_row(), w.cols, w.q, &out[size_t(r * w.cols)]);
    else
      for (int64_t c = 0; c < w.cols; ++c) out[size_t(r * w.cols + c)] = bf(w.w.ptr<uint16_t>()[row * w.cols + c]);
  }
  return out;
}

// ------------------------------------------------------------------ ops

TEST(GlmOps, MultiLinearMatchesPlainReferenceBothOrientations) {
  auto be = make_cpu_backend();
  std::mt19937 rng(21);
  const int64_t H = 3, R = 48, C = 128, T = 5;
  for (bool quantized : {true, false}) {
    Weight w = quantized ? test::random_qweight(rng, H, R, C, 4, 64, "embed_q")
                         : test::random_dense_weight(rng, H, R, C, "embed_q");
    if (quantized) w = be->adopt(w);  // exercises the repacked layout too where the ISA uses it
    std::vector<std::vector<float>> W;
    for (int64_t h = 0; h < H; ++h) W.push_back(dequant_matrix(w, h));
    for (bool transpose : {true, false}) {
      const int64_t Kin = transpose ? C : R, N = transpose ? R : C;
      for (bool shared : {false, true}) {
        const int64_t cols = shared ? Kin : H * Kin;
        auto xv = test::random_bf16(rng, size_t(T * cols));
        Tensor out = be->multi_linear(test::bf16_tensor(xv, {T, cols}), w, transpose);
        ASSERT_EQ(out.rows(), T);
        ASSERT_EQ(out.cols(), H * N);
        for (int64_t t = 0; t < T; ++t)
          for (int64_t h = 0; h < H; ++h)
            for (int64_t n = 0; n < N; ++n) {
              double ref = 0, mag = 0;
              for (int64_t i = 0; i < Kin; ++i) {
                const double x = bf(xv[size_t(t * cols + (shared ? 0 : h * Kin) + i)]);
                const double wv = transpose ? W[size_t(h)][size_t(n * C + i)] : W[size_t(h)][size_t(i * C + n)];
                ref += x * wv;
                mag += std::fabs(x * wv);
              }
              const double got = bf(out.ptr<uint16_t>()[t * H * N + h * N + n]);
              ASSERT_NEAR(got, ref, std::fabs(ref) * 8e-3 + mag * 1e-5 + 1e-6)
                  << "q=" << quantized << " transpose=" << transpose << " shared=" << shared << " t=" << t
                  << " h=" << h << " n=" << n;
            }
      }
    }
  }
}

TEST(GlmOps, SliceColsTakesTheColumnsOfEveryGroup) {
  auto be = make_cpu_backend();
  std::mt19937 rng(22);
  const int64_t T = 3, n = 5, group = 11, off = 7, width = 4;
  auto xv = test::random_bf16(rng, size_t(T * n * group));
  Tensor out = be->slice_cols(test::bf16_tensor(xv, {T, n * group}), group, off, width);
  ASSERT_EQ(out.shape, (std::vector<int64_t>{T, n * width}));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t g = 0; g < n; ++g)
      for (int64_t i = 0; i < width; ++i)
        ASSERT_EQ(out.ptr<uint16_t>()[(t * n + g) * width + i], xv[size_t(t * n * group + g * group + off + i)]);
  EXPECT_THROW(be->slice_cols(test::bf16_tensor(xv, {T, n * group}), group, 9, 4), Error);
}

// A plain double-precision MLA attention with MLX's rounding of the pe term.
void check_attention_pe(int64_t heads, int64_t kv_heads, int64_t dk, int64_t dv, int64_t dr, int64_t pos0,
                        int64_t T, uint32_t seed) {
  auto be = make_cpu_backend();
  std::mt19937 rng(seed);
  const int64_t S = pos0 + T, cap = S + 3;  // rows beyond S are poisoned: they must not be read
  const float scale = 1.0f / std::sqrt(float(dk + dr));
  auto qv = test::random_bf16(rng, size_t(T * heads * dk));
  auto qpv = test::random_bf16(rng, size_t(T * heads * dr));
  Tensor k = host_tensor(DType::BF16, {cap, kv_heads * dk}), v = host_tensor(DType::BF16, {cap, kv_heads * dv}),
         kpe = host_tensor(DType::BF16, {cap, dr});
  for (Tensor* t : {&k, &v, &kpe}) {
    test::poison(*t);
    auto r = test::random_bf16(rng, size_t(S * t->cols()));
    std::copy(r.begin(), r.end(), t->ptr<uint16_t>());
  }
  Tensor out = be->attention_pe(test::bf16_tensor(qv, {T, heads * dk}), k, v, test::bf16_tensor(qpv, {T, heads * dr}),
                                kpe, pos0, heads, kv_heads, scale);
  ASSERT_EQ(out.shape, (std::vector<int64_t>{T, heads * dv}));
  const uint16_t *K = k.ptr<uint16_t>(), *V = v.ptr<uint16_t>(), *KP = kpe.ptr<uint16_t>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t kvh = h / (heads / kv_heads), vis = pos0 + t + 1;
      std::vector<double> s(size_t(vis), 0.0);
      double mx = -1e300;
      for (int64_t j = 0; j < vis; ++j) {
        double pe = 0, qk = 0;
        for (int64_t d = 0; d < dr; ++d)
          pe += double(round_bf16(scale * bf(qpv[size_t((t * heads + h) * dr + d)]))) * bf(KP[j * dr + d]);
        for (int64_t d = 0; d < dk; ++d) qk += double(bf(qv[size_t((t * heads + h) * dk + d)])) * bf(K[j * kv_heads * dk + kvh * dk + d]);
        s[size_t(j)] = scale * qk + round_bf16(float(pe));
        mx = std::max(mx, s[size_t(j)]);
      }
      double sum = 0;
      for (auto& x : s) sum += (x = std::exp(x - mx));
      for (int64_t d = 0; d < dv; ++d) {
        double o = 0;
        for (int64_t j = 0; j < vis; ++j) o += s[size_t(j)] / sum * bf(V[j * kv_heads * dv + kvh * dv + d]);
        const double got = bf(out.ptr<uint16_t>()[(t * heads + h) * dv + d]);
        ASSERT_TRUE(std::isfinite(got));
        ASSERT_NEAR(got, o, std::fabs(o) * 1e-2 + 2e-3) << "t=" << t << " h=" << h << " d=" << d;
      }
    }
}

TEST(GlmOps, AttentionPeMatchesNaiveBothForms) {
  check_attention_pe(/*heads=*/5, /*kv_heads=*/1, /*dk=*/72, /*dv=*/72, /*dr=*/10, /*pos0=*/6, /*T=*/1, 31);   // absorbed, decode
  check_attention_pe(5, 1, 72, 72, 10, 0, 9, 32);                                                           // absorbed, prefill
  check_attention_pe(/*heads=*/3, /*kv_heads=*/3, /*dk=*/24, /*dv=*/40, /*dr=*/6, /*pos0=*/4, /*T=*/7, 33);  // expanded
}

TEST(GlmOps, GroupedSigmoidRouterMatchesPlainReference) {
  auto be = make_cpu_backend();
  std::mt19937 rng(41);
  const int64_t T = 29, E = 24, k = 3;
  auto lv = test::random_bf16(rng, size_t(T * E), 2.0f);
  Tensor logits = test::bf16_tensor(lv, {T, E});
  Tensor bias = host_tensor(DType::F32, {E});
  std::normal_distribution<float> nd(0.f, 0.1f);
  for (int64_t e = 0; e < E; ++e) bias.ptr<float>()[e] = nd(rng);
  struct Case { int64_t n_group, topk_group; bool normalize; float scaling; };
  for (Case cs : {Case{1, 1, true, 1.8f}, Case{4, 2, true, 1.8f}, Case{3, 1, false, 1.0f}, Case{6, 6, true, 2.5f}}) {
    Routing r = be->route_sigmoid_grouped_topk(logits, bias, k, cs.n_group, cs.topk_group, cs.normalize, 1e-20f,
                                               cs.scaling);
    ASSERT_EQ(r.scores.dtype, DType::F32);
    const int64_t per = E / cs.n_group;
    for (int64_t t = 0; t < T; ++t) {
      std::vector<double> s(static_cast<size_t>(E)), sel(static_cast<size_t>(E));
      for (int64_t e = 0; e < E; ++e) {
        s[size_t(e)] = 1.0 / (1.0 + std::exp(-double(bf(lv[size_t(t * E + e)]))));
        sel[size_t(e)] = s[size_t(e)] + bias.ptr<float>()[e];
      }
      // Groups: keep the topk_group groups with the largest sum of their two best.
      std::vector<std::pair<double, int64_t>> gs;
      for (int64_t g = 0; g < cs.n_group; ++g) {
        std::vector<double> v(sel.begin() + g * per, sel.begin() + (g + 1) * per);
        std::sort(v.rbegin(), v.rend());
        gs.push_back({-(v[0] + (per > 1 ? v[1] : 0.0)), g});
      }
      std::stable_sort(gs.begin(), gs.end());
      if (cs.n_group > 1)
        for (int64_t i = cs.topk_group; i < cs.n_group; ++i)
          for (int64_t e = gs[size_t(i)].second * per; e < (gs[size_t(i)].second + 1) * per; ++e) sel[size_t(e)] = 0.0;
      std::vector<int32_t> ord(static_cast<size_t>(E));
      std::iota(ord.begin(), ord.end(), 0);
      std::stable_sort(ord.begin(), ord.end(), [&](int32_t a, int32_t b) { return sel[size_t(a)] > sel[size_t(b)]; });
      double sum = 0;
      for (int64_t j = 0; j < k; ++j) sum += s[size_t(ord[size_t(j)])];
      for (int64_t j = 0; j < k; ++j) {
        const int32_t e = ord[size_t(j)];
        ASSERT_EQ(r.experts.ptr<int32_t>()[t * k + j], e) << "groups " << cs.n_group << " t=" << t << " j=" << j;
        const double want = (cs.normalize ? s[size_t(e)] / sum : s[size_t(e)]) * cs.scaling;
        ASSERT_NEAR(r.scores.ptr<float>()[t * k + j], want, 1e-6 * std::fabs(want) + 1e-7);
      }
    }
  }
  // The bias steers selection only; the weight is the unbiased fp32 sigmoid (not rounded to bf16).
  bias.ptr<float>()[5] = 100.f;
  Routing r = be->route_sigmoid_grouped_topk(logits, bias, k, 1, 1, /*normalize=*/false, 1e-20f, 1.0f);
  for (int64_t t = 0; t < T; ++t) {
    EXPECT_EQ(r.experts.ptr<int32_t>()[t * k], 5);
    EXPECT_EQ(r.scores.ptr<float>()[t * k], 1.0f / (1.0f + std::exp(-bf(lv[size_t(t * E + 5)]))));
  }
}

// ------------------------------------------------------------------ model

using test::greedy;

std::string file_bytes(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

TEST(GlmModel, SynthIsByteIdenticalForTheSameSeed) {
  const std::string a = synth_glm("same_a", {}, 11), b = synth_glm("same_b", {}, 11), c = synth_glm("other", {}, 12);
  size_t files = 0;
  for (auto& e : fs::directory_iterator(a)) {
    const auto name = e.path().filename();
    ASSERT_TRUE(fs::exists(fs::path(b) / name)) << name;
    EXPECT_EQ(file_bytes(e.path()), file_bytes(fs::path(b) / name)) << name;
    ++files;
  }
  EXPECT_GE(files, 5u);
  EXPECT_NE(file_bytes(fs::path(a) / "model.safetensors"), file_bytes(fs::path(c) / "model.safetensors"));
}

TEST(GlmModel, TinyLoadsAndGeneratesDeterministically) {
  auto be = make_cpu_backend();
  const std::string dir = synth_glm("det");
  auto m = load_model(dir, *be);
  EXPECT_EQ(m->family(), "glm4_moe_lite");
  const auto kinds = m->layer_kinds();
  ASSERT_EQ(kinds.size(), 4u);
  EXPECT_EQ(kinds[0], "mla+swiglu_mlp");
  EXPECT_EQ(kinds[1], "mla+moe");
  EXPECT_EQ(kinds[3], "mla+moe");
  EXPECT_EQ(m->config().eos_token_ids.size(), 3u);
  // The cache holds only the latent and the rope key per token.
  Cache c = m->new_cache(*be);
  ASSERT_EQ(c.kv.size(), 4u);
  EXPECT_EQ(c.kv[0].k.dim(0), 1);
  EXPECT_EQ(c.kv[0].k.dim(2), 64);  // kv_lora_rank
  EXPECT_EQ(c.kv[0].v.dim(2), 32);  // qk_rope_head_dim
  const auto prompt = ids_of(9, m->config().vocab_size);
  const auto a = greedy(*m, *be, prompt, 8);
  auto m2 = load_model(dir, *be);
  EXPECT_EQ(a, greedy(*m2, *be, prompt, 8));
  for (int32_t t : a) EXPECT_TRUE(t >= 0 && t < m->config().vocab_size);
}

TEST(GlmModel, AbsorbedAndExpandedMlaAgreeWithinBf16Tolerance) {
  auto be = make_cpu_backend();
  auto m = load_model(synth_glm("forms"), *be);
  const auto ids = ids_of(21, m->config().vocab_size);
  set_mla_form(*m, MlaAttention::Form::Absorbed);
  const auto abs_all = test::prefill_then_greedy_logits(*m, *be, ids, 4);
  set_mla_form(*m, MlaAttention::Form::Expanded);
  const auto exp_all = test::prefill_then_greedy_logits(*m, *be, ids, 4);
  const double d = rel_l2(abs_all, exp_all);
  RecordProperty("rel_l2_absorbed_vs_expanded", std::to_string(d));
  EXPECT_LE(d, 1e-2);
  EXPECT_NE(abs_all, exp_all);  // different rounding points: a real second path, not the same code
  // And the attention matters: another early token changes the last logits.
  auto other = ids;
  other[2] = (other[2] + 1) % int32_t(m->config().vocab_size);
  set_mla_form(*m, MlaAttention::Form::Auto);
  EXPECT_NE(test::last_logits(*m, *be, ids, ids.size()), test::last_logits(*m, *be, other, other.size()));
}

TEST(GlmModel, ChunkedPrefillAndStepDecodeAgree) {
  auto be = make_cpu_backend();
  auto m = load_model(synth_glm("chunks"), *be);
  const auto ids = ids_of(23, m->config().vocab_size);
  // One MLA form throughout: chunking changes nothing, bit for bit.
  for (auto f : {MlaAttention::Form::Absorbed, MlaAttention::Form::Expanded}) {
    set_mla_form(*m, f);
    const auto one = test::last_logits(*m, *be, ids, ids.size());
    EXPECT_EQ(one, test::last_logits(*m, *be, ids, 1));
    EXPECT_EQ(one, test::last_logits(*m, *be, ids, 5));
  }
  // MLX's choice (expanded for T > 1, absorbed for T == 1): within bf16 tolerance.
  set_mla_form(*m, MlaAttention::Form::Auto);
  const auto one = test::last_logits(*m, *be, ids, ids.size());
  for (size_t chunk : {size_t(1), size_t(2), size_t(5)}) {
    const auto v = test::last_logits(*m, *be, ids, chunk);
    RecordProperty("rel_l2_chunk_" + std::to_string(chunk), std::to_string(rel_l2(v, one)));
    EXPECT_LE(rel_l2(v, one), 1e-2) << "chunk " << chunk;
    EXPECT_EQ(argmax(v.data(), int64_t(v.size())), argmax(one.data(), int64_t(one.size()))) << "chunk " << chunk;
  }
}

TEST(GlmModel, PatchedLogitsAreBitIdenticalToUnpatched) {
  auto be = make_cpu_backend();
  auto m = load_model(synth_glm("patch"), *be);
  for (size_t n : {1u, 7u, 40u}) {
    const auto ids = ids_of(n, m->config().vocab_size);
    const auto base = test::prefill_then_greedy_logits(*m, *be, ids);
    patch::PatchOptions o;
    o.enabled = true;
    o.quiet = true;
    const auto rep = patch::patch(*m, o);
    EXPECT_EQ(rep.counts_str(), "{'swiglu_mlp': 1, 'moe_mlp': 3}");
    const auto fused = test::prefill_then_greedy_logits(*m, *be, ids);
    ASSERT_EQ(base.size(), fused.size());
    EXPECT_EQ(std::memcmp(base.data(), fused.data(), base.size() * 4), 0) << n << " tokens";
    EXPECT_EQ(patch::unpatch(*m), 4);
  }
}

TEST(GlmModel, PatchCountsOnTheRealLayerStructure) {
  // Tiny widths, the real 47-layer structure (spec §2.1): layer 0 dense, 46 MoE.
  auto be = make_cpu_backend();
  auto m = load_model(synth_glm("counts", {{"num_hidden_layers", "47"}, {"n_routed_experts", "64"},
                                           {"num_experts_per_tok", "4"}}),
                      *be);
  patch::PatchOptions o;
  o.enabled = true;
  o.quiet = true;
  const auto rep = patch::patch(*m, o);
  EXPECT_EQ(rep.counts_str(), "{'swiglu_mlp': 1, 'moe_mlp': 46}");
  EXPECT_EQ(rep.total(), 47);
}

TEST(GlmModel, TransformersStyleConfigKeys) {
  // transformers 5 writes mlp_layer_types and rope_parameters instead of
  // first_k_dense_replace and rope_theta: same model, same logits.
  auto be = make_cpu_backend();
  auto a = load_model(synth_glm("keys_a", {}, 19), *be);
  auto b = load_model(synth_glm("keys_b", {{"first_k_dense_replace", "null"}, {"rope_theta", "null"},
                                           {"mlp_layer_types", R"(["dense", "sparse", "sparse", "sparse"])"},
                                           {"rope_parameters", R"({"rope_type": "default", "rope_theta": 1000000.0})"}},
                               19),
                      *be);
  const auto ids = ids_of(9, a->config().vocab_size);
  EXPECT_EQ(test::last_logits(*a, *be, ids, ids.size()), test::last_logits(*b, *be, ids, ids.size()));
  EXPECT_EQ(b->layer_kinds()[0], "mla+swiglu_mlp");
  EXPECT_THROW(load_model(synth_glm("keys_c", {{"mlp_layer_types", R"(["sparse", "sparse", "sparse", "sparse"])"}}), *be),
               Error);
}

TEST(GlmModel, GroupLimitedRoutingConfigLoadsAndRuns) {
  auto be = make_cpu_backend();
  auto m = load_model(synth_glm("groups", {{"n_group", "4"}, {"topk_group", "2"}}), *be);
  const auto ids = ids_of(6, m->config().vocab_size);
  const auto a = test::last_logits(*m, *be, ids, ids.size());
  auto m1 = load_model(synth_glm("groups1"), *be);  // same seed, n_group 1
  EXPECT_NE(a, test::last_logits(*m1, *be, ids, ids.size()));  // group limits change the routing
}

TEST(GlmText, EveryPromptStartsWithGmaskSop) {
  const std::string dir = synth_glm("text");
  const text::Tokenizer tok = text::Tokenizer::from_dir(dir);
  const int32_t gmask = *tok.token_id("[gMASK]"), sop = *tok.token_id("<sop>");
  // Raw completion prompts get the prefix once.
  const auto raw = tok.encode(text::with_raw_prompt_prefix("glm4_moe_lite", "Hello world"));
  ASSERT_GE(raw.size(), 3u);
  EXPECT_EQ(raw[0], gmask);
  EXPECT_EQ(raw[1], sop);
  EXPECT_EQ(raw, tok.encode(text::with_raw_prompt_prefix("glm4_moe_lite", "[gMASK]<sop>Hello world")));
  EXPECT_EQ(text::with_raw_prompt_prefix("qwen3_moe", "Hello"), "Hello");
  EXPECT_EQ(text::with_raw_prompt_prefix("lfm2_moe", "Hello"), "Hello");
  // The chat template writes it itself (no newline after role tokens, spec §2.4).
  const nlohmann::json msgs = nlohmann::json::array({{{"role", "user"}, {"content", "Hi"}}});
  const std::string chat = text::apply_chat_template(tok, msgs, true);
  EXPECT_EQ(chat, "[gMASK]<sop><|user|>Hi<|assistant|><think>");
  const auto ids = tok.encode(chat);
  EXPECT_EQ(ids[0], gmask);
  EXPECT_EQ(ids[1], sop);
  EXPECT_NE(ids[2], gmask);
}

// Rewrites a synthetic checkpoint in the first mlx-lm layout: per layer one
// kv_b_proj [H*(dn+dv), kv_lora] instead of embed_q / unembed_out. Returns the
// new directory. `quantized`: kv_b_proj 4-bit (else bf16).
std::string make_legacy(const std::string& src, const std::string& name, bool quantized) {
  auto be = make_cpu_backend();
  const fs::path out = fs::path(src).parent_path() / (fs::path(src).filename().string() + "_" + name);
  fs::remove_all(out);
  fs::create_directories(out);
  test::synth_temp_dirs().dirs.push_back(out.string());  // removed at exit
  for (auto& e : fs::directory_iterator(src))
    if (e.path().extension() != ".safetensors" && e.path().filename() != "model.safetensors.index.json")
      fs::copy_file(e.path(), out / e.path().filename());
  const io::WeightStore ws = io::WeightStore::open_dir(src);
  const nlohmann::json cfg = nlohmann::json::parse(file_bytes(fs::path(src) / "config.json"));
  const int64_t H = cfg["num_attention_heads"], L = cfg["kv_lora_rank"], dn = cfg["qk_nope_head_dim"],
                dv = cfg["v_head_dim"];
  std::vector<io::TensorSpec> specs;
  std::map<std::string, std::vector<uint8_t>> made;
  for (auto& n : ws.names()) {
    const bool eq = n.find(".embed_q.") != std::string::npos, uo = n.find(".unembed_out.") != std::string::npos;
    if (!eq && !uo) {
      specs.push_back({n, ws.get(n).dtype, ws.get(n).shape});
      continue;
    }
    if (!eq || !n.ends_with(".weight")) continue;
    const std::string pre = n.substr(0, n.find(".embed_q."));
    auto view = [&](const std::string& mod, int64_t R, int64_t C) {
      Weight w;
      w.experts = H;
      w.rows = R;
      w.cols = C;
      w.quantized = true;
      w.q = {4, 64};
      auto t = [&](const std::string& part) {
        const io::TensorInfo& i = ws.get(pre + "." + mod + "." + part);
        Tensor x;
        x.dtype = i.dtype;
        x.shape = i.shape;
        x.data = const_cast<uint8_t*>(i.data);
        return x;
      };
      w.w = t("weight");
      w.scales = t("scales");
      w.biases = t("biases");
      return w;
    };
    const Weight wq = view("embed_q", L, dn), wo = view("unembed_out", dv, L);
    // kv_b rows per head: dn rows of embed_qᵀ then dv rows of unembed_out (bf16 values).
    std::vector<float> kvb(size_t(H * (dn + dv) * L));
    for (int64_t h = 0; h < H; ++h) {
      const auto q = dequant_matrix(wq, h), o = dequant_matrix(wo, h);
      for (int64_t i = 0; i < dn; ++i)
        for (int64_t c = 0; c < L; ++c) kvb[size_t((h * (dn + dv) + i) * L + c)] = round_bf16(q[size_t(c * dn + i)]);
      for (int64_t i = 0; i < dv; ++i)
        for (int64_t c = 0; c < L; ++c) kvb[size_t((h * (dn + dv) + dn + i) * L + c)] = round_bf16(o[size_t(i * L + c)]);
    }
    const std::string kn = pre + ".kv_b_proj";
    const int64_t R = H * (dn + dv);
    if (quantized) {
      std::vector<uint8_t> w(size_t(R * L / 2)), s(size_t(R * L / 64 * 2)), b(s.size());
      for (int64_t r = 0; r < R; ++r)
        quant::quantize_row(&kvb[size_t(r * L)], L, {4, 64}, reinterpret_cast<uint32_t*>(w.data()) + r * L / 8,
                            reinterpret_cast<uint16_t*>(s.data()) + r * L / 64, reinterpret_cast<uint16_t*>(b.data()) + r * L / 64);
      specs.push_back({kn + ".weight", DType::U32, {R, L / 8}});
      specs.push_back({kn + ".scales", DType::BF16, {R, L / 64}});
      specs.push_back({kn + ".biases", DType::BF16, {R, L / 64}});
      made[kn + ".weight"] = std::move(w);
      made[kn + ".scales"] = std::move(s);
      made[kn + ".biases"] = std::move(b);
    } else {
      std::vector<uint8_t> w(size_t(R * L * 2));
      for (int64_t i = 0; i < R * L; ++i) reinterpret_cast<uint16_t*>(w.data())[i] = f32_to_bf16_bits(kvb[size_t(i)]);
      specs.push_back({kn + ".weight", DType::BF16, {R, L}});
      made[kn + ".weight"] = std::move(w);
    }
  }
  io::write_model_weights(out.string(), specs, [&](const io::TensorSpec& s, uint8_t* dst) {
    if (auto it = made.find(s.name); it != made.end()) std::memcpy(dst, it->second.data(), it->second.size());
    else std::memcpy(dst, ws.get(s.name).data, s.nbytes());
  }, uint64_t(5) << 30);
  return out.string();
}

TEST(GlmModel, Bf16CorrectionBiasIsWidenedExactly) {
  // Bias values rounded to bf16 and stored F32 vs the same values stored BF16: identical logits.
  auto be = make_cpu_backend();
  const std::string src = synth_glm("bias_src");
  const io::WeightStore ws = io::WeightStore::open_dir(src);
  auto rewrite = [&](const std::string& name, DType bias_dtype) {
    const fs::path out = fs::path(src).parent_path() / (fs::path(src).filename().string() + "_" + name);
    fs::remove_all(out);
    fs::create_directories(out);
    test::synth_temp_dirs().dirs.push_back(out.string());  // removed at exit
    fs::copy_file(fs::path(src) / "config.json", out / "config.json");
    std::vector<io::TensorSpec> specs;
    for (auto& n : ws.names())
      specs.push_back({n, n.ends_with("e_score_correction_bias") ? bias_dtype : ws.get(n).dtype, ws.get(n).shape});
    io::write_model_weights(out.string(), specs, [&](const io::TensorSpec& s, uint8_t* dst) {
      const io::TensorInfo& t = ws.get(s.name);
      if (!s.name.ends_with("e_score_correction_bias")) {
        std::memcpy(dst, t.data, s.nbytes());
        return;
      }
      const float* v = reinterpret_cast<const float*>(t.data);
      for (int64_t i = 0; i < t.shape[0]; ++i) {
        if (bias_dtype == DType::BF16) reinterpret_cast<uint16_t*>(dst)[i] = f32_to_bf16_bits(v[i]);
        else reinterpret_cast<float*>(dst)[i] = round_bf16(v[i]);
      }
    }, uint64_t(1) << 30);
    return out.string();
  };
  auto a = load_model(rewrite("f32", DType::F32), *be);
  auto b = load_model(rewrite("bf16", DType::BF16), *be);
  const auto ids = ids_of(10, a->config().vocab_size);
  EXPECT_EQ(test::prefill_then_greedy_logits(*a, *be, ids, 3), test::prefill_then_greedy_logits(*b, *be, ids, 3));
}

TEST(GlmModel, LegacyKvBProjCheckpointIsConvertedAtLoad) {
  auto be = make_cpu_backend();
  const std::string src = synth_glm("legacy_src");
  auto ref = load_model(src, *be);
  const auto ids = ids_of(12, ref->config().vocab_size);
  const auto want = test::prefill_then_greedy_logits(*ref, *be, ids, 3);
  for (bool quantized : {false, true}) {
    const std::string dir = make_legacy(src, quantized ? "legacy_q" : "legacy_bf16", quantized);
    auto m = load_model(dir, *be);  // strict: would throw if kv_b_proj were left unused
    const auto got = test::prefill_then_greedy_logits(*m, *be, ids, 3);
    // bf16 kv_b_proj: the split weights are the original values rounded to bf16;
    // 4-bit: re-quantised twice (groups along kv_lora, then along nope), so looser
    // (measured 2026-11-26: 0.0031 bf16, 0.0059 4-bit).
    const double d = rel_l2(got, want);
    RecordProperty(quantized ? "rel_l2_legacy_4bit" : "rel_l2_legacy_bf16", std::to_string(d));
    EXPECT_LE(d, quantized ? 0.06 : 1e-2) << (quantized ? "4-bit" : "bf16");
    EXPECT_GT(rel_l2(got, want), 0.0);
  }
}

// Tensor parallel builds only its own heads from a legacy kv_b_proj (rank 1
// takes rows of heads 2-3): two in-process ranks match the legacy checkpoint
// in one process.
TEST(GlmModel, LegacyKvBProjSplitsByHeadUnderTensorParallel) {
  auto be = make_cpu_backend();
  const std::string src = synth_glm("legacy_tp_src", {{"moe_intermediate_size", "128"}});
  const std::string dir = make_legacy(src, "legacy_tp", /*quantized=*/true);
  auto one = load_model(dir, *be);
  const auto ids = ids_of(12, one->config().vocab_size);
  const auto want = test::prefill_then_greedy_logits(*one, *be, ids, 3);
  const auto got = test::ranks_prefill_then_greedy_logits(dir, dist::Mode::Tensor, 2, ids, 3);
  const double d = rel_l2(got, want);
  RecordProperty("rel_l2_legacy_tp2", std::to_string(d));
  EXPECT_LE(d, 1e-2);
}

}  // namespace
}  // namespace zmlx
