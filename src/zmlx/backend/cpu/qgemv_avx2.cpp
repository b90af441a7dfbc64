// AVX2 + FMA mat-vec kernels for CPUs without AVX-512 BF16. Compiled with
// AVX2 flags and only called when the CPU reports them (see qgemv.cpp).
//
// x is fp32. For 4-bit rows, 8 packed bytes hold 16 elements: zero-extending
// them to 32-bit lanes and taking the low / high nibble gives the even / odd
// elements, matched by x stored per 16-block as [evens, odds]. Per group:
// acc = Σ x·q (fp32 FMA), then total += scale·acc; the bias term uses the
// group sums of x, as in every variant.
#include <immintrin.h>

#include <cstring>

#include "zmlx/backend/cpu/qgemv.h"

namespace zmlx::cpu::detail {

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

static inline __m256i load8_u8_to_i32(const uint8_t* p) {
  int64_t v;
  std::memcpy(&v, p, 8);
  return _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(v));
}

static float row_q4(const uint8_t* w, const uint16_t* sc, const uint16_t* bi, const float* x, const float* sx,
                    int64_t K, int group) {
  const __m256i mask = _mm256_set1_epi32(0xf);
  __m256 total = _mm256_setzero_ps();
  float bias_sum = 0.f;
  for (int64_t g = 0; g < K / group; ++g) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int64_t b = g * group; b < (g + 1) * group; b += 16) {
      const __m256i bytes = load8_u8_to_i32(w + b / 2);
      const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(bytes, mask));
      const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4));
      acc0 = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x + b), acc0);
      acc1 = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + b + 8), acc1);
    }
    total = _mm256_fmadd_ps(_mm256_add_ps(acc0, acc1), _mm256_set1_ps(bf16_to_f32(sc[g])), total);
    bias_sum += bf16_to_f32(bi[g]) * sx[g];
  }
  return hsum(total) + bias_sum;
}

static float row_q8(const uint8_t* w, const uint16_t* sc, const uint16_t* bi, const float* x, const float* sx,
                    int64_t K, int group) {
  __m256 total = _mm256_setzero_ps();
  float bias_sum = 0.f;
  for (int64_t g = 0; g < K / group; ++g) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t c = g * group; c < (g + 1) * group; c += 8)
      acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(load8_u8_to_i32(w + c)), _mm256_loadu_ps(x + c), acc);
    total = _mm256_fmadd_ps(acc, _mm256_set1_ps(bf16_to_f32(sc[g])), total);
    bias_sum += bf16_to_f32(bi[g]) * sx[g];
  }
  return hsum(total) + bias_sum;
}

static float row_dense(const uint16_t* w, const float* x, int64_t K) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t c = 0; c < K; c += 8) {
    const __m256i wi = _mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c))), 16);
    acc = _mm256_fmadd_ps(_mm256_castsi256_ps(wi), _mm256_loadu_ps(x + c), acc);
  }
  return hsum(acc);
}

void gemv_avx2(const MatrixView& m, int64_t r0, int64_t r1, const PreparedRows& x, int64_t t0, int64_t T,
               float* out, int64_t ldo) {
  const int64_t K = m.cols;
  const bool ok = (m.bits == 4 && K % 16 == 0) || (m.bits == 8 && K % 8 == 0) || (m.bits == 0 && K % 8 == 0);
  if (!ok) return gemv_portable(m, r0, r1, x, t0, T, out, ldo);
  const int64_t G = m.bits ? K / m.group : 0;
  const int64_t row_bytes = K * m.bits / 8;
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t t = 0; t < T; ++t) {
      float v;
      if (m.bits == 0) {
        v = row_dense(m.wd + r * K, x.f32(t0 + t), K);
      } else {
        const uint8_t* w = reinterpret_cast<const uint8_t*>(m.w) + r * row_bytes;
        const float* sx = x.group_sums(m.group, t0 + t);
        v = m.bits == 4 ? row_q4(w, m.scales + r * G, m.biases + r * G, x.f32_perm4(t0 + t), sx, K, m.group)
                        : row_q8(w, m.scales + r * G, m.biases + r * G, x.f32(t0 + t), sx, K, m.group);
      }
      out[t * ldo + (r - r0)] = v;
    }
}

}  // namespace zmlx::cpu::detail
