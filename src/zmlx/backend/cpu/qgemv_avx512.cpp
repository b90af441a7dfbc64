// AVX-512 (BF16 + VBMI) mat-vec kernels. Compiled with AVX-512 flags and only
// called when the CPU reports those features (see qgemv.cpp).
//
// Quantized rows: a 32-byte load holds 32·e packed elements (e = 8/bits per
// byte). Zero-extending to 16-bit lanes and extracting bit-field k gives the
// elements e·j+k; vpermw maps each small integer to its exact bf16 value, and
// vdpbf16ps multiplies with x (pre-permuted the same way) and accumulates in
// fp32. Products q·x are exact in fp32, so the only rounding is the fp32
// accumulation. Each fp32 lane covers 2e consecutive elements, all in one
// quantization group, so the per-group scale is applied lane-wise per block.
//
// GCC 12 flags the intrinsics' own placeholder values (the undefined vectors
// inside _mm512_cvtepu16_epi32, _mm512_slli_epi32 and _mm512_reduce_add_ps, in
// its avx512fintrin.h) as uninitialized once they are inlined here: a false
// positive in the compiler's headers (160 warnings a build), so those two
// warnings are off for this file.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>

#include <cstring>

#include "zmlx/backend/cpu/qgemv.h"

namespace zmlx::cpu::detail {

static inline __m512 bf16_broadcast(uint16_t b) {
  return _mm512_castsi512_ps(_mm512_set1_epi32(int(uint32_t(b) << 16)));
}

// Converts up to 16 bf16 values (count n) to fp32 lanes, zero beyond n.
static inline __m512 bf16x16_to_f32(const uint16_t* p, int n) {
  __m256i v = _mm256_maskz_loadu_epi16(__mmask16((1u << n) - 1u), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

template <int BITS>
static inline __m512i small_int_bf16_table() {
  alignas(64) uint16_t t[32] = {};
  for (int i = 0; i < (1 << BITS) && i < 32; ++i) t[i] = f32_to_bf16_bits(float(i));
  return _mm512_load_si512(t);
}

template <int BITS, int TT>
static void rows_quant(const MatrixView& m, int64_t r0, int64_t r1, const PreparedRows& x,
                       int64_t t0, float* out, int64_t ldo) {
  constexpr int E = 8 / BITS;
  constexpr int BLOCK = 32 * E;  // elements per 32-byte load
  const int64_t K = m.cols, G = K / m.group, nblk = K / BLOCK;
  const int64_t row_bytes = K * BITS / 8;
  const int lanes_per_group = m.group / (2 * E);
  const bool broadcast = lanes_per_group >= 16;
  const int groups_per_block = broadcast ? 1 : 16 / lanes_per_group;
  alignas(64) int32_t idx[16];
  for (int i = 0; i < 16; ++i) idx[i] = broadcast ? 0 : i / lanes_per_group;
  const __m512i lane_group = _mm512_load_si512(idx);
  const __m512i table = BITS == 8 ? _mm512_setzero_si512() : small_int_bf16_table<BITS>();
  const __m512i mask = _mm512_set1_epi16((1 << BITS) - 1);

  const uint16_t* xp[TT];
  const float* sx[TT];
  for (int t = 0; t < TT; ++t) {
    xp[t] = BITS == 8 ? x.natural(t0 + t) : x.permuted(BITS, t0 + t);
    sx[t] = x.group_sums(m.group, t0 + t);
  }

  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* wr = reinterpret_cast<const uint8_t*>(m.w) + r * row_bytes;
    const uint16_t* sc = m.scales + r * G;
    const uint16_t* bi = m.biases + r * G;
    __m512 total[TT];
    for (int t = 0; t < TT; ++t) total[t] = _mm512_setzero_ps();

    for (int64_t b = 0; b < nblk; ++b) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + 32 * b));
      __m512bh q[E];
      if constexpr (BITS == 8) {
        __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(raw)));
        __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(raw, 1)));
        q[0] = _mm512_cvtne2ps_pbh(hi, lo);  // low half from `lo`: elements 0..15
      } else {
        const __m512i words = _mm512_cvtepu8_epi16(raw);
        for (int k = 0; k < E; ++k) {
          __m512i qk = k == 0 ? words : _mm512_srli_epi16(words, BITS * k);
          if (k != E - 1) qk = _mm512_and_si512(qk, mask);
          q[k] = (__m512bh)_mm512_permutexvar_epi16(qk, table);
        }
      }
      const int64_t g0 = b * BLOCK / m.group;
      const __m512 s = broadcast ? bf16_broadcast(sc[g0])
                                 : _mm512_permutexvar_ps(lane_group, bf16x16_to_f32(sc + g0, groups_per_block));
      for (int t = 0; t < TT; ++t) {
        __m512 acc = _mm512_setzero_ps();
        for (int k = 0; k < E; ++k)
          acc = _mm512_dpbf16_ps(acc, q[k], (__m512bh)_mm512_loadu_si512(xp[t] + b * BLOCK + 32 * k));
        total[t] = _mm512_fmadd_ps(acc, s, total[t]);
      }
    }
    // Bias term: Σ_g bias_g · Σ_{c∈g} x_c, 16 groups at a time.
    for (int t = 0; t < TT; ++t) {
      __m512 bacc = _mm512_setzero_ps();
      for (int64_t g = 0; g < G; g += 16) {
        const int n = int(G - g < 16 ? G - g : 16);
        const __m512 bv = bf16x16_to_f32(bi + g, n);
        const __m512 sv = _mm512_maskz_loadu_ps(__mmask16((1u << n) - 1u), sx[t] + g);
        bacc = _mm512_fmadd_ps(bv, sv, bacc);
      }
      out[t * ldo + (r - r0)] = _mm512_reduce_add_ps(total[t]) + _mm512_reduce_add_ps(bacc);
    }
  }
}

template <int TT>
static void rows_dense(const MatrixView& m, int64_t r0, int64_t r1, const PreparedRows& x,
                       int64_t t0, float* out, int64_t ldo) {
  const int64_t K = m.cols;
  for (int64_t r = r0; r < r1; ++r) {
    const uint16_t* wr = m.wd + r * K;
    __m512 acc[TT];
    for (int t = 0; t < TT; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t c = 0; c < K; c += 32) {
      const __m512bh w = (__m512bh)_mm512_loadu_si512(wr + c);
      for (int t = 0; t < TT; ++t)
        acc[t] = _mm512_dpbf16_ps(acc[t], w, (__m512bh)_mm512_loadu_si512(x.natural(t0 + t) + c));
    }
    for (int t = 0; t < TT; ++t) out[t * ldo + (r - r0)] = _mm512_reduce_add_ps(acc[t]);
  }
}


// Row-interleaved 4-bit tiles (repack.h): 16 rows per zmm, so there is no
// horizontal reduction and each broadcast x pair feeds 16 rows. Codes become
// the bf16 value 1 + q/16 with a shift and one ternary-logic op (no shuffle
// ports used), so per group
//   Σ x·q = 16·(Σ x·(1 + q/16) − Σ x)
//   row   = Σ_g 16·scale_g·acc_g  +  Σ_g (bias_g − 16·scale_g)·Σx_g
// Products x·(1 + q/16) are exact in fp32; four accumulators per token (one
// per column pair of a chunk) break the dependency chain.
template <int TT>
static void rows_tiles(const MatrixView& m, int64_t r0, int64_t r1, const PreparedRows& x, int64_t t0,
                       float* out, int64_t ldo) {
  const int64_t K = m.cols, G = K / m.group, chunks_per_group = m.group / 8;
  const __m512i nib = _mm512_set1_epi16(0x0078), one = _mm512_set1_epi16(0x3F80);
  const uint16_t* xs[TT];
  const float* sx[TT];
  for (int t = 0; t < TT; ++t) {
    xs[t] = x.natural(t0 + t);
    sx[t] = x.group_sums(m.group, t0 + t);
  }
  auto bf16x16 = [](const uint16_t* p) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
  };
  auto bcast = [](const uint16_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return (__m512bh)_mm512_set1_epi32(v);
  };
  for (int64_t row = r0; row < r1; row += 16) {
    const int64_t tile = row / 16;
    const uint8_t* tp = m.tiles + tile * (K / 8) * 64;
    const uint16_t* ts = m.tile_scales + tile * G * 16;
    const uint16_t* tb = m.tile_biases + tile * G * 16;
    __m512 total[TT];
    for (int t = 0; t < TT; ++t) total[t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      __m512 acc[TT][4];
      for (int t = 0; t < TT; ++t)
        for (int j = 0; j < 4; ++j) acc[t][j] = _mm512_setzero_ps();
      for (int64_t kk = 0; kk < chunks_per_group; ++kk) {
        const int64_t k = g * chunks_per_group + kk;
        const __m512i w = _mm512_loadu_si512(tp + k * 64);
        const __m512bh q0 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_slli_epi16(w, 3), nib, one, 0xEA);
        const __m512bh q1 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 1), nib, one, 0xEA);
        const __m512bh q2 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 5), nib, one, 0xEA);
        const __m512bh q3 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 9), nib, one, 0xEA);
        for (int t = 0; t < TT; ++t) {
          const uint16_t* xp = xs[t] + k * 8;
          acc[t][0] = _mm512_dpbf16_ps(acc[t][0], q0, bcast(xp));
          acc[t][1] = _mm512_dpbf16_ps(acc[t][1], q1, bcast(xp + 2));
          acc[t][2] = _mm512_dpbf16_ps(acc[t][2], q2, bcast(xp + 4));
          acc[t][3] = _mm512_dpbf16_ps(acc[t][3], q3, bcast(xp + 6));
        }
      }
      const __m512 sc16 = _mm512_mul_ps(bf16x16(ts + g * 16), _mm512_set1_ps(16.0f));  // exact
      for (int t = 0; t < TT; ++t) {
        const __m512 a = _mm512_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]), _mm512_add_ps(acc[t][2], acc[t][3]));
        total[t] = _mm512_fmadd_ps(a, sc16, total[t]);
      }
    }
    // Bias term, group by group: Σ_g (bias_g − 16·scale_g)·Σx_g.
    for (int t = 0; t < TT; ++t) {
      __m512 bsum = _mm512_setzero_ps();
      for (int64_t g = 0; g < G; ++g) {
        const __m512 sc16 = _mm512_mul_ps(bf16x16(ts + g * 16), _mm512_set1_ps(16.0f));
        const __m512 corr = _mm512_sub_ps(bf16x16(tb + g * 16), sc16);
        bsum = _mm512_fmadd_ps(corr, _mm512_set1_ps(sx[t][g]), bsum);
      }
      _mm512_storeu_ps(out + t * ldo + (row - r0), _mm512_add_ps(total[t], bsum));
    }
  }
}

template <int TT>
static void rows_tile(const MatrixView& m, int64_t r0, int64_t r1, const PreparedRows& x,
                      int64_t t0, float* out, int64_t ldo) {
  if (m.tiles) return rows_tiles<TT>(m, r0, r1, x, t0, out, ldo);
  switch (m.bits) {
    case 0: return rows_dense<TT>(m, r0, r1, x, t0, out, ldo);
    case 2: return rows_quant<2, TT>(m, r0, r1, x, t0, out, ldo);
    case 4: return rows_quant<4, TT>(m, r0, r1, x, t0, out, ldo);
    case 8: return rows_quant<8, TT>(m, r0, r1, x, t0, out, ldo);
  }
}

void gemv_avx512(const MatrixView& m, int64_t r0, int64_t r1, const PreparedRows& x, int64_t t0,
                 int64_t T, float* out, int64_t ldo) {
  const int64_t block = m.bits == 0 ? 32 : 32 * (8 / m.bits);
  if (!m.tiles && m.cols % block != 0) return gemv_portable(m, r0, r1, x, t0, T, out, ldo);
  int64_t t = 0;
  for (; t + 4 <= T; t += 4) rows_tile<4>(m, r0, r1, x, t0 + t, out + t * ldo, ldo);
  switch (T - t) {
    case 3: rows_tile<3>(m, r0, r1, x, t0 + t, out + t * ldo, ldo); break;
    case 2: rows_tile<2>(m, r0, r1, x, t0 + t, out + t * ldo, ldo); break;
    case 1: rows_tile<1>(m, r0, r1, x, t0 + t, out + t * ldo, ldo); break;
  }
}

float dot_bf16_avx512(const uint16_t* a, const uint16_t* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 32)
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(a + i), (__m512bh)_mm512_loadu_si512(b + i));
  return _mm512_reduce_add_ps(acc);
}

void axpy_bf16_avx512(float a, const uint16_t* x, float* y, int64_t n) {
  const __m512 av = _mm512_set1_ps(a);
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 xv = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i))), 16));
    _mm512_storeu_ps(y + i, _mm512_fmadd_ps(av, xv, _mm512_loadu_ps(y + i)));
  }
}

}  // namespace zmlx::cpu::detail
