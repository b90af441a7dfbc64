// The arithmetic of temperature sampling, shared by the host sampler
// (gen/sampler.cpp) and the CUDA sampler (backend/cuda/sampling.cu), so
// that both pick the same token from the same logits, seed and draw.
//
// The definition (see Sampler in gen/sampler.h for the whole algorithm):
//   - candidates are ordered by logit, highest first, ties to the lower id;
//     NaN counts as -inf and -0 as +0 (order_key);
//   - a candidate's weight is an integer: exp((l - max) / T) in units of
//     2^-44, computed by exp_weight with single IEEE operations only (no
//     FMA, no library exp), so the host and the GPU round alike; below
//     kMinZ (e^-30 ~ 1e-13 of the top weight) it is 0;
//   - sums of weights are exact integer sums, the same in any order: a
//     GPU scan and a host loop agree bit for bit;
//   - the random number of draw j is splitmix64(seed + (j + 1) * golden),
//     scaled to [0, mass) by a 64x64 -> high-64 multiply.
// Callers must not let the compiler contract a*b+c here: the project
// builds C++ with -ffp-contract=off, and device code uses the _rn
// intrinsics below.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define ZMLX_SAMPLING_HD __host__ __device__ __forceinline__
#else
#define ZMLX_SAMPLING_HD inline
#endif

namespace zmlx::sampling {

// z = (logit - max) / T below this has weight 0.
constexpr float kMinZ = -30.f;
// Weights are exp(z) * 2^kWeightBits, rounded; the top one is exactly 2^44,
// so a sum over a vocabulary of up to 2^19 entries fits in 64 bits.
constexpr int kWeightBits = 44;
constexpr int64_t kMaxVocab = int64_t(1) << 19;

ZMLX_SAMPLING_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
ZMLX_SAMPLING_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
ZMLX_SAMPLING_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
ZMLX_SAMPLING_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
#endif
}
ZMLX_SAMPLING_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, 4);
  return x;
#endif
}

// x rounded to the nearest integer, ties to even: below 2^23, adding and
// taking away 2^23 leaves no fraction bits; from 2^23 up a float is an
// integer. (rintf is a library call on a plain x86-64 build.)
ZMLX_SAMPLING_HD float round_even(float x) {
  const uint32_t sign = float_bits(x) & 0x80000000u;
  const float a = bits_float(float_bits(x) ^ sign);
  if (!(a < 8388608.f)) return x;  // an integer already (or inf / NaN)
  return bits_float(float_bits(sub_rn(add_rn(a, 8388608.f), 8388608.f)) | sign);
}

// A key whose unsigned order is the logits' order: larger key, larger logit.
// NaN is mapped to -inf and -0 to +0 first, so equal keys mean equal values.
ZMLX_SAMPLING_HD uint32_t order_key(float l) {
  uint32_t b = float_bits(l);
  if ((b & 0x7fffffffu) > 0x7f800000u) b = 0xff800000u;  // NaN -> -inf
  if (b == 0x80000000u) b = 0u;                           // -0 -> +0
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
// The logit of a key (NaN and -0 come back as -inf and +0).
ZMLX_SAMPLING_HD float key_logit(uint32_t k) {
  return bits_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// The repetition penalty of mlx-lm: a seen token's logit shrinks towards 0
// (divided when positive, multiplied when negative).
ZMLX_SAMPLING_HD float penalize(float l, float penalty) { return l < 0.f ? mul_rn(l, penalty) : l / penalty; }

// z of a logit: (l - max) * (1 / T), both factors computed by the caller
// once (inv_temp = 1.0f / T on the host).
ZMLX_SAMPLING_HD float scaled_z(float l, float max_logit, float inv_temp) {
  return mul_rn(sub_rn(l, max_logit), inv_temp);
}

// exp(z) * 2^44 rounded to an integer, for z in [kMinZ, 0]; 0 below (and
// for NaN). Range reduction z = k ln2 + r with a two-part ln2 whose high
// part has 16 significant bits (k ln2_hi is exact for |k| <= 2^8), then a
// degree-7 Taylor polynomial of e^r on |r| <= ln2/2 (relative error ~2e-8,
// below float's own rounding), then the exact scaling by 2^(k + 44).
ZMLX_SAMPLING_HD uint64_t exp_weight(float z) {
  if (!(z >= kMinZ)) return 0;
  if (z > 0.f) z = 0.f;
  const float k = round_even(mul_rn(z, 1.44269502f));  // z / ln2
  const float r = sub_rn(sub_rn(z, mul_rn(k, 0.693145751953125f)), mul_rn(k, 1.42860677e-6f));
  float p = 1.f / 5040.f;
  p = add_rn(mul_rn(p, r), 1.f / 720.f);
  p = add_rn(mul_rn(p, r), 1.f / 120.f);
  p = add_rn(mul_rn(p, r), 1.f / 24.f);
  p = add_rn(mul_rn(p, r), 1.f / 6.f);
  p = add_rn(mul_rn(p, r), 0.5f);
  p = add_rn(mul_rn(p, r), 1.f);
  p = add_rn(mul_rn(p, r), 1.f);
  // 2^(k + 44) as a float: k is in [-44, 0], so the exponent field is normal.
  const float scale = bits_float(uint32_t(127 + int(k) + kWeightBits) << 23);
  return uint64_t(int64_t(round_even(mul_rn(p, scale))));
}

// The random 64 bits of draw `draw` of the stream `seed` (splitmix64).
ZMLX_SAMPLING_HD uint64_t random_bits(uint64_t seed, uint64_t draw) {
  uint64_t z = seed + (draw + 1) * 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// floor(bits * mass / 2^64): a uniform integer in [0, mass) for mass > 0.
ZMLX_SAMPLING_HD uint64_t scale_to(uint64_t bits, uint64_t mass) {
#if defined(__CUDA_ARCH__)
  return __umul64hi(bits, mass);
#else
  return uint64_t((unsigned __int128)bits * mass >> 64);
#endif
}

// The weight top-p asks for: ceil(top_p * S), at most S (double(S) may
// round up past S above 2^53).
ZMLX_SAMPLING_HD uint64_t top_p_target(float top_p, uint64_t sum) {
  const double t = double(top_p) * double(sum);
  const uint64_t f = uint64_t(t);
  const uint64_t c = double(f) < t ? f + 1 : f;
  return c < sum ? c : sum;
}

// What a sampler needs besides the logits, as the device reads it.
struct Params {
  float inv_temp = 1.f;    // 1 / T (T > 0); 0 means greedy (argmax of the penalized logits)
  float top_p = 1.f;       // 1: off
  float ln_min_p = 0.f;    // log(min_p); used when min_p > 0
  float penalty = 1.f;     // 1: off
  int32_t top_k = 0;       // 0: off
  int32_t use_min_p = 0;   // min_p > 0
  int32_t window_cap = 0;  // how many recent tokens the penalty sees
  int32_t pad = 0;
  float frequency = 0.f;   // OpenAI's frequency_penalty: minus this per earlier pick of the token
  float presence = 0.f;    // OpenAI's presence_penalty: minus this once the token was picked
  uint64_t seed = 0;
  // Whether the penalties change logits (then they are not bf16 values).
  ZMLX_SAMPLING_HD bool penalized() const { return penalty != 1.f || frequency != 0.f || presence != 0.f; }
  ZMLX_SAMPLING_HD bool counts_output() const { return frequency != 0.f || presence != 0.f; }
};

// The frequency and presence penalties of a logit whose token the output
// already holds `count` times (after the repetition penalty).
ZMLX_SAMPLING_HD float penalize_count(float l, int32_t count, float frequency, float presence) {
  if (count <= 0) return l;
  return sub_rn(sub_rn(l, mul_rn(float(count), frequency)), presence);
}

}  // namespace zmlx::sampling
