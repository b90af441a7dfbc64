// Tensor-core prefill GEMMs (backend/cuda/gemm.h) against a plain host
// reference in double precision: dense GEMM, MoE gate/up + SwiGLU, MoE down
// and the slot-ordered combine. Outputs are poisoned with NaN (0x7fc0)
// first, so an element the kernels never write fails the check.
//
// Two kinds of random weights:
//  - "exact": scales ±m·2^-8 and biases n·2^-8 chosen so that every
//    dequantized weight scale·q + bias is a bf16 value; the GPU's bf16
//    weight tile is then exact and each output must match the double
//    reference to within half a bf16 ulp plus fp32 accumulation noise
//    (checked element by element).
//  - "general": random bf16 scales of both signs and random biases; the
//    GPU rounds each weight to bf16, so only rel L2 <= 5e-3 and a max-error
//    bound are checked.
// Skipped where no CUDA device is visible.
#include <gtest/gtest.h>

#ifdef ZMLX_HAVE_CUDA
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "zmlx/backend/cuda/gemm.h"
#include "zmlx/backend/cuda/kernels.h"  // k::swiglu (the unfused composition)
#include "test_helpers.h"                // ScopedEnv

namespace {

namespace g = zmlx::cuda::gemm;

bool have_gpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}
#define REQUIRE_GPU() \
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device"

constexpr uint16_t kPoison = 0x7fc0;  // bf16 quiet NaN

uint16_t f2bf(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
float bf2f(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
float rbf(float f) { return bf2f(f2bf(f)); }
uint16_t f2bf_d(double d) { return f2bf(float(d)); }  // only for values exact in float

#define CK(call)                                                                     \
  do {                                                                               \
    cudaError_t e_ = (call);                                                         \
    ASSERT_EQ(e_, cudaSuccess) << #call << ": " << cudaGetErrorString(e_);           \
  } while (0)

template <class T>
struct Dev {
  T* p = nullptr;
  size_t n = 0;
  explicit Dev(const std::vector<T>& h) : n(h.size()) {
    cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T));
    cudaMemcpy(p, h.data(), n * sizeof(T), cudaMemcpyHostToDevice);
  }
  Dev(size_t count, T fill) : Dev(std::vector<T>(count, fill)) {}
  ~Dev() { cudaFree(p); }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
  std::vector<T> get() const {
    std::vector<T> h(n);
    cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost);
    return h;
  }
};

// E stacked [rows, cols] matrices, MLX affine quantized or dense bf16.
struct HostW {
  int E = 1, bits = 4, group = 64;
  int64_t rows = 0, cols = 0;
  std::vector<uint32_t> w;
  std::vector<uint16_t> s, b;
  // [E, rows, cols] dequantized values: exact scale·q + bias (to float
  // precision), or, with round_w, MLX qmm's bf16(fma(scale, q, bias)).
  std::vector<float> deq;

  double at(int e, int64_t r, int64_t c) const { return deq[(size_t(e) * rows + r) * cols + c]; }
};

HostW make_weights(std::mt19937& rng, int E, int64_t rows, int64_t cols, int bits, int group, bool exact,
                   bool round_w = false) {
  HostW h;
  h.E = E, h.bits = bits, h.group = group, h.rows = rows, h.cols = cols;
  h.deq.resize(size_t(E) * rows * cols);
  std::uniform_real_distribution<float> uni(0.f, 1.f);
  if (bits == 16) {
    std::normal_distribution<float> nd(0.f, 0.05f);
    h.w.resize(size_t(E) * rows * cols / 2);
    auto* v = reinterpret_cast<uint16_t*>(h.w.data());
    for (size_t i = 0; i < h.deq.size(); ++i) {
      v[i] = f2bf(nd(rng));
      h.deq[i] = bf2f(v[i]);
    }
    return h;
  }
  const int per = 32 / bits;
  const uint32_t qmax = (1u << bits) - 1u;
  const int64_t gpr = cols / group;
  h.w.assign(size_t(E) * rows * cols / per, 0u);
  h.s.resize(size_t(E) * rows * gpr);
  h.b.resize(h.s.size());
  for (size_t i = 0; i < h.s.size(); ++i) {
    const bool neg = uni(rng) < 0.5f;
    if (exact) {
      // scale·q + bias = 2^-k·(±m·q + n) with |±m·q + n| < 256: exact in bf16.
      if (bits == 8) {
        const float sc = 1.f / 1024.f;
        const int n = int(uni(rng) * 255.f);  // 0..254
        h.s[i] = f2bf(neg ? -sc : sc);
        h.b[i] = f2bf(float(neg ? n : -n) * sc);
      } else {
        const int m = 1 + 2 * int(uni(rng) * 3.99f);  // 1,3,5,7
        const int n = int(uni(rng) * 121.f) - 60;     // -60..60
        h.s[i] = f2bf(float(neg ? -m : m) / 256.f);
        h.b[i] = f2bf(float(n) / 256.f);
      }
    } else {
      const float sc = 0.002f + 0.02f * uni(rng);
      h.s[i] = f2bf(neg ? -sc : sc);
      h.b[i] = f2bf(0.2f * (uni(rng) - 0.5f));
    }
  }
  for (int e = 0; e < E; ++e)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const uint32_t q = uint32_t(uni(rng) * float(qmax + 1)) & qmax;
        const size_t el = (size_t(e) * rows + r) * cols + c;
        h.w[el / per] |= q << (bits * (el % per));
        const size_t gi = (size_t(e) * rows + r) * gpr + c / group;
        const float sc = bf2f(h.s[gi]), bi = bf2f(h.b[gi]);
        h.deq[el] = round_w ? rbf(std::fma(sc, float(q), bi)) : float(double(sc) * double(q) + double(bi));
      }
  return h;
}

struct DevW {
  Dev<uint32_t> w;
  Dev<uint16_t> s, b;
  g::QMat m;
  explicit DevW(const HostW& h) : w(h.w), s(h.s), b(h.b) {
    m.w = w.p;
    m.scales = h.bits == 16 ? nullptr : s.p;
    m.biases = h.bits == 16 ? nullptr : b.p;
    m.rows = h.rows, m.cols = h.cols, m.bits = h.bits, m.group = h.group;
    m.w_stride = h.rows * h.cols * h.bits / 32;
    m.s_stride = h.bits == 16 ? 0 : h.rows * h.cols / h.group;
  }
};

std::vector<uint16_t> random_x(std::mt19937& rng, size_t n, float std = 1.f) {
  std::normal_distribution<float> nd(0.f, std);
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = f2bf(nd(rng));
  return v;
}

// Compares got (bf16, [rows, cols]) with ref (double). exact: also demands
// |got - ref| <= 2^-8·|ref| + 5e-5·absref + tiny for every element (half a
// bf16 ulp plus fp32 tensor-core accumulation error; absref = sum |x·w|).
void expect_close(const std::string& what, const std::vector<uint16_t>& got, const std::vector<double>& ref,
                  const std::vector<double>* absref, int64_t rows, int64_t cols, double rel_tol, bool exact) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  double num = 0, den = 0, max_err = -1, max_ref = 0;
  int64_t max_at = -1, nan_count = 0, nan_first = -1, bad = 0, bad_first = -1;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double v = bf2f(got[i]);
    max_ref = std::max(max_ref, std::fabs(ref[i]));
    if (!std::isfinite(v)) {
      if (nan_first < 0) nan_first = int64_t(i);
      ++nan_count;
      continue;
    }
    const double d = v - ref[i];
    num += d * d;
    den += ref[i] * ref[i];
    if (std::fabs(d) > max_err) max_err = std::fabs(d), max_at = int64_t(i);
    if (exact) {
      const double tol = std::ldexp(std::fabs(ref[i]), -8) + 5e-5 * (absref ? (*absref)[i] : 0.0) + 1e-30;
      if (std::fabs(d) > tol) {
        if (bad_first < 0) bad_first = int64_t(i);
        ++bad;
      }
    }
  }
  const double rel = std::sqrt(num / std::max(den, 1e-300));
  char buf[512];
  std::snprintf(buf, sizeof buf, "%s [%lld x %lld]: rel_l2 %.3e, max_abs_err %.3e at (%lld, %lld) got %.6g ref %.6g, max|ref| %.4g",
                what.c_str(), (long long)rows, (long long)cols, rel, max_err, (long long)(max_at / cols),
                (long long)(max_at % cols), max_at >= 0 ? double(bf2f(got[size_t(max_at)])) : 0.0,
                max_at >= 0 ? ref[size_t(max_at)] : 0.0, max_ref);
  std::printf("  %s\n", buf);
  EXPECT_EQ(nan_count, 0) << buf << "\n  " << nan_count << " non-finite (unwritten?) elements, first at ("
                          << nan_first / cols << ", " << nan_first % cols << ")";
  EXPECT_LE(rel, rel_tol) << buf;
  EXPECT_LE(max_err, 0.02 * max_ref + 1e-6) << buf;
  if (exact && bad > 0) {
    const size_t i = size_t(bad_first);
    ADD_FAILURE() << buf << "\n  " << bad << " elements beyond half an ulp; first at (" << bad_first / cols << ", "
                  << bad_first % cols << ") got " << bf2f(got[i]) << " ref " << ref[i];
  }
}

// MLX silu(g)·u with the kernels' bf16 roundings (same float steps).
float host_swiglu(float gt, float up) {
  const float sig = rbf(1.0f / (1.0f + std::exp(-gt)));
  const float s = rbf(gt * sig);
  return rbf(s * up);
}

// ---------------------------------------------------------------- dense

struct DenseCase {
  int T;
  int64_t K, N;
  int bits, group;
  bool exact;
};

void run_dense(const DenseCase& c, unsigned seed) {
  std::mt19937 rng(seed);
  const HostW hw = make_weights(rng, 1, c.N, c.K, c.bits, c.group, c.exact);
  const std::vector<uint16_t> x = random_x(rng, size_t(c.T) * c.K);
  std::vector<double> ref(size_t(c.T) * c.N), aref(ref.size());
  for (int t = 0; t < c.T; ++t)
    for (int64_t n = 0; n < c.N; ++n) {
      double a = 0, aa = 0;
      const uint16_t* xr = &x[size_t(t) * c.K];
      const float* wr = &hw.deq[size_t(n) * c.K];
      for (int64_t k = 0; k < c.K; ++k) {
        const double p = double(bf2f(xr[k])) * wr[k];
        a += p;
        aa += std::fabs(p);
      }
      ref[size_t(t) * c.N + n] = a;
      aref[size_t(t) * c.N + n] = aa;
    }
  DevW dw(hw);
  ASSERT_TRUE(g::gemm_supported(dw.m));
  Dev<uint16_t> dx(x), dy(size_t(c.T) * c.N, kPoison);
  Dev<float> ws(g::gemm_dense_workspace_bytes(c.T, dw.m, false) / 4, 0.f);
  g::gemm_dense(dx.p, c.T, dw.m, dy.p, nullptr, ws.p);
  CK(cudaDeviceSynchronize());
  char name[160];
  std::snprintf(name, sizeof name, "gemm_dense T=%d K=%lld N=%lld bits=%d group=%d %s", c.T, (long long)c.K,
                (long long)c.N, c.bits, c.group, c.exact ? "exact" : "general");
  expect_close(name, dy.get(), ref, &aref, c.T, c.N, 5e-3, c.exact);
}

TEST(CudaGemm, DenseQuantizedAndBf16) {
  REQUIRE_GPU();
  const DenseCase cases[] = {
      {1, 64, 48, 4, 64, false},      {7, 768, 768, 4, 64, true},     {33, 2048, 2048, 4, 64, false},
      {300, 2048, 1000, 4, 64, true}, {300, 768, 1001, 8, 32, false}, {33, 512, 2048, 2, 128, true},
      {65, 4096, 256, 4, 64, false},  {7, 2048, 50, 16, 64, false},   {300, 64, 768, 16, 64, false},
      {129, 512, 136, 8, 64, true},   {64, 128, 128, 4, 128, true},   {1, 2048, 2048, 8, 64, false},
  };
  unsigned seed = 1;
  for (const auto& c : cases) run_dense(c, seed++);
}

TEST(CudaGemm, DenseSwiglu) {
  REQUIRE_GPU();
  struct Case {
    int T;
    int64_t K, I;
    int bits, group;
    bool exact;
  };
  // {300, 2048, 768} splits K (4 ranges); {33, 2048, 1024} (8) and {33, 512, 200} (2) split as one-M-tile
  // prompts do; the others not.
  const Case cases[] = {{1, 64, 48, 4, 64, true},      {33, 512, 200, 4, 64, true}, {300, 2048, 768, 8, 64, false},
                        {70, 256, 96, 16, 64, false},  {33, 2048, 1024, 4, 128, false}};
  unsigned seed = 50;
  for (const Case& c : cases) {
    std::mt19937 rng(seed++);
    // Weights rounded to bf16 in the reference, as in the MoE SwiGLU test.
    const HostW hg = make_weights(rng, 1, c.I, c.K, c.bits, c.group, c.exact, true);
    const HostW hu = make_weights(rng, 1, c.I, c.K, c.bits, c.group, c.exact, true);
    const std::vector<uint16_t> x = random_x(rng, size_t(c.T) * c.K);
    std::vector<double> ref(size_t(c.T) * c.I);
    for (int t = 0; t < c.T; ++t)
      for (int64_t i = 0; i < c.I; ++i) {
        double ga = 0, ua = 0;
        for (int64_t kk = 0; kk < c.K; ++kk) {
          const double xv = bf2f(x[size_t(t) * c.K + kk]);
          ga += xv * hg.at(0, i, kk);
          ua += xv * hu.at(0, i, kk);
        }
        ref[size_t(t) * c.I + i] = host_swiglu(rbf(float(ga)), rbf(float(ua)));
      }
    DevW dg(hg), du(hu);
    Dev<uint16_t> dx(x), dy(size_t(c.T) * c.I, kPoison);
    Dev<float> ws(g::gemm_dense_workspace_bytes(c.T, dg.m, true) / 4, 0.f);
    g::gemm_dense_swiglu(dx.p, c.T, dg.m, du.m, dy.p, nullptr, ws.p);
    CK(cudaDeviceSynchronize());
    // The unfused composition (gate GEMM, up GEMM, swiglu kernel) gives the
    // same bits, split K or not.
    {
      Dev<uint16_t> gy(size_t(c.T) * c.I, kPoison), uy(size_t(c.T) * c.I, kPoison), sy(size_t(c.T) * c.I, kPoison);
      Dev<float> w1(g::gemm_dense_workspace_bytes(c.T, dg.m, false) / 4, 0.f);
      g::gemm_dense(dx.p, c.T, dg.m, gy.p, nullptr, w1.p);
      g::gemm_dense(dx.p, c.T, du.m, uy.p, nullptr, w1.p);
      zmlx::cuda::k::swiglu(gy.p, uy.p, int64_t(c.T) * c.I, sy.p, nullptr);
      CK(cudaDeviceSynchronize());
      EXPECT_TRUE(sy.get() == dy.get()) << "fused and unfused dense SwiGLU differ, T " << c.T << " K " << c.K
                                        << " I " << c.I << " (split workspace " << ws.n << " floats)";
    }
    char name[160];
    std::snprintf(name, sizeof name, "gemm_dense_swiglu T=%d K=%lld I=%lld bits=%d group=%d %s", c.T,
                  (long long)c.K, (long long)c.I, c.bits, c.group, c.exact ? "exact" : "general");
    expect_close(name, dy.get(), ref, nullptr, c.T, c.I, 5e-3, false);
  }
}

TEST(CudaGemm, SplitKOnlyForSmallGrids) {
  g::QMat m;
  m.bits = 4, m.group = 64;
  auto bytes = [&](int T, int64_t N, int64_t K) {
    m.rows = N, m.cols = K;
    return g::gemm_dense_workspace_bytes(T, m, false);
  };
  EXPECT_EQ(bytes(512, 4096, 2048), 0u) << "256 tiles fill the GPU: no split";
  EXPECT_EQ(bytes(512, 512, 2048), size_t(4) * 512 * 512 * 4) << "32 tiles, 32 K-steps: 4 ranges of 8";
  EXPECT_EQ(bytes(512, 2048, 4096), size_t(2) * 512 * 2048 * 4) << "128 tiles: 2 ranges";
  EXPECT_EQ(bytes(65, 2048, 512), 0u) << "two M tiles, 8 K-steps: cannot split (8 steps a range at least)";
  // One M tile (T <= 64, short prompts): ranges of 4 K-steps, up to 512 blocks.
  EXPECT_EQ(bytes(33, 2048, 512), size_t(2) * 33 * 2048 * 4) << "one M tile, 8 K-steps: 2 ranges of 4";
  EXPECT_EQ(bytes(16, 4096, 2048), size_t(8) * 16 * 4096 * 4) << "one M tile, 32 tiles x 32 K-steps: 8 ranges";
  EXPECT_EQ(bytes(16, 128, 4096), size_t(16) * 16 * 128 * 4) << "one M tile, 1 tile, 64 K-steps: at most 16 ranges";
  m.rows = 768, m.cols = 2048;
  EXPECT_EQ(g::gemm_dense_workspace_bytes(300, m, true), 2 * g::gemm_dense_workspace_bytes(300, m, false));
}

TEST(CudaGemm, Supported) {
  g::QMat m;
  uint32_t dummy[4] alignas(16) = {};
  uint16_t sb[4] = {};
  m.w = dummy, m.scales = sb, m.biases = sb, m.rows = 16, m.cols = 2048, m.bits = 4, m.group = 64;
  EXPECT_TRUE(g::gemm_supported(m));
  m.cols = 96;
  EXPECT_FALSE(g::gemm_supported(m));  // K must be a multiple of 64
  m.cols = 2048, m.bits = 3;
  EXPECT_FALSE(g::gemm_supported(m));
  m.bits = 4, m.group = 16;
  EXPECT_FALSE(g::gemm_supported(m));
  m.bits = 16;
  EXPECT_TRUE(g::gemm_supported(m));
}

// Host-only: the "exact" weights really are bf16 values (the premise of the
// element-wise checks), and the packing puts value c of a row at bits
// [bits·(c % (32/bits)), +bits) of word c / (32/bits).
TEST(CudaGemm, HostReferenceSelfCheck) {
  std::mt19937 rng(3);
  for (int bits : {2, 4, 8}) {
    const HostW h = make_weights(rng, 2, 8, 128, bits, bits == 8 ? 32 : 64, true);
    int64_t not_bf16 = 0;
    for (float v : h.deq) not_bf16 += rbf(v) != v;
    EXPECT_EQ(not_bf16, 0) << "bits " << bits;
    const int per = 32 / bits;
    const size_t el = size_t(1) * 8 * 128 + 3 * 128 + 77;  // expert 1, row 3, col 77
    const uint32_t q = (h.w[el / per] >> (bits * (el % per))) & ((1u << bits) - 1u);
    const size_t gi = (size_t(1) * 8 + 3) * (128 / h.group) + 77 / h.group;
    EXPECT_EQ(double(h.deq[el]), double(bf2f(h.s[gi])) * q + double(bf2f(h.b[gi]))) << "bits " << bits;
  }
  EXPECT_EQ(f2bf(1.00390625f), 0x3f80);  // tie to even
  EXPECT_EQ(f2bf(1.01171875f), 0x3f82);  // tie to even (up)
}

// ---------------------------------------------------------------- MoE

// k distinct experts per token out of E: expert `hot` is picked by almost
// every token, experts E-2 and E-1 never.
std::vector<int32_t> random_experts(std::mt19937& rng, int T, int k, int E, int hot) {
  std::vector<double> wt(size_t(E), 1.0);
  wt[size_t(hot)] = 60.0;
  wt[size_t(E - 1)] = wt[size_t(E - 2)] = 0.0;
  std::vector<int32_t> ex(size_t(T) * k);
  for (int t = 0; t < T; ++t) {
    std::vector<double> w = wt;
    for (int j = 0; j < k; ++j) {
      std::discrete_distribution<int> d(w.begin(), w.end());
      const int e = d(rng);
      ex[size_t(t) * k + j] = e;
      w[size_t(e)] = 0.0;
    }
  }
  return ex;
}


struct MoeCase {
  int T, k, E;
  int64_t D, I;
  int bits, group;
  bool exact;
};

void run_gate_up(const MoeCase& c, unsigned seed) {
  std::mt19937 rng(seed);
  // Reference with the weights rounded to bf16 as the kernel (and MLX's
  // qmm) does: SwiGLU rounds gate/up to bf16 before the nonlinearity, and
  // the ~1e-3 relative weight-rounding noise pushed through those roundings
  // would leave too little margin under 5e-3. Dense and down are checked
  // against the unrounded weights.
  const HostW hg = make_weights(rng, c.E, c.I, c.D, c.bits, c.group, c.exact, true);
  const HostW hu = make_weights(rng, c.E, c.I, c.D, c.bits, c.group, c.exact, true);
  const std::vector<uint16_t> x = random_x(rng, size_t(c.T) * c.D);
  const std::vector<int32_t> ex = random_experts(rng, c.T, c.k, c.E, 3);
  const int64_t P = int64_t(c.T) * c.k;
  std::vector<double> ref(size_t(P) * c.I);
  for (int64_t p = 0; p < P; ++p) {
    const uint16_t* xr = &x[size_t(p / c.k) * c.D];
    const int e = ex[size_t(p)];
    for (int64_t i = 0; i < c.I; ++i) {
      double ga = 0, ua = 0;
      for (int64_t d = 0; d < c.D; ++d) {
        const double xv = bf2f(xr[d]);
        ga += xv * hg.at(e, i, d);
        ua += xv * hu.at(e, i, d);
      }
      ref[size_t(p) * c.I + i] = host_swiglu(rbf(float(ga)), rbf(float(ua)));
    }
  }
  DevW dg(hg), du(hu);
  Dev<uint16_t> dx(x), dout(size_t(P) * c.I, kPoison);
  Dev<int32_t> dex(ex);
  Dev<uint8_t> ws(g::moe_workspace_bytes(c.T, c.k, c.E), 0xAB);
  g::moe_gate_up_swiglu(dx.p, dex.p, c.T, c.k, dg.m, du.m, dout.p, ws.p, nullptr, c.E);
  CK(cudaDeviceSynchronize());
  char name[200];
  std::snprintf(name, sizeof name, "moe_gate_up_swiglu T=%d k=%d E=%d D=%lld I=%lld bits=%d group=%d %s", c.T, c.k,
                c.E, (long long)c.D, (long long)c.I, c.bits, c.group, c.exact ? "exact" : "general");
  // SwiGLU rounds gate/up to bf16 before the nonlinearity; a one-ulp flip
  // of a rounded gate moves the output by about an ulp, so only the
  // aggregate checks apply here.
  expect_close(name, dout.get(), ref, nullptr, P, c.I, 5e-3, false);

  // Same call again without the expert count (0: unknown, up to kMaxExperts; only the grid differs).
  Dev<uint16_t> dout2(size_t(P) * c.I, kPoison);
  g::moe_gate_up_swiglu(dx.p, dex.p, c.T, c.k, dg.m, du.m, dout2.p, ws.p, nullptr);
  CK(cudaDeviceSynchronize());
  EXPECT_TRUE(dout.get() == dout2.get()) << name << ": results depend on the num_experts hint";
}

TEST(CudaGemm, MoeGateUpSwiglu) {
  REQUIRE_GPU();
  const MoeCase cases[] = {
      {1, 4, 16, 2048, 768, 4, 64, true},  {33, 4, 16, 512, 96, 4, 64, true},  {300, 4, 16, 768, 200, 4, 64, true},
      {7, 4, 16, 256, 64, 8, 32, false},   {300, 4, 16, 128, 48, 16, 64, false}, {33, 8, 16, 2048, 768, 4, 64, false},
  };
  unsigned seed = 100;
  for (const auto& c : cases) run_gate_up(c, seed++);
}

void run_down(const MoeCase& c, unsigned seed) {
  // Here D is the output width (rows of the down matrix), I the contraction.
  std::mt19937 rng(seed);
  const HostW hd = make_weights(rng, c.E, c.D, c.I, c.bits, c.group, c.exact);
  const int64_t P = int64_t(c.T) * c.k;
  const std::vector<uint16_t> h = random_x(rng, size_t(P) * c.I, 0.5f);
  const std::vector<int32_t> ex = random_experts(rng, c.T, c.k, c.E, 7);
  std::vector<double> ref(size_t(P) * c.D), aref(ref.size());
  for (int64_t p = 0; p < P; ++p) {
    const uint16_t* hr = &h[size_t(p) * c.I];
    const int e = ex[size_t(p)];
    for (int64_t d = 0; d < c.D; ++d) {
      double a = 0, aa = 0;
      for (int64_t i = 0; i < c.I; ++i) {
        const double v = double(bf2f(hr[i])) * hd.at(e, d, i);
        a += v;
        aa += std::fabs(v);
      }
      ref[size_t(p) * c.D + d] = a;
      aref[size_t(p) * c.D + d] = aa;
    }
  }
  DevW dd(hd);
  Dev<uint16_t> dh(h), dy(size_t(P) * c.D, kPoison);
  Dev<int32_t> dex(ex);
  Dev<uint8_t> ws(g::moe_workspace_bytes(c.T, c.k, c.E), 0xCD);
  g::moe_down(dh.p, dex.p, c.T, c.k, dd.m, dy.p, ws.p, nullptr, c.E);
  CK(cudaDeviceSynchronize());
  char name[200];
  std::snprintf(name, sizeof name, "moe_down T=%d k=%d E=%d D=%lld I=%lld bits=%d group=%d %s", c.T, c.k, c.E,
                (long long)c.D, (long long)c.I, c.bits, c.group, c.exact ? "exact" : "general");
  const std::vector<uint16_t> y = dy.get();
  expect_close(name, y, ref, &aref, P, c.D, 5e-3, c.exact);

  // Combine, both modes: against a host emulation of the same fp32 / bf16
  // steps on the GPU's y (<= 1 bf16 ulp), and against the double reference.
  std::uniform_real_distribution<float> uni(0.05f, 1.f);
  std::vector<uint16_t> sb(static_cast<size_t>(P));
  std::vector<float> sf(static_cast<size_t>(P));
  for (int64_t p = 0; p < P; ++p) sb[size_t(p)] = f2bf(uni(rng)), sf[size_t(p)] = uni(rng);
  Dev<uint16_t> dsb(sb);
  Dev<float> dsf(sf);
  struct Mode {
    g::Combine mode;
    bool f32;
    const char* name;
  };
  const Mode modes[] = {{zmlx::cuda::k::kBf16Products, false, "bf16 products, bf16 scores"},
                        {zmlx::cuda::k::kF32Products, false, "f32 products, bf16 scores"},
                        {zmlx::cuda::k::kF32Products, true, "f32 products, f32 scores"}};
  for (const Mode& m : modes) {
    Dev<uint16_t> dout(size_t(c.T) * c.D, kPoison);
    g::moe_combine(dy.p, m.f32 ? static_cast<const void*>(dsf.p) : static_cast<const void*>(dsb.p), m.f32, m.mode,
                   c.T, c.k, c.D, dout.p, nullptr);
    CK(cudaDeviceSynchronize());
    const std::vector<uint16_t> out = dout.get();
    std::vector<double> emu(out.size()), exact(out.size());
    for (int t = 0; t < c.T; ++t)
      for (int64_t d = 0; d < c.D; ++d) {
        float acc = 0.f;
        double ex_acc = 0;
        for (int j = 0; j < c.k; ++j) {
          const size_t p = size_t(t) * c.k + j;
          const float yv = bf2f(y[p * c.D + d]);
          const float sc = m.f32 ? sf[p] : bf2f(sb[p]);
          const float term = m.mode == zmlx::cuda::k::kBf16Products ? rbf(yv * sc) : yv * sc;
          acc += term;
          ex_acc += ref[p * c.D + d] * double(sc);
        }
        emu[size_t(t) * c.D + d] = rbf(acc);
        exact[size_t(t) * c.D + d] = ex_acc;
      }
    int64_t bad = 0, first = -1;
    for (size_t i = 0; i < out.size(); ++i) {
      const double ulp = std::max(std::ldexp(std::fabs(emu[i]), -7), 1e-30);
      if (!(std::fabs(bf2f(out[i]) - emu[i]) <= ulp)) {
        if (first < 0) first = int64_t(i);
        ++bad;
      }
    }
    EXPECT_EQ(bad, 0) << name << " combine (" << m.name << "): " << bad << " elements differ from the host emulation "
                      << "by more than 1 ulp; first at (" << first / c.D << ", " << first % c.D << ") got "
                      << (first >= 0 ? bf2f(out[size_t(first)]) : 0.f) << " want "
                      << (first >= 0 ? emu[size_t(first)] : 0.0);
    // Whole path against double (exact weights only: with general weights
    // y's own check above already covers the weight rounding).
    if (c.exact)
      expect_close(std::string(name) + " + combine (" + m.name + ")", out, exact, nullptr, c.T, c.D, 5e-3, false);
  }
}

TEST(CudaGemm, MoeDownAndCombine) {
  REQUIRE_GPU();
  // {T, k, E, D (output), I (contraction), bits, group, exact}
  const MoeCase cases[] = {
      {1, 4, 16, 2048, 768, 4, 64, true},  {33, 4, 16, 512, 768, 4, 64, true}, {300, 4, 16, 200, 256, 4, 64, true},
      {7, 4, 16, 96, 512, 8, 32, false},   {300, 4, 16, 64, 128, 16, 64, false}, {64, 8, 16, 2048, 768, 4, 64, false},
  };
  unsigned seed = 200;
  for (const auto& c : cases) run_down(c, seed++);
}

// moe_linear with one input row per token (x[p / k]).
TEST(CudaGemm, MoeLinearSharedInput) {
  REQUIRE_GPU();
  std::mt19937 rng(11);
  const int T = 45, k = 4, E = 16;
  const int64_t K = 768, N = 136;
  const HostW hw = make_weights(rng, E, N, K, 4, 64, true);
  const std::vector<uint16_t> x = random_x(rng, size_t(T) * K);
  const std::vector<int32_t> ex = random_experts(rng, T, k, E, 9);
  const int64_t P = int64_t(T) * k;
  std::vector<double> ref(size_t(P) * N), aref(ref.size());
  for (int64_t p = 0; p < P; ++p)
    for (int64_t n = 0; n < N; ++n) {
      double a = 0, aa = 0;
      for (int64_t kk = 0; kk < K; ++kk) {
        const double v = double(bf2f(x[size_t(p / k) * K + kk])) * hw.at(ex[size_t(p)], n, kk);
        a += v;
        aa += std::fabs(v);
      }
      ref[size_t(p) * N + n] = a;
      aref[size_t(p) * N + n] = aa;
    }
  DevW dw(hw);
  Dev<uint16_t> dx(x), dy(size_t(P) * N, kPoison);
  Dev<int32_t> dex(ex);
  Dev<uint8_t> ws(g::moe_workspace_bytes(T, k, E), 0);
  g::moe_linear(dx.p, false, dex.p, T, k, dw.m, dy.p, ws.p, nullptr, E);
  CK(cudaDeviceSynchronize());
  expect_close("moe_linear shared input T=45 k=4 E=16 K=768 N=136 4-bit exact", dy.get(), ref, &aref, P, N, 5e-3,
               true);
}

// The 4-bit MoE linears run 3 stages deep at 3 blocks an SM (on a card whose
// SM holds three, sm_90; elsewhere both runs below take the 4-stage form)
// unless ZMLX_GEMM_MOE_3STAGE=0 (the 4-stage form of every other GEMM): the same
// products in the same order, so the same bits, at every group size and at
// K-step counts below, at and above the stage count (K = 64 .. 768), and
// both against the double reference.
TEST(CudaGemm, MoeThreeStageFormIsBitIdentical) {
  REQUIRE_GPU();
  struct Case {
    int T, k, E;
    int64_t N, K;
    int group;
  };
  const Case cases[] = {{9, 4, 16, 136, 64, 64},  {45, 4, 16, 200, 128, 32}, {70, 8, 16, 96, 192, 64},
                        {33, 4, 16, 256, 256, 128}, {130, 8, 32, 512, 768, 64}};
  int dev = 0, major = 0;
  CK(cudaGetDevice(&dev));
  CK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  const bool hopper = major == 9;
  std::mt19937 rng(23);
  for (const Case& c : cases) {
    const HostW hw = make_weights(rng, c.E, c.N, c.K, 4, c.group, true);
    const int64_t P = int64_t(c.T) * c.k;
    const std::vector<uint16_t> x = random_x(rng, size_t(P) * c.K, 0.5f);
    const std::vector<int32_t> ex = random_experts(rng, c.T, c.k, c.E, 1);
    std::vector<double> ref(size_t(P) * c.N), aref(ref.size());
    for (int64_t p = 0; p < P; ++p)
      for (int64_t n = 0; n < c.N; ++n) {
        double a = 0, aa = 0;
        for (int64_t kk = 0; kk < c.K; ++kk) {
          const double v = double(bf2f(x[size_t(p) * c.K + kk])) * hw.at(ex[size_t(p)], n, kk);
          a += v;
          aa += std::fabs(v);
        }
        ref[size_t(p) * c.N + n] = a;
        aref[size_t(p) * c.N + n] = aa;
      }
    DevW dw(hw);
    Dev<uint16_t> dx(x), y3(size_t(P) * c.N, kPoison), y4(size_t(P) * c.N, kPoison);
    Dev<int32_t> dex(ex);
    Dev<uint8_t> ws(g::moe_workspace_bytes(c.T, c.k, c.E), 0);
    {
      zmlx::test::ScopedEnv three("ZMLX_GEMM_MOE_3STAGE", nullptr);
      // On Hopper the default must really be the 3-stage form, or the
      // comparison below would compare a kernel with itself.
      if (hopper) ASSERT_TRUE(g::moe_linear_three_stage(dw.m)) << "sm_90 but the 4-stage form";
      g::moe_linear(dx.p, true, dex.p, c.T, c.k, dw.m, y3.p, ws.p, nullptr, c.E);
    }
    {
      zmlx::test::ScopedEnv four("ZMLX_GEMM_MOE_3STAGE", "0");
      ASSERT_FALSE(g::moe_linear_three_stage(dw.m)) << "the switch did not turn the 3-stage form off";
      g::moe_linear(dx.p, true, dex.p, c.T, c.k, dw.m, y4.p, ws.p, nullptr, c.E);
    }
    CK(cudaDeviceSynchronize());
    char name[160];
    std::snprintf(name, sizeof name, "moe_linear T=%d k=%d E=%d N=%lld K=%lld group=%d", c.T, c.k, c.E,
                  (long long)c.N, (long long)c.K, c.group);
    const std::vector<uint16_t> a = y3.get(), b = y4.get();
    EXPECT_TRUE(a == b) << name << ": the 3-stage and 4-stage forms differ";
    EXPECT_EQ(std::count(a.begin(), a.end(), kPoison), 0) << name << ": unwritten elements";
    expect_close(name, a, ref, &aref, P, c.N, 5e-3, true);
  }
}

// The bucketing must not depend on what the workspace held before, and
// repeated runs must give the same bits.
TEST(CudaGemm, MoeDeterministic) {
  REQUIRE_GPU();
  std::mt19937 rng(7);
  const int T = 257, k = 8, E = 16;
  const HostW hd = make_weights(rng, E, 256, 512, 4, 64, false);
  const int64_t P = int64_t(T) * k;
  const std::vector<uint16_t> h = random_x(rng, size_t(P) * 512);
  const std::vector<int32_t> ex = random_experts(rng, T, k, E, 0);
  DevW dd(hd);
  Dev<uint16_t> dh(h), y1(size_t(P) * 256, kPoison), y2(size_t(P) * 256, kPoison);
  Dev<int32_t> dex(ex);
  Dev<uint8_t> ws1(g::moe_workspace_bytes(T, k, E), 0x00), ws2(g::moe_workspace_bytes(T, k, E), 0xFF);
  g::moe_down(dh.p, dex.p, T, k, dd.m, y1.p, ws1.p, nullptr, E);
  g::moe_down(dh.p, dex.p, T, k, dd.m, y2.p, ws2.p, nullptr, E);
  CK(cudaDeviceSynchronize());
  const auto a = y1.get(), b = y2.get();
  EXPECT_TRUE(a == b) << "moe_down differs between two runs";
  EXPECT_EQ(std::count(a.begin(), a.end(), kPoison), 0) << "unwritten elements";
}

}  // namespace

#endif  // ZMLX_HAVE_CUDA
