// CPU backend ops against plain double-precision references, and the fused
// MoE / SwiGLU kernels against the unfused ops (bit-identical).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "test_helpers.h"
#include "zmlx/ops/backend.h"

namespace zmlx {
namespace {

float f(uint16_t b) { return bf16_to_f32(b); }
bool same_bits(const Tensor& a, const Tensor& b) {
  return a.nbytes() == b.nbytes() && std::memcmp(a.data, b.data, a.nbytes()) == 0;
}

TEST(CpuOps, RmsNormMatchesReference) {
  auto be = make_cpu_backend();
  std::mt19937 rng(1);
  const int64_t R = 7, D = 130;
  auto xv = test::random_bf16(rng, R * D, 3.0f);
  auto wv = test::random_bf16(rng, D, 1.0f);
  Tensor out = be->rms_norm(test::bf16_tensor(xv, {R, D}), test::bf16_tensor(wv, {D}), 1e-6f);
  for (int64_t r = 0; r < R; ++r) {
    double ss = 0;
    for (int64_t d = 0; d < D; ++d) ss += double(f(xv[r * D + d])) * f(xv[r * D + d]);
    const double inv = 1.0 / std::sqrt(ss / D + 1e-6);
    for (int64_t d = 0; d < D; ++d) {
      const double ref = double(f(wv[d])) * round_bf16(float(f(xv[r * D + d]) * inv));
      const double got = f(out.ptr<uint16_t>()[r * D + d]);
      EXPECT_NEAR(got, ref, std::fabs(ref) * 1e-2 + 1e-6) << r << "," << d;
    }
  }
}

TEST(CpuOps, RopeBothVariantsMatchFormula) {
  auto be = make_cpu_backend();
  std::mt19937 rng(2);
  const int64_t T = 3, H = 2, hd = 16, pos0 = 5;
  const float base = 10000.f;
  auto xv = test::random_bf16(rng, T * H * hd);
  for (bool trad : {false, true}) {
    Tensor x = test::bf16_tensor(xv, {T, H * hd});
    be->rope(x, H, hd, 0, hd, pos0, base, trad);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < hd / 2; ++i) {
          const double th = double(pos0 + t) * std::pow(double(base), -2.0 * i / hd);
          const int64_t a = trad ? 2 * i : i, b = trad ? 2 * i + 1 : i + hd / 2;
          const int64_t o = t * H * hd + h * hd;
          const double x0 = f(xv[o + a]), x1 = f(xv[o + b]);
          EXPECT_NEAR(f(x.ptr<uint16_t>()[o + a]), x0 * std::cos(th) - x1 * std::sin(th), 2e-2);
          EXPECT_NEAR(f(x.ptr<uint16_t>()[o + b]), x0 * std::sin(th) + x1 * std::cos(th), 2e-2);
        }
  }
}

TEST(CpuOps, AttentionMatchesNaiveCausalGqa) {
  auto be = make_cpu_backend();
  std::mt19937 rng(3);
  const int64_t H = 4, Hkv = 2, hd = 8, pos0 = 3, T = 4, S = pos0 + T;
  const float scale = 0.35f;
  auto kv_all = test::random_bf16(rng, S * Hkv * hd);
  auto vv_all = test::random_bf16(rng, S * Hkv * hd);
  auto qv = test::random_bf16(rng, T * H * hd);
  KvLayer c = be->new_kv_layer(Hkv, hd, 2);  // small: forces growth
  std::vector<uint16_t> k0(kv_all.begin(), kv_all.begin() + pos0 * Hkv * hd), v0(vv_all.begin(), vv_all.begin() + pos0 * Hkv * hd);
  std::vector<uint16_t> k1(kv_all.begin() + pos0 * Hkv * hd, kv_all.end()), v1(vv_all.begin() + pos0 * Hkv * hd, vv_all.end());
  be->kv_write(c, test::bf16_tensor(k0, {pos0, Hkv * hd}), test::bf16_tensor(v0, {pos0, Hkv * hd}), 0);
  be->kv_write(c, test::bf16_tensor(k1, {T, Hkv * hd}), test::bf16_tensor(v1, {T, Hkv * hd}), pos0);
  Tensor o = be->attention(test::bf16_tensor(qv, {T, H * hd}), c, pos0, H, Hkv, hd, scale);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t kvh = h / (H / Hkv), vis = pos0 + t + 1;
      std::vector<double> s(vis);
      for (int64_t j = 0; j < vis; ++j) {
        double d = 0;
        for (int64_t e = 0; e < hd; ++e) d += double(f(qv[(t * H + h) * hd + e])) * f(kv_all[(j * Hkv + kvh) * hd + e]);
        s[j] = d * scale;
      }
      const double mx = *std::max_element(s.begin(), s.end());
      double z = 0;
      for (auto& v : s) z += (v = std::exp(v - mx));
      for (int64_t e = 0; e < hd; ++e) {
        double ref = 0;
        for (int64_t j = 0; j < vis; ++j) ref += s[j] / z * f(vv_all[(j * Hkv + kvh) * hd + e]);
        EXPECT_NEAR(f(o.ptr<uint16_t>()[(t * H + h) * hd + e]), ref, std::fabs(ref) * 1e-2 + 1e-3);
      }
    }
}

TEST(CpuOps, SoftmaxTopKRouter) {
  auto be = make_cpu_backend();
  std::mt19937 rng(4);
  const int64_t T = 5, E = 16, k = 4;
  auto lv = test::random_bf16(rng, T * E, 2.0f);
  Routing r = be->route_softmax_topk(test::bf16_tensor(lv, {T, E}), k, true);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return f(lv[t * E + a]) > f(lv[t * E + b]); });
    double sum = 0;
    for (int64_t j = 0; j < k; ++j) {
      EXPECT_EQ(r.experts.ptr<int32_t>()[t * k + j], order[size_t(j)]) << "token " << t << " slot " << j;
      sum += f(r.scores.ptr<uint16_t>()[t * k + j]);
    }
    EXPECT_NEAR(sum, 1.0, 2e-2);
  }
}

// ---- fused vs unfused: the patch layer's bar is bit-identical output ----

struct MoeFixture {
  std::mt19937 rng{5};
  int64_t T, D = 128, I = 256, E = 6, k = 3;  // whole groups of 128 both ways
  Weight gate, up, down;
  Tensor x;
  Routing r;
  MoeFixture(int64_t tokens, int bits, int group) : T(tokens) {
    gate = test::random_qweight(rng, E, I, D, bits, group, "gate");
    up = test::random_qweight(rng, E, I, D, bits, group, "up");
    down = test::random_qweight(rng, E, D, I, bits, group, "down");
    x = test::bf16_tensor(test::random_bf16(rng, T * D), {T, D});
    auto be = make_cpu_backend();
    r = be->route_softmax_topk(test::bf16_tensor(test::random_bf16(rng, T * E, 2.f), {T, E}), k, true);
  }
};

class FusedMoe : public ::testing::TestWithParam<std::tuple<int64_t, int, int>> {};

TEST_P(FusedMoe, GatherQmmSwigluAndCombineAreBitIdentical) {
  auto [T, bits, group] = GetParam();
  MoeFixture fx(T, bits, group);
  auto be = make_cpu_backend();
  Tensor h_unfused = be->swiglu(be->gather_qmm(fx.x, fx.gate, fx.r), be->gather_qmm(fx.x, fx.up, fx.r));
  Tensor h_fused = be->gather_qmm_swiglu(fx.x, fx.gate, fx.up, fx.r);
  ASSERT_TRUE(same_bits(h_unfused, h_fused));
  for (CombineMode mode : {CombineMode::Bf16Products, CombineMode::F32Products}) {
    Tensor y_unfused = be->moe_combine(be->gather_qmm(h_unfused, fx.down, fx.r), fx.r, mode);
    Tensor y_fused = be->gather_qmm_combine(h_fused, fx.down, fx.r, mode);
    ASSERT_TRUE(same_bits(y_unfused, y_fused)) << "combine mode " << int(mode);
  }
}

INSTANTIATE_TEST_SUITE_P(DecodeAndPrefill, FusedMoe,
                         ::testing::Values(std::make_tuple(int64_t(1), 4, 64), std::make_tuple(int64_t(1), 8, 32),
                                           std::make_tuple(int64_t(7), 4, 64), std::make_tuple(int64_t(13), 4, 128),
                                           std::make_tuple(int64_t(5), 8, 64), std::make_tuple(int64_t(3), 2, 64)));

// The bf16-product combine reads bf16 scores; a routing with fp32 scores
// (the sigmoid routers') paired with it is refused with a clear error by both
// combine ops, instead of the scores being misread, and works with the
// fp32-product combine.
TEST(FusedMoe, Bf16ProductCombineRefusesFp32Scores) {
  MoeFixture fx(3, 4, 64);
  auto be = make_cpu_backend();
  Routing r = fx.r;
  Tensor f32 = host_tensor(DType::F32, r.scores.shape);
  for (int64_t i = 0; i < r.scores.numel(); ++i) f32.ptr<float>()[i] = bf16_to_f32(r.scores.ptr<uint16_t>()[i]);
  r.scores = f32;
  Tensor h = be->gather_qmm_swiglu(fx.x, fx.gate, fx.up, r);
  Tensor y = be->gather_qmm(h, fx.down, r);
  for (int op = 0; op < 2; ++op) {
    try {
      if (op == 0) be->moe_combine(y, r, CombineMode::Bf16Products);
      else be->gather_qmm_combine(h, fx.down, r, CombineMode::Bf16Products);
      ADD_FAILURE() << "op " << op << " accepted fp32 scores with bf16 products";
    } catch (const std::exception& e) {
      EXPECT_NE(std::string(e.what()).find("needs bf16 routing scores, got F32"), std::string::npos) << e.what();
    }
  }
  // The fp32-product combine takes them, and its two forms agree.
  EXPECT_TRUE(same_bits(be->moe_combine(y, r, CombineMode::F32Products),
                        be->gather_qmm_combine(h, fx.down, r, CombineMode::F32Products)));
}

TEST(FusedSwiglu, LinearSwigluIsBitIdentical) {
  std::mt19937 rng(6);
  auto be = make_cpu_backend();
  for (int64_t T : {1, 6}) {
    Weight g = test::random_qweight(rng, 0, 80, 256, 4, 64, "g"), u = test::random_qweight(rng, 0, 80, 256, 4, 64, "u");
    Tensor x = test::bf16_tensor(test::random_bf16(rng, T * 256), {T, 256});
    Tensor a = be->swiglu(be->linear(x, g), be->linear(x, u));
    Tensor b = be->linear_swiglu(x, g, u);
    EXPECT_TRUE(same_bits(a, b)) << "T=" << T;
  }
}

TEST(FusedMoe, UnfusedMatchesDoublePrecisionMoe) {
  // The baseline itself against plain math: Σ_j s_j · down_e(silu(gate_e x) · up_e x).
  MoeFixture fx(2, 4, 64);
  auto be = make_cpu_backend();
  Tensor h = be->swiglu(be->gather_qmm(fx.x, fx.gate, fx.r), be->gather_qmm(fx.x, fx.up, fx.r));
  Tensor y = be->moe_combine(be->gather_qmm(h, fx.down, fx.r), fx.r, CombineMode::Bf16Products);
  auto deq = [](const Weight& w, int64_t e, int64_t row, int64_t c) {
    const int64_t G = w.cols / w.q.group_size, wpr = w.cols * w.q.bits / 32;
    const uint32_t word = w.w.ptr<uint32_t>()[(e * w.rows + row) * wpr + c / (32 / w.q.bits)];
    const uint32_t q = (word >> (w.q.bits * (c % (32 / w.q.bits)))) & ((1u << w.q.bits) - 1);
    const int64_t g = (e * w.rows + row) * G + c / w.q.group_size;
    return double(f(w.scales.ptr<uint16_t>()[g])) * q + f(w.biases.ptr<uint16_t>()[g]);
  };
  for (int64_t t = 0; t < fx.T; ++t) {
    std::vector<double> out(fx.D, 0.0);
    for (int64_t j = 0; j < fx.k; ++j) {
      const int64_t e = fx.r.experts.ptr<int32_t>()[t * fx.k + j];
      const double s = f(fx.r.scores.ptr<uint16_t>()[t * fx.k + j]);
      std::vector<double> a(fx.I);
      for (int64_t i = 0; i < fx.I; ++i) {
        double g = 0, u = 0;
        for (int64_t c = 0; c < fx.D; ++c) {
          g += f(fx.x.ptr<uint16_t>()[t * fx.D + c]) * deq(fx.gate, e, i, c);
          u += f(fx.x.ptr<uint16_t>()[t * fx.D + c]) * deq(fx.up, e, i, c);
        }
        a[i] = g / (1 + std::exp(-g)) * u;
      }
      for (int64_t d = 0; d < fx.D; ++d) {
        double acc = 0;
        for (int64_t i = 0; i < fx.I; ++i) acc += a[i] * deq(fx.down, e, d, i);
        out[d] += s * acc;
      }
    }
    double num = 0, den = 0;
    for (int64_t d = 0; d < fx.D; ++d) {
      const double diff = f(y.ptr<uint16_t>()[t * fx.D + d]) - out[d];
      num += diff * diff;
      den += out[d] * out[d];
    }
    EXPECT_LT(std::sqrt(num / den), 2e-2) << "token " << t;
  }
}

}  // namespace
}  // namespace zmlx
