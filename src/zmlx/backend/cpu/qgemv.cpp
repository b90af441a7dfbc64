#include "zmlx/backend/cpu/qgemv.h"

#include <cstdlib>
#include <cstring>
#include <string>

#include "zmlx/core/error.h"

namespace zmlx::cpu {

// ---------------------------------------------------------------- prepared rows

static void permute_for_bits(const uint16_t* x, int64_t K, int bits, uint16_t* out) {
  // A 32-byte load of packed words holds 32*e elements (e = 8/bits per byte).
  // Zero-extending the bytes to 16-bit lanes and extracting bit-field k of
  // every lane yields elements e*j + k (j = 0..31), so x is stored in the same
  // order: block-wise, part k = x[B + e*j + k].
  const int e = 8 / bits;
  const int64_t block = 32 * e;
  for (int64_t B = 0; B + block <= K; B += block)
    for (int k = 0; k < e; ++k)
      for (int j = 0; j < 32; ++j) out[B + 32 * k + j] = x[B + e * j + k];
}

void PreparedRows::prepare(const uint16_t* x, int64_t T, int64_t K, int64_t ldx, unsigned layouts) {
  T_ = T;
  K_ = K;
  layouts_ = layouts;
  nat_.resize(size_t(T * K));
  if (layouts & kF32) f32_.resize(size_t(T * K));
  if (layouts & kF32Perm4) f32p4_.resize(size_t(T * K));
  if (layouts & kPerm4) perm4_.resize(size_t(T * K));
  if (layouts & kPerm2) perm2_.resize(size_t(T * K));
  const int64_t n32 = K / 32;
  sums32_.assign(size_t(T * n32), 0.f);
  sums64_.assign(size_t(T * (K / 64)), 0.f);
  sums128_.assign(size_t(T * (K / 128)), 0.f);
  for (int64_t t = 0; t < T; ++t) {
    const uint16_t* xr = x + t * ldx;
    std::memcpy(&nat_[t * K], xr, size_t(K) * 2);
    if (layouts & kF32)
      for (int64_t c = 0; c < K; ++c) f32_[size_t(t * K + c)] = bf16_to_f32(xr[c]);
    if ((layouts & kF32Perm4) && K % 16 == 0)
      for (int64_t b = 0; b < K; b += 16)
        for (int j = 0; j < 8; ++j) {
          f32p4_[size_t(t * K + b + j)] = bf16_to_f32(xr[b + 2 * j]);
          f32p4_[size_t(t * K + b + 8 + j)] = bf16_to_f32(xr[b + 2 * j + 1]);
        }
    if ((layouts & kPerm4) && K % 64 == 0) permute_for_bits(xr, K, 4, &perm4_[t * K]);
    if ((layouts & kPerm2) && K % 128 == 0) permute_for_bits(xr, K, 2, &perm2_[t * K]);
    // Group sums are built hierarchically (32 -> 64 -> 128) so every kernel
    // variant sees the same bias-term values.
    float* s32 = &sums32_[t * n32];
    for (int64_t i = 0; i < n32; ++i) {
      float s = 0.f;
      for (int c = 0; c < 32; ++c) s += bf16_to_f32(xr[i * 32 + c]);
      s32[i] = s;
    }
    for (int64_t i = 0; i < K / 64; ++i) sums64_[t * (K / 64) + i] = s32[2 * i] + s32[2 * i + 1];
    for (int64_t i = 0; i < K / 128; ++i)
      sums128_[t * (K / 128) + i] = sums64_[t * (K / 64) + 2 * i] + sums64_[t * (K / 64) + 2 * i + 1];
  }
}

const uint16_t* PreparedRows::permuted(int bits, int64_t t) const {
  ZMLX_CHECK(layouts_ & (bits == 2 ? kPerm2 : kPerm4), "internal: {}-bit layout of x was not prepared", bits);
  return (bits == 2 ? perm2_.data() : perm4_.data()) + t * K_;
}

const float* PreparedRows::f32_perm4(int64_t t) const {
  ZMLX_CHECK(layouts_ & kF32Perm4, "internal: fp32 4-bit layout of x was not prepared");
  return f32p4_.data() + t * K_;
}

const float* PreparedRows::f32(int64_t t) const {
  ZMLX_CHECK(layouts_ & kF32, "internal: fp32 layout of x was not prepared");
  return f32_.data() + t * K_;
}

const float* PreparedRows::group_sums(int g, int64_t t) const {
  if (g == 32) return sums32_.data() + t * (K_ / 32);
  if (g == 64) return sums64_.data() + t * (K_ / 64);
  return sums128_.data() + t * (K_ / 128);
}

// ---------------------------------------------------------------- views

MatrixView matrix_view(const Weight& w, int64_t expert) {
  MatrixView m;
  m.rows = w.rows;
  m.cols = w.cols;
  if (w.quantized) {
    const int64_t wpr = w.words_per_row(), gpr = w.groups_per_row();
    const int64_t e = expert < 0 ? 0 : expert;
    m.w = w.w.ptr<uint32_t>() + e * w.rows * wpr;
    m.scales = w.scales.ptr<uint16_t>() + e * w.rows * gpr;
    m.biases = w.biases.ptr<uint16_t>() + e * w.rows * gpr;
    m.bits = w.q.bits;
    m.group = w.q.group_size;
    if (!w.tiles.empty()) {
      m.tiles = w.tiles.ptr<uint8_t>() + e * w.rows * w.cols / 2;
      m.tile_scales = w.tile_scales.ptr<uint16_t>() + e * w.rows * gpr;
      m.tile_biases = w.tile_biases.ptr<uint16_t>() + e * w.rows * gpr;
    }
  } else {
    const int64_t e = expert < 0 ? 0 : expert;
    m.wd = w.w.ptr<uint16_t>() + e * w.rows * w.cols;
  }
  return m;
}

unsigned layouts_needed(const MatrixView& m) {
  if (active_isa() == Isa::Portable) return kF32;
  if (active_isa() == Isa::Avx2) return m.bits == 4 && m.cols % 16 == 0 ? unsigned(kF32Perm4) : unsigned(kF32);
  if (m.tiles) return 0;
  switch (m.bits) {
    case 0: return m.cols % 32 == 0 ? 0u : unsigned(kF32);
    case 2: return m.cols % 128 == 0 ? unsigned(kPerm2) : unsigned(kF32);
    case 4: return m.cols % 64 == 0 ? unsigned(kPerm4) : unsigned(kF32);
    default: return m.cols % 32 == 0 ? 0u : unsigned(kF32);
  }
}

// ---------------------------------------------------------------- dispatch

static bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16") &&
         __builtin_cpu_supports("avx512vbmi");
}

static bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

bool isa_supported(Isa isa) {
  return isa == Isa::Portable || (isa == Isa::Avx2 && cpu_has_avx2()) || (isa == Isa::Avx512 && cpu_has_avx512());
}

static Isa detect_isa() {
  if (const char* env = std::getenv("ZMLX_CPU_ISA")) {
    std::string v = env;
    if (v == "portable") return Isa::Portable;
    if (v == "avx2") {
      ZMLX_CHECK(cpu_has_avx2(), "ZMLX_CPU_ISA=avx2 but this CPU lacks AVX2/FMA");
      return Isa::Avx2;
    }
    if (v == "avx512") {
      ZMLX_CHECK(cpu_has_avx512(), "ZMLX_CPU_ISA=avx512 but this CPU lacks AVX-512 BF16/VBMI");
      return Isa::Avx512;
    }
    fail("ZMLX_CPU_ISA='{}' is not one of: portable, avx2, avx512", v);
  }
  return cpu_has_avx512() ? Isa::Avx512 : cpu_has_avx2() ? Isa::Avx2 : Isa::Portable;
}

static Isa& isa_slot() {
  static Isa isa = detect_isa();
  return isa;
}
Isa active_isa() { return isa_slot(); }
void force_isa(Isa isa) {
  ZMLX_CHECK(isa_supported(isa), "ISA {} not supported on this CPU", isa_name(isa));
  isa_slot() = isa;
}
std::string_view isa_name(Isa isa) {
  return isa == Isa::Avx512 ? "avx512" : isa == Isa::Avx2 ? "avx2" : "portable";
}

void gemv_rows(const MatrixView& m, int64_t r0, int64_t r1, const PreparedRows& x, int64_t t0,
               int64_t T, float* out, int64_t ldo) {
  if (isa_slot() == Isa::Avx512)
    detail::gemv_avx512(m, r0, r1, x, t0, T, out, ldo);
  else if (isa_slot() == Isa::Avx2)
    detail::gemv_avx2(m, r0, r1, x, t0, T, out, ldo);
  else
    detail::gemv_portable(m, r0, r1, x, t0, T, out, ldo);
}

float dot_bf16(const uint16_t* a, const uint16_t* b, int64_t n) {
  if (isa_slot() == Isa::Avx512 && n % 32 == 0) return detail::dot_bf16_avx512(a, b, n);
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += bf16_to_f32(a[i]) * bf16_to_f32(b[i]);
  return s;
}

void axpy_bf16(float a, const uint16_t* x, float* y, int64_t n) {
  if (isa_slot() == Isa::Avx512 && n % 16 == 0) return detail::axpy_bf16_avx512(a, x, y, n);
  for (int64_t i = 0; i < n; ++i) y[i] += a * bf16_to_f32(x[i]);
}

// ---------------------------------------------------------------- portable

namespace detail {

static inline uint32_t extract_q(const uint32_t* row, int64_t c, int bits) {
  const int per = 32 / bits;
  return (row[c / per] >> (bits * (c % per))) & ((1u << bits) - 1u);
}

void gemv_portable(const MatrixView& m, int64_t r0, int64_t r1, const PreparedRows& x, int64_t t0,
                   int64_t T, float* out, int64_t ldo) {
  const int64_t K = m.cols;
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t t = 0; t < T; ++t) {
      const float* xf = x.f32(t0 + t);
      float acc_row = 0.f;
      if (m.bits == 0) {
        const uint16_t* wr = m.wd + r * K;
        for (int64_t c = 0; c < K; ++c) acc_row += xf[c] * bf16_to_f32(wr[c]);
      } else {
        const uint32_t* wr = m.w + r * (K * m.bits / 32);
        const int64_t G = K / m.group;
        const float* sx = x.group_sums(m.group, t0 + t);
        for (int64_t g = 0; g < G; ++g) {
          float acc = 0.f;
          for (int64_t c = g * m.group; c < (g + 1) * m.group; ++c)
            acc += xf[c] * float(extract_q(wr, c, m.bits));
          acc_row += bf16_to_f32(m.scales[r * G + g]) * acc + bf16_to_f32(m.biases[r * G + g]) * sx[g];
        }
      }
      out[t * ldo + (r - r0)] = acc_row;
    }
  }
}

}  // namespace detail

double reference_dot(const MatrixView& m, int64_t row, const uint16_t* x) {
  const int64_t K = m.cols;
  double acc = 0;
  for (int64_t c = 0; c < K; ++c) {
    float w;
    if (m.bits == 0) {
      w = bf16_to_f32(m.wd[row * K + c]);
    } else {
      const int64_t G = K / m.group, g = c / m.group;
      uint32_t q = detail::extract_q(m.w + row * (K * m.bits / 32), c, m.bits);
      w = bf16_to_f32(m.scales[row * G + g]) * float(q) + bf16_to_f32(m.biases[row * G + g]);
    }
    acc += double(bf16_to_f32(x[c])) * double(w);
  }
  return acc;
}

}  // namespace zmlx::cpu
