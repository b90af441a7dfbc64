// CUDA kernels (see kernels.h for the contracts).
//
// Quantized mat-vec design: one warp per output row; each lane walks the row
// in chunks of 32 values (16 bytes of 4-bit weights: one 128-bit load), with
// a fixed lane->chunk mapping and a butterfly warp reduction. Every kernel
// that needs "row r of W times x" calls row_dot(), so the unfused and fused
// MoE paths produce the same bits for the same inputs.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "zmlx/backend/cuda/device_common.cuh"
#include "zmlx/backend/cuda/kernels.h"
#include "zmlx/backend/cuda/mla.h"

namespace zmlx::cuda::k {
namespace {

using namespace zmlx::cuda::dev;

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;  // one warp per row, 256 threads
constexpr int kTokTile = 8;       // tokens per pass over a weight row (prefill)
constexpr int kMaxMulti = 4;

struct MultiQ {
  QMat m[kMaxMulti];
  uint16_t* y[kMaxMulti];
  int64_t first_block[kMaxMulti + 1];
  int n;
};

void check_launch(const char* what) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw std::runtime_error(std::string("CUDA kernel ") + what + ": " + cudaGetErrorString(e));
}

// MLX silu(gate) * up with bf16 rounding after sigmoid, product and result.
__device__ __forceinline__ uint16_t swiglu_bf(uint16_t gate, uint16_t up) { return to_bf(swiglu_f(bf(gate), bf(up))); }

// 32 bf16 inputs of one chunk as floats, and their sum (fp32, in order):
// the quantized dot product needs Σx once per chunk, whatever the row.
struct XF {
  float v[32];
  float sum;
};
// Inputs 8i..8i+7 of a chunk from its 16-byte piece i; then the sum.
__device__ __forceinline__ void xf_piece(XF& c, int i, const uint4& q) {
  const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) c.v[8 * i + 2 * j] = lo_bf(w[j]), c.v[8 * i + 2 * j + 1] = hi_bf(w[j]);
}
__device__ __forceinline__ void xf_sum(XF& c) {
  c.sum = 0.f;
#pragma unroll
  for (int i = 0; i < 32; ++i) c.sum += c.v[i];
}
// NC: x in global memory, read through the non-coherent path; otherwise a
// plain load (x staged in shared memory).
template <bool NC = true>
__device__ __forceinline__ XF load_x(const uint16_t* x) {
  XF c;
  const uint4* p = reinterpret_cast<const uint4*>(x);
#pragma unroll
  for (int i = 0; i < 4; ++i) xf_piece(c, i, NC ? __ldg(p + i) : p[i]);
  xf_sum(c);
  return c;
}

// 32 weights of one chunk: BITS words (BITS = 16 means dense bf16).
template <int BITS>
struct WChunk {
  uint32_t v[BITS];
};
template <int BITS>
__device__ __forceinline__ WChunk<BITS> load_w(const uint32_t* p) {
  WChunk<BITS> c;
  if constexpr (BITS == 2) {
    const uint2 q = __ldg(reinterpret_cast<const uint2*>(p));
    c.v[0] = q.x, c.v[1] = q.y;
  } else {
#pragma unroll
    for (int i = 0; i < BITS / 4; ++i) {
      const uint4 q = __ldg(reinterpret_cast<const uint4*>(p) + i);
      c.v[4 * i] = q.x, c.v[4 * i + 1] = q.y, c.v[4 * i + 2] = q.z, c.v[4 * i + 3] = q.w;
    }
  }
  return c;
}

// The bf16 pair (128 + nibble s, 128 + nibble s+4) of a 4-bit word, exact
// (the bf16 ulp at 128 is 1): chunk_dot and the MMA path decode with it.
// One lop3 for the mask and the exponent: written as two C++ operations the
// compiler emitted two (a SASS lop3 holds one immediate), so the exponent
// goes in as a register operand. (a & b) | c is lop3 table 0xEA.
__device__ __forceinline__ uint32_t nib_pair(uint32_t w, int s) {
  uint32_t r;
  asm("lop3.b32 %0, %1, 0x000F000F, %2, 0xEA;" : "=r"(r) : "r"(w >> (4 * s)), "r"(0x43004300u));
  return r;
}

// chunk_dot<4>'s arithmetic on a chunk's 16 nib_pairs (pr[4j + s] =
// nib_pair(word j, s)), for callers that make the pairs ahead of time.
__device__ __forceinline__ float chunk_dot_pairs(const uint32_t (&pr)[16], const XF& x, float scale, float bias,
                                                 float acc) {
  float qx = 0.f;
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const uint32_t p = pr[4 * j + s];
      qx = fmaf(lo_bf(p), x.v[8 * j + s], qx);
      qx = fmaf(hi_bf(p), x.v[8 * j + s + 4], qx);
    }
  acc = fmaf(scale, qx, acc);
  return fmaf(fmaf(-128.f, scale, bias), x.sum, acc);
}
__device__ __forceinline__ void chunk_pairs(const WChunk<4>& w, uint32_t (&pr)[16]) {
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int s = 0; s < 4; ++s) pr[4 * j + s] = nib_pair(w.v[j], s);
}

// acc += Σ_i w_i·x_i over one chunk. Quantized: w_i = scale·q_i + bias, so
// the sum is scale·Σq·x + bias·Σx (fp32, fixed order). q becomes a float
// through the exponent trick (2^23 + q, exact) instead of a slow I2F.
// 4-bit: two weights at a time, as the MMA path does: nib_pair (one shift,
// one lop3), each half a float through one more op;
// Σ(128+q)·x·scale + (bias − 128·scale)·Σx. Three instructions a
// weight instead of four (the scalar decode mat-vecs are bound by
// instruction issue once their weights are preloaded).
template <int BITS>
__device__ __forceinline__ float chunk_dot(const WChunk<BITS>& w, const XF& x, float scale, float bias, float acc) {
  if constexpr (BITS == 16) {
#pragma unroll
    for (int i = 0; i < 32; ++i) acc = fmaf((i & 1) ? hi_bf(w.v[i >> 1]) : lo_bf(w.v[i >> 1]), x.v[i], acc);
    return acc;
  } else if constexpr (BITS == 4) {
    uint32_t pr[16];
    chunk_pairs(w, pr);
    return chunk_dot_pairs(pr, x, scale, bias, acc);
  } else {
    constexpr uint32_t mask = (1u << BITS) - 1u;
    constexpr int per = 32 / BITS;
    float qx = 0.f;
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      const float q = __uint_as_float(0x4B000000u | ((w.v[i / per] >> (BITS * (i % per))) & mask)) - 8388608.0f;
      qx = fmaf(q, x.v[i], qx);
    }
    acc = fmaf(scale, qx, acc);
    return fmaf(bias, x.sum, acc);
  }
}

// Row r of expert e (of m) against TT input rows x + t·xs (t < ntok); warp
// reduced, the same value in every lane.
template <int BITS, int TT>
__device__ __forceinline__ void row_dot(const QMat& m, int64_t e, int64_t r, const uint16_t* x, int64_t xs, int ntok,
                                        float (&acc)[TT]) {
  const int lane = threadIdx.x & 31;
  const int64_t K = m.cols;
  const int chunks = int(K / 32);
  const uint32_t* wr = m.w + e * m.w_stride + r * (K * BITS / 32);
  const int64_t gpr = BITS == 16 ? 0 : K / m.group;
  const uint16_t* sr = BITS == 16 ? nullptr : m.scales + e * m.s_stride + r * gpr;
  const uint16_t* br = BITS == 16 ? nullptr : m.biases + e * m.s_stride + r * gpr;
#pragma unroll
  for (int t = 0; t < TT; ++t) acc[t] = 0.f;
#pragma unroll 2
  for (int c = lane; c < chunks; c += kWarp) {
    const WChunk<BITS> w = load_w<BITS>(wr + int64_t(c) * BITS);
    float sc = 1.f, bi = 0.f;
    if constexpr (BITS != 16) {
      const int g = (c * 32) / m.group;
      sc = bf(__ldg(sr + g));
      bi = bf(__ldg(br + g));
    }
#pragma unroll
    for (int t = 0; t < TT; ++t)
      if (t < ntok) acc[t] = chunk_dot<BITS>(w, load_x(x + t * xs + int64_t(c) * 32), sc, bi, acc[t]);
  }
#pragma unroll
  for (int t = 0; t < TT; ++t) acc[t] = warp_sum(acc[t]);
}

// Decode (one input row): a warp computes R consecutive rows r0.. (nrows
// valid), issuing every row's loads for a chunk before using them; the
// input chunk is unpacked once for all R rows. Per row, the arithmetic is
// row_dot's.
// Measured on an H200 (bench/cuda_kernels_bench): one row per warp is best
// for the plain mat-vecs (more warps in flight), two for gate+up pairs.
constexpr int kDecodeRows = 1;
constexpr int kSwigluDecodeRows = 2;

template <int BITS, int R, int NM>
__device__ __forceinline__ void rows_dot_n(const QMat (&ms)[NM], int64_t e, int64_t r0, int nrows, const uint16_t* x,
                                           float (&acc)[NM][R]) {
  const int lane = threadIdx.x & 31;
  const int64_t K = ms[0].cols;
  const int chunks = int(K / 32);
  const int64_t wpr = K * BITS / 32;
  const int64_t gpr = BITS == 16 ? 0 : K / ms[0].group;
#pragma unroll
  for (int i = 0; i < NM; ++i)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[i][r] = 0.f;
#pragma unroll 2
  for (int c = lane; c < chunks; c += kWarp) {
    WChunk<BITS> w[NM][R];
    float sc[NM][R], bi[NM][R];
#pragma unroll
    for (int i = 0; i < NM; ++i)
#pragma unroll
      for (int r = 0; r < R; ++r) {
        sc[i][r] = 1.f, bi[i][r] = 0.f;
        if (r < nrows) {
          w[i][r] = load_w<BITS>(ms[i].w + e * ms[i].w_stride + (r0 + r) * wpr + int64_t(c) * BITS);
          if constexpr (BITS != 16) {
            const int64_t g = e * ms[i].s_stride + (r0 + r) * gpr + (c * 32) / ms[i].group;
            sc[i][r] = bf(__ldg(ms[i].scales + g)), bi[i][r] = bf(__ldg(ms[i].biases + g));
          }
        }
      }
    const XF xf = load_x(x + int64_t(c) * 32);
#pragma unroll
    for (int i = 0; i < NM; ++i)
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (r < nrows) acc[i][r] = chunk_dot<BITS>(w[i][r], xf, sc[i][r], bi[i][r], acc[i][r]);
  }
#pragma unroll
  for (int i = 0; i < NM; ++i)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[i][r] = warp_sum(acc[i][r]);
}

template <int BITS, int R>
__device__ __forceinline__ void rows_dot(const QMat& m, int64_t e, int64_t r0, int nrows, const uint16_t* x,
                                         float (&acc)[R]) {
  const QMat ms[1] = {m};
  float a[1][R];
  rows_dot_n<BITS, R, 1>(ms, e, r0, nrows, x, a);
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = a[0][r];
}

__device__ __forceinline__ float combine_score(const void* scores, bool f32, int64_t p) {
  return f32 ? static_cast<const float*>(scores)[p] : bf(static_cast<const uint16_t*>(scores)[p]);
}
// score: combine_score's value (a bf16 score for kBf16Products).
__device__ __forceinline__ float combine_product(uint16_t y, float score, int mode) {
  return mode == kBf16Products ? rbf(bf(y) * score) : bf(y) * score;
}
__device__ __forceinline__ float combine_term(uint16_t y, const void* scores, bool f32, int mode, int64_t p) {
  return combine_product(y, combine_score(scores, f32 && mode != kBf16Products, p), mode);
}

// ------------------------------------------------------------------ linear

template <int BITS, int TT>
__global__ void __launch_bounds__(256) linear_kernel(const uint16_t* x, int T, QMat m, uint16_t* y) {
  ZMLX_TRACE_BLOCK_END();
  pdl_begin();
  const int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (r >= m.rows) return;
  const int t0 = blockIdx.y * TT, ntok = min(TT, T - t0);
  float acc[TT];
  row_dot<BITS, TT>(m, 0, r, x + int64_t(t0) * m.cols, m.cols, ntok, acc);
  if ((threadIdx.x & 31) == 0)
    for (int t = 0; t < ntok; ++t) y[int64_t(t0 + t) * m.rows + r] = to_bf(acc[t]);
}

// Several matrices (same format) applied to the same input in one launch;
// block b belongs to the matrix whose block range holds it.
template <int BITS, int TT>
__global__ void __launch_bounds__(256) linear_multi_kernel(const uint16_t* x, int T, MultiQ mq) {
  ZMLX_TRACE_BLOCK_END();
  pdl_begin();
  int i = 0;
  while (i + 1 < mq.n && int64_t(blockIdx.x) >= mq.first_block[i + 1]) ++i;
  const QMat& m = mq.m[i];
  const int64_t r = (int64_t(blockIdx.x) - mq.first_block[i]) * kRowsPerBlock + (threadIdx.x >> 5);
  if (r >= m.rows) return;
  const int t0 = blockIdx.y * TT, ntok = min(TT, T - t0);
  float acc[TT];
  row_dot<BITS, TT>(m, 0, r, x + int64_t(t0) * m.cols, m.cols, ntok, acc);
  if ((threadIdx.x & 31) == 0)
    for (int t = 0; t < ntok; ++t) mq.y[i][int64_t(t0 + t) * m.rows + r] = to_bf(acc[t]);
}

template <int BITS, int TT>
__global__ void __launch_bounds__(256) linear_swiglu_kernel(const uint16_t* x, int T, QMat g, QMat u, uint16_t* y) {
  ZMLX_TRACE_BLOCK_END();
  pdl_begin();
  const int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (r >= g.rows) return;
  const int t0 = blockIdx.y * TT, ntok = min(TT, T - t0);
  float ga[TT], ua[TT];
  row_dot<BITS, TT>(g, 0, r, x + int64_t(t0) * g.cols, g.cols, ntok, ga);
  row_dot<BITS, TT>(u, 0, r, x + int64_t(t0) * u.cols, u.cols, ntok, ua);
  if ((threadIdx.x & 31) == 0)
    for (int t = 0; t < ntok; ++t) y[int64_t(t0 + t) * g.rows + r] = swiglu_bf(to_bf(ga[t]), to_bf(ua[t]));
}

template <int BITS>
__global__ void __launch_bounds__(256) gather_combine_kernel(const uint16_t* h, const int32_t* ex, const void* scores,
                                                             bool f32, int mode, int k, QMat m, uint16_t* out) {
  ZMLX_TRACE_BLOCK_END();
  pdl_begin();
  const int64_t d = int64_t(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (d >= m.rows) return;
  const int64_t t = blockIdx.y;
  float acc = 0.f;
  for (int j = 0; j < k; ++j) {
    const int64_t p = t * k + j;
    float a[1];
    row_dot<BITS, 1>(m, ex[p], d, h + p * m.cols, 0, 1, a);
    acc += combine_term(to_bf(a[0]), scores, f32, mode, p);
  }
  if ((threadIdx.x & 31) == 0) out[t * m.rows + d] = to_bf(acc);
}

constexpr int kShortK = 8;  // experts per token the short-row combine keeps in registers

// gather_combine for rows of at most CPL·1024 inputs (CPL chunks per lane):
// every selected expert's chunks are loaded before any is used. Same
// arithmetic as row_dot (a lane's chunks in order, then the warp reduction).
template <int BITS, int CPL>
__global__ void __launch_bounds__(256) gather_combine_short_kernel(const uint16_t* h, const int32_t* ex,
                                                                   const void* scores, bool f32, int mode, int k,
                                                                   QMat m, uint16_t* out) {
  ZMLX_TRACE_BLOCK_END();
  pdl_begin();
  constexpr int KMAX = kShortK / CPL;
  const int64_t d = int64_t(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (d >= m.rows) return;
  const int lane = threadIdx.x & 31;
  const int64_t t = blockIdx.y, K = m.cols;
  const int chunks = int(K / 32);
  const int64_t gpr = BITS == 16 ? 0 : K / m.group;
  WChunk<BITS> w[KMAX][CPL];
  float sc[KMAX][CPL], bi[KMAX][CPL];
#pragma unroll
  for (int j = 0; j < KMAX; ++j)
#pragma unroll
    for (int u = 0; u < CPL; ++u) {
      const int c = lane + 32 * u;
      sc[j][u] = 1.f, bi[j][u] = 0.f;
      if (j < k && c < chunks) {
        const int64_t e = ex[t * k + j];
        w[j][u] = load_w<BITS>(m.w + e * m.w_stride + d * (K * BITS / 32) + int64_t(c) * BITS);
        if constexpr (BITS != 16) {
          const int64_t g = e * m.s_stride + d * gpr + (c * 32) / m.group;
          sc[j][u] = bf(__ldg(m.scales + g)), bi[j][u] = bf(__ldg(m.biases + g));
        }
      }
    }
  float acc = 0.f;
#pragma unroll
  for (int j = 0; j < KMAX; ++j) {
    if (j >= k) break;
    const int64_t p = t * k + j;
    float a = 0.f;
#pragma unroll
    for (int u = 0; u < CPL; ++u) {
      const int c = lane + 32 * u;
      if (c < chunks) a = chunk_dot<BITS>(w[j][u], load_x(h + p * K + int64_t(c) * 32), sc[j][u], bi[j][u], a);
    }
    a = warp_sum(a);
    acc += combine_term(to_bf(a), scores, f32, mode, p);
  }
  if (lane == 0) out[t * m.rows + d] = to_bf(acc);
}

__global__ void moe_combine_kernel(const uint16_t* y, const void* scores, bool f32, int mode, int T, int k, int64_t D,
                                   uint16_t* out) {
  ZMLX_TRACE_BLOCK_END();
  pdl_begin();
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= int64_t(T) * D) return;
  const int64_t t = i / D, d = i % D;
  float acc = 0.f;
  for (int j = 0; j < k; ++j) acc += combine_term(y[(t * k + j) * D + d], scores, f32, mode, t * k + j);
  out[i] = to_bf(acc);
}

// ---- decode forms (one token; kDecodeRows rows per warp) ----
constexpr int kRowsPerDecodeBlock = kRowsPerBlock * kDecodeRows;

template <int R = kDecodeRows>
__device__ __forceinline__ int64_t decode_row0(int64_t block = blockIdx.x) {
  return (block * kRowsPerBlock + (threadIdx.x >> 5)) * R;
}

// A plain (non-expert) row's weights are constant, so a decode kernel can
// issue a lane's weight loads before the programmatic-launch wait, while
// the previous kernel (which writes x) still runs, and wait only for x.
// kPreChunks chunks a lane (K <= 32·32·kPreChunks: 4096 inputs) are held in
// registers; the sum is row_dot's, in the same order (c = lane, lane + 32,
// ...), so the bits are the same. Longer rows take rows_dot after the wait.
// Plain linears with longer rows (up to 8192 inputs: GLM's o_proj, 5120)
// take linear_decode_kernel<B, kPreChunksLong>, which holds twice as many.
constexpr int kPreChunks = 4, kPreChunksLong = 8;
// Scales and biases stay raw bf16 bits until the dot product uses them
// (row_scale / row_bias), as in MmaStep: converting them where they are
// loaded would make the warp wait there for each chunk's load before
// issuing the next chunk's.
template <int BITS, int PRE = kPreChunks>
struct RowPreload {
  WChunk<BITS> w[PRE];
  uint32_t sc[PRE], bi[PRE];  // bf16 bits (dense rows: scale 1, bias 0)
};
template <int BITS, int PRE>
__device__ __forceinline__ float row_scale(const RowPreload<BITS, PRE>& p, int i) {
  return lo_bf(p.sc[i]);
}
template <int BITS, int PRE>
__device__ __forceinline__ float row_bias(const RowPreload<BITS, PRE>& p, int i) {
  return lo_bf(p.bi[i]);
}
template <int BITS, int PRE = kPreChunks>
__device__ __forceinline__ bool row_preloadable(const QMat& m) {
  return m.cols / 32 <= 32 * PRE;
}
// Row r of matrix e of m (stacked matrices: experts or heads).
template <int BITS, int PRE = kPreChunks>
__device__ __forceinline__ void row_preload(const QMat& m, int64_t r, RowPreload<BITS, PRE>& p, int64_t e = 0,
                                            int lane = -1) {
  if (lane < 0) lane = threadIdx.x & 31;
  const int chunks = int(m.cols / 32);
  const uint32_t* wr = m.w + e * m.w_stride + r * (m.cols * BITS / 32);
  const int64_t gpr = BITS == 16 ? 0 : m.cols / m.group;
#pragma unroll
  for (int i = 0; i < PRE; ++i) {
    const int c = lane + 32 * i;
    p.sc[i] = 0x3F80u, p.bi[i] = 0u;  // bf16 1 and 0
    if (c < chunks) {
      p.w[i] = load_w<BITS>(wr + int64_t(c) * BITS);
      if constexpr (BITS != 16) {
        const int64_t g = e * m.s_stride + r * gpr + (c * 32) / m.group;
        p.sc[i] = __ldg(m.scales + g), p.bi[i] = __ldg(m.biases + g);
      }
    }
  }
}
// A lane's preloaded 4-bit chunks as nib_pairs (decode_row_to's CV form),
// made before the wait: the empty asm on each pair keeps the compiler from
// moving its shift and lop3 past the wait.
template <int PRE>
struct ChunkPairs {
  uint32_t v[PRE][16];
};
template <int PRE>
__device__ __forceinline__ void make_pairs_ahead(const QMat& m, const RowPreload<4, PRE>& p, ChunkPairs<PRE>& pr) {
  const int lane = threadIdx.x & 31, chunks = int(m.cols / 32);
#pragma unroll
  for (int i = 0; i < PRE; ++i)
    if (lane + 32 * i < chunks) {
      chunk_pairs(p.w[i], pr.v[i]);
#pragma unroll
      for (int k = 0; k < 16; ++k) asm volatile("" : "+r"(pr.v[i][k]));
    }
}
// The row's value from this lane's preloaded chunks, chunk c's inputs from
// x_chunk(c) (an XF); the same value in every lane. With pairs (made by
// make_pairs_ahead) each chunk starts from its nib_pairs: the same
// arithmetic, as chunk_dot<4> is chunk_pairs then chunk_dot_pairs.
template <int BITS, int PRE, typename XChunk, typename Pairs = std::nullptr_t>
__device__ __forceinline__ float row_dot_preloaded_from(const QMat& m, const RowPreload<BITS, PRE>& p,
                                                        XChunk&& x_chunk, const Pairs& pairs = nullptr) {
  const int lane = threadIdx.x & 31, chunks = int(m.cols / 32);
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < PRE; ++i) {
    const int c = lane + 32 * i;
    if (c >= chunks) continue;
    if constexpr (std::is_same_v<Pairs, ChunkPairs<PRE>>)
      acc = chunk_dot_pairs(pairs.v[i], x_chunk(c), row_scale(p, i), row_bias(p, i), acc);
    else
      acc = chunk_dot<BITS>(p.w[i], x_chunk(c), row_scale(p, i), row_bias(p, i), acc);
  }
  return warp_sum(acc);
}
template <int BITS, int PRE = kPreChunks, bool NC = true, typename Pairs = std::nullptr_t>
__device__ __forceinline__ float row_dot_preloaded(const QMat& m, const RowPreload<BITS, PRE>& p, const uint16_t* x,
                                                   const Pairs& pairs = nullptr) {
  return row_dot_preloaded_from<BITS, PRE>(m, p, [&](int c) { return load_x<NC>(x + int64_t(c) * 32); }, pairs);
}

// x staged once a block in shared memory (decode_row's SX): after the
// wait the block copies x there, and every warp reads its lanes' chunks
// from it instead of from global memory. A lane's chunk c is 64 contiguous
// bytes, so read straight from global memory each of the four 16-byte loads
// of a warp touches 16 lines (lanes 64 bytes apart): 4x the L1 wavefronts
// of a contiguous load, and each of the block's warps makes them.
// The block stages x as floats, not as its bf16 pairs: the warps then do
// not unpack every input once a row (one instruction a weight, of the ~5
// these kernels spend, and they are bound by instruction issue), for one
// more 16-byte shared load a row's 8 inputs. A chunk's 32 floats are 8
// slots of 16 bytes, rotated by c (slot 8c + (j + c) mod 8), so the eight
// lanes of each phase of a 16-byte load (chunks c .. c+7) fall on eight
// different 4-bank groups. The values and their order are load_x's, so
// the bits are the same.
__device__ __forceinline__ int staged_x_slot(int c, int j) { return (c << 3) | ((j + c) & 7); }
// One shared buffer a kernel for every caller of the same PRE (decode_row
// and swiglu_decode_row in one launch share it): x of up to 32·32·PRE inputs.
template <int PRE>
__device__ __forceinline__ float4* staged_x_buffer() {
  __shared__ float4 buf[32 * PRE * 8];
  return buf;
}
// Whole block, after the programmatic-launch wait; K <= 32·32·PRE. Piece p
// (8 inputs, 16 bytes of x) is slots 2i and 2i + 1 of chunk p / 4 (i = p % 4).
template <int PRE>
__device__ __forceinline__ const float4* stage_x_block(const uint16_t* x, int64_t K) {
  float4* xs = staged_x_buffer<PRE>();
  const uint4* src = reinterpret_cast<const uint4*>(x);
  for (int p = threadIdx.x; p < int(K >> 3); p += blockDim.x) {
    const uint4 q = __ldg(src + p);
    const int c = p >> 2, i = p & 3;
    xs[staged_x_slot(c, 2 * i)] = make_float4(lo_bf(q.x), hi_bf(q.x), lo_bf(q.y), hi_bf(q.y));
    xs[staged_x_slot(c, 2 * i + 1)] = make_float4(lo_bf(q.z), hi_bf(q.z), lo_bf(q.w), hi_bf(q.w));
  }
  __syncthreads();
  return xs;
}
// Chunk c of a staged x, in load_x's order (xf_piece's: inputs 8i .. 8i+7
// from piece i), then its sum.
__device__ __forceinline__ XF load_x_staged(const float4* xs, int c) {
  XF out;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float4 a = xs[staged_x_slot(c, 2 * i)], b = xs[staged_x_slot(c, 2 * i + 1)];
    out.v[8 * i] = a.x, out.v[8 * i + 1] = a.y, out.v[8 * i + 2] = a.z, out.v[8 * i + 3] = a.w;
    out.v[8 * i + 4] = b.x, out.v[8 * i + 5] = b.y, out.v[8 * i + 6] = b.z, out.v[8 * i + 7] = b.w;
  }
  xf_sum(out);
  return out;
}
template <int BITS, int PRE = kPreChunks, typename Pairs = std::nullptr_t>
__device__ __forceinline__ float row_dot_preloaded_staged(const QMat& m, const RowPreload<BITS, PRE>& p,
                                                          const float4* xs, const Pairs& pairs = nullptr) {
  return row_dot_preloaded_from<BITS, PRE>(m, p, [&](int c) { return load_x_staged(xs, c); }, pairs);
}

// One row of m (row r, valid or not) into y[r]: preloaded when the row is
// short enough, x then staged as above when SX. Every thread of the block
// calls it (pdl_begin inside). SX is a template parameter, not a flag: one
// kernel holding both forms took more registers (ptxas).
// store(r, value) takes the row's bf16 value in lane 0 (decode_row: y[r]).
// CV (4-bit rows only): each preloaded chunk is also turned into its
// nib_pairs before the programmatic-launch wait (make_pairs_ahead), so after
// the wait a weight costs its half's extraction and its FMA, not the shift
// and lop3 as well: the same arithmetic in the same order (chunk_dot_pairs),
// 12 more registers a preloaded chunk.
template <int BITS, int PRE = kPreChunks, bool SX = false, bool CV = false, typename Store>
__device__ __forceinline__ void decode_row_to(const QMat& m, int64_t r, const uint16_t* x, bool pre, Store&& store) {
  static_assert(kDecodeRows == 1, "decode_row computes one row a warp");
  static_assert(!CV || BITS == 4, "pairs ahead of the wait: 4-bit rows");
  if (pre && row_preloadable<BITS, PRE>(m)) {  // the same for the whole block
    const bool valid = r < m.rows;
    RowPreload<BITS, PRE> p;
    std::conditional_t<CV, ChunkPairs<PRE>, std::nullptr_t> pr{};
    if (valid) {
      row_preload<BITS, PRE>(m, r, p);
      if constexpr (CV) make_pairs_ahead<PRE>(m, p, pr);
    }
    pdl_begin();
    const float4* xs = SX ? stage_x_block<PRE>(x, m.cols) : nullptr;  // whole block, before any warp leaves
    ZMLX_TRACE_MARK(0);  // trace: x staged
    if (!valid) return;
    const float acc =
        SX ? row_dot_preloaded_staged<BITS, PRE>(m, p, xs, pr) : row_dot_preloaded<BITS, PRE>(m, p, x, pr);
    ZMLX_TRACE_MARK(1);  // trace: the row's sum
    if ((threadIdx.x & 31) == 0) store(r, to_bf(acc));
    return;
  }
  pdl_begin();
  if (r >= m.rows) return;
  float acc[1];
  rows_dot<BITS, 1>(m, 0, r, 1, x, acc);
  if ((threadIdx.x & 31) == 0) store(r, to_bf(acc[0]));
}
template <int BITS, int PRE = kPreChunks, bool SX = false, bool CV = false>
__device__ __forceinline__ void decode_row(const QMat& m, int64_t r, const uint16_t* x, uint16_t* y, bool pre) {
  decode_row_to<BITS, PRE, SX, CV>(m, r, x, pre, [y](int64_t i, uint16_t v) { y[i] = v; });
}

template <int BITS, int PRE, bool SX, bool CV = false>
__global__ void __launch_bounds__(256) linear_decode_kernel(const uint16_t* x, QMat m, uint16_t* y, bool pre) {
  ZMLX_TRACE_BLOCK_END();
  decode_row<BITS, PRE, SX, CV>(m, decode_row0(), x, y, pre);
}

template <int BITS, bool SX>
__global__ void __launch_bounds__(256) linear_multi_decode_kernel(const uint16_t* x, MultiQ mq, bool pre) {
  ZMLX_TRACE_BLOCK_END();
  int i = 0;
  while (i + 1 < mq.n && int64_t(blockIdx.x) >= mq.first_block[i + 1]) ++i;
  const int64_t r0 = ((int64_t(blockIdx.x) - mq.first_block[i]) * kRowsPerBlock + (threadIdx.x >> 5)) * kDecodeRows;
  decode_row<BITS, kPreChunks, SX>(mq.m[i], r0, x, mq.y[i], pre);
}

// Gate and up row r (valid or not) into y[r] = swiglu(bf16(g·x), bf16(u·x)),
// preloaded as decode_row does. Every thread of the block calls it.
template <int BITS, bool SX>
__device__ __forceinline__ void swiglu_decode_row(const QMat& g, const QMat& u, int64_t r, const uint16_t* x,
                                                  uint16_t* y, bool pre) {
  static_assert(kDecodeRows == 1, "swiglu_decode_row computes one row a warp");
  if (pre && row_preloadable<BITS>(g)) {
    const bool valid = r < g.rows;
    RowPreload<BITS> pg, pu;
    if (valid) row_preload<BITS>(g, r, pg), row_preload<BITS>(u, r, pu);
    pdl_begin();
    const float4* xs = SX ? stage_x_block<kPreChunks>(x, g.cols) : nullptr;  // whole block, before any warp leaves
    ZMLX_TRACE_MARK(0);  // trace: x staged
    if (!valid) return;
    const float ag = SX ? row_dot_preloaded_staged<BITS>(g, pg, xs) : row_dot_preloaded<BITS>(g, pg, x);
    const float au = SX ? row_dot_preloaded_staged<BITS>(u, pu, xs) : row_dot_preloaded<BITS>(u, pu, x);
    ZMLX_TRACE_MARK(1);  // trace: the rows' sums
    if ((threadIdx.x & 31) == 0) y[r] = swiglu_bf(to_bf(ag), to_bf(au));
    return;
  }
  pdl_begin();
  if (r >= g.rows) return;
  const QMat gu[2] = {g, u};
  float a[2][1];
  rows_dot_n<BITS, 1, 2>(gu, 0, r, 1, x, a);
  if ((threadIdx.x & 31) == 0) y[r] = swiglu_bf(to_bf(a[0][0]), to_bf(a[1][0]));
}

template <int BITS, bool SX>
__global__ void __launch_bounds__(256) linear_swiglu_decode_kernel(const uint16_t* x, QMat g, QMat u, uint16_t* y,
                                                                   bool pre) {
  ZMLX_TRACE_BLOCK_END();
  swiglu_decode_row<BITS, SX>(g, u, decode_row0(), x, y, pre);
}

// A MoE block's router and its shared expert's gate+up, which read the same
// x, in one launch (one token): blocks [0, wb) compute w's rows as
// linear_decode_kernel does, the rest the gate+up rows as
// linear_swiglu_decode_kernel does, so both outputs have those kernels' bits
// and the router's successor (the top-k) waits on one kernel, not two.
template <int WB, int SB, bool SX>
__global__ void __launch_bounds__(256) linear_and_swiglu_decode_kernel(const uint16_t* x, QMat w, uint16_t* y, int wb,
                                                                       QMat g, QMat u, uint16_t* yh, bool pre) {
  ZMLX_TRACE_BLOCK_END();
  if (int(blockIdx.x) < wb) return decode_row<WB, kPreChunks, SX>(w, decode_row0(), x, y, pre);
  swiglu_decode_row<SB, SX>(g, u, decode_row0(int64_t(blockIdx.x) - wb), x, yh, pre);
}

// One (token, slot) pair per blockIdx.y.
template <int BITS>
__global__ void __launch_bounds__(256) gather_linear_decode_kernel(const uint16_t* x, bool per_slot, const int32_t* ex,
                                                                   int k, QMat m, uint16_t* y) {
  ZMLX_TRACE_BLOCK_END();
  pdl_begin();
  const int64_t r0 = decode_row0();
  if (r0 >= m.rows) return;
  const int n = int(kDecodeRows < (m.rows - r0) ? int64_t(kDecodeRows) : (m.rows - r0));
  const int64_t p = blockIdx.y;
  const int64_t xr = per_slot ? p : p / k;
  float acc[kDecodeRows];
  rows_dot<BITS, kDecodeRows>(m, ex[p], r0, n, x + xr * m.cols, acc);
  if ((threadIdx.x & 31) == 0)
    for (int r = 0; r < n; ++r) y[p * m.rows + r0 + r] = to_bf(acc[r]);
}

template <int BITS>
__global__ void __launch_bounds__(256) gather_swiglu_decode_kernel(const uint16_t* x, const int32_t* ex, int k, QMat g,
                                                                   QMat u, uint16_t* y) {
  ZMLX_TRACE_BLOCK_END();
  pdl_begin();
  const int64_t r0 = decode_row0<kSwigluDecodeRows>();
  if (r0 >= g.rows) return;
  const int n = int(kSwigluDecodeRows < (g.rows - r0) ? int64_t(kSwigluDecodeRows) : (g.rows - r0));
  const int64_t p = blockIdx.y;
  const int32_t e = ex[p];
  const QMat gu[2] = {g, u};
  float a[2][kSwigluDecodeRows];
  rows_dot_n<BITS, kSwigluDecodeRows, 2>(gu, e, r0, n, x + (p / k) * g.cols, a);
  if ((threadIdx.x & 31) == 0)
    for (int r = 0; r < n; ++r) y[p * g.rows + r0 + r] = swiglu_bf(to_bf(a[0][r]), to_bf(a[1][r]));
}

// ---- tensor-core decode mat-vec (4-bit weights) ----
//
// Why: at one token the scalar path above spends ~4 instructions per weight
// turning nibbles into floats (shift, and, fadd, ffma) and is bound by
// instruction issue, not by DRAM. Here the multiply-adds run on the tensor
// cores (mma.sync m16n8k16, bf16 in, fp32 accumulate) and a weight costs
// about one instruction (a shift and a lop3 per bf16 pair, shared by two
// weights, plus 1/8 of an MMA).
//
// Layout, without relayouting the weights: a warp owns a tile of 16 rows.
// Lane (g = lane/4, t = lane%4) loads, with one 16-byte load per row, chunk
// t (32 inputs) of a 128-input slab for rows g and g+8: the words the
// scalar path would load too. A dot product does not care in which order
// its k are summed, so the MMA's k-slots take whatever real k a lane holds,
// as long as B holds x at the same k: nibble pair s of a word becomes the
// bf16 pair (128 + q[s], 128 + q[s+4]) through (w >> 4s) & 0x000F000F |
// 0x43004300 (exact: the bf16 ulp at 128 is 1), and the block stages x once
// in shared memory in that same pair order (mma_stage_x).
//
// Groups: the four lanes of a quad feed one MMA row from four different
// chunks, which may lie in different groups (group 32). So B is not x in
// every column: column c < 4 holds x only in the k-slots of lane c (its
// chunk of slab X) and column 4 + c only in those of lane c's chunk of a
// second slab Y (the A registers a2/a3); the rest of B is zero. Every C
// entry is then the sum over exactly one 32-input chunk of one row, inside
// one group whatever the group size, and the lane holding it applies the
// affine part in fp32:
//   Σ w·x = scale·Σ(128+q)·x + (bias − 128·scale)·Σx      (Σx per chunk, staged)
// Products bf16 x bf16 are exact; the tensor core accumulates in fp32, so
// the result differs from the scalar path only by fp32 summation order.
// The 128 offset costs ~4 bits of the fp32 mantissa per chunk (C is ~16x
// the q·x part), far below the bf16 rounding of the output.
//
// Long rows are split over S = mma_splits(K) warps (slabs sp, sp+S, ...),
// whose partial sums are added in split order through shared memory. S
// depends on K alone and every kernel below computes a row with the same
// mma_tile + mma_split_sum, so fused and unfused forms give the same bits.
constexpr int kMmaWarps = 8;  // 256 threads a block
constexpr int kSmallSwigluBlocksPerSm = 3;  // gate+up's 4-warp blocks an SM (its register cap)
constexpr int64_t kMmaMaxK = 16384;

// One launch of the decode kernel: NM == 1: up to kMaxMulti matrices on one
// input (linear, linear_multi, gather); NM == 2: gate m[0] and up m[1].
struct MmaJob {
  QMat m[kMaxMulti];
  uint16_t* y[kMaxMulti];
  int64_t first_block[kMaxMulti + 1];
  int n;
  const int32_t* ex;  // expert of pair blockIdx.y, or null (plain matrices)
  int k;              // input row of pair p: per_slot ? p : p / k
  int per_slot;
  int splits;
  bool preload;  // plain matrices: first weight loads before the PDL wait
  bool x_early;  // x was complete before the previous kernel ran: staged before the PDL wait
};

// Shared words of one staged input row, laid out so that a lane's two B
// registers of an MMA (b0, b1) come from one 16-byte load already as the
// aligned register pair the MMA reads (packing them from two loads took ~90
// register moves a step). For chunk c, word w (0..3) and pair s (0..3):
//   P: [c·32 + w·8 + 2s] = pair (w, s), [.. + 1] = 0   (b0 = x: slab X lanes)
//   Q: [K + c·32 + w·8 + 2s] = 0, [.. + 1] = pair     (b1 = x: slab Y lanes)
// then 32 zero words (lanes that contribute nothing), then K/32 chunk sums
// (float); rounded up to 16 bytes.
__host__ __device__ __forceinline__ int64_t mma_stage_words(int64_t K) {
  return (2 * K + 32 + K / 32 + 3) & ~int64_t(3);
}
__device__ __forceinline__ int64_t mma_stage_zero(int64_t K) { return 2 * K; }
__device__ __forceinline__ int64_t mma_stage_sums(int64_t K) { return 2 * K + 32; }

// Whole block: n consecutive input rows x[n][K] into n staged rows st,
// st + sw, ... (sw = mma_stage_words(K)): each in nibble-pair order, word w
// (8 inputs) as (x0,x4) (x1,x5) (x2,x6) (x3,x7), then Σx per chunk (load_x's
// in-order sum). The rows go in one pass over (row, word) pairs, so their
// loads are in flight together (row after row, gather_combine's 8 rows took
// ~3 us of load latency on an H100).
__device__ __forceinline__ void mma_stage_rows(const uint16_t* x, int n, int64_t K, uint32_t* st, int64_t sw) {
  const int words = int(K >> 3), chunks = int(K >> 5);
  // i / words and i / chunks as a multiply-high by a reciprocal worked out
  // once: exact while i · divisor < 2^32 (here i < 2^15, divisors < 2^12).
  const uint32_t rw = 0xFFFFFFFFu / uint32_t(words) + 1u, rc = 0xFFFFFFFFu / uint32_t(chunks) + 1u;
#pragma unroll 4
  for (int i = threadIdx.x; i < n * words; i += blockDim.x) {
    const int q = int(__umulhi(uint32_t(i), rw)), w = i - q * words;
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(x + q * K) + w);
    const uint32_t p0 = __byte_perm(v.x, v.z, 0x5410), p1 = __byte_perm(v.x, v.z, 0x7632),
                   p2 = __byte_perm(v.y, v.w, 0x5410), p3 = __byte_perm(v.y, v.w, 0x7632);
    uint4* P = reinterpret_cast<uint4*>(st + q * sw) + 2 * w;  // word w of chunk w/4 is at 8w
    uint4* Q = reinterpret_cast<uint4*>(st + q * sw + K) + 2 * w;
    P[0] = make_uint4(p0, 0u, p1, 0u), P[1] = make_uint4(p2, 0u, p3, 0u);
    Q[0] = make_uint4(0u, p0, 0u, p1), Q[1] = make_uint4(0u, p2, 0u, p3);
  }
  for (int i = threadIdx.x; i < n * 32; i += blockDim.x) st[(i >> 5) * sw + mma_stage_zero(K) + (i & 31)] = 0u;
#pragma unroll 2
  for (int i = threadIdx.x; i < n * chunks; i += blockDim.x) {
    const int q = int(__umulhi(uint32_t(i), rc)), c = i - q * chunks;
    reinterpret_cast<float*>(st + q * sw + mma_stage_sums(K))[c] = load_x(x + q * K + int64_t(c) * 32).sum;
  }
}
__device__ __forceinline__ void mma_stage_x(const uint16_t* x, int64_t K, uint32_t* st) {
  mma_stage_rows(x, 1, K, st, 0);
}

__device__ __forceinline__ void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  __trap();
#endif
}

__device__ __forceinline__ uint32_t u4_at(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// What a lane loads for one step (slabs X and Y) of NM matrices: words of
// rows g, g+8 for its chunk of X, then of Y; and, for the two C columns it
// will hold (chunks cs, cs+1), the raw bf16 scale and bias of both rows.
// They stay raw until mma_do_step uses them: an instruction that reads a
// loaded register waits for the load, and in-order issue holds every later
// instruction of the warp behind it. Working out bias − 128·scale where
// they were loaded made each step's loads three round trips in a row (the
// SASS of gate+up, 2026-11-27: a batch of loads, a stall on the scales'
// FFMA, the next column's loads, another stall), and the next step's loads,
// issued before this step's MMAs, held those MMAs back by as much.
template <int NM>
struct MmaStep {
  uint4 w[NM][4];
  uint32_t sc[NM][2][2], bi[NM][2][2];  // [matrix][row g / g+8][column], bf16 bits
};

// Rows r0+g and r0+g+8 (g = lane/4) of a tile: where this warp's loads go.
// Everything but the expert is known before the programmatic-launch wait, so
// the offsets are worked out there (mma_rows) and the loads after the wait
// cost an add each; group sizes are powers of two (mma_format), so no
// integer division is left on that path (each had been ~20 dependent
// instructions between the wait and the first weight load).
struct MmaRows {
  bool va, vb;
  int chunks, slabs;
  int cshift;           // log2(chunks per group)
  int64_t gpr;          // groups per row
  int64_t woff, goff;   // row r0+g's first weight word and first group, within a matrix
};
template <int NM>
__device__ __forceinline__ MmaRows mma_rows(const QMat (&ms)[NM], int64_t r0) {
  const int g = (threadIdx.x & 31) >> 2;
  const int64_t ra = r0 + g;
  MmaRows r;
  r.va = ra < ms[0].rows, r.vb = ra + 8 < ms[0].rows;
  r.chunks = int(ms[0].cols >> 5), r.slabs = (r.chunks + 3) >> 2;
  const int gshift = __ffs(ms[0].group) - 1;
  r.cshift = gshift - 5;
  r.gpr = ms[0].cols >> gshift;
  r.woff = ra * (ms[0].cols >> 3);
  r.goff = ra * r.gpr;
  return r;
}

// GW (groups of 64 or more, known at compile time): both C columns of a
// lane share one group, so only column 0's scale and bias are held (fewer
// registers; gather_combine needs them to hold two steps).
// The loads of one step from rows laid out as in a matrix (row g + 8 is
// 8·wpr words after row g, its groups 8·gpr after), wherever they are: wa,
// sa, ba point at row g's first word, scale and bias of each matrix. SMEM:
// a copy in shared memory (the streamed head), read with plain loads;
// otherwise global memory, read through the non-coherent path. Invalid rows
// and chunks give zeros either way, so both give a step the same registers.
template <int NM, bool GW, bool SMEM>
__device__ __forceinline__ void mma_load_step_at(MmaStep<NM>& st, const uint32_t* const (&wa)[NM],
                                                 const uint16_t* const (&sa)[NM], const uint16_t* const (&ba)[NM],
                                                 int64_t wpr, const MmaRows& rw, int slab_x, int slab_y, int t) {
  const bool va = rw.va, vb = rw.vb;
  const int chunks = rw.chunks;
  const int64_t gpr = rw.gpr;
  const int cx = 4 * slab_x + t, cy = 4 * slab_y + t;
  const int cs = 4 * (t < 2 ? slab_x : slab_y) + 2 * (t & 1);
  const uint4 z = make_uint4(0u, 0u, 0u, 0u);
  auto ld4 = [](const uint32_t* p, int c) {
    const uint4* q = reinterpret_cast<const uint4*>(p) + c;
    return SMEM ? *q : __ldg(q);
  };
  auto ld2 = [](const uint16_t* p) -> uint32_t { return SMEM ? *p : __ldg(p); };
#pragma unroll
  for (int i = 0; i < NM; ++i) {
    const uint32_t* wb = wa[i] + 8 * wpr;
    st.w[i][0] = va && cx < chunks ? ld4(wa[i], cx) : z;
    st.w[i][1] = vb && cx < chunks ? ld4(wb, cx) : z;
    st.w[i][2] = va && cy < chunks ? ld4(wa[i], cy) : z;
    st.w[i][3] = vb && cy < chunks ? ld4(wb, cy) : z;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int c = cs + j;
      // cs is even, so for groups of 64+ both columns share one group:
      // column 1 is not loaded and mma_do_step reads column 0's.
      if (j == 1 && (GW || rw.cshift > 0)) continue;
      const int64_t gi = c >> rw.cshift;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        uint32_t sv = 0u, bv = 0u;  // bf16 zeros: the terms of a missing row or chunk are 0
        if ((h == 0 ? va : vb) && c < chunks) {
          sv = ld2(sa[i] + gi + h * 8 * gpr);
          bv = ld2(ba[i] + gi + h * 8 * gpr);
        }
        st.sc[i][h][j] = sv;
        st.bi[i][h][j] = bv;
      }
    }
  }
}
// The same from the matrices themselves (expert e), in global memory.
template <int NM, bool GW = false>
__device__ __forceinline__ void mma_load_step(MmaStep<NM>& st, const QMat (&ms)[NM], int64_t e, const MmaRows& rw,
                                              int slab_x, int slab_y, int t) {
  const uint32_t* wa[NM];
  const uint16_t *sa[NM], *ba[NM];
#pragma unroll
  for (int i = 0; i < NM; ++i) {
    wa[i] = ms[i].w + e * ms[i].w_stride + rw.woff;
    sa[i] = ms[i].scales + e * ms[i].s_stride + rw.goff;
    ba[i] = ms[i].biases + e * ms[i].s_stride + rw.goff;
  }
  mma_load_step_at<NM, GW, false>(st, wa, sa, ba, ms[0].cols >> 3, rw, slab_x, slab_y, t);
}

template <int NM, bool GW = false>
__device__ __forceinline__ void mma_do_step(const MmaStep<NM>& st, const uint32_t* stage, int64_t K, int slab_x,
                                            int slab_y, const MmaRows& rw, int g, int t, float (&acc)[NM][2]) {
  const int chunks = rw.chunks;
  const bool one_group = GW || rw.cshift > 0;  // both columns in column 0's group (mma_load_step)
  const int cx = 4 * slab_x + t, cy = 4 * slab_y + t;
  const float* sxs = reinterpret_cast<const float*>(stage + mma_stage_sums(K));
  // B: only lane (t, t) supplies x for slab X (column t: b0, from P), lane
  // (t+4, t) for slab Y (column 4+t: b1, from Q); every other lane reads the
  // zero words.
  const uint4* b = reinterpret_cast<const uint4*>(g == t && cx < chunks         ? stage + 32 * cx
                                                  : g == t + 4 && cy < chunks ? stage + K + 32 * cy
                                                                              : stage + mma_stage_zero(K));
  float c[NM][4];
#pragma unroll
  for (int i = 0; i < NM; ++i) c[i][0] = c[i][1] = c[i][2] = c[i][3] = 0.f;
#pragma unroll
  for (int ww = 0; ww < 4; ++ww) {
    const uint4 b01 = b[2 * ww], b23 = b[2 * ww + 1];  // (b0, b1) of pairs s = 0, 1 | 2, 3
#pragma unroll
    for (int i = 0; i < NM; ++i) {
      const uint32_t w0 = u4_at(st.w[i][0], ww), w1 = u4_at(st.w[i][1], ww), w2 = u4_at(st.w[i][2], ww),
                     w3 = u4_at(st.w[i][3], ww);
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const uint4& bb = s < 2 ? b01 : b23;
#ifdef ZMLX_DIAG_NO_MMA
        // Diagnostic builds only (-DCMAKE_CUDA_FLAGS=-DZMLX_DIAG_NO_MMA, with
        // the kernel trace): the same loads and registers, a few ALU ops
        // instead of the MMA, so a trace shows what the tensor-core work
        // costs each MoE kernel. The results are wrong (small finite values).
        c[i][s & 3] += __uint_as_float(((w0 ^ w1 ^ w2 ^ w3 ^ bb.x) >> (4 * s)) & 0x3F000000u) * 1e-9f;
#else
        mma_16816(c[i], nib_pair(w0, s), nib_pair(w1, s), nib_pair(w2, s), nib_pair(w3, s),
                  (s & 1) ? bb.z : bb.x, (s & 1) ? bb.w : bb.y);
#endif
      }
    }
  }
  // One accumulator chain of 16 MMAs: four independent chains (one per
  // word) measured slower on an H100 (more registers), not faster.
  // c[i][j]: row g, column 2t+j; c[i][2+j]: row g+8. Column 2t+j is chunk
  // cs + j (of slab X for t < 2, of slab Y otherwise).
  const int cs = 4 * (t < 2 ? slab_x : slab_y) + 2 * (t & 1);
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    if (cs + j >= chunks) continue;
    const float sx = sxs[cs + j];
#pragma unroll
    for (int i = 0; i < NM; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float sc = lo_bf(j == 0 || one_group ? st.sc[i][h][0] : st.sc[i][h][j]);
        const float bi = lo_bf(j == 0 || one_group ? st.bi[i][h][0] : st.bi[i][h][j]);
        acc[i][h] = fmaf(sc, c[i][2 * h + j], acc[i][h]);
        acc[i][h] = fmaf(fmaf(-128.f, sc, bi), sx, acc[i][h]);
      }
  }
}

// The first step's loads of split sp. The decode kernels issue them before
// staging x (plain weights even before the programmatic-launch wait).
template <int NM, bool GW = false>
__device__ __forceinline__ void mma_first_step(MmaStep<NM>& cur, const QMat (&ms)[NM], int64_t e, const MmaRows& rw,
                                               int sp, int S) {
  if (sp < rw.slabs) mma_load_step<NM, GW>(cur, ms, e, rw, sp, sp + S, threadIdx.x & 3);
}

// A row's partial is spread over the 4 lanes of a quad (one C column each):
// the sum, in every lane of the quad.
template <int NM>
__device__ __forceinline__ void mma_quad_sum(float (&part)[NM][2]) {
#pragma unroll
  for (int i = 0; i < NM; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      part[i][h] += __shfl_xor_sync(0xffffffffu, part[i][h], 1);
      part[i][h] += __shfl_xor_sync(0xffffffffu, part[i][h], 2);
    }
}

// This warp's share (split sp of S: slabs sp, sp+S, ...) of the tile's
// rows against the staged input st, cur holding mma_first_step's loads;
// the same value in the 4 lanes of a quad. The next step's loads are
// issued before this step's MMAs. TURNS: two steps an iteration, the two
// buffers taking turns (a `cur = nxt` copy at the end of each step was ~48
// register moves, ncu); gather_combine, at its 128-register cap, keeps the
// copy (taking turns spilled there).
template <int NM, bool TURNS = true>
__device__ __forceinline__ void mma_tile(const QMat (&ms)[NM], int64_t e, const MmaRows& rw, MmaStep<NM>& cur,
                                         const uint32_t* st, int sp, int S, float (&part)[NM][2]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int64_t K = ms[0].cols;
#pragma unroll
  for (int i = 0; i < NM; ++i) part[i][0] = part[i][1] = 0.f;
  MmaStep<NM> nxt;
  if constexpr (TURNS) {
    for (int x0 = sp; x0 < rw.slabs; x0 += 4 * S) {
      const int x1 = x0 + 2 * S, x2 = x1 + 2 * S;
      if (x1 < rw.slabs) mma_load_step<NM>(nxt, ms, e, rw, x1, x1 + S, t);
      mma_do_step<NM>(cur, st, K, x0, x0 + S, rw, g, t, part);
      if (x0 == sp) ZMLX_TRACE_MARK(3);  // trace: the first step's weights arrived and were used
      if (x1 >= rw.slabs) break;
      if (x2 < rw.slabs) mma_load_step<NM>(cur, ms, e, rw, x2, x2 + S, t);
      mma_do_step<NM>(nxt, st, K, x1, x1 + S, rw, g, t, part);
    }
  } else {
    for (int x0 = sp; x0 < rw.slabs; x0 += 2 * S) {
      const int x1 = x0 + 2 * S;
      if (x1 < rw.slabs) mma_load_step<NM>(nxt, ms, e, rw, x1, x1 + S, t);
      mma_do_step<NM>(cur, st, K, x0, x0 + S, rw, g, t, part);
      cur = nxt;
    }
  }
  mma_quad_sum(part);
}

// Row value from the S split partials of warps w0.. (stride floats per warp), in split order.
__device__ __forceinline__ float mma_split_sum(const float* red, int w0, int S, int stride, int off) {
  float v = red[w0 * stride + off];
  for (int s = 1; s < S; ++s) v += red[(w0 + s) * stride + off];
  return v;
}
// This warp's partials of its tile's 16 rows (mma_tile's part, the same in a
// quad's 4 lanes) into the block's space for mma_split_sum: matrix m's row
// g at red[(warp·NM + m)·16 + g], row g + 8 eight floats on.
template <int NM>
__device__ __forceinline__ void mma_publish_partials(float* red, const float (&part)[NM][2]) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if ((lane & 3) == 0)
#pragma unroll
    for (int m = 0; m < NM; ++m) {
      red[(warp * NM + m) * 16 + (lane >> 2)] = part[m][0];
      red[(warp * NM + m) * 16 + (lane >> 2) + 8] = part[m][1];
    }
}

// Decode (one input row per pair blockIdx.y): a block of WARPS warps holds
// WARPS / S tiles of 16 rows, S warps each.
// Register caps: as many blocks an SM as fit without spilling (ptxas: ~112
// registers for one matrix, ~164 for gate+up). Gate+up therefore runs 8
// warps an SM at most; in blocks of 8 warps that is one block an SM, and
// the 192 blocks of Qwen3's 8 experts took 1.45 waves of 132 SMs. Blocks of
// 4 warps (S <= 4) fit 3 an SM (12 warps, 170 registers each at most), so
// the same work is one wave. The warps per block change which block computes
// a row, not how: the bits are the same.
template <int NM, int WARPS>
__global__ void __launch_bounds__(WARPS * 32, NM == 1 ? 2 : (WARPS == 4 ? kSmallSwigluBlocksPerSm : 1))
    mma_decode_kernel(const uint16_t* x, MmaJob job) {
  ZMLX_TRACE_BLOCK_END();
  extern __shared__ __align__(16) uint32_t mma_smem[];
  int i = 0;
  if (NM == 1)
    while (i + 1 < job.n && int64_t(blockIdx.x) >= job.first_block[i + 1]) ++i;
  QMat ms[NM];
#pragma unroll
  for (int m = 0; m < NM; ++m) ms[m] = job.m[NM == 1 ? i : m];
  const int64_t p = blockIdx.y;
  const int64_t xr = job.ex ? (job.per_slot ? p : p / job.k) : 0;
  const int64_t K = ms[0].cols, rows = ms[0].rows;
  float* red = reinterpret_cast<float*>(mma_smem + mma_stage_words(K));
  // S is a power of two: shifts, not divisions (mma_rows).
  const int S = job.splits, sh = __ffs(S) - 1, tpb = WARPS >> sh, warp = threadIdx.x >> 5;
  const int sp = warp & (S - 1);
  const int64_t tile0 = (int64_t(blockIdx.x) - job.first_block[i]) * tpb;
  const int64_t r0 = (tile0 + (warp >> sh)) * 16;
  const MmaRows rw = mma_rows(ms, r0);
  // Plain matrices (no expert ids, which the previous kernel may write):
  // the first weight loads go out before the programmatic-launch wait.
  MmaStep<NM> cur;
  const bool early = !job.ex && job.preload;
  if (early && r0 < rows) mma_first_step(cur, ms, 0, rw, sp, S);
  // An input written two kernels back (the MoE block's normed x, behind the
  // router and the top-k) is staged while the previous kernel runs, so after
  // the wait only the expert id stands between this kernel and its loads.
  if (job.x_early) {
    mma_stage_x(x + xr * K, K, mma_smem);
    __syncthreads();
  }
  pdl_begin();
  const int64_t e = job.ex ? job.ex[p] : 0;
  // Otherwise the first loads go out as soon as the expert id is known,
  // before x is staged.
  if (!early && r0 < rows) mma_first_step(cur, ms, e, rw, sp, S);
  if (!job.x_early) {
    mma_stage_x(x + xr * K, K, mma_smem);
    __syncthreads();
  }
  ZMLX_TRACE_MARK(0);  // trace: the expert id read, x staged, the first loads issued
  float part[NM][2];
  if (r0 < rows) {
    mma_tile<NM>(ms, e, rw, cur, mma_smem, sp, S, part);
  } else {
#pragma unroll
    for (int m = 0; m < NM; ++m) part[m][0] = part[m][1] = 0.f;
  }
  ZMLX_TRACE_MARK(1);  // trace: every step done (mark 3: the first)
  mma_publish_partials<NM>(red, part);
  __syncthreads();
  ZMLX_TRACE_MARK(2);  // trace: the partials published
  if (int(threadIdx.x) < 16 * tpb) {
    const int tt = threadIdx.x >> 4, rr = threadIdx.x & 15;
    const int64_t r = (tile0 + tt) * 16 + rr;
    if (r < rows) {
      float v[NM];
#pragma unroll
      for (int m = 0; m < NM; ++m) v[m] = mma_split_sum(red, tt * S, S, NM * 16, m * 16 + rr);
      uint16_t* y = job.y[NM == 1 ? i : 0] + p * rows;
      if constexpr (NM == 1)
        y[r] = to_bf(v[0]);
      else
        y[r] = swiglu_bf(to_bf(v[0]), to_bf(v[1]));
    }
  }
}

// ---- expert mat-vecs of a few pairs an expert (short prompts) ----
//
// Why: a prompt of 16-256 tokens gives each expert about 1-16 of its
// (token, slot) pairs. The expert GEMM (gemm.cu) dequantizes every weight of
// every touched expert into shared memory for a tile of 64 pairs whatever
// the count: Qwen3's gate+up took 193-284 us at 16-256 tokens, ~800 GB/s
// (H200, gemm_bench, 2026-11-29). The decode MMA kernels use an eighth of
// each MMA (its columns are chunks of one input): a form of them that ran
// 4 bucketed pairs a block, each step's weights loaded once, took 129 us at
// 16 tokens but 1,642 at 512 (same card and day; not kept).
//
// Here the pairs come bucketed by expert in tiles of at most kGroupPairs = 8
// (gemm::bucket_pairs), and the MMA's 8 columns are a tile's pairs: a block
// takes one tile and 64 rows of the expert's matrices, each weight is loaded
// once and used for every pair of the tile. One MMA pair covers one 32-input
// chunk for 16 rows: lane (g, t) supplies one 8-input word of the chunk of
// rows g and g+8 as nibble pairs (nib_pair: the bf16 pairs (128+q[s],
// 128+q[s+4]), s = 0, 1 for the first MMA, 2, 3 for the second), and B holds
// x of pair g at the same inputs, staged once a block in that order. A
// chunk here is 4 words of one group, not always 4 adjacent words: a slab's
// 16 words are spans of one group each (CPG·4 words: 4, 8 or 16), and lane t
// loads words CPG·t .. CPG·t + CPG − 1 of each span in one load (4, 8 or 16
// bytes), so chunk j of a span is its words {CPG·t + j}. (One 4-byte load a
// word left half of every 32-byte sector to another instruction: L1-bound,
// ncu 2026-11-29.) Every C entry is one (row, pair) sum over one chunk,
// inside one group, and the lane applies the affine part in fp32, as the
// decode MMA kernels do:
//   Σ w·x = scale·Σ(128+q)·x + (bias − 128·scale)·Σx      (Σx per chunk, staged)
// The chunk sums are the tensor core's: the bits differ from the per-pair
// kernels' by fp32 summation order (the GPU test bounds it). Both grouped
// entry points run this kernel, so fused and unfused agree bit for bit.
//
// A warp: a tile of 16 rows over all of K, slab by slab (4 chunks), the
// loads of the next two slabs in flight during a slab's MMAs (three
// register buffers taking turns). Known cost (ptxas, sm_90a, rechecked
// 2026-11-29 with the span loads): gate+up with groups of 32 spills 356
// bytes (168 registers) at the 3-blocks-an-SM cap; groups of 64 (163
// registers) and 128 (156) do not. CPG (chunks a group: 1, 2, 4) sizes the
// scale registers, so groups of 64 and 128 hold one or two a row a slab.
constexpr int kPairWarps = 4;

// 32-bit words of one staged pair row: K/2 (pairs of bf16), padded so that
// a row starts 16 banks after the previous one (a quarter-warp phase's
// 16-byte loads, 4 words of each of 2 pairs, then hit distinct banks).
__host__ __device__ __forceinline__ int64_t pair_stage_stride(int64_t K) { return ((K / 2 + 31) & ~int64_t(31)) + 16; }
__host__ __device__ __forceinline__ size_t pair_smem_bytes(int64_t K) {
  return size_t(kGroupPairs * pair_stage_stride(K) + kGroupPairs * (K / 32)) * 4;
}

// Word t (lane t's) of chunk c: chunk c lies in span c / CPG (CPG·4 words of
// one group), as its words {CPG·t + c % CPG}.
template <int CPG>
__host__ __device__ __forceinline__ int64_t pair_chunk_word(int64_t c, int t) {
  return (c / CPG) * (4 * CPG) + CPG * t + c % CPG;
}

// Whole block: the input rows of the n pairs in pairs[] (row p of x when
// per_slot, else row p / k) into st in nibble-pair order, chunk by chunk
// (pair_chunk_word: the words of chunk c in lane order; word w's pairs
// (x0,x4) (x1,x5) (x2,x6) (x3,x7) as 4 words), and Σx of every chunk (its
// 32 inputs added in lane order) at sums[c·kGroupPairs + q], so a lane reads
// its two pairs' sums in one 8-byte load, free of bank conflicts.
// A thread a (pair, chunk): its four 16-byte loads go out together and the
// sum comes from the same registers (reading each chunk again for its sum,
// as load_x does, made staging a large share of a block's time). Pair rows
// n.. are zeros.
template <int CPG>
__device__ __forceinline__ void pair_stage_x(const uint16_t* x, const int* pairs, int n, bool per_slot, int k, int64_t K,
                                             uint32_t* st) {
  const int64_t sw = pair_stage_stride(K);
  float* sums = reinterpret_cast<float*>(st + kGroupPairs * sw);
  const int chunks = int(K >> 5);
  const uint32_t rc = 0xFFFFFFFFu / uint32_t(chunks) + 1u;  // i / chunks as a multiply-high (i < 2^15)
#pragma unroll 2
  for (int i = threadIdx.x; i < kGroupPairs * chunks; i += blockDim.x) {
    const int q = int(__umulhi(uint32_t(i), rc)), c = i - q * chunks;
    uint4 v[4];
    if (q < n) {
      // Input word w (inputs 8w..8w+7) is 16 bytes of the row.
      const uint4* src = reinterpret_cast<const uint4*>(x + (per_slot ? pairs[q] : pairs[q] / k) * K);
#pragma unroll
      for (int w = 0; w < 4; ++w) v[w] = __ldg(src + pair_chunk_word<CPG>(c, w));
    } else {
#pragma unroll
      for (int w = 0; w < 4; ++w) v[w] = make_uint4(0u, 0u, 0u, 0u);
    }
    uint4* dst = reinterpret_cast<uint4*>(st + q * sw) + 4 * c;
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      dst[w] = make_uint4(__byte_perm(v[w].x, v[w].z, 0x5410), __byte_perm(v[w].x, v[w].z, 0x7632),
                          __byte_perm(v[w].y, v[w].w, 0x5410), __byte_perm(v[w].y, v[w].w, 0x7632));
      sum += lo_bf(v[w].x), sum += hi_bf(v[w].x), sum += lo_bf(v[w].y), sum += hi_bf(v[w].y);
      sum += lo_bf(v[w].z), sum += hi_bf(v[w].z), sum += lo_bf(v[w].w), sum += hi_bf(v[w].w);
    }
    sums[c * kGroupPairs + q] = sum;
  }
}

// One slab's loads of a lane: its word of chunks 4·slab + j of rows g and
// g+8 (pair_chunk_word), and the raw bf16 scale and bias of each group
// among them (one group a span).
template <int NM, int CPG>
struct PairStep {
  static constexpr int NG = 4 / CPG;  // groups a slab
  uint32_t w[NM][2][4];
  uint32_t sc[NM][2][NG], bi[NM][2][NG];
};

// Where a lane's rows lie in each matrix (expert e): row g's first word and
// first group; row g + 8 is 8 rows further.
template <int NM>
struct PairRows {
  const uint32_t* w[NM];
  const uint16_t *s[NM], *b[NM];
  int64_t wpr, gpr;  // words, groups a row
  bool va, vb;
  int chunks, slabs;
  int gshift;  // log2(group)
};

template <int NM, int CPG>
__device__ __forceinline__ void pair_load_step(PairStep<NM, CPG>& st, const PairRows<NM>& pr, int slab, int t) {
  constexpr int NG = PairStep<NM, CPG>::NG;
  // Span q of the slab: words 16·slab + 4·CPG·q .., lane t's CPG of them in
  // one load (a span is all valid or all past K: K is a multiple of the group).
  using Vec = typename std::conditional<CPG == 1, uint32_t, typename std::conditional<CPG == 2, uint2, uint4>::type>::type;
  auto put = [](uint32_t (&dst)[4], int q, const Vec& v) {
    if constexpr (CPG == 1) dst[q] = v;
    else if constexpr (CPG == 2) dst[2 * q] = v.x, dst[2 * q + 1] = v.y;
    else dst[0] = v.x, dst[1] = v.y, dst[2] = v.z, dst[3] = v.w;
  };
#pragma unroll
  for (int i = 0; i < NM; ++i) {
#pragma unroll
    for (int q = 0; q < NG; ++q) {
      const int c = 4 * slab + q * CPG;
      const bool ok = c < pr.chunks;
      const int64_t w0 = int64_t(16) * slab + 4 * CPG * q + CPG * t;
      Vec zero{};
      const Vec a = pr.va && ok ? __ldg(reinterpret_cast<const Vec*>(pr.w[i] + w0)) : zero;
      const Vec b = pr.vb && ok ? __ldg(reinterpret_cast<const Vec*>(pr.w[i] + 8 * pr.wpr + w0)) : zero;
      put(st.w[i][0], q, a);
      put(st.w[i][1], q, b);
    }
#pragma unroll
    for (int q = 0; q < NG; ++q) {
      const int c = 4 * slab + q * CPG;  // the group's first chunk in this slab
      const bool ok = c < pr.chunks;
      const int64_t gi = (int64_t(c) << 5) >> pr.gshift;
      st.sc[i][0][q] = pr.va && ok ? __ldg(pr.s[i] + gi) : 0u;
      st.bi[i][0][q] = pr.va && ok ? __ldg(pr.b[i] + gi) : 0u;
      st.sc[i][1][q] = pr.vb && ok ? __ldg(pr.s[i] + 8 * pr.gpr + gi) : 0u;
      st.bi[i][1][q] = pr.vb && ok ? __ldg(pr.b[i] + 8 * pr.gpr + gi) : 0u;
    }
  }
}

// One slab's MMAs and affine parts. acc[i][h][p]: matrix i, row g + 8h,
// pair 2t + p of the tile.
template <int NM, int CPG>
__device__ __forceinline__ void pair_do_step(const PairStep<NM, CPG>& st, const uint32_t* xg, const float* sums,
                                             int chunks, int slab, int t, float (&acc)[NM][2][2]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int c = 4 * slab + j;
    if (c >= chunks) break;
    const uint4 b = reinterpret_cast<const uint4*>(xg)[4 * c + t];  // pair g: lane t's word of chunk c, as pairs
    const float2 sx = reinterpret_cast<const float2*>(sums)[c * (kGroupPairs / 2) + t];  // pairs 2t, 2t+1
    const float sx0 = sx.x, sx1 = sx.y;
#pragma unroll
    for (int i = 0; i < NM; ++i) {
      const uint32_t wg = st.w[i][0][j], wh = st.w[i][1][j];
      float cc[4] = {0.f, 0.f, 0.f, 0.f};
      mma_16816(cc, nib_pair(wg, 0), nib_pair(wh, 0), nib_pair(wg, 1), nib_pair(wh, 1), b.x, b.y);
      mma_16816(cc, nib_pair(wg, 2), nib_pair(wh, 2), nib_pair(wg, 3), nib_pair(wh, 3), b.z, b.w);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float sc = lo_bf(st.sc[i][h][j / CPG]), bi = lo_bf(st.bi[i][h][j / CPG]);
        const float off = fmaf(-128.f, sc, bi);
        acc[i][h][0] = fmaf(off, sx0, fmaf(sc, cc[2 * h], acc[i][h][0]));
        acc[i][h][1] = fmaf(off, sx1, fmaf(sc, cc[2 * h + 1], acc[i][h][1]));
      }
    }
  }
}

// What one launch computes: y[p] = x_p · m[0]ᵀ (NM == 1) or
// swiglu(x_p · m[0]ᵀ, x_p · m[1]ᵀ) (gate, up), x_p = x[p] when per_slot,
// else x[p / k]; y rows indexed by pair, as gather_linear's.
template <int NM>
struct PairJob {
  QMat m[NM];
  uint16_t* y;
  int k;
  bool per_slot;
};

// A block: kPairWarps tiles of 16 rows (blockIdx.x) against the pairs of
// bucket tile blockIdx.y (one expert, at most kGroupPairs pairs).
template <int NM, int CPG>
__global__ void __launch_bounds__(kPairWarps * 32, 3) moe_pairs_kernel(const uint16_t* x, PairJob<NM> job, PairGroups grp) {
  extern __shared__ __align__(16) uint32_t pair_smem[];
  __shared__ int pairs[kGroupPairs];
  pdl_begin();
  const int ti = int(blockIdx.y);
  if (ti >= *grp.ntiles) return;
  const int4 tile = reinterpret_cast<const int4*>(grp.tiles)[ti];
  const int n = min(tile.z - tile.y, kGroupPairs);
  const int64_t e = tile.x;
  if (int(threadIdx.x) < n) pairs[threadIdx.x] = grp.perm[tile.y + int(threadIdx.x)];
  const int64_t K = job.m[0].cols, rows = job.m[0].rows;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int64_t r0 = (int64_t(blockIdx.x) * kPairWarps + warp) * 16;
  PairRows<NM> pr;
  pr.wpr = K >> 3;
  pr.gshift = __ffs(job.m[0].group) - 1;
  pr.gpr = K >> pr.gshift;
  pr.va = r0 + g < rows, pr.vb = r0 + g + 8 < rows;
  pr.chunks = int(K >> 5), pr.slabs = (pr.chunks + 3) >> 2;
#pragma unroll
  for (int i = 0; i < NM; ++i) {
    const QMat& m = job.m[i];
    pr.w[i] = m.w + e * m.w_stride + (r0 + g) * pr.wpr;
    pr.s[i] = m.scales + e * m.s_stride + (r0 + g) * pr.gpr;
    pr.b[i] = m.biases + e * m.s_stride + (r0 + g) * pr.gpr;
  }
  // Three slabs' loads in flight: buffers a, b, c take turns.
  PairStep<NM, CPG> a, b, c;
  const bool live = r0 < rows;
  if (live) {
    pair_load_step(a, pr, 0, t);
    if (1 < pr.slabs) pair_load_step(b, pr, 1, t);
  }
  __syncthreads();  // pairs[]
  pair_stage_x<CPG>(x, pairs, n, job.per_slot, job.k, K, pair_smem);
  __syncthreads();
  const int64_t sw = pair_stage_stride(K);
  const uint32_t* xg = pair_smem + g * sw;
  const float* sums = reinterpret_cast<const float*>(pair_smem + kGroupPairs * sw);
  float acc[NM][2][2];
#pragma unroll
  for (int i = 0; i < NM; ++i) acc[i][0][0] = acc[i][0][1] = acc[i][1][0] = acc[i][1][1] = 0.f;
  if (live) {
    for (int s = 0; s < pr.slabs; s += 3) {
      if (s + 2 < pr.slabs) pair_load_step(c, pr, s + 2, t);
      pair_do_step(a, xg, sums, pr.chunks, s, t, acc);
      if (s + 1 >= pr.slabs) break;
      if (s + 3 < pr.slabs) pair_load_step(a, pr, s + 3, t);
      pair_do_step(b, xg, sums, pr.chunks, s + 1, t, acc);
      if (s + 2 >= pr.slabs) break;
      if (s + 4 < pr.slabs) pair_load_step(b, pr, s + 4, t);
      pair_do_step(c, xg, sums, pr.chunks, s + 2, t, acc);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t r = r0 + g + 8 * h;
      if (r >= rows) continue;
#pragma unroll
      for (int p = 0; p < 2; ++p) {
        const int q = 2 * t + p;
        if (q >= n) continue;
        uint16_t* y = job.y + int64_t(pairs[q]) * rows;
        if constexpr (NM == 1)
          y[r] = to_bf(acc[0][h][p]);
        else
          y[r] = swiglu_bf(to_bf(acc[0][h][p]), to_bf(acc[1][h][p]));
      }
    }
  }
}

// ---- the output head streamed through shared memory (one token) ----
//
// Why: the head (lm_head: 65-155 K rows of 2,048 inputs, 75-175 MB a token)
// is the decode step's largest kernel. As mma_decode_kernel's grid (Qwen3:
// 4,748 blocks, 18 waves) it read ~2.0 TB/s on an H100: a block issues its
// loads, waits for them, computes and leaves, so an SM's bytes in flight dip
// at every block's turn. Here a resident grid (kHeadBlocksPerSm blocks an
// SM) keeps its blocks' next groups of rows in flight, copied into shared
// memory by bulk copies (TMA, transaction-count mbarriers) while its warps
// compute the groups before them. A group is one mma_decode block's rows
// (kMmaWarps / S tiles of 16), and warp (tile, split) computes its slabs
// with mma_do_step from steps loaded out of the copy (mma_load_step_at):
// the steps, their order and the split sums are mma_decode_kernel's, so are
// the bits. (A stream of 2026-11-27 12:06 summed its rows with the scalar
// kernel's instructions and was bound by them: 83.5 us against the MMA
// kernel's 88.1.) Bulk copies are sm_90 instructions (device_common.cuh):
// head_stream_fits() asks for a Hopper GPU running this binary's sm_90 code.
constexpr int kHeadMaxStages = 6;
// Two blocks an SM, each with up to ~110 KB of shared memory (2 stages of
// Qwen3's head): the kernel is bound by its instructions, not by bytes in
// flight. On H200s (2026-11-27, cuda_kernels_bench, Qwen3's head): one
// block an SM with 5 stages 85.9 us, two with 2 stages each 65.6, the same
// two with no compute 40.7 (4.3 TB/s); mma_decode_kernel 86.7. (A variant
// timed with no copies, its compute alone, took 65.4 against 72.3 with
// them: docs/performance.md.)
constexpr int kHeadBlocksPerSm = 2;
constexpr size_t kHeadSmemBudget = 110 * 1024;
// A group's rows: one mma_decode block's (kMmaWarps / S tiles of 16).
__host__ __device__ __forceinline__ int64_t head_group_rows(int S) { return 16 * (kMmaWarps / S); }
// A stage: the group's rows' words, then their scales, then their biases
// (three contiguous ranges of the matrix, so three copies).
__host__ __device__ __forceinline__ int64_t head_stage_bytes(const QMat& m, int S) {
  return head_group_rows(S) * (m.cols / 2 + 4 * (m.cols / m.group));
}
// The shared memory beside the stages: the staged x and the partials.
__host__ __device__ __forceinline__ int64_t head_fixed_bytes(int64_t K) {
  return (mma_stage_words(K) + kMmaWarps * 16) * 4;
}

__global__ void __launch_bounds__(kMmaWarps * 32, kHeadBlocksPerSm)
    head_stream_kernel(const uint16_t* x, QMat m, uint16_t* y, int S, int stages) {
  ZMLX_TRACE_BLOCK_END();
  extern __shared__ __align__(128) uint8_t head_smem[];
  __shared__ __align__(8) uint64_t full[kHeadMaxStages];
  const int64_t K = m.cols, wpr = K >> 3, gpr = K / m.group;
  const int sh = __ffs(S) - 1, tpb = kMmaWarps >> sh, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int sp = warp & (S - 1), tt = warp >> sh;
  const int64_t rows_g = head_group_rows(S), groups = (m.rows + rows_g - 1) / rows_g;
  const int64_t w_bytes = rows_g * wpr * 4, s_bytes = rows_g * gpr * 2, stage_bytes = w_bytes + 2 * s_bytes;
  uint32_t* xs = reinterpret_cast<uint32_t*>(head_smem + stages * stage_bytes);
  float* red = reinterpret_cast<float*>(xs + mma_stage_words(K));
  // Thread 0: group g's rows into stage st.
  auto issue = [&](int64_t g, int st) {
    const int64_t r0 = g * rows_g, n = min(rows_g, m.rows - r0);
    uint8_t* dst = head_smem + st * stage_bytes;
    mbar_expect_tx(&full[st], uint32_t(n * (wpr * 4 + 4 * gpr)));
    bulk_copy(dst, m.w + r0 * wpr, uint32_t(n * wpr * 4), &full[st]);
    bulk_copy(dst + w_bytes, m.scales + r0 * gpr, uint32_t(n * gpr * 2), &full[st]);
    bulk_copy(dst + w_bytes + s_bytes, m.biases + r0 * gpr, uint32_t(n * gpr * 2), &full[st]);
  };
  // The weights do not depend on the previous kernel: the first stages are
  // requested before the programmatic-launch wait.
  if (threadIdx.x == 0) {
    for (int i = 0; i < stages; ++i) mbar_init(&full[i], 1);
    mbar_init_fence();
    for (int i = 0; i < stages; ++i)
      if (blockIdx.x + int64_t(i) * gridDim.x < groups) issue(blockIdx.x + int64_t(i) * gridDim.x, i);
  }
  pdl_begin();
  mma_stage_x(x, K, xs);
  __syncthreads();  // x staged; the barriers' initialisation seen by every thread
  const QMat ms[1] = {m};
  for (int64_t it = 0;; ++it) {
    const int64_t g = blockIdx.x + it * gridDim.x;
    if (g >= groups) break;
    const int st = int(it % stages);
    mbar_wait(&full[st], uint32_t(it / stages) & 1u);
    const uint8_t* stage = head_smem + st * stage_bytes;
    const int64_t r0 = g * rows_g + tt * 16;
    float part[1][2] = {{0.f, 0.f}};
    if (r0 < m.rows) {
      const MmaRows rw = mma_rows(ms, r0);
      const int64_t lr = tt * 16 + (lane >> 2);  // row g of the warp's tile, within the group
      const uint32_t* wa[1] = {reinterpret_cast<const uint32_t*>(stage) + lr * wpr};
      const uint16_t* sa[1] = {reinterpret_cast<const uint16_t*>(stage + w_bytes) + lr * gpr};
      const uint16_t* ba[1] = {reinterpret_cast<const uint16_t*>(stage + w_bytes + s_bytes) + lr * gpr};
      // mma_tile's steps, in its order: slabs (sp, sp + S), (sp + 2S, sp + 3S), ...
      for (int x0 = sp; x0 < rw.slabs; x0 += 2 * S) {
        MmaStep<1> cur;
        mma_load_step_at<1, false, true>(cur, wa, sa, ba, wpr, rw, x0, x0 + S, lane & 3);
        mma_do_step<1>(cur, xs, K, x0, x0 + S, rw, lane >> 2, lane & 3, part);
      }
      mma_quad_sum(part);
    }
    mma_publish_partials<1>(red, part);
    __syncthreads();
    if (int(threadIdx.x) < 16 * tpb) {
      const int t2 = threadIdx.x >> 4, rr = threadIdx.x & 15;
      const int64_t r = g * rows_g + t2 * 16 + rr;
      if (r < m.rows) y[r] = to_bf(mma_split_sum(red, t2 * S, S, 16, rr));
    }
    __syncthreads();  // every warp is done with the stage and with red
    if (threadIdx.x == 0 && g + int64_t(stages) * gridDim.x < groups) issue(g + int64_t(stages) * gridDim.x, st);
  }
}

// gather_combine: a block of WARPS warps is one tile of 16 output rows of
// token blockIdx.y; its warps take (expert slot, split) pairs, WARPS / S
// slots a pass (all k slots in one pass when k·S <= 16);
// the slots' values are rounded to bf16 and combined in slot order, as
// moe_combine does with gather_linear's output.
// early: the routing (ex, scores) was complete before the previous kernel
// ran (kernels.h, gather_combine), so the scores, the first pass's experts
// and their first weight loads are issued before the programmatic-launch
// wait; only h comes from the previous kernel.
// TWO (combine_two_steps: groups of 64+, every warp at most two steps, one
// pass, early routing): both steps' loads go out before the wait, so no
// weight load is left after it (the second step's had been, a DRAM round
// trip a layer); the same sums in the same order.
// SH (one token; shd.m 4-bit with rows of at most 2048 inputs): the MoE
// block's shared expert's down projection rides along. Warp w computes rows
// r0 + w (and r0 + w + 8 in 8-warp blocks) of shd.m · shd.h as
// linear_decode_kernel does; their weights are loaded before the wait with
// the routed ones (TWO), shd.h is staged with h, and the rows are computed after
// the routed steps, so they add no round trip of their own. The output is
// bf16(bf16(combine) + that row), as add() adds the two: the bits of
// gather_combine, linear and add.
constexpr int kSharedPre = 2;  // chunks a lane: rows of up to 2048 inputs
// Shared memory words of the kernel: per_pass staged rows of sw words, the
// warps' partials (16 floats each), the k scores, the 16 shared rows, then
// (SH) shd.h at a 16-byte boundary.
__host__ __device__ __forceinline__ int64_t combine_shared_x_word(int per_pass, int64_t sw, int warps, int k) {
  return (per_pass * sw + warps * 16 + k + 16 + 3) & ~int64_t(3);
}
template <int WARPS, bool TWO, bool SH>
__device__ __forceinline__ void mma_combine_body(const uint16_t* h, const int32_t* ex, const void* scores, bool f32,
                                                 int mode, int k, QMat m, int S, uint16_t* out, bool early,
                                                 bool par_sum, SharedDown shd) {
  extern __shared__ __align__(16) uint32_t mma_smem[];
  const int64_t t = blockIdx.y, K = m.cols, r0 = int64_t(blockIdx.x) * 16;
  const int64_t sw = mma_stage_words(K);
  const int sh = __ffs(S) - 1, per_pass = WARPS >> sh, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int sp = warp & (S - 1);  // S is a power of two
  float* red = reinterpret_cast<float*>(mma_smem + per_pass * sw);
  // The token's scores, read now rather than one dependent load per slot
  // at the end (the first pass's __syncthreads publishes them).
  float* sc = red + WARPS * 16;
  const QMat ms[1] = {m};
  const MmaRows rw = mma_rows(ms, r0);
  const int jj = warp >> sh, nj0 = min(per_pass, k);
  int64_t e0 = 0;
  // TWO: the second step (slabs x1, x1 + S) is loaded with the first.
  const int x1 = sp + 2 * S;
  MmaStep<1> first, second;
  auto prologue = [&] {
    if (int(threadIdx.x) < k) sc[threadIdx.x] = combine_score(scores, f32 && mode != kBf16Products, t * k + threadIdx.x);
    if (jj < nj0) {
      e0 = ex[t * k + jj];
      mma_first_step<1, TWO>(first, ms, e0, rw, sp, S);
      if (TWO && x1 < rw.slabs) mma_load_step<1, TWO>(second, ms, e0, rw, x1, x1 + S, lane & 3);
    }
  };
  early = early || TWO;  // TWO is launched with the routing early only
  // SH: this warp's shared rows r0 + warp + i·WARPS, i < SR. The two-step
  // form loads their weights here; the general form, at its register cap,
  // loads each just before computing it.
  constexpr int SR = SH ? 16 / WARPS : 1;
  RowPreload<4, kSharedPre> shp[TWO ? SR : 1];
  float* shy = sc + k;  // the tile's shared rows, bf16 values
  uint16_t* shx = reinterpret_cast<uint16_t*>(mma_smem + combine_shared_x_word(per_pass, sw, WARPS, k));
  if constexpr (SH && TWO)
#pragma unroll
    for (int i = 0; i < SR; ++i)
      if (r0 + warp + i * WARPS < shd.m.rows) row_preload<4, kSharedPre>(shd.m, r0 + warp + i * WARPS, shp[i]);
  if (early) prologue();
  pdl_begin();
  if (!early) prologue();
  float acc = 0.f;
  for (int j0 = 0; j0 < k; j0 += per_pass) {
    const int nj = min(per_pass, k - j0);
    const int64_t e = j0 == 0 ? e0 : jj < nj ? ex[t * k + j0 + jj] : 0;
    mma_stage_rows(h + (t * k + j0) * K, nj, K, mma_smem, sw);
    if (SH && j0 == 0)
      for (int i = threadIdx.x; i < shd.m.cols / 8; i += blockDim.x)
        reinterpret_cast<uint4*>(shx)[i] = __ldg(reinterpret_cast<const uint4*>(shd.h) + i);
    __syncthreads();
    ZMLX_TRACE_MARK(0);  // trace: h staged (the last pass's)
    float part[1][2] = {{0.f, 0.f}};
    if constexpr (TWO) {  // one pass, at most two steps a warp, both loaded
      if (jj < nj && sp < rw.slabs) {
        const uint32_t* st = mma_smem + jj * sw;
        mma_do_step<1, true>(first, st, K, sp, sp + S, rw, lane >> 2, lane & 3, part);
        ZMLX_TRACE_MARK(3);  // trace: the first step done
        if (x1 < rw.slabs) mma_do_step<1, true>(second, st, K, x1, x1 + S, rw, lane >> 2, lane & 3, part);
      }
      mma_quad_sum(part);
    } else if (jj < nj) {
      MmaStep<1> cur;
      if (j0 == 0) cur = first;  // loaded by the prologue
      else mma_first_step(cur, ms, e, rw, sp, S);
      mma_tile<1, false>(ms, e, rw, cur, mma_smem + jj * sw, sp, S, part);
    }
    if (SH && j0 == 0)
#pragma unroll
      for (int i = 0; i < SR; ++i) {
        const int64_t r = r0 + warp + i * WARPS;
        if (r >= shd.m.rows) continue;
        RowPreload<4, kSharedPre>& p = shp[TWO ? i : 0];
        if constexpr (!TWO) row_preload<4, kSharedPre>(shd.m, r, p);
        const float v = row_dot_preloaded<4, kSharedPre, false>(shd.m, p, shx);
        if (lane == 0) shy[warp + i * WARPS] = bf(to_bf(v));
      }
    ZMLX_TRACE_MARK(1);  // trace: every step (and the shared rows) done
    mma_publish_partials<1>(red, part);
    __syncthreads();
    ZMLX_TRACE_MARK(2);  // trace: the partials published
    if (par_sum) {
      // Each (slot, row) product by a thread of its own, into the staged
      // rows' space (every warp is past its MMAs), then each row's sum in
      // slot order: the same terms, order and bits as the loop below, whose
      // 16 threads had worked out nj products each, one after another
      // (1.4 us from the partials to the block's end in a Qwen3 trace).
      float* prod = reinterpret_cast<float*>(mma_smem);
      if (int(threadIdx.x) < 16 * nj) {
        const int q = threadIdx.x >> 4, r = threadIdx.x & 15;
        prod[threadIdx.x] = combine_product(to_bf(mma_split_sum(red, q * S, S, 16, r)), sc[j0 + q], mode);
      }
      __syncthreads();
      if (threadIdx.x < 16)
#pragma unroll
        for (int q = 0; q < 16; ++q)
          if (q < nj) acc += prod[q * 16 + threadIdx.x];
    } else if (threadIdx.x < 16) {
      for (int q = 0; q < nj; ++q)
        acc += combine_product(to_bf(mma_split_sum(red, q * S, S, 16, threadIdx.x)), sc[j0 + q], mode);
    }
    if (TWO) break;  // one pass: nothing to restage
    __syncthreads();  // the next pass restages the inputs
  }
  if (threadIdx.x < 16 && r0 + threadIdx.x < m.rows) {
    uint16_t o = to_bf(acc);
    if constexpr (SH) o = to_bf(bf(o) + shy[threadIdx.x]);
    out[t * m.rows + r0 + threadIdx.x] = o;
  }
}
template <int WARPS, bool TWO = false, bool SH = false>
__global__ void __launch_bounds__(WARPS * 32, WARPS == 8 ? 2 : 1)
    mma_combine_kernel(const uint16_t* h, const int32_t* ex, const void* scores, bool f32, int mode, int k, QMat m,
                       int S, uint16_t* out, bool early, bool par_sum, SharedDown shd) {
  ZMLX_TRACE_BLOCK_END();
  mma_combine_body<WARPS, TWO, SH>(h, ex, scores, f32, mode, k, m, S, out, early, par_sum, shd);
}
// The 16-warp two-step shared-expert form (GLM) at 88 registers a thread,
// no spills (ptxas). Uncapped it takes 116, and 512 threads of 116 need an
// SM's whole register file: in the trace of a GLM step (H100, 2026-11-27),
// 117 of its 128 blocks became resident only after gate+up had left their
// SM entirely, after its wait, so their weight loads, meant to overlap
// gate+up, came after it. At 88 a block fits beside one of gate+up's three
// 4-warp blocks (3 x 20,480 + 45,056 > 65,536 > 20,480 + 45,056): 104 late,
// the kernel 9.61 -> 9.15 us, decode +1.1 % (kernel_trace.h's late column).
// The same body, so the same bits. ZMLX_CUDA_COMBINE_REG_CAP=0: uncapped.
__global__ void __maxnreg__(88)
    mma_combine_shared_capped_kernel(const uint16_t* h, const int32_t* ex, const void* scores, bool f32, int mode,
                                     int k, QMat m, int S, uint16_t* out, bool early, bool par_sum,
                                     SharedDown shd) {
  ZMLX_TRACE_BLOCK_END();
  mma_combine_body<16, true, true>(h, ex, scores, f32, mode, k, m, S, out, early, par_sum, shd);
}

// ---- host side of the MMA path ----

// ZMLX_CUDA_MMA=0 keeps the scalar kernels (the plain reference); =all
// sends every plain linear the format allows to the MMA path, whatever its
// size (tests). Read at every launch so a test or bench can compare the
// paths in one process.
enum class MmaMode { Off, Auto, All };
MmaMode mma_mode() {
  if (env_is("ZMLX_CUDA_MMA", "0")) return MmaMode::Off;
  if (env_is("ZMLX_CUDA_MMA", "all")) return MmaMode::All;
  return MmaMode::Auto;
}
// Whether the MMA path computes this matrix. A function of the format and K
// only, so every kernel of one product (fused or not) makes the same choice.
bool mma_format(const QMat& m) {
  return m.bits == 4 && m.cols % 32 == 0 && m.cols <= kMmaMaxK && m.group >= 32 && (m.group & (m.group - 1)) == 0 &&
         m.cols % m.group == 0;
}
bool use_mma(const QMat& m) { return mma_format(m) && mma_mode() != MmaMode::Off; }
// Plain linears (linear, linear_multi, linear_swiglu) up to 2^23 weights
// keep the scalar kernels: below that the MMA path's fixed cost (~4.1 us on
// an H100, whatever the size) loses to the scalar kernels, above it the
// MMA path's bandwidth wins (bench/cuda_kernels_bench's sweep, 2026-11-26:
// 2048 x 2048 3.3 us scalar vs 4.3 MMA; 4096 x 2048 4.6 vs 4.6; 8192 x 2048
// 8.2 vs 5.9; lm_head 151936 x 2048 133 vs 102). Per matrix, so
// linear_multi still gives each matrix linear's bits (it launches both
// paths when its matrices fall on both sides). The expert kernels do not
// use it: gather, gather_swiglu and gather_combine must choose alike.
constexpr int64_t kMmaMinWeights = int64_t(1) << 23;
// Rows longer than 4096 stay scalar up to 2^24 weights: the MMA path gives
// a 16-row tile at most 8 warps, so such a row takes 3+ dependent load steps
// a warp, and a matrix of few rows (GLM's o_proj, 2048 x 5120: 128 tiles, one
// block an SM) leaves the GPU mostly idle. The scalar kernel, a row a warp,
// decoded GLM 270.1 / 269.5 tok/s against 264.1 / 264.6 (H100, one call).
constexpr int64_t kMmaMinWeightsLongRows = int64_t(1) << 24;
bool use_mma_linear(const QMat& m) {
  const MmaMode mode = mma_mode();
  if (mode == MmaMode::Off || !mma_format(m)) return false;
  if (mode == MmaMode::All) return true;
  return m.rows * m.cols > (m.cols > 4096 ? kMmaMinWeightsLongRows : kMmaMinWeights);
}

// ZMLX_CUDA_WIDE_COMBINE=0: the earlier split rule (4 to 8 slabs a warp)
// and 8-warp gather_combine blocks (A/B runs). Read once: the split count
// decides the bits, and every kernel of a process must agree.
bool wide_combine() {
  static const bool on = env_on("ZMLX_CUDA_WIDE_COMBINE");
  return on;
}

// Warps per 16-row tile: at most 4 slabs (2 steps) a warp, so short rows
// keep one warp a tile and long ones get enough warps in flight. A function
// of K alone (every kernel of one product splits alike). The bound was 8
// slabs until gather_combine, whose 128 blocks leave most of an H100's warp
// slots empty, measured faster with 16 warps of 3 slabs for Qwen3's 768-wide
// down projection (ncu: 7 cycles a warp between instructions, 1.1 IPC).
int mma_splits(int64_t K) {
  const int64_t slabs = (K + 127) / 128;
  int s = 1;
  if (wide_combine())
    while (s < kMmaWarps && (slabs + s - 1) / s > 4) s *= 2;
  else
    while (s < kMmaWarps && s * 2 * 4 <= slabs) s *= 2;
  return s;
}

// Expert mat-vecs whose slots share the token's input (gate and up, fused or
// not; never down, whose splits must match gather_combine's): fewer splits
// when the tiles x splits would not fit one wave of the gate+up kernel (4-warp
// blocks, 3 an SM). LFM2's 4 experts of 1792 rows (448 tiles) took two waves
// at 4 splits. A function of the shape and the GPU, so the fused kernel and
// the unfused gathers split alike (the same bits); ZMLX_CUDA_ONE_WAVE=0 keeps
// mma_splits (A/B runs).
int gate_up_splits(int S, int64_t tiles) {
  static const bool on = env_on("ZMLX_CUDA_ONE_WAVE");
  if (!on) return S;
  const int64_t capacity = sm_count() * kSmallSwigluBlocksPerSm * 4;  // warps of one wave of 4-warp blocks
  while (S > 1 && tiles * S > capacity) S /= 2;
  return S;
}

// ZMLX_CUDA_PRELOAD=0: decode kernels issue the loads that do not depend on
// the previous kernel (plain weights, keys of earlier steps) after the
// programmatic-launch wait, as before (A/B runs; the same bits either way).
bool preload_weights() {
  static const bool on = env_on("ZMLX_CUDA_PRELOAD");
  return on;
}
// The plain scalar decode mat-vecs (decode_row) stage x once a block in
// shared memory (stage_x, kernels.h), unless ZMLX_CUDA_STAGE_X=0 (A/B runs
// and the GPU test; read per launch; the same bits). Trace of a Qwen3 step
// (H100, 2026-11-27): o_proj (256 blocks) 4.95 -> 3.99 us, q/k/v (640)
// 3.95 -> 3.62, the router (16) 2.16 -> 2.01. LFM2's router (4 blocks) got
// slower alone (1.93 -> 2.33 us), so launches under 16 blocks first kept
// the old form; but decode A/Bs of that threshold (two H100 calls, 07:55
// and 08:01 UTC) had every launch staged faster on the whole step: Qwen3
// +1.3 %, LFM2 +1.3-1.6 %, GLM flat. So every launch stages, but for the
// long-row form below.
// f(std::true_type{}) where a launch stages x, else f(std::false_type{}):
// f launches the kernel instantiated with that SX. long_rows: the
// long-row form (rows of 4,097-8,192 inputs, kPreChunksLong preloaded:
// GLM's o_proj) reads x from global memory unless ZMLX_CUDA_STAGE_X=all.
// An H200 sweep (2026-11-28) had GLM 0.7-1.6 % faster with no launch
// staging; this rule made GLM decode 1.5 % faster than staging every
// launch and 0.3 % faster than staging none (H200, four rounds; same bits;
// docs/performance.md).
template <typename F>
void with_staged_x(F&& f, bool long_rows = false) {
  if (stage_x() && (!long_rows || env_is("ZMLX_CUDA_STAGE_X", "all"))) f(std::true_type{});
  else f(std::false_type{});
}

// ZMLX_CUDA_LONG_PRELOAD=0: plain linears with rows of 4097-8192 inputs load
// their weights after the wait, as before (A/B runs; the same bits).
bool long_row_preload() {
  static const bool on = env_on("ZMLX_CUDA_LONG_PRELOAD");
  return on;
}

// ZMLX_CUDA_SHORT_ROWS=0: multi_linear_t gives short rows a whole warp each,
// as before (A/B runs and the test; the same values). Read at every launch.
bool short_multi_linear() { return env_on("ZMLX_CUDA_SHORT_ROWS"); }

// ZMLX_CUDA_MMA_WARPS=8 keeps gate+up in blocks of 8 warps (A/B runs).
bool small_swiglu_blocks() {
  static const bool on = !env_is("ZMLX_CUDA_MMA_WARPS", "8");
  return on;
}

template <int NM, int WARPS>
void mma_decode_w(const uint16_t* x, MmaJob job, unsigned pairs, cudaStream_t s) {
  const int64_t K = job.m[0].cols;
  const int64_t per_block = 16 * (WARPS / job.splits);
  const int nout = NM == 1 ? job.n : 1;
  job.first_block[0] = 0;
  for (int i = 0; i < nout; ++i)
    job.first_block[i + 1] = job.first_block[i] + (job.m[i].rows + per_block - 1) / per_block;
  const size_t smem = size_t(mma_stage_words(K) + WARPS * NM * 16) * 4;
  allow_dynamic_smem(reinterpret_cast<const void*>(mma_decode_kernel<NM, WARPS>), smem);
  launch_smem(mma_decode_kernel<NM, WARPS>, dim3(unsigned(job.first_block[nout]), pairs), dim3(WARPS * 32), smem, s, x,
              job);
}

template <int NM>
void mma_decode(const uint16_t* x, MmaJob job, unsigned pairs, cudaStream_t s) {
  job.splits = mma_splits(job.m[0].cols);
  if (job.ex && !job.per_slot) job.splits = gate_up_splits(job.splits, (job.m[0].rows + 15) / 16 * int64_t(pairs));
  job.preload = preload_weights();
  if constexpr (NM == 2)
    if (job.splits <= 4 && small_swiglu_blocks()) return mma_decode_w<NM, 4>(x, job, pairs, s);
  mma_decode_w<NM, kMmaWarps>(x, job, pairs, s);
}

// moe_pairs_kernel's launch: 64 rows a block, a grid row a bucket tile
// (those past *grp.ntiles exit at once).
template <int NM, int CPG>
void pairs_launch_cpg(const uint16_t* x, const PairJob<NM>& job, const PairGroups& grp, cudaStream_t s) {
  const size_t smem = pair_smem_bytes(job.m[0].cols);
  allow_dynamic_smem(reinterpret_cast<const void*>(moe_pairs_kernel<NM, CPG>), smem);
  const int64_t per_block = 16 * kPairWarps;
  launch_smem(moe_pairs_kernel<NM, CPG>, dim3(unsigned((job.m[0].rows + per_block - 1) / per_block), unsigned(grp.max_tiles)),
              dim3(kPairWarps * 32), smem, s, x, job, grp);
}
template <int NM>
void pairs_launch(const uint16_t* x, const PairJob<NM>& job, const PairGroups& grp, cudaStream_t s) {
  switch (job.m[0].group) {
    case 32: return pairs_launch_cpg<NM, 1>(x, job, grp, s);
    case 64: return pairs_launch_cpg<NM, 2>(x, job, grp, s);
    default: return pairs_launch_cpg<NM, 4>(x, job, grp, s);  // 128 (grouped_fits)
  }
}

// ZMLX_CUDA_EARLY_X=0: gate+up stages its input after the programmatic-launch
// wait whatever the caller says (A/B runs; the same bits either way).
bool early_x() {
  static const bool on = env_on("ZMLX_CUDA_EARLY_X");
  return on;
}

MmaJob mma_job(const QMat* ms, uint16_t* const* ys, int n) {
  MmaJob j{};
  for (int i = 0; i < n; ++i) j.m[i] = ms[i], j.y[i] = ys ? ys[i] : nullptr;
  j.n = n;
  j.ex = nullptr;
  j.k = 1;
  j.per_slot = 0;
  return j;
}

// ZMLX_CUDA_EARLY_ROUTING=0: gather_combine reads its routing after the
// programmatic-launch wait whatever the caller says (A/B runs).
bool early_routing() {
  static const bool on = env_on("ZMLX_CUDA_EARLY_ROUTING");
  return on;
}

// ZMLX_CUDA_COMBINE_PAR_SUM=0: the combine's 16 threads work out their rows'
// slot products one after another (A/B runs; the same bits). Read once, as
// the other A/B switches: no test switches it within a process.
bool combine_par_sum() {
  static const bool on = env_on("ZMLX_CUDA_COMBINE_PAR_SUM");
  return on;
}

// ZMLX_CUDA_TWO_STEP_COMBINE=0: gather_combine issues its second step's
// loads after the wait, as before (A/B runs; the same bits).
bool two_step_combine() {
  static const bool on = env_on("ZMLX_CUDA_TWO_STEP_COMBINE");
  return on;
}
// gather_combine's block: 16 warps when one pass over the k slots needs
// more than 8 (k·S > 8).
int combine_warps(int k, int S) { return wide_combine() && k * S > kMmaWarps ? 16 : kMmaWarps; }

// shd.m.w set: the shared-expert form (SH; T = 1, checked by the caller).
void mma_combine(const uint16_t* h, const int32_t* ex, const void* sc, bool f32, int mode, int T, int k, const QMat& m,
                 uint16_t* out, cudaStream_t s, bool routing_ready, const SharedDown& shd = {}) {
  const int S = mma_splits(m.cols), warps = combine_warps(k, S);
  auto go = [&](auto kernel) {
    const size_t smem =
        size_t(combine_shared_x_word(warps / S, mma_stage_words(m.cols), warps, k) + (shd.m.w ? shd.m.cols / 2 : 0)) *
        4;
    allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
    launch_smem(kernel, dim3(unsigned((m.rows + 15) / 16), unsigned(T)), dim3(warps * 32), smem, s, h, ex, sc, f32,
                mode, k, m, S, out, routing_ready && early_routing(), combine_par_sum(), shd);
  };
  const bool two = combine_two_steps(m, k, routing_ready);
  if (shd.m.w) {
    if (combine_shared_capped(m, k, routing_ready)) go(mma_combine_shared_capped_kernel);
    else if (warps == 16) two ? go(mma_combine_kernel<16, true, true>) : go(mma_combine_kernel<16, false, true>);
    else two ? go(mma_combine_kernel<kMmaWarps, true, true>) : go(mma_combine_kernel<kMmaWarps, false, true>);
  } else {
    if (warps == 16) two ? go(mma_combine_kernel<16, true>) : go(mma_combine_kernel<16>);
    else two ? go(mma_combine_kernel<kMmaWarps, true>) : go(mma_combine_kernel<kMmaWarps>);
  }
}

// Dispatch on the weight format; TT = tokens per pass.
template <template <int> class Launch, typename... A>
void by_bits(int bits, A&&... a) {
  switch (bits) {
    case 2: Launch<2>::go(a...); break;
    case 4: Launch<4>::go(a...); break;
    case 8: Launch<8>::go(a...); break;
    case 16: Launch<16>::go(a...); break;
    default: throw std::runtime_error("CUDA backend: unsupported weight bits " + std::to_string(bits));
  }
}

// Whether a one-token linear of m on linear_decode_kernel (4-bit, rows
// preloaded) runs its CV form, the weights unpacked into nib_pairs before the
// wait (decode_row_to). It takes 94 registers against 51 (ptxas, x staged):
// two 256-thread blocks an SM instead of four, so only launches whose blocks
// all fit on the GPU at once take it; blocks that start after the wait would
// unpack after it anyway. One H200, 2026-11-29, alternating rounds: Qwen3
// decode +1.0 % patched (five rounds, two calls) and unpatched (two), LFM2
// +0.5 %, GLM level (docs/performance.md). q/k/v's 640-block multi-matrix
// launch the same way was 7 % slower (2 blocks an SM hold 264 of them), so
// linear_multi keeps the packed form. ZMLX_CUDA_PRECONVERT=0: never (A/B
// runs; the same bits; read per launch).
template <bool SX>
struct UnpackAheadResidency {};
template <bool SX>
bool unpack_ahead(const QMat& m) {
  // Only rows decode_row_to preloads (row_preloadable) have weights in
  // registers before the wait to unpack.
  if (m.bits != 4 || m.cols / 32 > 32 * kPreChunks || !preload_weights() || !env_on("ZMLX_CUDA_PRECONVERT"))
    return false;
  const int resident = cached_per_device<UnpackAheadResidency<SX>>([](int) {
    int per_sm = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, linear_decode_kernel<4, kPreChunks, SX, true>, 256,
                                                      0) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    return per_sm * int(sm_count());
  });
  return (m.rows + kRowsPerDecodeBlock - 1) / kRowsPerDecodeBlock <= resident;
}

template <int B>
void launch_linear_multi_decode(dim3 grid, const uint16_t* x, const MultiQ& mq, cudaStream_t s) {
  with_staged_x([&](auto sx) {
    launch(linear_multi_decode_kernel<B, decltype(sx)::value>, grid, dim3(256), s, x, mq, preload_weights());
  });
}

// ZMLX_CUDA_HEAD_STREAM=0: the output head takes mma_decode_kernel, as
// before (A/B runs and the test; the same bits). Read at every launch.
bool head_stream_on() { return env_on("ZMLX_CUDA_HEAD_STREAM"); }
// Stages that fit the shared-memory budget beside the staged x and the
// partials (at most kHeadMaxStages).
int head_stream_stages(const QMat& m) {
  const int S = mma_splits(m.cols);
  const int64_t room = int64_t(kHeadSmemBudget) - head_fixed_bytes(m.cols);
  return room <= 0 ? 0 : int(std::min<int64_t>(kHeadMaxStages, room / head_stage_bytes(m, S)));
}
}  // namespace

bool head_stream_fits(const QMat& m) {
  static const bool hopper = runs_sm90_code(reinterpret_cast<const void*>(head_stream_kernel));
  // Bulk copies take 16-byte aligned ranges whose sizes are multiples of
  // 16 bytes. A group's words are (K a multiple of 32), and so are a whole
  // group's scales and biases (rows x K / group bf16, 16 rows a tile); the
  // last group's may not be (K 512 in groups of 128: 8 bytes a row).
  const uintptr_t bases =
      reinterpret_cast<uintptr_t>(m.w) | reinterpret_cast<uintptr_t>(m.scales) | reinterpret_cast<uintptr_t>(m.biases);
  const int64_t rows_g = head_group_rows(mma_splits(m.cols));
  const bool aligned = (bases & 15) == 0 && (m.rows % rows_g) * (m.cols / m.group) * 2 % 16 == 0;
  return hopper && head_stream_on() && use_mma_linear(m) && m.rows >= kHeadStreamMinRows && aligned &&
         head_stream_stages(m) >= 2;
}

namespace {
void head_stream(const uint16_t* x, const QMat& m, uint16_t* y, cudaStream_t s) {
  const int S = mma_splits(m.cols), stages = head_stream_stages(m);
  const size_t smem = size_t(stages * head_stage_bytes(m, S) + head_fixed_bytes(m.cols));
  allow_dynamic_smem(reinterpret_cast<const void*>(head_stream_kernel), smem);
  const int64_t groups = (m.rows + head_group_rows(S) - 1) / head_group_rows(S);
  launch_smem(head_stream_kernel, dim3(unsigned(std::min<int64_t>(kHeadBlocksPerSm * sm_count(), groups))),
              dim3(kMmaWarps * 32), smem, s, x, m, y, S, stages);
}

template <int B>
struct LinearL {
  static void go(const uint16_t* x, int T, const QMat& m, uint16_t* y, cudaStream_t s) {
    if (T == 1 && head_stream_fits(m)) return head_stream(x, m, y, s);
    if (T == 1 && use_mma_linear(m)) return mma_decode<1>(x, mma_job(&m, &y, 1), 1, s);
    const unsigned gx = unsigned((m.rows + kRowsPerBlock - 1) / kRowsPerBlock);
    const dim3 decode_grid(unsigned((m.rows + kRowsPerDecodeBlock - 1) / kRowsPerDecodeBlock));
    const int64_t chunks = m.cols / 32;
    if (T == 1 && chunks > 32 * kPreChunks && chunks <= 32 * kPreChunksLong && long_row_preload())
      with_staged_x(
          [&](auto sx) {
            launch(linear_decode_kernel<B, kPreChunksLong, decltype(sx)::value>, decode_grid, dim3(256), s, x, m, y,
                   preload_weights());
          },
          true);
    else if (T == 1)
      with_staged_x([&](auto sx) {
        if constexpr (B == 4)
          if (unpack_ahead<decltype(sx)::value>(m))
            return launch(linear_decode_kernel<B, kPreChunks, decltype(sx)::value, true>, decode_grid, dim3(256), s,
                          x, m, y, preload_weights());
        launch(linear_decode_kernel<B, kPreChunks, decltype(sx)::value>, decode_grid, dim3(256), s, x, m, y,
               preload_weights());
      });
    else
      launch(linear_kernel<B, kTokTile>, dim3(dim3(gx, unsigned((T + kTokTile - 1) / kTokTile))), dim3(256), s, x, T, m, y);
  }
};
template <int B>
struct LinearMultiL {
  static void go(const uint16_t* x, int T, const MultiQ& mq, cudaStream_t s) {
    if (T == 1 && use_mma(mq.m[0])) {
      // Matrices with enough rows in one MMA launch, the others in one scalar launch.
      QMat big[kMaxMulti];
      uint16_t* ybig[kMaxMulti];
      MultiQ small{};
      int nb = 0;
      small.n = 0;
      small.first_block[0] = 0;
      for (int i = 0; i < mq.n; ++i) {
        if (use_mma_linear(mq.m[i])) {
          big[nb] = mq.m[i], ybig[nb++] = mq.y[i];
        } else {
          const int j = small.n++;
          small.m[j] = mq.m[i], small.y[j] = mq.y[i];
          small.first_block[j + 1] = small.first_block[j] + (mq.m[i].rows + kRowsPerDecodeBlock - 1) / kRowsPerDecodeBlock;
        }
      }
      if (nb > 0) mma_decode<1>(x, mma_job(big, ybig, nb), 1, s);
      if (small.n > 0)
        launch_linear_multi_decode<B>(dim3(unsigned(small.first_block[small.n])), x, small, s);
      return;
    }
    const unsigned gx = unsigned(mq.first_block[mq.n]);
    if (T == 1)
      launch_linear_multi_decode<B>(dim3(gx), x, mq, s);
    else
      launch(linear_multi_kernel<B, kTokTile>, dim3(gx, unsigned((T + kTokTile - 1) / kTokTile)), dim3(256), s, x, T, mq);
  }
};
template <int B>
struct LinearSwigluL {
  static void go(const uint16_t* x, int T, const QMat& g, const QMat& u, uint16_t* y, cudaStream_t s) {
    if (T == 1 && use_mma_linear(g)) {
      const QMat gu[2] = {g, u};
      MmaJob j = mma_job(gu, nullptr, 2);
      j.y[0] = y;
      return mma_decode<2>(x, j, 1, s);
    }
    const unsigned gx = unsigned((g.rows + kRowsPerBlock - 1) / kRowsPerBlock);
    const dim3 decode_grid(unsigned((g.rows + kRowsPerDecodeBlock - 1) / kRowsPerDecodeBlock));
    if (T == 1)
      with_staged_x([&](auto sx) {
        launch(linear_swiglu_decode_kernel<B, decltype(sx)::value>, decode_grid, dim3(256), s, x, g, u, y,
               preload_weights());
      });
    else
      launch(linear_swiglu_kernel<B, kTokTile>, dim3(dim3(gx, unsigned((T + kTokTile - 1) / kTokTile))), dim3(256), s, x, T, g, u, y);
  }
};
template <int B>
struct GatherL {
  static void go(const uint16_t* x, bool per_slot, const int32_t* ex, int P, int k, const QMat& m, uint16_t* y,
                 cudaStream_t s) {
    if (use_mma(m)) {
      MmaJob j = mma_job(&m, &y, 1);
      j.ex = ex, j.k = k, j.per_slot = per_slot;
      return mma_decode<1>(x, j, unsigned(P), s);
    }
    launch(gather_linear_decode_kernel<B>,
           dim3(unsigned((m.rows + kRowsPerDecodeBlock - 1) / kRowsPerDecodeBlock), unsigned(P)), dim3(256), s, x,
           per_slot, ex, k, m, y);
  }
};
template <int B>
struct GatherSwigluL {
  static void go(const uint16_t* x, const int32_t* ex, int P, int k, const QMat& g, const QMat& u, uint16_t* y,
                 cudaStream_t s, bool x_ready) {
    if (use_mma(g)) {
      const QMat gu[2] = {g, u};
      MmaJob j = mma_job(gu, nullptr, 2);
      j.y[0] = y;
      j.ex = ex, j.k = k, j.per_slot = 0;
      j.x_early = x_ready && early_x();
      return mma_decode<2>(x, j, unsigned(P), s);
    }
    constexpr int per_block = kRowsPerBlock * kSwigluDecodeRows;
    launch(gather_swiglu_decode_kernel<B>, dim3(unsigned((g.rows + per_block - 1) / per_block), unsigned(P)), dim3(256), s, x, ex,
           k, g, u, y);
  }
};
template <int B>
struct GatherCombineL {
  static void go(const uint16_t* h, const int32_t* ex, const void* sc, bool f32, int mode, int T, int k, const QMat& m,
                 uint16_t* out, cudaStream_t s, bool routing_ready) {
    if (use_mma(m)) return mma_combine(h, ex, sc, f32, mode, T, k, m, out, s, routing_ready);
    const dim3 grid{unsigned((m.rows + kRowsPerBlock - 1) / kRowsPerBlock), unsigned(T)};
    if (m.cols <= 32 * 32 && k <= kShortK)
      launch(gather_combine_short_kernel<B, 1>, grid, dim3(256), s, h, ex, sc, f32, mode, k, m, out);
    else if (m.cols <= 2 * 32 * 32 && 2 * k <= kShortK)
      launch(gather_combine_short_kernel<B, 2>, grid, dim3(256), s, h, ex, sc, f32, mode, k, m, out);
    else
      launch(gather_combine_kernel<B>, dim3(dim3(unsigned((m.rows + kRowsPerBlock - 1) / kRowsPerBlock), unsigned(T))), dim3(256), s, 
        h, ex, sc, f32, mode, k, m, out);
  }
};

// ------------------------------------------------------------ elementwise

__global__ void embed_kernel(QMat m, const int32_t* ids, int T, uint16_t* out) {
  ZMLX_TRACE_BLOCK_END();
  pdl_begin();
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t D = m.cols;
  if (i >= int64_t(T) * D) return;
  const int64_t t = i / D, d = i % D;
  int64_t id = ids[t];
  if (id < 0 || id >= m.rows) id = 0;  // the host checked eager ids; a replayed graph's come from the sampler
  if (m.bits == 16) {
    out[i] = reinterpret_cast<const uint16_t*>(m.w)[id * D + d];
    return;
  }
  const int per = 32 / m.bits;
  const uint32_t mask = (1u << m.bits) - 1u;
  const uint32_t word = m.w[id * (D * m.bits / 32) + d / per];
  const uint32_t q = (word >> (m.bits * (d % per))) & mask;
  const int64_t g = id * (D / m.group) + d / m.group;
  out[i] = to_bf(bf(m.scales[g]) * float(q) + bf(m.biases[g]));
}

constexpr int kNormMaxChunks = 4;  // 16-byte chunks a lane holds in warp_rms_norm_row: D <= 1024

// One row's RMSNorm by one warp: out[d] = bf16(w[d] · bf16(x[d] · inv)),
// inv = 1 / sqrt(mean(x²) + eps). Rows of a multiple of 256 values (16-byte
// aligned) load 16 bytes a lane, every load of the row issued before the sum:
// the strided loop of 2-byte loads the other rows take waits out its loads
// one by one (~9 us for a 768-value row on an H100, GLM's q_a norm). The
// weights' loads go out with x's, or before the programmatic-launch wait
// (NormW, rms_norm_warp_kernel): loaded after the sum, as they were, they
// added a round trip to the row. Every caller (rms_norm, the fused MLA
// kernel) goes through here, so a row gets the same bits from each.
struct NormW {
  uint4 v[kNormMaxChunks];
};
__device__ __forceinline__ bool warp_norm_vec(const uint16_t* x, const uint16_t* w, int D, const uint16_t* out) {
  return D % 256 == 0 && D <= 256 * kNormMaxChunks &&
         ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(w) | reinterpret_cast<uintptr_t>(out)) & 15) == 0;
}
// The weights' chunks a lane of warp_rms_norm_row's vector form uses.
__device__ __forceinline__ void load_norm_w(const uint16_t* w, int D, NormW& wv) {
  const int lane = threadIdx.x & 31, n = D / 256;
#pragma unroll
  for (int i = 0; i < kNormMaxChunks; ++i)
    if (i < n) wv.v[i] = __ldg(reinterpret_cast<const uint4*>(w) + i * 32 + lane);
}
// pre: w's chunks, loaded by load_norm_w (vector form only); null: loaded here.
__device__ __forceinline__ void warp_rms_norm_row(const uint16_t* x, const uint16_t* w, int D, float eps,
                                                  uint16_t* out, const NormW* pre = nullptr) {
  const int lane = threadIdx.x & 31;
  if (pre || warp_norm_vec(x, w, D, out)) {  // pre: the caller checked
    const int n = D / 256;
    NormW wl;
    if (!pre) load_norm_w(w, D, wl);
    const NormW& wv = pre ? *pre : wl;
    uint4 xv[kNormMaxChunks];
#pragma unroll
    for (int i = 0; i < kNormMaxChunks; ++i)
      if (i < n) xv[i] = __ldg(reinterpret_cast<const uint4*>(x) + i * 32 + lane);
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < kNormMaxChunks; ++i)
      if (i < n) {
        const uint32_t u[4] = {xv[i].x, xv[i].y, xv[i].z, xv[i].w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          ss = fmaf(lo_bf(u[j]), lo_bf(u[j]), ss);
          ss = fmaf(hi_bf(u[j]), hi_bf(u[j]), ss);
        }
      }
    ss = warp_sum(ss);
    const float inv = 1.0f / sqrtf(ss / float(D) + eps);
#pragma unroll
    for (int i = 0; i < kNormMaxChunks; ++i)
      if (i < n) {
        const uint32_t u[4] = {xv[i].x, xv[i].y, xv[i].z, xv[i].w},
                       g[4] = {wv.v[i].x, wv.v[i].y, wv.v[i].z, wv.v[i].w};
        uint32_t o[4];
#pragma unroll
        for (int j = 0; j < 4; ++j)
          o[j] = uint32_t(to_bf(lo_bf(g[j]) * rbf(lo_bf(u[j]) * inv))) |
                 (uint32_t(to_bf(hi_bf(g[j]) * rbf(hi_bf(u[j]) * inv))) << 16);
        reinterpret_cast<uint4*>(out)[i * 32 + lane] = make_uint4(o[0], o[1], o[2], o[3]);
      }
    return;
  }
  float ss = 0.f;
  for (int d = lane; d < D; d += 32) {
    const float v = bf(x[d]);
    ss = fmaf(v, v, ss);
  }
  ss = warp_sum(ss);
  const float inv = 1.0f / sqrtf(ss / float(D) + eps);
  for (int d = lane; d < D; d += 32) out[d] = to_bf(bf(w[d]) * rbf(bf(x[d]) * inv));
}

// One warp per row (D <= 1024) or one block per row.
__global__ void rms_norm_warp_kernel(const uint16_t* x, int64_t R, int D, const uint16_t* w, float eps, uint16_t* out,
                                     bool trigger_first) {
  ZMLX_TRACE_BLOCK_END();
  const int64_t r = int64_t(blockIdx.x) * 8 + (threadIdx.x >> 5);
  // The weights are constant: loaded before the wait (the vector form).
  // Only where there is a wait (sm_90): the sm_80 build run on an H100 from
  // its PTX gave one 256-value chunk of every row as zeros in this form
  // (2026-11-28; the sm_90a build's rows were right).
  NormW wv;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const bool pre = r < R && warp_norm_vec(x + r * D, w, D, out + r * D);
#else
  const bool pre = false;
#endif
  if (pre) load_norm_w(w, D, wv);
  pdl_begin(trigger_first);
  if (r >= R) return;
  warp_rms_norm_row(x + r * D, w, D, eps, out + r * D, pre ? &wv : nullptr);
}

__global__ void rms_norm_block_kernel(const uint16_t* x, int D, const uint16_t* w, float eps, uint16_t* out,
                                      bool trigger_first) {
  ZMLX_TRACE_BLOCK_END();
  pdl_begin(trigger_first);
  const int64_t r = blockIdx.x;
  const uint16_t* xr = x + r * D;
  float ss = 0.f;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    const float v = bf(xr[d]);
    ss = fmaf(v, v, ss);
  }
  const float inv = 1.0f / sqrtf(block_sum(ss) / float(D) + eps);
  for (int d = threadIdx.x; d < D; d += blockDim.x) out[r * D + d] = to_bf(bf(w[d]) * rbf(bf(xr[d]) * inv));
}

// h = bf16(h + x) in place, then out = rms_norm(h) (block per row).
__global__ void add_rms_norm_kernel(uint16_t* h, const uint16_t* x, int D, const uint16_t* w, float eps,
                                    uint16_t* out, bool trigger_first) {
  ZMLX_TRACE_BLOCK_END();
  pdl_begin(trigger_first);
  const int64_t r = blockIdx.x;
  uint16_t* hr = h + r * D;
  const uint16_t* xr = x + r * D;
  float ss = 0.f;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    const uint16_t v = to_bf(bf(hr[d]) + bf(xr[d]));
    hr[d] = v;
    ss = fmaf(bf(v), bf(v), ss);
  }
  const float inv = 1.0f / sqrtf(block_sum(ss) / float(D) + eps);
  for (int d = threadIdx.x; d < D; d += blockDim.x) out[r * D + d] = to_bf(bf(w[d]) * rbf(bf(hr[d]) * inv));
}

// add_rms_norm for rows of D = 8·blockDim.x: one 16-byte load of h, x and w
// per thread (add_rms_norm_row8).
// early: the norm weights (constant) are loaded before the wait, and the
// residual row is sent to L2 then (a prefetch, safe whoever still writes it).
// A decode step streams megabytes of weights through L2 between the writes
// of h and its next read, so both most likely came from DRAM after the wait
// (trace, Qwen3, H100: the layer's first norm ended 1.29 us after its
// release, the second 0.82; with this, decode +1.3-1.4 % on Qwen3 and GLM).
// ZMLX_CUDA_NORM_PREFETCH=0: off (the same bits).
__global__ void add_rms_norm_vec_kernel(uint16_t* h, const uint16_t* x, int D, const uint16_t* w, float eps,
                                        uint16_t* out, bool early, bool trigger_first) {
  ZMLX_TRACE_BLOCK_END();
  const int64_t r = blockIdx.x;
  uint4* hr = reinterpret_cast<uint4*>(h + r * D) + threadIdx.x;
  uint4 wv{};
  if (early) {
    wv = __ldg(reinterpret_cast<const uint4*>(w) + threadIdx.x);
    if ((threadIdx.x & 7) == 0) prefetch_l2_line(hr);
  }
  pdl_begin(trigger_first);
  const uint4 hv = *hr, xv = __ldg(reinterpret_cast<const uint4*>(x + r * D) + threadIdx.x);
  if (!early) wv = __ldg(reinterpret_cast<const uint4*>(w) + threadIdx.x);
  uint4 hn, on;
  add_rms_norm_row8(hv, xv, wv, D, eps, hn, on);
  *hr = hn;
  reinterpret_cast<uint4*>(out + r * D)[threadIdx.x] = on;
}

// Per head row (one warp): RMSNorm with the q or k norm weight, RoPE over
// the whole head, then q to q_out and k, v into the cache at pos + t.
// DPL consecutive bf16 values as floats, and back, in one load/store
// (2, 4, 8 or 16 bytes; the callers' offsets are multiples of that).
template <int DPL>
__device__ __forceinline__ void load_bf16s(const uint16_t* p, float (&v)[DPL]) {
  if constexpr (DPL == 1) {
    v[0] = bf(*p);
  } else if constexpr (DPL == 2) {
    const uint32_t w = *reinterpret_cast<const uint32_t*>(p);
    v[0] = lo_bf(w), v[1] = hi_bf(w);
  } else if constexpr (DPL == 4) {
    const uint2 w = *reinterpret_cast<const uint2*>(p);
    v[0] = lo_bf(w.x), v[1] = hi_bf(w.x), v[2] = lo_bf(w.y), v[3] = hi_bf(w.y);
  } else {
    static_assert(DPL % 8 == 0, "DPL");
#pragma unroll
    for (int i = 0; i < DPL / 8; ++i) {
      const uint4 w = reinterpret_cast<const uint4*>(p)[i];
      const uint32_t ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) v[8 * i + 2 * j] = lo_bf(ws[j]), v[8 * i + 2 * j + 1] = hi_bf(ws[j]);
    }
  }
}
template <int DPL>
__device__ __forceinline__ void store_bf16s(uint16_t* p, const float (&v)[DPL]) {
  uint16_t b[DPL];
#pragma unroll
  for (int i = 0; i < DPL; ++i) b[i] = to_bf(v[i]);
  if constexpr (DPL == 1) {
    *p = b[0];
  } else if constexpr (DPL == 2) {
    *reinterpret_cast<uint32_t*>(p) = uint32_t(b[0]) | uint32_t(b[1]) << 16;
  } else {
#pragma unroll
    for (int i = 0; i < DPL / 4; ++i)
      reinterpret_cast<uint2*>(p)[i] = make_uint2(uint32_t(b[4 * i]) | uint32_t(b[4 * i + 1]) << 16,
                                                  uint32_t(b[4 * i + 2]) | uint32_t(b[4 * i + 3]) << 16);
  }
}
template <int DPL>
__device__ __forceinline__ void copy_bf16s(uint16_t* dst, const uint16_t* src) {
  if constexpr (DPL == 1) *dst = *src;
  else if constexpr (DPL == 2) *reinterpret_cast<uint32_t*>(dst) = *reinterpret_cast<const uint32_t*>(src);
  else
#pragma unroll
    for (int i = 0; i < DPL / 4; ++i) reinterpret_cast<uint2*>(dst)[i] = reinterpret_cast<const uint2*>(src)[i];
}

// sin and cos of a RoPE angle: Cody-Waite reduction by 2π (two constants,
// fmaf) into [-π, π], then the fast hardware pair, accurate to ~4e-7 there
// (the library sincosf costs ~10x the instructions and set this kernel's
// latency).
__device__ __forceinline__ void rope_sincos(float th, float& sn, float& c) {
  const float k = rintf(th * 0.159154943f);
  float r = fmaf(-k, 6.28318548f, th);  // 2π rounded to fp32 ...
  r = fmaf(k, 1.74845553e-7f, r);       // ... and what that rounding dropped
  __sincosf(r, &sn, &c);
}

// The lane's RoPE frequencies for norm_rope_loaded.
template <int DPL>
__device__ __forceinline__ void load_rope_freqs(const float* inv_freq, bool traditional, float (&fr)[DPL]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int d = 0; d < DPL; ++d)
    fr[d] = !traditional ? inv_freq[(lane & 15) * DPL + d] : inv_freq[(lane * DPL + d) / 2];
}

// norm_rope_row's arithmetic on a row already loaded (x: the lane's values,
// overwritten; w: its norm weights; fr: load_rope_freqs), for callers that
// issue several rows' loads at once.
template <int DPL>
__device__ __forceinline__ void norm_rope_loaded(float (&x)[DPL], const float (&w)[DPL], const float (&fr)[DPL],
                                                 float eps, bool traditional, int pos, float (&y)[DPL]) {
  constexpr int HD = 32 * DPL;
  const int lane = threadIdx.x & 31;
  float ss = 0.f;
#pragma unroll
  for (int d = 0; d < DPL; ++d) ss = fmaf(x[d], x[d], ss);
  ss = warp_sum(ss);
  const float inv = 1.0f / sqrtf(ss / float(HD) + eps);
#pragma unroll
  for (int d = 0; d < DPL; ++d) x[d] = bf(to_bf(w[d] * rbf(x[d] * inv)));
  if (!traditional) {  // pairs (i, i + HD/2): lanes l and l ^ 16 hold them at the same offsets
#pragma unroll
    for (int d = 0; d < DPL; ++d) {
      const float other = __shfl_xor_sync(0xffffffffu, x[d], 16);
      float sn, c;
      rope_sincos(float(pos) * fr[d], sn, c);
      y[d] = lane < 16 ? x[d] * c - other * sn : other * sn + x[d] * c;
    }
  } else if constexpr (DPL % 2 == 0) {  // pairs (2i, 2i+1) inside a lane
#pragma unroll
    for (int d = 0; d < DPL; d += 2) {
      float sn, c;
      rope_sincos(float(pos) * fr[d], sn, c);
      y[d] = x[d] * c - x[d + 1] * sn;
      y[d + 1] = x[d] * sn + x[d + 1] * c;
    }
  } else {  // DPL == 1: pairs across lanes l, l ^ 1
    const float other = __shfl_xor_sync(0xffffffffu, x[0], 1);
    float sn, c;
    rope_sincos(float(pos) * fr[0], sn, c);
    y[0] = (lane & 1) == 0 ? x[0] * c - other * sn : other * sn + x[0] * c;
  }
}

// One head row (HD = 32·DPL values at src, lane holding DPL of them) ->
// RMSNorm with weights nw -> RoPE at position pos; y: the lane's values
// before their bf16 rounding. Whole warp. qk_norm_rope_kv_kernel and the
// fused decode attention (attn_partial_kernel<DPL, true>) both go through
// here, and attn_group_mma_kernel through norm_rope_loaded, so a row gets
// the same bits from each.
template <int DPL>
__device__ __forceinline__ void norm_rope_row(const uint16_t* src, const uint16_t* nw, float eps,
                                              const float* inv_freq, bool traditional, int pos, float (&y)[DPL]) {
  // Every load this warp needs is issued before the first use.
  float x[DPL], w[DPL], fr[DPL];
  load_bf16s<DPL>(src + threadIdx.x % 32 * DPL, x);
  load_bf16s<DPL>(nw + threadIdx.x % 32 * DPL, w);
  load_rope_freqs<DPL>(inv_freq, traditional, fr);
  norm_rope_loaded<DPL>(x, w, fr, eps, traditional, pos, y);
}

template <int DPL>
__global__ void qk_norm_rope_kv_kernel(const uint16_t* q, const uint16_t* k, const uint16_t* v, int T, int H, int Hkv,
                                       const uint16_t* qn, const uint16_t* kn, float eps, const float* inv_freq,
                                       bool traditional, int pos0, const int* dpos, uint16_t* q_out, uint16_t* kc,
                                       uint16_t* vc, int64_t cap) {
  ZMLX_TRACE_BLOCK_END();
  pdl_begin();
  constexpr int HD = 32 * DPL;
  const int64_t wid = int64_t(blockIdx.x) * 8 + (threadIdx.x >> 5);
  if (wid >= int64_t(T) * (H + Hkv)) return;
  const int lane = threadIdx.x & 31;
  const int t = int(wid / (H + Hkv)), hh = int(wid % (H + Hkv));
  const bool is_q = hh < H;
  const int head = is_q ? hh : hh - H;
  const uint16_t* src = is_q ? q + (int64_t(t) * H + head) * HD : k + (int64_t(t) * Hkv + head) * HD;
  const int pos = (dpos ? *dpos : pos0) + t;
  float y[DPL];
  norm_rope_row<DPL>(src, is_q ? qn : kn, eps, inv_freq, traditional, pos, y);
  if (is_q) {
    store_bf16s<DPL>(q_out + (int64_t(t) * H + head) * HD + lane * DPL, y);
  } else if (pos < cap) {
    store_bf16s<DPL>(kc + (head * cap + pos) * HD + lane * DPL, y);
    copy_bf16s<DPL>(vc + (head * cap + pos) * HD + lane * DPL, v + (int64_t(t) * Hkv + head) * HD + lane * DPL);
  }
}

// One RoPE rotation of the bf16 pair (x0, x1) by the angle pos·inv_freq,
// rounded to bf16: the plain rope kernel and the fused MLA kernel share it,
// so both give the same bits.
__device__ __forceinline__ void rope_pair(uint16_t x0b, uint16_t x1b, int pos, float inv_freq, uint16_t& y0,
                                          uint16_t& y1) {
  float c, s;
  rope_sincos(float(pos) * inv_freq, s, c);
  const float x0 = bf(x0b), x1 = bf(x1b);
  y0 = to_bf(x0 * c - x1 * s);
  y1 = to_bf(x0 * s + x1 * c);
}

__global__ void rope_kernel(uint16_t* x, int T, int heads, int hd, int off, int half, int pos0, const int* dpos,
                            const float* inv_freq, bool traditional) {
  ZMLX_TRACE_BLOCK_END();
  pdl_begin();
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= int64_t(T) * heads * half) return;
  const int f = int(i % half);
  const int64_t th = i / half;
  const int t = int(th / heads), h = int(th % heads);
  const int pos = (dpos ? *dpos : pos0) + t;
  uint16_t* v = x + (int64_t(t) * heads + h) * hd + off;
  const int a = traditional ? 2 * f : f, b = traditional ? 2 * f + 1 : f + half;
  rope_pair(v[a], v[b], pos, inv_freq[f], v[a], v[b]);
}

// One token's row of ckv ([latent | k_pe]) into the cache rows at pos, by
// one warp: the latent's RMSNorm as rms_norm_warp_kernel computes it, and
// the key's traditional RoPE pairs.
__device__ __forceinline__ void mla_cache_row(const uint16_t* xr, int kv_lora, int rope, const uint16_t* kv_norm,
                                              float eps, const float* inv_freq, int64_t pos, uint16_t* kc,
                                              uint16_t* vc) {
  const int lane = threadIdx.x & 31;
  warp_rms_norm_row(xr, kv_norm, kv_lora, eps, kc + pos * kv_lora);
  for (int f = lane; f < rope / 2; f += 32)
    rope_pair(xr[kv_lora + 2 * f], xr[kv_lora + 2 * f + 1], int(pos), inv_freq[f], vc[pos * rope + 2 * f],
              vc[pos * rope + 2 * f + 1]);
}

// mla_rope_split_cache: blocks [0, qblocks) take one (token, head, column)
// of q each thread (columns < nope copied, then one traditional RoPE pair);
// the blocks after them one token per warp (mla_cache_row).
__global__ void mla_rope_split_cache_kernel(const uint16_t* q, const uint16_t* ckv, int T, int heads, int nope,
                                            int rope, int kv_lora, const uint16_t* kv_norm, float eps,
                                            const float* inv_freq, int pos0, const int* dpos, uint16_t* q_nope,
                                            uint16_t* q_pe, uint16_t* kc, uint16_t* vc, int64_t cap,
                                            unsigned qblocks) {
  ZMLX_TRACE_BLOCK_END();
  pdl_begin();
  const int half = rope / 2, qd = nope + rope, per_head = nope + half;
  if (blockIdx.x < qblocks) {
    const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= int64_t(T) * heads * per_head) return;
    const int j = int(i % per_head);
    const int64_t th = i / per_head;  // t * heads + h
    const uint16_t* src = q + th * qd;
    if (j < nope) {
      q_nope[th * nope + j] = src[j];
    } else {
      const int f = j - nope, t = int(th / heads);
      uint16_t* dst = q_pe + th * rope + 2 * f;
      rope_pair(src[nope + 2 * f], src[nope + 2 * f + 1], (dpos ? *dpos : pos0) + t, inv_freq[f], dst[0], dst[1]);
    }
    return;
  }
  const int t = int(blockIdx.x - qblocks) * 8 + (threadIdx.x >> 5);
  if (t >= T) return;
  const int64_t pos = (dpos ? *dpos : pos0) + t;
  if (pos >= cap) return;
  mla_cache_row(ckv + int64_t(t) * (kv_lora + rope), kv_lora, rope, kv_norm, eps, inv_freq, pos, kc, vc);
}

// GLM's q_b projection and mla_rope_split_cache in one launch (one token).
// Why: the split was a kernel of its own between q_b and the absorbed query,
// ~2.8 us of a ~65 us GLM layer in a trace (H100, 2026-11-27), most of it
// the kernel boundary. Blocks [0, qblocks) compute 8 rows of q each as
// linear_decode_kernel does (decode_row_to: linear's bits), keep them in
// shared memory, then split them as mla_rope_split_cache_kernel does
// (copied, or one rope_pair for each even offset into the rope part: the
// pair's two rows are in the same block, as rows and per-head offsets are
// even); block qblocks writes the token's cache rows (mla_cache_row) from
// ckv, which the kernel two launches back wrote.
template <int BITS, bool SX>
__global__ void __launch_bounds__(256)
    linear_mla_split_decode_kernel(const uint16_t* x, QMat m, const uint16_t* ckv, int nope, int rope, int kv_lora,
                                   const uint16_t* kv_norm, float eps, const float* inv_freq, int pos0,
                                   const int* dpos, uint16_t* q_nope, uint16_t* q_pe, uint16_t* kc, uint16_t* vc,
                                   int64_t cap, unsigned qblocks) {
  ZMLX_TRACE_BLOCK_END();
  if (blockIdx.x >= qblocks) {
    pdl_begin();
    const int64_t pos = (dpos ? *dpos : pos0);
    if (threadIdx.x < 32 && pos < cap) mla_cache_row(ckv, kv_lora, rope, kv_norm, eps, inv_freq, pos, kc, vc);
    return;
  }
  static_assert(kRowsPerBlock % 2 == 0, "a rope pair's two rows must share a block");
  __shared__ uint16_t rows[kRowsPerBlock];
  const int64_t r0 = int64_t(blockIdx.x) * kRowsPerBlock;
  decode_row_to<BITS, kPreChunks, SX>(m, decode_row0(), x, true,
                                      [&](int64_t r, uint16_t v) { rows[r - r0] = v; });
  __syncthreads();
  const int i = threadIdx.x;
  const int64_t r = r0 + i;
  if (i >= kRowsPerBlock || r >= m.rows) return;
  const int qd = nope + rope, j = int(r % qd);
  const int64_t h = r / qd;
  if (j < nope) {
    q_nope[h * nope + j] = rows[i];
  } else if (((j - nope) & 1) == 0) {
    const int f = (j - nope) >> 1;
    uint16_t* dst = q_pe + h * rope + 2 * f;
    rope_pair(rows[i], rows[i + 1], dpos ? *dpos : pos0, inv_freq[f], dst[0], dst[1]);
  }
}

__global__ void add_kernel(uint16_t* h, const uint16_t* x, int64_t n, bool trigger_first) {
  ZMLX_TRACE_BLOCK_END();
  pdl_begin(trigger_first);
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) h[i] = to_bf(bf(h[i]) + bf(x[i]));
}

__global__ void swiglu_kernel(const uint16_t* g, const uint16_t* u, int64_t n, uint16_t* out) {
  ZMLX_TRACE_BLOCK_END();
  pdl_begin();
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = swiglu_bf(g[i], u[i]);
}

__global__ void kv_write_kernel(uint16_t* kc, uint16_t* vc, int64_t cap, int H, int hd, int vd, const uint16_t* k,
                                const uint16_t* v, int T, int pos0, const int* dpos) {
  ZMLX_TRACE_BLOCK_END();
  pdl_begin();
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int wd = hd > vd ? hd : vd;
  if (i >= int64_t(T) * H * wd) return;
  const int d = int(i % wd);
  const int64_t th = i / wd;
  const int t = int(th / H), h = int(th % H);
  const int64_t pos = (dpos ? *dpos : pos0) + t;
  if (pos >= cap) return;
  if (d < hd) kc[(h * cap + pos) * hd + d] = k[th * hd + d];
  if (d < vd) vc[(h * cap + pos) * vd + d] = v[th * vd + d];
}

// --------------------------------------------------------------- attention

constexpr int kAttnWarps = 4;
constexpr int kAttnGroup = 4;  // key positions a warp handles per step
// The grouped decode kernel's shared memory at most (an H100's opt-in limit
// is 227 KiB; an A100's 163), and at most the card's (smem_optin_limit):
// past it, the per-head kernel serves.
constexpr size_t kAttnGroupMaxSmem = 160 * 1024;

// Partial softmax-attention of one (head, split, token): running max m, sum l
// and unnormalised output acc over the split's keys.
// The fused decode form (PREP, one token): q and k arrive raw from the q/k/v
// projection and are normalized and roped here (norm_rope_row, as
// qk_norm_rope_kv_kernel does), instead of by a kernel of their own; the
// split holding the new position uses the new key and value from registers,
// and the first head of each kv group writes them to the cache.
struct AttnPrep {
  const uint16_t *k, *v;    // this token's raw k, v rows [kv heads · hd]
  const uint16_t *qn, *kn;  // per-head RMSNorm weights [hd]
  float eps;
  const float* inv_freq;
  bool traditional;
  uint16_t *kc, *vc;        // the cache, written at the new position
};

template <int DPL, bool PREP>
__global__ void __launch_bounds__(kAttnWarps * 32) attn_partial_kernel(const uint16_t* q, int heads, int kvh,
                                                                      const uint16_t* kc, const uint16_t* vc,
                                                                      int64_t cap, int pos0, const int* dpos,
                                                                      float scale, int splits, float* scratch,
                                                                      bool preload, bool prefetch, AttnPrep prep) {
  ZMLX_TRACE_BLOCK_END();
  constexpr int HD = 32 * DPL;
  const int h = blockIdx.x, s = blockIdx.y, t = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  // The position comes from the host or from the recorded step's first
  // node (a copy), never from the previous kernel, so it is read before the
  // programmatic-launch wait.
  const int p0 = dpos ? *dpos : pos0;
  const int visible = p0 + t + 1;
  const int chunk = (visible + splits - 1) / splits;
  const int j0 = s * chunk, j1 = min(visible, j0 + chunk);
  const int g = h / (heads / kvh);
  const uint16_t* K = kc + int64_t(g) * cap * HD + lane * DPL;
  const uint16_t* V = vc + int64_t(g) * cap * HD + lane * DPL;
  // kAttnGroup positions per step (this warp's j, j + kAttnWarps, ...): all
  // their key and value loads are issued first and their warp reductions
  // interleave, instead of one dependent chain per position. The first
  // step's keys before p0 were written by earlier steps, not by the previous
  // kernel (which writes positions p0..), so with `preload` they are loaded
  // before the wait.
  const int jfirst = j0 + warp;
  float kv[kAttnGroup][DPL], vv[kAttnGroup][DPL];
  auto load_step = [&](int j, bool old_keys) {
#pragma unroll
    for (int u = 0; u < kAttnGroup; ++u) {
      const int ju = j + u * kAttnWarps;
      if (ju < j1 && (ju < p0) == old_keys) {
        if (PREP && !old_keys) {  // ju == p0: this step's key, made here
          float y[DPL];
          norm_rope_row<DPL>(prep.k + int64_t(g) * HD, prep.kn, prep.eps, prep.inv_freq, prep.traditional, ju, y);
#pragma unroll
          for (int d = 0; d < DPL; ++d) kv[u][d] = bf(to_bf(y[d]));
          load_bf16s<DPL>(prep.v + int64_t(g) * HD + lane * DPL, vv[u]);
          if (h % (heads / kvh) == 0 && ju < cap) {
            store_bf16s<DPL>(prep.kc + (int64_t(g) * cap + ju) * HD + lane * DPL, y);
            copy_bf16s<DPL>(prep.vc + (int64_t(g) * cap + ju) * HD + lane * DPL, prep.v + int64_t(g) * HD + lane * DPL);
          }
          continue;
        }
        load_bf16s<DPL>(K + int64_t(ju) * HD, kv[u]);
        load_bf16s<DPL>(V + int64_t(ju) * HD, vv[u]);
      }
    }
  };
  // The steps after the first load their keys and values after the wait,
  // one dependent round trip each, which from DRAM is the longer one (the
  // cache does not stay in L2 between steps: each token streams the weights
  // through it). So the first head of each kv group sends the split's old
  // rows (written by earlier steps) to L2 before the wait, two bulk
  // prefetches of contiguous rows.
  if (prefetch && threadIdx.x == 0 && t == 0 && h % (heads / kvh) == 0) {
    prefetch_rows_l2(kc + int64_t(g) * cap * HD, HD, j0, min(j1, p0));
    prefetch_rows_l2(vc + int64_t(g) * cap * HD, HD, j0, min(j1, p0));
  }
  if (preload) load_step(jfirst, true);
  pdl_begin();
  if (!preload) load_step(jfirst, true);
  load_step(jfirst, false);
  float qv[DPL];
  if constexpr (PREP) {
    float y[DPL];
    norm_rope_row<DPL>(q + int64_t(h) * HD, prep.qn, prep.eps, prep.inv_freq, prep.traditional, p0, y);
#pragma unroll
    for (int d = 0; d < DPL; ++d) qv[d] = bf(to_bf(y[d]));
  } else {
    load_bf16s<DPL>(q + (int64_t(t) * heads + h) * HD + lane * DPL, qv);
  }
  ZMLX_TRACE_MARK(0);  // trace: q (and the new key) normed and roped
  float m = -FLT_MAX, l = 0.f, acc[DPL];
#pragma unroll
  for (int d = 0; d < DPL; ++d) acc[d] = 0.f;
  for (int j = jfirst; j < j1; j += kAttnWarps * kAttnGroup) {
    float sc[kAttnGroup];
    if (j != jfirst) {
      load_step(j, true);
      load_step(j, false);
    }
#pragma unroll
    for (int u = 0; u < kAttnGroup; ++u) {
      sc[u] = 0.f;
#pragma unroll
      for (int d = 0; d < DPL; ++d) sc[u] = fmaf(qv[d], kv[u][d], sc[u]);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
#pragma unroll
      for (int u = 0; u < kAttnGroup; ++u) sc[u] += __shfl_xor_sync(0xffffffffu, sc[u], o);
    float mn = m;
#pragma unroll
    for (int u = 0; u < kAttnGroup; ++u) {
      sc[u] = j + u * kAttnWarps < j1 ? sc[u] * scale : -INFINITY;
      mn = fmaxf(mn, sc[u]);
    }
    const float corr = expf(m - mn);
    l *= corr;
#pragma unroll
    for (int d = 0; d < DPL; ++d) acc[d] *= corr;
#pragma unroll
    for (int u = 0; u < kAttnGroup; ++u) {
      if (j + u * kAttnWarps >= j1) break;
      const float p = expf(sc[u] - mn);
      l += p;
#pragma unroll
      for (int d = 0; d < DPL; ++d) acc[d] = fmaf(p, vv[u][d], acc[d]);
    }
    m = mn;
    if (j == jfirst) ZMLX_TRACE_MARK(3);  // trace: the first (preloaded) step done
  }
  ZMLX_TRACE_MARK(1);  // trace: every step done
  __shared__ float sm[kAttnWarps], sl[kAttnWarps], sacc[kAttnWarps][HD];
  if (lane == 0) sm[warp] = m, sl[warp] = l;
#pragma unroll
  for (int d = 0; d < DPL; ++d) sacc[warp][lane * DPL + d] = acc[d];
  __syncthreads();
  ZMLX_TRACE_MARK(2);  // trace: the warps' partials published
  store_split_partial(sm, sl, sacc, HD, scratch + ((int64_t(t) * heads + h) * splits + s) * (HD + 2));
}

// One (kv group, split) of a one-token decode step on tensor cores, every
// query head of the group in one block (attn_partial_kernel gives each head
// its own block and does every q·k and p·v on the CUDA cores, a warp
// reduction a key: at long contexts, waves of small blocks bound by
// instruction issue). The G heads' q rows are the rows of one 16-row MMA
// tile (rows G..15 zero); the split's keys and values sit in shared memory
// (swizzled rows, as the flash prefill kernel keeps them), the rows written
// by earlier steps (before p0; no kernel of this step writes them) copied
// by cp.async before the programmatic-launch wait. The new row (p0) is made
// here (PREP, as attn_partial_kernel makes it, and written to the cache) or,
// unfused, copied from the cache after the wait. G <= 8: a thread's tile
// row is lane / 4, rows 8..15 are padding. Each of the 4 warps takes
// 16-row slices of the split round robin: S = Q·Kᵀ (fp32), online softmax
// for its rows, O += bf16(P)·V (fp32), as the flash kernels do. The warps'
// states then combine, as store_split_partial does, into each head's
// partial. Shared memory: Q [16][HD], K and V [rows16][HD] (rows16: the
// longest split, to 16), then the warps' (m, l, o[HD]) for each head.
// The trace marks: 0 q and the new row in shared memory, 1 every slice
// done, 2 the warps' states published.
//
// CL: the grid is (splits, kv groups), each group's splits one thread-block
// cluster (splits <= 16; past 8 a non-portable size). CM (with CL): the
// flash-decoding merge happens in the cluster instead of attn_merge_kernel:
// split s merges heads s, s + splits, ...; every block hands each head's
// partial (m, l, acc[HD], the scratch row) to that head's merging block by
// st.async into a receive area of its shared memory, counted against a
// barrier there (set up before the programmatic-launch wait, as the router
// launches' LogitsToBlock0), and the merging block runs the merge kernel's
// own code (merge_split_partials, register form) on it: the same bits, one
// kernel and its boundary fewer a layer. (A cluster a query head with split
// 0 merging after a cluster barrier measured 6 % slower, 2026-11-26.)
// CL without CM only measures what the cluster launch costs.
//
// ST (long splits): the split streams through kAttnStages buffers of
// kAttnStageRows rows (one 16-row slice a warp) instead of sitting in
// shared memory whole: stage c (rows 64c..64c+63) is copied while the
// stages before it are computed, the first kAttnStages before the wait. A
// warp still takes slices warp, warp + 4, ... in order, so the arithmetic
// and the bits are the one-shot form's. The new row goes into its stage's
// buffer (or, for a stage copied after the wait, from a slot the copy reads),
// and the warps' states reuse the key buffers once every slice is done.
// Shared memory no longer grows with the split, so long contexts keep
// several blocks an SM and the tensor cores (the one-shot form held 1 block
// an SM at 32K positions and gave way to the per-head kernel past 34,816).
constexpr int kAttnMmaWarps = 4;
constexpr int kAttnStageRows = kAttnMmaWarps * 16;
constexpr int kAttnStages = 2;
__host__ __device__ constexpr int attn_rows16(int rows) { return (rows + 15) / 16 * 16; }
template <int HD, bool PREP, bool CL = false, bool CM = false, bool ST = false>
__global__ void __launch_bounds__(kAttnMmaWarps * 32) attn_group_mma_kernel(const uint16_t* q, int heads, int kvh,
                                                                            const uint16_t* kc, const uint16_t* vc,
                                                                            int64_t cap, int pos0, const int* dpos,
                                                                            float scale, int splits, int rows,
                                                                            float* scratch, AttnPrep prep,
                                                                            uint16_t* merged) {
  static_assert(CL || !CM, "the merge in the cluster needs the cluster launch");
  static_assert(!(ST && CL), "streamed splits are long ones: no cluster");
  ZMLX_TRACE_BLOCK_END();
  constexpr int DPL = HD / 32, RB = HD * 2, CH = HD / 8;  // lane's dims, row bytes, 16-byte chunks a row
  extern __shared__ __align__(128) uint8_t attn_smem[];
  const int rows16 = ST ? kAttnStages * kAttnStageRows : attn_rows16(rows);  // rows of the K and V areas
  uint8_t* sQ = attn_smem;
  uint8_t* sK = sQ + 16 * RB;
  uint8_t* sV = sK + rows16 * RB;
  uint8_t* sNew = sV + rows16 * RB;  // ST: the new row's key and value, for a stage copied after the wait
  // [warp][head][HD + 4]; ST: in the key buffers, once every slice is done.
  float* states = reinterpret_cast<float*>(ST ? sK : sV + rows16 * RB);
  const int G = heads / kvh, g = CL ? blockIdx.y : blockIdx.x, s = CL ? blockIdx.x : blockIdx.y;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  // CM: the partials of the heads this block merges, [slot][split][HD + 2]
  // (head s + slot·splits), and the barrier that counts their bytes.
  float* recv = states + kAttnMmaWarps * (heads / kvh) * (HD + 4);
  __shared__ __align__(8) uint64_t arrived;
  const int merges = CM && s < G ? (G - 1 - s) / splits + 1 : 0;
  if constexpr (CM) mbar_prepare_cluster(&arrived, merges > 0, uint32_t(merges * splits * (HD + 2) * 4));
  const int p0 = dpos ? *dpos : pos0;  // from the host or the step's first node: read before the wait
  const int visible = p0 + 1;
  const int chunk = (visible + splits - 1) / splits;
  const int j0 = s * chunk, j1 = min(visible, j0 + chunk), jo = min(j1, p0);
  const int n = max(j1 - j0, 0), nold = max(jo - j0, 0);  // the split's rows, and its old ones
  const uint32_t aQ = smem_addr(sQ), aK = smem_addr(sK), aV = smem_addr(sV);
  const uint16_t* gk = kc + (int64_t(g) * cap + j0) * HD;
  const uint16_t* gv = vc + (int64_t(g) * cap + j0) * HD;
  // Split rows [r0, r1) into shared memory rows from r0 - shift: old rows
  // copied; the rows after the split's last, to its 16-row end, zero-filled
  // (0·V must not meet stale NaNs); the new row (nold, when n > nold) from
  // sNew when `new_from_slot`, else left to the warp that makes it.
  auto copy_rows = [&](int r0, int r1, int shift, bool new_from_slot) {
    for (int i = tid + r0 * CH; i < r1 * CH; i += blockDim.x) {
      const int r = i / CH, c = i % CH, sr = r - shift;
      if (r < nold || r >= n) {
        const bool ok = r < nold;
        cp_async16(aK + swz(sr, c, RB), ok ? gk + int64_t(r) * HD + c * 8 : kc, ok);
        cp_async16(aV + swz(sr, c, RB), ok ? gv + int64_t(r) * HD + c * 8 : vc, ok);
      } else if (new_from_slot) {
        *reinterpret_cast<uint4*>(sK + swz(sr, c, RB)) = *reinterpret_cast<const uint4*>(sNew + c * 16);
        *reinterpret_cast<uint4*>(sV + swz(sr, c, RB)) = *reinterpret_cast<const uint4*>(sNew + RB + c * 16);
      }
    }
    cp_async_commit();
  };
  // ST: stage c's rows into buffer c % kAttnStages (an empty group past the
  // split's end, so a wait counts groups alike every iteration).
  auto copy_stage = [&](int c, bool after_wait) {
    const int r0 = c * kAttnStageRows;
    copy_rows(r0, min(r0 + kAttnStageRows, attn_rows16(n)), r0 - (c % kAttnStages) * kAttnStageRows, after_wait);
  };
  {
    if constexpr (ST) {
#pragma unroll
      for (int c = 0; c < kAttnStages; ++c) copy_stage(c, false);
    } else {
      copy_rows(0, attn_rows16(n), 0, false);
    }
    for (int i = tid; i < (16 - G) * CH; i += blockDim.x)
      *reinterpret_cast<uint4*>(sQ + swz(G + i / CH, i % CH, RB)) = make_uint4(0u, 0u, 0u, 0u);
  }
  pdl_begin();
  // After the wait: the heads' q rows (normed and roped here with PREP) as
  // bf16 tile rows, and the new row. A warp has up to two q rows (G <= 8)
  // and the last warp the new row too: every load is issued before the
  // first use, one round trip for all.
  {
    constexpr int QR = 8 / kAttnMmaWarps;
    const bool has_new = n > nold && warp == kAttnMmaWarps - 1;
    const int col = lane * DPL;
    float x[QR][DPL], xk[DPL], xv[DPL], wq[DPL], wk[DPL], fr[DPL];
#pragma unroll
    for (int i = 0; i < QR; ++i)
      if (warp + i * kAttnMmaWarps < G) load_bf16s<DPL>(q + int64_t(g * G + warp + i * kAttnMmaWarps) * HD + col, x[i]);
    if (has_new) {  // raw from the projection (PREP), or the cache row the previous kernel wrote
      load_bf16s<DPL>((PREP ? prep.k + int64_t(g) * HD : kc + (int64_t(g) * cap + p0) * HD) + col, xk);
      load_bf16s<DPL>((PREP ? prep.v + int64_t(g) * HD : vc + (int64_t(g) * cap + p0) * HD) + col, xv);
    }
    if constexpr (PREP) {
      load_bf16s<DPL>(prep.qn + col, wq);
      if (has_new) load_bf16s<DPL>(prep.kn + col, wk);
      load_rope_freqs<DPL>(prep.inv_freq, prep.traditional, fr);
    }
    const int off = col * 2;  // the lane's bytes within a row
#pragma unroll
    for (int i = 0; i < QR; ++i) {
      const int hh = warp + i * kAttnMmaWarps;
      if (hh >= G) break;
      float y[DPL];
      if constexpr (PREP) norm_rope_loaded<DPL>(x[i], wq, fr, prep.eps, prep.traditional, p0, y);
      if constexpr (!PREP)
#pragma unroll
        for (int d = 0; d < DPL; ++d) y[d] = x[i][d];
      store_bf16s<DPL>(reinterpret_cast<uint16_t*>(sQ + swz(hh, off / 16, RB) + off % 16), y);
    }
    if (has_new) {  // the split holding p0
      float y[DPL];
      if constexpr (PREP) {
        norm_rope_loaded<DPL>(xk, wk, fr, prep.eps, prep.traditional, p0, y);
        if (p0 < cap) {
          store_bf16s<DPL>(prep.kc + (int64_t(g) * cap + p0) * HD + col, y);
          store_bf16s<DPL>(prep.vc + (int64_t(g) * cap + p0) * HD + col, xv);
        }
      } else {
#pragma unroll
        for (int d = 0; d < DPL; ++d) y[d] = xk[d];
      }
      // Its stage's buffer row, or (ST, a stage copied after the wait) the slot.
      const int stage = nold / kAttnStageRows;
      if (!ST || stage < kAttnStages) {
        const int sr = ST ? nold - (stage - stage % kAttnStages) * kAttnStageRows : nold;
        store_bf16s<DPL>(reinterpret_cast<uint16_t*>(sK + swz(sr, off / 16, RB) + off % 16), y);
        store_bf16s<DPL>(reinterpret_cast<uint16_t*>(sV + swz(sr, off / 16, RB) + off % 16), xv);
      } else {
        store_bf16s<DPL>(reinterpret_cast<uint16_t*>(sNew + off), y);
        store_bf16s<DPL>(reinterpret_cast<uint16_t*>(sNew + RB + off), xv);
      }
    }
  }
  ZMLX_TRACE_MARK(0);  // trace: q (and the new row) in shared memory
  if constexpr (ST) cp_async_wait<kAttnStages - 1>();  // stage 0
  else cp_async_wait<0>();
  __syncthreads();
  uint32_t qa[HD / 16][4];  // Q as the A operand, every k-step
#pragma unroll
  for (int kk = 0; kk < HD / 16; ++kk) ldmatrix_x4(qa[kk], aQ + swz(lane & 15, kk * 2 + (lane >> 4), RB));
  float o[HD / 8][4];
#pragma unroll
  for (int t = 0; t < HD / 8; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[t][e] = 0.f;
  float m = -FLT_MAX, l = 0.f;  // of tile row lane / 4 (head lane / 4 where < G); rows +8 are padding
  // One 16-row slice: split rows from `base`, at shared-memory row `sbase`.
  auto slice = [&](int base, int sbase) {
    float sc[2][4] = {};
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
      uint32_t b[4];
      ldmatrix_x4(b, aK + swz(sbase + (lane & 7) + ((lane >> 4) << 3), kk * 2 + ((lane >> 3) & 1), RB));
      mma_bf16(sc[0], qa[kk], b[0], b[1]);
      mma_bf16(sc[1], qa[kk], b[2], b[3]);
    }
    float mx = m;
#pragma unroll
    for (int t = 0; t < 2; ++t)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int r = base + t * 8 + (lane & 3) * 2 + e;
        sc[t][e] = r < n ? sc[t][e] * scale : -INFINITY;
        mx = fmaxf(mx, sc[t][e]);
      }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float corr = expf(m - mx);
    m = mx;
    l *= corr;
#pragma unroll
    for (int t = 0; t < HD / 8; ++t) o[t][0] *= corr, o[t][1] *= corr;
    float p[2][2];
#pragma unroll
    for (int t = 0; t < 2; ++t)
#pragma unroll
      for (int e = 0; e < 2; ++e) p[t][e] = expf(sc[t][e] - mx), l += p[t][e];
    // P as the A operand of P·V: this thread's tile row (lane / 4) at keys
    // 2·(lane % 4) + {0, 1} and + 8; the padding rows (+8) are zero.
    const uint32_t pa[4] = {pack_bf2(p[0][0], p[0][1]), 0u, pack_bf2(p[1][0], p[1][1]), 0u};
    const int vrow = sbase + (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
    for (int t = 0; t < HD / 16; ++t) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, aV + swz(vrow, t * 2 + (lane >> 4), RB));
      mma_bf16(o[2 * t], pa, b[0], b[1]);
      mma_bf16(o[2 * t + 1], pa, b[2], b[3]);
    }
  };
  if constexpr (ST) {
    const int stages = (n + kAttnStageRows - 1) / kAttnStageRows;
    for (int c = 0; c < stages; ++c) {
      if (c > 0) {
        cp_async_wait<kAttnStages - 1>();  // stage c
        __syncthreads();
      }
      const int base = c * kAttnStageRows + warp * 16;
      if (base < n) slice(base, (c % kAttnStages) * kAttnStageRows + warp * 16);
      __syncthreads();  // every warp is done with buffer c % kAttnStages
      copy_stage(c + kAttnStages, true);
    }
    cp_async_wait<0>();  // nothing left in flight (the groups past the end are empty)
  } else {
    for (int base = warp * 16; base < n; base += kAttnMmaWarps * 16) slice(base, base);
  }
  ZMLX_TRACE_MARK(1);  // trace: every slice done
  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
  // Each warp's state of each head: (m, l, -, -, o[HD]), rows of HD + 4
  // floats so that o is 16-byte aligned.
  constexpr int SR = HD + 4;
  const int hh = lane >> 2;
  if (hh < G) {
    float* st = states + (warp * G + hh) * SR;
    if ((lane & 3) == 0) st[0] = m, st[1] = l;
#pragma unroll
    for (int t = 0; t < HD / 8; ++t)
      *reinterpret_cast<float2*>(st + 4 + t * 8 + (lane & 3) * 2) = make_float2(o[t][0], o[t][1]);
  }
  __syncthreads();
  ZMLX_TRACE_MARK(2);  // trace: the warps' states published
  // The heads' partials, as store_split_partial combines warps: a thread
  // 8 dimensions of one head (G·HD/8 <= 128 of them), every load at once.
  for (int i = tid; i < G * HD / 8; i += blockDim.x) {
    const int h = i / (HD / 8), d0 = i % (HD / 8) * 8;
    float ms[kAttnMmaWarps], ls[kAttnMmaWarps], v[kAttnMmaWarps][8];
#pragma unroll
    for (int w = 0; w < kAttnMmaWarps; ++w) {
      const float* st = states + (w * G + h) * SR;
      ms[w] = st[0], ls[w] = st[1];
      const float4 lo = *reinterpret_cast<const float4*>(st + 4 + d0);
      const float4 hi = *reinterpret_cast<const float4*>(st + 8 + d0);
      v[w][0] = lo.x, v[w][1] = lo.y, v[w][2] = lo.z, v[w][3] = lo.w;
      v[w][4] = hi.x, v[w][5] = hi.y, v[w][6] = hi.z, v[w][7] = hi.w;
    }
    float M = -FLT_MAX;
#pragma unroll
    for (int w = 0; w < kAttnMmaWarps; ++w)
      if (ls[w] > 0.f) M = fmaxf(M, ms[w]);
    float L = 0.f, a[8] = {};
#pragma unroll
    for (int w = 0; w < kAttnMmaWarps; ++w) {
      if (!(ls[w] > 0.f)) continue;
      const float e = expf(ms[w] - M);
      L = fmaf(ls[w], e, L);
#pragma unroll
      for (int j = 0; j < 8; ++j) a[j] = fmaf(v[w][j], e, a[j]);
    }
    if constexpr (CM) {  // into the merging block's receive area (the same offsets there)
      const uint32_t to = uint32_t(h % splits);
      const float* row = recv + (int64_t(h / splits) * splits + s) * (HD + 2);
#pragma unroll
      for (int j = 0; j < 8; j += 2) st_async_cluster_v2(row + 2 + d0 + j, &arrived, to, a[j], a[j + 1]);
      if (d0 == 0) st_async_cluster_v2(row, &arrived, to, M, L);
    } else {
      float* out = scratch + (int64_t(g * G + h) * splits + s) * (HD + 2);  // 8-byte aligned rows
#pragma unroll
      for (int j = 0; j < 8; j += 2) *reinterpret_cast<float2*>(out + 2 + d0 + j) = make_float2(a[j], a[j + 1]);
      if (d0 == 0) out[0] = M, out[1] = L;
    }
  }
  if constexpr (CM) {
    if (merges == 0) return;
    mbar_wait_cluster(&arrived, 0);
    ZMLX_TRACE_MARK(3);  // trace: every split's partials here
    for (int i = 0; i < merges; ++i)
      merge_split_partials(recv + int64_t(i) * splits * (HD + 2), HD, splits,
                           merged + int64_t(g * G + s + i * splits) * HD);
  }
}

__global__ void attn_merge_kernel(const float* scratch, int heads, int hd, int splits, uint16_t* out, bool in_registers,
                                  bool trigger_first) {
  ZMLX_TRACE_BLOCK_END();
  pdl_begin(trigger_first);
  const int h = blockIdx.x, t = blockIdx.y;
  merge_split_partials(scratch + (int64_t(t) * heads + h) * splits * (hd + 2), hd, splits,
                       out + (int64_t(t) * heads + h) * hd, in_registers);
}

// The merge above kRegMergeSplits splits (long contexts; up to
// kMaxMergeSplits): a block per (head, token, 32 dimensions), 8 warps, the
// lane a dimension, warp w summing splits w, w + 8, ... Every load (each
// split's m and l, the lane's values) is issued at the start: one round trip.
// The shared-memory form (one thread working out the weights in a loop, then
// rounds of 8 loads a thread) took 8 us a layer at 48 splits and 18 at 128 in
// a Qwen3 step. Weights as there: M the largest m of the splits that saw a
// key, w_s = exp(m_s - M); but L = Σ l_s·w_s and the values' sums in another
// (fixed) order: warp sums, then the warps in order.
constexpr int kWideMergeWarps = 8;
static_assert(kMaxMergeSplits <= kWideMergeWarps * 32, "a thread a split's m and l");
__global__ void __launch_bounds__(kWideMergeWarps * 32) attn_merge_wide_kernel(const float* scratch, int heads, int D,
                                                                               int splits, uint16_t* out,
                                                                               bool trigger_first) {
  ZMLX_TRACE_BLOCK_END();
  pdl_begin(trigger_first);
  constexpr int PER = kMaxMergeSplits / kWideMergeWarps;
  const int h = blockIdx.x, t = blockIdx.y, tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int d = blockIdx.z * 32 + lane;
  const float* base = scratch + (int64_t(t) * heads + h) * splits * (D + 2);
  const bool mine = tid < splits;
  const float mi = mine ? base[tid * (D + 2)] : -FLT_MAX, li = mine ? base[tid * (D + 2) + 1] : 0.f;
  float v[PER];
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int sp = warp + i * kWideMergeWarps;
    v[i] = sp < splits && d < D ? base[sp * (D + 2) + 2 + d] : 0.f;
  }
  __shared__ float s_w[kMaxMergeSplits], s_max[kWideMergeWarps], s_sum[kWideMergeWarps],
      s_part[kWideMergeWarps][32];
  const float mm = warp_max(li > 0.f ? mi : -FLT_MAX);
  if (lane == 0) s_max[warp] = mm;
  __syncthreads();
  float M = s_max[0];
#pragma unroll
  for (int w = 1; w < kWideMergeWarps; ++w) M = fmaxf(M, s_max[w]);
  const float wi = li > 0.f ? expf(mi - M) : 0.f;  // 0: the split saw no key
  if (mine) s_w[tid] = wi;
  const float lw = warp_sum(li > 0.f ? li * wi : 0.f);
  if (lane == 0) s_sum[warp] = lw;
  __syncthreads();
  float a = 0.f;
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int sp = warp + i * kWideMergeWarps;
    if (sp < splits && s_w[sp] > 0.f) a = fmaf(v[i], s_w[sp], a);
  }
  s_part[warp][lane] = a;
  __syncthreads();
  if (warp != 0 || d >= D) return;
  float L = 0.f, r = 0.f;
#pragma unroll
  for (int w = 0; w < kWideMergeWarps; ++w) L += s_sum[w], r += s_part[w][lane];
  out[(int64_t(t) * heads + h) * D + d] = to_bf(r * (1.0f / L));
}

// ------------------------------------------------------------------ routers

constexpr int kRouteMaxPerLane = 16;  // E <= 512

// Warp-wide argmax over (value desc, id asc) of the not-yet-taken entries.
__device__ __forceinline__ void warp_best(float v, int id, float& bv, int& bid) {
  bv = v, bid = id;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oid = __shfl_xor_sync(0xffffffffu, bid, o);
    if (ov > bv || (ov == bv && oid < bid)) bv = ov, bid = oid;
  }
}

// Floats as unsigned ints in the same order (for the warp's integer max).
__device__ __forceinline__ uint32_t ordered_bits(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
// ordered_bits' inverse.
__device__ __forceinline__ float from_ordered_bits(uint32_t o) {
  return __uint_as_float((o & 0x80000000u) ? (o & 0x7fffffffu) : ~o);
}

// vals[i] of the lane that owns expert sel (lane sel % 32, slot sel / 32),
// broadcast to the whole warp.
template <int PL>
__device__ __forceinline__ float owner_value(const float (&vals)[PL], int sel) {
  const int lane = threadIdx.x & 31;
  float mine = 0.f;
#pragma unroll
  for (int i = 0; i < PL; ++i)
    if (lane + 32 * i == sel) mine = vals[i];
  return __shfl_sync(0xffffffffu, mine, sel & 31);
}

// The routers' selection, one warp per token (lane L holds experts L, L+32,
// ...): the top k of `key` in descending order, ties to the lower id. Pick j
// ends in lane j (its id and its entry of `vals`), and every lane gets the
// fp32 sum of the picked vals in pick order (the renormalisation sum). Each
// pick is two warp-wide integer reductions (max key, then the lowest id
// holding it) instead of a shuffle tree per pick.
template <int PL>
__device__ void warp_topk_picks(const float (&key)[PL], const float (&vals)[PL], int E, int k, int& my_id,
                                float& my_val, float& total) {
  const int lane = threadIdx.x & 31;
  uint32_t ok[PL];
#pragma unroll
  for (int i = 0; i < PL; ++i) ok[i] = ordered_bits(key[i]);
  uint32_t taken = 0;
  total = 0.f;
  my_id = 0, my_val = 0.f;
  for (int j = 0; j < k; ++j) {
    // This lane's best untaken expert (ids ascend with i: strict > keeps the lower id).
    uint32_t best = 0;
    int id = INT_MAX;
#pragma unroll
    for (int i = 0; i < PL; ++i) {
      const int e = lane + 32 * i;
      if (e < E && !(taken >> i & 1u) && (id == INT_MAX || ok[i] > best)) best = ok[i], id = e;
    }
    const uint32_t top = __reduce_max_sync(0xffffffffu, id == INT_MAX ? 0u : best);
    const int pick = int(__reduce_min_sync(0xffffffffu, (id != INT_MAX && best == top) ? uint32_t(id) : 0xffffffffu));
    if ((pick & 31) == lane) taken |= 1u << (pick >> 5);
    const float v = owner_value(vals, pick);
    total += v;
    if (lane == j) my_id = pick, my_val = v;
  }
}

// warp_topk_picks for keys that are their own values and exact bf16 values
// (the softmax router's rounded probabilities): the top 16 bits of a key's
// ordered_bits order it exactly (its low 16 are all equal within a sign), so
// key and id pack into one word, (ordered key) << 16 | (0xFFFF - id), and
// one warp-wide max per pick finds the largest key and, among equal keys,
// the lowest id; the value comes back from the word. warp_topk_picks takes
// two reductions and a shuffle a pick (Qwen3: 8 dependent picks). The same
// picks, order and pick-order sum, so the same bits (GPU test
// RouterPackedTopKIsBitIdentical; ZMLX_CUDA_PACKED_TOPK=0: warp_topk_picks).
template <int PL>
__device__ void warp_topk_packed(const float (&key)[PL], int E, int k, int& my_id, float& my_val, float& total) {
  const int lane = threadIdx.x & 31;
  uint32_t pk[PL];
#pragma unroll
  for (int i = 0; i < PL; ++i) {
    const int e = lane + 32 * i;
    pk[i] = e < E ? (ordered_bits(key[i]) & 0xFFFF0000u) | uint32_t(0xFFFF - e) : 0u;
  }
  total = 0.f;
  my_id = 0, my_val = 0.f;
  for (int j = 0; j < k; ++j) {
    uint32_t best = 0;
#pragma unroll
    for (int i = 0; i < PL; ++i) best = max(best, pk[i]);
    const uint32_t top = __reduce_max_sync(0xffffffffu, best);
    const int pick = 0xFFFF - int(top & 0xFFFFu);
#pragma unroll
    for (int i = 0; i < PL; ++i)
      if (pk[i] == top) pk[i] = 0u;  // ids are unique: only the pick's own word
    const uint32_t ob = top & 0x80000000u ? (top & 0xFFFF0000u) : (top | 0x0000FFFFu);
    const float v = from_ordered_bits(ob);
    total += v;
    if (lane == j) my_id = pick, my_val = v;
  }
}

// One token's softmax top-k (route_softmax_kernel), one warp: logits l
// [E] (global or shared memory, expert e's at l[LS·e]) -> its k ids and
// bf16 scores.
template <int PL, int LS = 1>
__device__ __forceinline__ void route_softmax_token(const uint16_t* l, int E, int k, bool normalize, bool packed,
                                                    int32_t* ex, uint16_t* scores) {
  const int lane = threadIdx.x & 31;
  float z[PL], ez[PL], p[PL];
  // The max as one warp-wide integer max of the logits' ordered bits (a
  // NaN counted as -inf, as fmaxf skips it): the same value as five
  // shuffle-and-fmaxf rounds, in one instruction of the one warp's chain.
  uint32_t om = ordered_bits(-INFINITY);
  #pragma unroll
  for (int i = 0; i < PL; ++i) {
    const int e = lane + 32 * i;
    z[i] = e < E ? bf(l[LS * e]) : -INFINITY;
    om = max(om, ordered_bits(z[i] == z[i] ? z[i] : -INFINITY));
  }
  const float mx = from_ordered_bits(__reduce_max_sync(0xffffffffu, om));
  // Each exp once (the sum and the probabilities read the same values).
  float sum = 0.f;
  #pragma unroll
  for (int i = 0; i < PL; ++i) {
    ez[i] = (lane + 32 * i < E) ? expf(z[i] - mx) : 0.f;
    sum += ez[i];
  }
  sum = warp_sum(sum);
  #pragma unroll
  for (int i = 0; i < PL; ++i) p[i] = lane + 32 * i < E ? rbf(ez[i] / sum) : -INFINITY;
  int id;
  float w, total;
  if (packed)
    warp_topk_packed(p, E, k, id, w, total);
  else
    warp_topk_picks(p, p, E, k, id, w, total);
  if (lane < k) {
    const float denom = rbf(total);
    ex[lane] = id;
    scores[lane] = to_bf(normalize ? w / denom : w);
  }
}

template <int PL>
__global__ void route_softmax_kernel(const uint16_t* logits, int T, int E, int k, bool normalize, int32_t* ex,
                                     uint16_t* scores, bool packed, bool trigger_first) {
  ZMLX_TRACE_BLOCK_END();
  pdl_begin(trigger_first);
  const int t = blockIdx.x * 4 + (threadIdx.x >> 5);
  if (t >= T) return;
  route_softmax_token<PL>(logits + int64_t(t) * E, E, k, normalize, packed, ex + int64_t(t) * k,
                          scores + int64_t(t) * k);
  ZMLX_TRACE_MARK(1);  // trace: the picks stored
}

// One token's sigmoid + bias top-k (route_sigmoid_kernel), one warp.
template <int PL, int LS = 1>
__device__ __forceinline__ void route_sigmoid_token(const uint16_t* l, const float* bias, int E, int k,
                                                    bool normalize, float eps, float scaling, int32_t* ex,
                                                    uint16_t* scores) {
  const int lane = threadIdx.x & 31;
  float sw[PL], sel_key[PL];
  #pragma unroll
  for (int i = 0; i < PL; ++i) {
    const int e = lane + 32 * i;
    sw[i] = e < E ? rbf(1.0f / (1.0f + expf(-bf(l[LS * e])))) : 0.f;
    sel_key[i] = e < E ? sw[i] + bias[e] : -INFINITY;
  }
  int id;
  float w, total;
  warp_topk_picks(sel_key, sw, E, k, id, w, total);
  if (lane < k) {
    const float denom = rbf(rbf(total) + eps);
    if (normalize) w = rbf(w / denom);
    ex[lane] = id;
    scores[lane] = to_bf(w * scaling);
  }
}

template <int PL>
__global__ void route_sigmoid_kernel(const uint16_t* logits, const float* bias, int T, int E, int k, bool normalize,
                                     float eps, float scaling, int32_t* ex, uint16_t* scores, bool trigger_first) {
  ZMLX_TRACE_BLOCK_END();
  pdl_begin(trigger_first);
  const int t = blockIdx.x * 4 + (threadIdx.x >> 5);
  if (t >= T) return;
  route_sigmoid_token<PL>(logits + int64_t(t) * E, bias, E, k, normalize, eps, scaling, ex + int64_t(t) * k,
                          scores + int64_t(t) * k);
}

// ---------------------------------------------------------------- short conv

constexpr int kConvMaxL = 8;

// One channel's step of the short conv (Backend::short_conv), for one token
// of [B | C | x] values b, cv, xv: win holds the channel's last L-1 Bx values,
// oldest first, and wc its L weights; returns bf16(C · conv) and shifts Bx
// into win. The terms are added in k order, as the composition's. Every
// short-conv kernel calls it, so they share its bits.
__device__ __forceinline__ uint16_t conv_channel_step(uint16_t (&win)[kConvMaxL], const uint16_t (&wc)[kConvMaxL],
                                                      int L, uint16_t b, uint16_t cv, uint16_t xv) {
  const uint16_t bx = to_bf(bf(b) * bf(xv));
#pragma unroll
  for (int i = 0; i < kConvMaxL; ++i)
    if (i == L - 1) win[i] = bx;
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < kConvMaxL; ++i)
    if (i < L) acc += bf(win[i]) * bf(wc[i]);
#pragma unroll
  for (int i = 0; i + 1 < kConvMaxL; ++i)
    if (i + 1 < L) win[i] = win[i + 1];
  return to_bf(bf(cv) * rbf(acc));
}
// Channel c's window (the last L-1 Bx values from state [L-1, C]) and weights (w [C, L]).
__device__ __forceinline__ void conv_channel_load(const uint16_t* state, const uint16_t* w, int64_t C, int L,
                                                  int64_t c, uint16_t (&win)[kConvMaxL], uint16_t (&wc)[kConvMaxL]) {
#pragma unroll
  for (int i = 0; i < kConvMaxL; ++i) {
    win[i] = i + 1 < L ? state[int64_t(i) * C + c] : uint16_t(0);
    wc[i] = i < L ? w[c * L + i] : uint16_t(0);
  }
}
__device__ __forceinline__ void conv_channel_store(uint16_t* state, int64_t C, int L, int64_t c,
                                                   const uint16_t (&win)[kConvMaxL]) {
#pragma unroll
  for (int i = 0; i + 1 < kConvMaxL; ++i)
    if (i + 1 < L) state[int64_t(i) * C + c] = win[i];
}

__global__ void short_conv_kernel(const uint16_t* bcx, int T, int C, uint16_t* state, const uint16_t* w, int L,
                                  uint16_t* out) {
  ZMLX_TRACE_BLOCK_END();
  pdl_begin();
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  uint16_t win[kConvMaxL], wc[kConvMaxL];
  conv_channel_load(state, w, C, L, c, win, wc);
  for (int t = 0; t < T; ++t) {
    const uint16_t* row = bcx + int64_t(t) * 3 * C;
    out[int64_t(t) * C + c] = conv_channel_step(win, wc, L, row[c], row[C + c], row[2 * C + c]);
  }
  conv_channel_store(state, C, L, c, win);
}

// LFM2's conv block at one token: in_proj (rows [B | C | x], 3C of them,
// 4-bit, the MMA path) and the short conv in one launch. Why: the short conv
// was a kernel of its own (16 blocks of a few hundred operations) between
// in_proj and out_proj, 3-4 us of a 42-43 us conv layer in two traces of an
// LFM2 step (H100, 2026-11-27), most of it the kernel boundary and its ramp.
// Block b computes the three 16-row tiles holding B, C and x of channels
// 16b..16b+15 (tiles b, C/16 + b and 2C/16 + b), S warps a tile, exactly as
// mma_decode_kernel computes a tile (mma_tile, mma_split_sum in split order,
// bf16 rounding: linear's bits), then 16 threads run those channels' conv
// step (conv_channel_step: short_conv's bits). Each channel's state belongs
// to one block, so the in-place update races with nothing; the state and
// the conv weights are read before the programmatic-launch wait (the state
// was last written by this layer's previous step).
// Residency (LFM2, H100, 2026-11-27 A/Bs): uncapped the kernel took 109
// registers, and out_proj's blocks (48 registers x 256 threads) fit only one
// beside each of its 12-warp blocks; at 104 two fit. 96 (a small spill) was
// no better. out_proj is let launch only once this kernel's MMA steps are
// done (late_trigger): launched at the wait, all its blocks were resident
// ~5 us early, yet ~12 of 256 ended 0.8-1.8 us after the median (perhaps
// stacked on the 4 SMs these 128 blocks leave free: the trace had no SM ids
// then; it records them now, unchecked for this kernel), and decode was 1-2 %
// slower than with the late trigger. The same bits either way.
template <int S>
__global__ void __maxnreg__(104)
    mma_conv_decode_kernel(const uint16_t* x, QMat m, uint16_t* state, const uint16_t* w, int L, uint16_t* out,
                           bool preload, bool late_trigger) {
  ZMLX_TRACE_BLOCK_END();
  extern __shared__ __align__(16) uint32_t mma_smem[];
  __shared__ uint16_t bcx[48];  // the block's B, C and x values, bf16
  const int64_t K = m.cols, C = m.rows / 3;
  float* red = reinterpret_cast<float*>(mma_smem + mma_stage_words(K));
  const int warp = threadIdx.x >> 5, sp = warp % S, part_of = warp / S;
  const int64_t r0 = (part_of * (C / 16) + blockIdx.x) * 16;
  const QMat ms[1] = {m};
  const MmaRows rw = mma_rows(ms, r0);
  MmaStep<1> cur;
  if (preload) mma_first_step(cur, ms, 0, rw, sp, S);
  const int64_t c = int64_t(blockIdx.x) * 16 + threadIdx.x;
  uint16_t win[kConvMaxL], wc[kConvMaxL];
  if (threadIdx.x < 16) conv_channel_load(state, w, C, L, c, win, wc);
  pdl_begin(false, !late_trigger);
  if (!preload) mma_first_step(cur, ms, 0, rw, sp, S);
  mma_stage_x(x, K, mma_smem);
  __syncthreads();
  float part[1][2];
  mma_tile<1>(ms, 0, rw, cur, mma_smem, sp, S, part);
  if (late_trigger) pdl_trigger();
  mma_publish_partials<1>(red, part);
  __syncthreads();
  if (threadIdx.x < 48) {
    const int q = threadIdx.x >> 4, rr = threadIdx.x & 15;
    bcx[threadIdx.x] = to_bf(mma_split_sum(red, q * S, S, 16, rr));
  }
  __syncthreads();
  if (threadIdx.x < 16) {
    out[c] = conv_channel_step(win, wc, L, bcx[threadIdx.x], bcx[16 + threadIdx.x], bcx[32 + threadIdx.x]);
    conv_channel_store(state, C, L, c, win);
  }
}

// argmax of one bf16 row (ties to the lower id), one block. 16-byte loads,
// four in flight per thread: a 152k vocabulary is ~5 round trips to memory
// instead of ~150 dependent 2-byte loads. With `step` set (chained greedy
// decoding) the id also becomes the next step's input: step[0] = id,
// ring[step[1] % ring_len] = id, step[1] += 1.
__device__ __forceinline__ void argmax_take(float v, int i, float& bv, int& bi) {
  if (v > bv || (v == bv && i < bi)) bv = v, bi = i;
}

// 1,024 threads: the bound keeps ptxas at 64 registers or fewer (the trace
// build's per-block record had taken it past that: a failed launch).
__global__ void __launch_bounds__(1024) argmax_kernel(const uint16_t* x, int64_t V, int32_t* out, int32_t* step,
                                                      int32_t* ring, int ring_len) {
  ZMLX_TRACE_BLOCK_END();
  pdl_begin();
  __shared__ float sv[32];
  __shared__ int si[32];
  float bv = -INFINITY;
  int bi = INT_MAX;
  const bool vec = (reinterpret_cast<uintptr_t>(x) & 15) == 0;
  const int64_t nvec = vec ? V / 8 : 0;
  const uint4* xv = reinterpret_cast<const uint4*>(x);
  constexpr int kUnroll = 4;
  for (int64_t base = 0; base < nvec; base += int64_t(blockDim.x) * kUnroll) {
    uint4 q[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = base + u * int64_t(blockDim.x) + threadIdx.x;
      q[u] = j < nvec ? __ldg(xv + j) : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = base + u * int64_t(blockDim.x) + threadIdx.x;
      if (j >= nvec) break;
      const int i0 = int(j * 8);
      const uint32_t w[4] = {q[u].x, q[u].y, q[u].z, q[u].w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        argmax_take(lo_bf(w[j]), i0 + 2 * j, bv, bi);
        argmax_take(hi_bf(w[j]), i0 + 2 * j + 1, bv, bi);
      }
    }
  }
  for (int64_t i = nvec * 8 + threadIdx.x; i < V; i += blockDim.x) argmax_take(bf(x[i]), int(i), bv, bi);
  float ov;
  int oi;
  warp_best(bv, bi, ov, oi);
  if ((threadIdx.x & 31) == 0) sv[threadIdx.x >> 5] = ov, si[threadIdx.x >> 5] = oi;
  __syncthreads();
  if (threadIdx.x < 32) {
    const int nw = blockDim.x / 32;
    warp_best(threadIdx.x < nw ? sv[threadIdx.x] : -INFINITY, threadIdx.x < nw ? si[threadIdx.x] : INT_MAX, ov, oi);
    if (threadIdx.x == 0) {
      if (out) *out = oi;
      if (step) publish_chained_token(oi, step, ring, ring_len);
    }
  }
}

// ------------------------------------------------------------- GLM (MLA)

constexpr int kPeMaxPerLane = 16;  // dk, dv <= 512

// attention_pe partials (Backend::attention_pe), same split/merge scheme as
// attn_partial_kernel; scratch rows are (dv + 2) floats.
__global__ void __launch_bounds__(kAttnWarps * 32) attn_pe_partial_kernel(
    const uint16_t* q, const uint16_t* k, const uint16_t* v, const uint16_t* q_pe, const uint16_t* k_pe, int heads,
    int kvh, int dk, int dv, int dr, int pos0, const int* dpos, float scale, int splits, float* scratch) {
  ZMLX_TRACE_BLOCK_END();
  pdl_begin();
  const int h = blockIdx.x, s = blockIdx.y, t = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int visible = (dpos ? *dpos : pos0) + t + 1;
  const int chunk = (visible + splits - 1) / splits;
  const int j0 = s * chunk, j1 = min(visible, j0 + chunk);
  const int g = h / (heads / kvh);
  float qv[kPeMaxPerLane], qs[2];
  for (int i = 0; i < kPeMaxPerLane; ++i) qv[i] = lane + 32 * i < dk ? bf(q[(int64_t(t) * heads + h) * dk + lane + 32 * i]) : 0.f;
  for (int i = 0; i < 2; ++i)
    qs[i] = lane + 32 * i < dr ? rbf(scale * bf(q_pe[(int64_t(t) * heads + h) * dr + lane + 32 * i])) : 0.f;
  float m = -FLT_MAX, l = 0.f, acc[kPeMaxPerLane];
  for (int i = 0; i < kPeMaxPerLane; ++i) acc[i] = 0.f;
  for (int j = j0 + warp; j < j1; j += kAttnWarps) {
    const uint16_t* kr = k + (int64_t(j) * kvh + g) * dk;
    const uint16_t* pr = k_pe + int64_t(j) * dr;
    float pe = 0.f, sc = 0.f;
    for (int i = 0; i < 2; ++i)
      if (lane + 32 * i < dr) pe = fmaf(qs[i], bf(pr[lane + 32 * i]), pe);
    for (int i = 0; i < kPeMaxPerLane; ++i)
      if (lane + 32 * i < dk) sc = fmaf(qv[i], bf(kr[lane + 32 * i]), sc);
    pe = rbf(warp_sum(pe));
    sc = warp_sum(sc) * scale + pe;
    const float mn = fmaxf(m, sc);
    const float corr = expf(m - mn), p = expf(sc - mn);
    l = l * corr + p;
    const uint16_t* vr = v + (int64_t(j) * kvh + g) * dv;
    for (int i = 0; i < kPeMaxPerLane; ++i)
      if (lane + 32 * i < dv) acc[i] = fmaf(p, bf(vr[lane + 32 * i]), acc[i] * corr);
    m = mn;
  }
  __shared__ float sm[kAttnWarps], sl[kAttnWarps];
  __shared__ float sacc[kAttnWarps][32 * kPeMaxPerLane];
  if (lane == 0) sm[warp] = m, sl[warp] = l;
  for (int i = 0; i < kPeMaxPerLane; ++i) sacc[warp][lane + 32 * i] = acc[i];
  __syncthreads();
  store_split_partial(sm, sl, sacc, dv, scratch + ((int64_t(t) * heads + h) * splits + s) * (dv + 2));
}

// multi_linear, transpose: out[t, h*N + r] = x[t, h] · W[h][r] (one warp per row).
template <int BITS>
__global__ void __launch_bounds__(256) multi_linear_t_kernel(const uint16_t* x, int64_t ldx, int64_t xoff, int H,
                                                             QMat m, uint16_t* out, bool pre) {
  ZMLX_TRACE_BLOCK_END();
  const int64_t r = int64_t(blockIdx.y) * kRowsPerBlock + (threadIdx.x >> 5);
  const int64_t th = blockIdx.x, t = th / H, h = th % H;  // T·H can pass grid.y's 65535
  if (pre && row_preloadable<BITS>(m)) {  // head h's weights are constant: loads before the wait
    RowPreload<BITS> p;
    if (r < m.rows) row_preload<BITS>(m, r, p, h);
    pdl_begin();
    if (r >= m.rows) return;
    const float acc = row_dot_preloaded<BITS>(m, p, x + t * ldx + h * xoff);
    if ((threadIdx.x & 31) == 0) out[(t * H + h) * m.rows + r] = to_bf(acc);
    return;
  }
  pdl_begin();
  if (r >= m.rows) return;
  float acc[1];
  row_dot<BITS, 1>(m, h, r, x + t * ldx + h * xoff, 0, 1, acc);
  if ((threadIdx.x & 31) == 0) out[(t * H + h) * m.rows + r] = to_bf(acc[0]);
}
// multi_linear_t for rows of at most LPR chunks (LPR = 8 or 16 lanes a row,
// 32 / LPR rows a warp): GLM's absorbed heads have rows of 192 and 512
// inputs (6 and 16 chunks), which left 26 or 16 lanes of a warp idle and
// took two waves of blocks. A lane holds the chunk it holds in
// multi_linear_t_kernel (chunk = its lane in the row's group) and the sum is
// the same butterfly without its first steps, which there only add the idle
// lanes' zeros: the same values.
// trigger_first (one token): the successor launches before this kernel's
// wait, so GLM's o_proj, behind the absorbed value heads, is resident and
// loading its weights while the attention merge runs (it had been launched
// too late to preload: 0.3 us before its wait released).
template <int BITS, int LPR>
__global__ void __launch_bounds__(256) multi_linear_t_short_kernel(const uint16_t* x, int64_t ldx, int64_t xoff,
                                                                   int H, QMat m, uint16_t* out, bool pre,
                                                                   bool trigger_first) {
  ZMLX_TRACE_BLOCK_END();
  constexpr int RPW = 32 / LPR;
  const int lane = threadIdx.x & 31, sl = lane % LPR;
  const int64_t r = (int64_t(blockIdx.y) * kRowsPerBlock + (threadIdx.x >> 5)) * RPW + lane / LPR;
  const int64_t th = blockIdx.x, t = th / H, h = th % H;
  const bool has = r < m.rows && sl < int(m.cols / 32);
  RowPreload<BITS> p;
  if (pre && has) row_preload<BITS>(m, r, p, h, sl);
  pdl_begin(trigger_first);
  if (!pre && has) row_preload<BITS>(m, r, p, h, sl);
  float acc = has ? chunk_dot<BITS>(p.w[0], load_x(x + t * ldx + h * xoff + int64_t(sl) * 32), row_scale(p, 0),
                                   row_bias(p, 0), 0.f)
                  : 0.f;
#pragma unroll
  for (int o = LPR / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (sl == 0 && r < m.rows) out[(t * H + h) * m.rows + r] = to_bf(acc);
}

template <int B>
struct MultiLinearTL {
  static void go(const uint16_t* x, int T, int64_t ldx, int64_t xoff, int H, const QMat& m, uint16_t* out,
                 cudaStream_t s) {
    const int64_t chunks = m.cols / 32;
    auto short_rows = [&](auto kernel, int lpr) {
      const int64_t per_block = kRowsPerBlock * (32 / lpr);
      // ZMLX_CUDA_EARLY_SHORT_T=0: the successor launches after the wait (A/B runs; the same bits).
      static const bool early_short = env_on("ZMLX_CUDA_EARLY_SHORT_T");
      const bool early = T == 1 && early_trigger() && early_short;
      launch(kernel, dim3(unsigned(T * H), unsigned((m.rows + per_block - 1) / per_block)), dim3(256), s, x, ldx,
             xoff, H, m, out, preload_weights(), early);
    };
    if (multi_linear_short_rows(B, m.cols)) {
      if (chunks <= 8) return short_rows(multi_linear_t_short_kernel<B, 8>, 8);
      return short_rows(multi_linear_t_short_kernel<B, 16>, 16);
    }
    launch(multi_linear_t_kernel<B>, dim3(unsigned(T * H), unsigned((m.rows + kRowsPerBlock - 1) / kRowsPerBlock)),
           dim3(256), s, x, ldx, xoff, H, m, out, preload_weights());
  }
};

// multi_linear, no transpose: out[t, h*C + c] = Σ_r x[t, h, r] · W[h][r][c]
// (fp32 weights scale·q + bias, sum in r order; one thread per output).
__global__ void multi_linear_n_kernel(const uint16_t* x, int64_t ldx, int64_t xoff, int T, int H, QMat m,
                                      uint16_t* out) {
  ZMLX_TRACE_BLOCK_END();
  pdl_begin();
  const int64_t R = m.rows, C = m.cols;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= int64_t(T) * H * C) return;
  const int64_t c = i % C, th = i / C, t = th / H, h = th % H;
  const uint16_t* xr = x + t * ldx + h * xoff;
  float acc = 0.f;
  if (m.bits == 16) {
    const uint16_t* w = reinterpret_cast<const uint16_t*>(m.w) + (h * R) * C + c;
    for (int64_t r = 0; r < R; ++r) acc += bf(xr[r]) * bf(w[r * C]);
  } else {
    const int per = 32 / m.bits;
    const uint32_t mask = (1u << m.bits) - 1u;
    const int64_t wpr = C * m.bits / 32, gpr = C / m.group;
    for (int64_t r = 0; r < R; ++r) {
      const int64_t row = h * R + r;
      const uint32_t q = (m.w[row * wpr + c / per] >> (m.bits * (c % per))) & mask;
      const int64_t g = row * gpr + c / m.group;
      const float wv = bf(m.scales[g]) * float(q) + bf(m.biases[g]);
      acc += bf(xr[r]) * wv;
    }
  }
  out[i] = to_bf(acc);
}

__global__ void slice_cols_kernel(const uint16_t* x, int64_t T, int64_t cols, int64_t group, int64_t offset,
                                  int64_t width, uint16_t* out) {
  ZMLX_TRACE_BLOCK_END();
  pdl_begin();
  const int64_t n = cols / group;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= T * n * width) return;
  const int64_t w = i % width, tg = i / width, t = tg / n, g = tg % n;
  out[i] = x[t * cols + g * group + offset + w];
}

constexpr int kGroupedMaxE = 256;

// GLM router (Backend::route_sigmoid_grouped_topk), one thread per token,
// step for step as the CPU reference.
__global__ void route_grouped_kernel(const uint16_t* logits, const float* bias, int T, int E, int k, int n_group,
                                     int topk_group, bool normalize, float eps, float scaling, int32_t* ex,
                                     float* scores, bool trigger_first) {
  ZMLX_TRACE_BLOCK_END();
  pdl_begin(trigger_first);
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= T) return;
  float s[kGroupedMaxE], sel[kGroupedMaxE];
  for (int e = 0; e < E; ++e) {
    s[e] = 1.0f / (1.0f + expf(-bf(logits[int64_t(t) * E + e])));
    sel[e] = s[e] + bias[e];
  }
  if (n_group > 1 && topk_group < n_group) {
    const int per = E / n_group;
    float gs[64];
    bool keep[64];
    for (int g = 0; g < n_group; ++g) {
      float b1 = -INFINITY, b2 = -INFINITY;
      for (int e = g * per; e < (g + 1) * per; ++e) {
        const float v = sel[e];
        if (v > b1) b2 = b1, b1 = v;
        else if (v > b2) b2 = v;
      }
      gs[g] = b1 + b2;
      keep[g] = false;
    }
    for (int i = 0; i < topk_group; ++i) {  // best groups, ties to the lower index (a stable sort's order)
      int best = -1;
      for (int g = 0; g < n_group; ++g)
        if (!keep[g] && (best < 0 || gs[g] > gs[best])) best = g;
      keep[best] = true;
    }
    for (int g = 0; g < n_group; ++g)
      if (!keep[g])
        for (int e = g * per; e < (g + 1) * per; ++e) sel[e] = 0.f;
  }
  int chosen[16];
  float total = 0.f;
  for (int j = 0; j < k; ++j) {
    int best = -1;
    for (int e = 0; e < E; ++e) {
      bool used = false;
      for (int i = 0; i < j; ++i) used = used || chosen[i] == e;
      if (!used && (best < 0 || sel[e] > sel[best])) best = e;
    }
    chosen[j] = best;
  }
  for (int j = 0; j < k; ++j) total += s[chosen[j]];
  for (int j = 0; j < k; ++j) {
    float w = s[chosen[j]];
    if (normalize) w = w / (total + eps);
    ex[int64_t(t) * k + j] = chosen[j];
    scores[int64_t(t) * k + j] = w * scaling;
  }
}

// The grouped router without group limiting (n_group == 1 or topk_group ==
// n_group, as GLM-4.7-Flash ships) for one token's logits l[E] (global or
// shared memory), one warp: the picks into ex[k] and their scores into
// scores[k]. PL may exceed ceil(E / 32): lanes past E hold -inf keys and are
// never picked, so the picks, their order and the sum agree.
template <int PL, int LS = 1>  // LS: expert e's logit at l[LS·e]
__device__ __forceinline__ void route_grouped_warp_token(const uint16_t* l, const float* bias, int E, int k,
                                                         bool normalize, float eps, float scaling, int32_t* ex,
                                                         float* scores) {
  const int lane = threadIdx.x & 31;
  float sv[PL], key[PL];
  #pragma unroll
  for (int i = 0; i < PL; ++i) {
    const int e = lane + 32 * i;
    sv[i] = e < E ? 1.0f / (1.0f + expf(-bf(l[LS * e]))) : 0.f;
    key[i] = e < E ? sv[i] + bias[e] : -INFINITY;
  }
  int id;
  float w, total;
  warp_topk_picks(key, sv, E, k, id, w, total);
  if (lane < k) {
    if (normalize) w = w / (total + eps);
    ex[lane] = id;
    scores[lane] = w * scaling;
  }
}

// One warp per token, as route_sigmoid.
template <int PL>
__global__ void route_grouped_warp_kernel(const uint16_t* logits, const float* bias, int T, int E, int k,
                                          bool normalize, float eps, float scaling, int32_t* ex, float* scores, bool trigger_first) {
  ZMLX_TRACE_BLOCK_END();
  pdl_begin(trigger_first);
  const int t = blockIdx.x * 4 + (threadIdx.x >> 5);
  if (t >= T) return;
  route_grouped_warp_token<PL>(logits + int64_t(t) * E, bias, E, k, normalize, eps, scaling, ex + int64_t(t) * k,
                               scores + int64_t(t) * k);
}

// The router launches below hand every logit to block 0 of their cluster
// the same way: each router warp stores its row's logit as a 32-bit word
// (st.async stores no 16-bit values; the bf16 in the low half) into block
// 0's shared memory, counted against a barrier there that block 0 sets up
// before the programmatic-launch wait, behind one relaxed cluster barrier.
// After the wait nothing but the logits' own arrival stands between the
// rows and the picks: a cluster barrier with release, the earlier form,
// waited ~1 us longer for the blocks' global stores (H100 traces,
// 2026-11-28). Declared __shared__ in every block of the cluster; only
// block 0's copy is used. Block 0 of the grid must be the cluster's rank 0:
// both launches put their one router cluster at the grid's start.
template <int MaxE>
struct LogitsToBlock0 {
  uint32_t words[MaxE];
  uint64_t arrived;  // counts the E words' bytes

  // Every block of the cluster, before any of them stores a logit.
  __device__ void prepare(int E) { mbar_prepare_cluster(&arrived, blockIdx.x == 0, uint32_t(E) * 4); }
  __device__ void store(int64_t row, uint16_t v) { st_async_cluster_u32(words + row, &arrived, 0, v); }
  // Block 0: returns once every logit is in its shared memory.
  __device__ void wait() { mbar_wait_cluster(&arrived, 0); }
  // The logits as bf16, expert e's at [2 * e].
  __device__ const uint16_t* logits() const { return reinterpret_cast<const uint16_t*>(words); }
};

// What both router launches do after LogitsToBlock0::prepare: with `dry`,
// block 0's first warp runs its top-k once on zero logits before the wait
// (the picks into shared memory), so that after the wait it runs the very
// instructions from its SM's instruction cache (run cold, once a layer after
// ~36 MB of weights have passed through L2, GLM's took ~4.4 us, 1.7 us after
// a dry run: H100 traces, 2026-11-28); then every warp's router rows, each
// logit to y and to block 0; then block 0's first warp waits for them all
// and picks. pick(logits, ex, scores) is the launch's top-k (logits at
// stride 2, LogitsToBlock0::logits), a __noinline__ function, so the dry run
// and the real one are one copy of code.
template <int WB, bool SX, int MaxE, typename Score, typename Pick>
__device__ __forceinline__ void router_rows_then_picks(const uint16_t* x, const QMat& w, uint16_t* y, bool pre,
                                                       LogitsToBlock0<MaxE>& hand, bool dry, int32_t* ex,
                                                       Score* scores, Pick pick) {
  if (dry && blockIdx.x == 0 && threadIdx.x < 32) {
    __shared__ uint32_t dry_l[MaxE];
    __shared__ int32_t dry_ex[32];
    __shared__ Score dry_scores[32];
    for (int i = threadIdx.x; i < MaxE; i += 32) dry_l[i] = 0;
    __syncwarp();
    pick(reinterpret_cast<const uint16_t*>(dry_l), dry_ex, dry_scores);
  }
  decode_row_to<WB, kPreChunks, SX>(w, decode_row0(), x, pre, [&](int64_t r, uint16_t v) {
    y[r] = v;
    hand.store(r, v);
  });
  if (blockIdx.x != 0 || threadIdx.x >= 32) return;
  hand.wait();
  ZMLX_TRACE_MARK(2);  // trace: every router row in block 0
  pick(hand.logits(), ex, scores);
  ZMLX_TRACE_MARK(3);  // trace: the picks stored
}

// The router's bias (a weight, complete before the step), copied by block 0's
// first warp into shared memory before the programmatic-launch wait, so the
// picks read it there after the logits arrive instead of loading it from
// global memory on that one warp's chain. Returns the pointer the picks
// read: `s` in block 0's first warp, `bias` elsewhere (and when null).
// LFM2's sigmoid router (linear_route_decode_kernel); GLM's grouped router
// in the same form measured -0.1 to -0.8 % (two rounds, H200 2026-11-28),
// so its launch reads the bias from global memory as before.
template <int MaxE>
__device__ __forceinline__ const float* bias_to_shared(const float* bias, int E, float (&s)[MaxE]) {
  if (!bias || blockIdx.x != 0 || threadIdx.x >= 32) return bias;
  for (int i = threadIdx.x; i < E; i += 32) s[i] = bias[i];
  __syncwarp();
  return s;
}

// linear_and_swiglu_decode_kernel with the grouped router's top-k as well
// (one token), for routers of at most 64 experts (8 blocks): the router's wb
// blocks form the grid's first thread-block cluster (wb blocks a cluster).
// Each router warp stores its logit to y and hands it to block 0
// (LogitsToBlock0); then block 0's first warp picks the experts as
// route_grouped_warp_kernel does, while the shared expert's gate+up blocks
// still run. The top-k's own launch and kernel boundary (~3 us a layer on an
// H100) leave the step; logits, picks, scores and the shared h keep their
// ops' bits. (A router alone with a counter in its last block was slower;
// with a cluster, linear_route below.)
constexpr int kFusedRouteMaxE = 8 * kRowsPerBlock;  // 64: a cluster of 8 blocks, a row a warp
constexpr int kFusedRoutePerLane = kFusedRouteMaxE / 32;

// The top-k of the launch below as one copy of code (not inlined), so that
// running it once before the wait loads the very instructions that block 0
// runs after it. The logits at stride 2 (LogitsToBlock0::logits).
__device__ __noinline__ void route_grouped_warp_token_call(const uint16_t* l, const float* bias, int E, int k,
                                                           bool normalize, float eps, float scaling, int32_t* ex,
                                                           float* scores) {
  route_grouped_warp_token<kFusedRoutePerLane, 2>(l, bias, E, k, normalize, eps, scaling, ex, scores);
}

template <int WB, bool SX>
__global__ void __launch_bounds__(256) linear_route_and_swiglu_decode_kernel(const uint16_t* x, QMat w, uint16_t* y,
                                                                             int wb, QMat g, QMat u, uint16_t* yh,
                                                                             bool pre, GroupedRoute ra) {
  ZMLX_TRACE_BLOCK_END();
  // Gate+up blocks, and past them the padding of the last cluster (no rows).
  if (int(blockIdx.x) >= wb) return swiglu_decode_row<4, SX>(g, u, decode_row0(int64_t(blockIdx.x) - wb), x, yh, pre);
  const int E = int(w.rows);
  __shared__ LogitsToBlock0<kFusedRouteMaxE> hand;
  hand.prepare(E);
  router_rows_then_picks<WB, SX>(x, w, y, pre, hand, true, ra.experts, ra.scores,
                                 [&](const uint16_t* l, int32_t* ex, float* sc) {
                                   route_grouped_warp_token_call(l, ra.bias, E, ra.k, ra.normalize, ra.eps,
                                                                 ra.scaling, ex, sc);
                                 });
}

// linear_decode_kernel for a softmax or a sigmoid + bias router (one token,
// at most 128 experts), with the top-k in the same launch: the router's wb
// blocks (a row a warp) are one thread-block cluster. Each warp stores its
// logit to y and hands it to block 0 (LogitsToBlock0); block 0's first warp
// picks the experts with route_softmax_kernel's or route_sigmoid_kernel's
// own token function (their bits). The top-k's launch and kernel boundary
// leave the step (Qwen3, LFM2), as GLM's grouped top-k left it in
// linear_route_and_swiglu_decode_kernel above, whose dry run before the wait
// this kernel repeats (ZMLX_CUDA_ROUTE_DRY_RUN=0: none).
constexpr int kRouteInRouterMaxE = 16 * kRowsPerDecodeBlock;  // 128: 16 blocks, a non-portable cluster past 8

// The logits at stride 2 (LogitsToBlock0::logits).
template <int PL, bool SIG>
__device__ __noinline__ void route_token_call(const uint16_t* l, TopKRoute r, int E, int32_t* ex, uint16_t* scores) {
  if (SIG) route_sigmoid_token<PL, 2>(l, r.bias, E, r.k, r.normalize, r.eps, r.scaling, ex, scores);
  else route_softmax_token<PL, 2>(l, E, r.k, r.normalize, r.packed, ex, scores);
}

template <int WB, bool SX, int PL, bool SIG>
__global__ void __launch_bounds__(256) linear_route_decode_kernel(const uint16_t* x, QMat w, uint16_t* y, bool pre,
                                                                  TopKRoute ra, bool dry) {
  ZMLX_TRACE_BLOCK_END();
  const int E = int(w.rows);
  __shared__ LogitsToBlock0<kRouteInRouterMaxE> hand;
  __shared__ float bias_s[SIG ? kRouteInRouterMaxE : 1];  // the softmax router has no bias
  TopKRoute r = ra;
  r.bias = bias_to_shared(SIG ? ra.bias : nullptr, E, bias_s);
  hand.prepare(E);
  router_rows_then_picks<WB, SX>(x, w, y, pre, hand, dry, ra.experts, ra.scores,
                                 [&](const uint16_t* l, int32_t* ex, uint16_t* sc) {
                                   route_token_call<PL, SIG>(l, r, E, ex, sc);
                                 });
}

unsigned blocks_for(int64_t n, int threads) { return unsigned((n + threads - 1) / threads); }

}  // namespace

// -------------------------------------------------------------- host entry

void embed(const QMat& table, const int32_t* ids, int T, uint16_t* out, cudaStream_t s) {
  launch(embed_kernel, dim3(blocks_for(int64_t(T) * table.cols, 256)), dim3(256), s, table, ids, T, out);
  check_launch("embed");
}

void linear(const uint16_t* x, int T, const QMat& w, uint16_t* y, cudaStream_t s) {
  by_bits<LinearL>(w.bits, x, T, w, y, s);
  check_launch("linear");
}

void linear_multi(const uint16_t* x, int T, const QMat* ms, uint16_t* const* ys, int n, cudaStream_t s) {
  if (n > kMaxMulti) throw std::runtime_error("linear_multi: at most 4 matrices");
  MultiQ mq;
  mq.n = n;
  mq.first_block[0] = 0;
  for (int i = 0; i < n; ++i) {
    if (ms[i].bits != ms[0].bits || ms[i].cols != ms[0].cols) throw std::runtime_error("linear_multi: matrices differ in format");
    mq.m[i] = ms[i];
    mq.y[i] = ys[i];
    const int64_t per_block = T == 1 ? kRowsPerDecodeBlock : kRowsPerBlock;
    mq.first_block[i + 1] = mq.first_block[i] + (ms[i].rows + per_block - 1) / per_block;
  }
  by_bits<LinearMultiL>(ms[0].bits, x, T, mq, s);
  check_launch("linear_multi");
}

void linear_swiglu(const uint16_t* x, int T, const QMat& g, const QMat& u, uint16_t* y, cudaStream_t s) {
  if (g.bits != u.bits) throw std::runtime_error("linear_swiglu: gate and up differ in format");
  by_bits<LinearSwigluL>(g.bits, x, T, g, u, y, s);
  check_launch("linear_swiglu");
}

void gather_linear(const uint16_t* x, bool per_slot, const int32_t* experts, int T, int k, const QMat& w, uint16_t* y,
                   cudaStream_t s) {
  by_bits<GatherL>(w.bits, x, per_slot, experts, T * k, k, w, y, s);
  check_launch("gather_qmm");
}

void gather_swiglu(const uint16_t* x, const int32_t* experts, int T, int k, const QMat& g, const QMat& u, uint16_t* y,
                   cudaStream_t s, bool x_ready) {
  if (g.bits != u.bits) throw std::runtime_error("gather_qmm_swiglu: gate and up differ in format");
  by_bits<GatherSwigluL>(g.bits, x, experts, T * k, k, g, u, y, s, x_ready);
  check_launch("gather_qmm_swiglu");
}

// Rows of 64+ inputs: pair_stage_x divides by the chunk count through a
// reciprocal that wraps at one chunk. Groups of 32, 64 and 128 only: the
// formats models load (config.cpp) and the GPU test checks against the CPU;
// a larger group would run the CPG = 4 form over spans of half a group,
// never checked.
bool grouped_fits(const QMat& m) {
  return use_mma(m) && m.group <= 128 && m.cols >= 64 && m.cols <= kGroupMaxK;
}

void gather_linear_grouped(const uint16_t* x, bool per_slot, int k, const QMat& w, uint16_t* y, const PairGroups& grp,
                           cudaStream_t s) {
  if (!grouped_fits(w)) throw std::runtime_error("gather_qmm (grouped pairs): a weight format it does not take");
  pairs_launch<1>(x, PairJob<1>{{w}, y, k, per_slot}, grp, s);
  check_launch("gather_qmm (grouped pairs)");
}

void gather_swiglu_grouped(const uint16_t* x, int k, const QMat& g, const QMat& u, uint16_t* y, const PairGroups& grp,
                           cudaStream_t s) {
  if (!grouped_fits(g) || !grouped_fits(u) || g.bits != u.bits || g.group != u.group || g.rows != u.rows ||
      g.cols != u.cols)
    throw std::runtime_error("gather_qmm_swiglu (grouped pairs): formats it does not take");
  pairs_launch<2>(x, PairJob<2>{{g, u}, y, k, false}, grp, s);
  check_launch("gather_qmm_swiglu (grouped pairs)");
}

void gather_combine(const uint16_t* h, const int32_t* experts, const void* scores, bool scores_f32, Combine mode,
                    int T, int k, const QMat& down, uint16_t* out, cudaStream_t s, bool routing_ready) {
  by_bits<GatherCombineL>(down.bits, h, experts, scores, scores_f32, int(mode), T, k, down, out, s, routing_ready);
  check_launch("gather_qmm_combine");
}

namespace {
// Which of the two shared-expert launches are on. ZMLX_CUDA_SHARED_EXPERT_FUSION=0:
// neither (the shared expert's gate+up and down stay kernels of their own);
// =router / =combine: that one only (A/B runs; the same bits either way).
enum class SharedFusion { Both, Router, Combine, Off };
SharedFusion shared_fusion() {
  static const SharedFusion f = env_is("ZMLX_CUDA_SHARED_EXPERT_FUSION", "0")        ? SharedFusion::Off
                                : env_is("ZMLX_CUDA_SHARED_EXPERT_FUSION", "router")  ? SharedFusion::Router
                                : env_is("ZMLX_CUDA_SHARED_EXPERT_FUSION", "combine") ? SharedFusion::Combine
                                                                                       : SharedFusion::Both;
  return f;
}

// Whether linear(x, m) of one token takes linear_decode_kernel<B> (scalar,
// rows preloaded up to 32·kPreChunks chunks a row): the form the fused
// launches below reproduce.
bool scalar_preloaded_decode(const QMat& m, int max_chunks) {
  return !use_mma_linear(m) && m.cols % 32 == 0 && m.cols / 32 <= max_chunks;
}
}  // namespace

// LinearL's one-token choice: not the tensor-core path (which the streamed
// head is part of), then with_staged_x's form (stage_x()) decides.
bool linear_unpacks_ahead(const QMat& m) {
  return !use_mma_linear(m) && (stage_x() ? unpack_ahead<true>(m) : unpack_ahead<false>(m));
}

bool gather_combine_shared_fits(const QMat& down, const QMat& sd) {
  const SharedFusion f = shared_fusion();
  return (f == SharedFusion::Both || f == SharedFusion::Combine) && use_mma(down) && sd.bits == 4 &&
         sd.rows == down.rows && scalar_preloaded_decode(sd, 32 * kSharedPre);
}

void gather_combine_shared(const uint16_t* h, const int32_t* experts, const void* scores, bool scores_f32,
                           Combine mode, int k, const QMat& down, const SharedDown& shared, uint16_t* out,
                           cudaStream_t s, bool routing_ready) {
  if (!gather_combine_shared_fits(down, shared.m))
    throw std::runtime_error("gather_combine_shared: shapes or formats it does not take");
  mma_combine(h, experts, scores, scores_f32, int(mode), 1, k, down, out, s, routing_ready, shared);
  check_launch("gather_qmm_combine (+ shared expert)");
}

namespace {
template <int WB>
void launch_linear_and_swiglu(const uint16_t* x, const QMat& w, uint16_t* y, const QMat& g, const QMat& u,
                              uint16_t* yh, cudaStream_t s) {
  const int wb = int((w.rows + kRowsPerDecodeBlock - 1) / kRowsPerDecodeBlock);
  const int gb = int((g.rows + kRowsPerDecodeBlock - 1) / kRowsPerDecodeBlock);
  with_staged_x([&](auto sx) {
    launch(linear_and_swiglu_decode_kernel<WB, 4, decltype(sx)::value>, dim3(unsigned(wb + gb)), dim3(256), s, x, w, y,
           wb, g, u, yh, preload_weights());
  });
}
}  // namespace

bool linear_and_swiglu_fits(const QMat& w, const QMat& g, const QMat& u) {
  const SharedFusion f = shared_fusion();
  return (f == SharedFusion::Both || f == SharedFusion::Router) && g.bits == 4 && u.bits == 4 &&
         (w.bits == 4 || w.bits == 8 || w.bits == 16) && scalar_preloaded_decode(w, 32 * kPreChunks) &&
         scalar_preloaded_decode(g, 32 * kPreChunks);
}

void linear_and_swiglu(const uint16_t* x, const QMat& w, uint16_t* y, const QMat& g, const QMat& u, uint16_t* yh,
                       cudaStream_t s) {
  if (!linear_and_swiglu_fits(w, g, u)) throw std::runtime_error("linear_and_swiglu: formats it does not take");
  switch (w.bits) {
    case 4: launch_linear_and_swiglu<4>(x, w, y, g, u, yh, s); break;
    case 8: launch_linear_and_swiglu<8>(x, w, y, g, u, yh, s); break;
    default: launch_linear_and_swiglu<16>(x, w, y, g, u, yh, s); break;
  }
  check_launch("linear + linear_swiglu");
}

bool linear_route_and_swiglu_fits(const QMat& w, const QMat& g, const QMat& u, int k, int n_group, int topk_group) {
  static const bool clusters = runs_sm90_code(reinterpret_cast<const void*>(linear_route_and_swiglu_decode_kernel<16, false>));
  static const bool on = env_on("ZMLX_CUDA_ROUTE_IN_ROUTER");
  return on && clusters && linear_and_swiglu_fits(w, g, u) && w.rows <= kFusedRouteMaxE && k >= 1 && k <= 16 &&
         k <= w.rows && (n_group == 1 || topk_group >= n_group);
}

namespace {
// At least two: the rows hand their logits to block 0 by st.async, which
// compute-sanitizer calls invalid in a cluster of one block (a router of up
// to 8 experts; the spare block's warps hold no row).
int route_in_router_blocks(const QMat& w) {
  return std::max(2, int((w.rows + kRowsPerDecodeBlock - 1) / kRowsPerDecodeBlock));
}
}  // namespace

void linear_route_and_swiglu(const uint16_t* x, const QMat& w, uint16_t* y, const GroupedRoute& r, const QMat& g,
                             const QMat& u, uint16_t* yh, cudaStream_t s) {
  if (!linear_route_and_swiglu_fits(w, g, u, r.k, r.n_group, r.topk_group))
    throw std::runtime_error("linear_route_and_swiglu: formats, a router or a GPU it does not take");
  const int wb = route_in_router_blocks(w);  // at least two (st.async into block 0)
  const int gb = int((g.rows + kRowsPerDecodeBlock - 1) / kRowsPerDecodeBlock);
  const int blocks = (wb + gb + wb - 1) / wb * wb;  // whole clusters of wb blocks
  auto go = [&](auto wbits) {
    with_staged_x([&](auto sx) {
      launch_ex(linear_route_and_swiglu_decode_kernel<decltype(wbits)::value, decltype(sx)::value>,
                dim3(unsigned(blocks)), dim3(256), 0, unsigned(wb), s, x, w, y, wb, g, u, yh, preload_weights(), r);
    });
  };
  switch (w.bits) {
    case 4: go(std::integral_constant<int, 4>{}); break;
    case 8: go(std::integral_constant<int, 8>{}); break;
    default: go(std::integral_constant<int, 16>{}); break;
  }
  check_launch("linear + grouped top-k + linear_swiglu");
}

void moe_combine(const uint16_t* y, const void* scores, bool scores_f32, Combine mode, int T, int k, int64_t D,
                 uint16_t* out, cudaStream_t s) {
  launch(moe_combine_kernel, dim3(blocks_for(int64_t(T) * D, 256)), dim3(256), s, y, scores, scores_f32, int(mode), T, k, D, out);
  check_launch("moe_combine");
}

void rms_norm(const uint16_t* x, int64_t rows, int64_t D, const uint16_t* w, float eps, uint16_t* out,
              cudaStream_t s) {
  if (D <= 1024)
    launch_short(rms_norm_warp_kernel, dim3(unsigned((rows + 7) / 8)), dim3(256), s, x, rows, int(D), w, eps, out);
  else
    launch_short(rms_norm_block_kernel, dim3(unsigned(rows)), dim3(256), s, x, int(D), w, eps, out);
  check_launch("rms_norm");
}

void add_rms_norm(uint16_t* h, const uint16_t* x, int64_t rows, int64_t D, const uint16_t* w, float eps,
                  uint16_t* out, cudaStream_t s) {
  const bool aligned = ((reinterpret_cast<uintptr_t>(h) | reinterpret_cast<uintptr_t>(x) |
                         reinterpret_cast<uintptr_t>(w) | reinterpret_cast<uintptr_t>(out)) & 15) == 0;
  if (aligned && D % 256 == 0 && D / 8 <= 1024)
    launch_short(add_rms_norm_vec_kernel, dim3(unsigned(rows)), dim3(unsigned(D / 8)), s, h, x, int(D), w, eps, out,
                 env_on("ZMLX_CUDA_NORM_PREFETCH"));
  else
    launch_short(add_rms_norm_kernel, dim3(unsigned(rows)), dim3(256), s, h, x, int(D), w, eps, out);
  check_launch("add_rms_norm");
}

bool qk_norm_rope_kv(const uint16_t* q, const uint16_t* k, const uint16_t* v, int T, int H, int Hkv, int hd,
                     const uint16_t* qn, const uint16_t* kn, float eps, const float* inv_freq, bool traditional,
                     int pos0, const int* dpos, uint16_t* q_out, uint16_t* kc, uint16_t* vc, int64_t cap,
                     cudaStream_t s) {
  const dim3 grid{unsigned((int64_t(T) * (H + Hkv) + 7) / 8)};
  switch (hd) {
    case 32: launch(qk_norm_rope_kv_kernel<1>, grid, dim3(256), s, q, k, v, T, H, Hkv, qn, kn, eps, inv_freq, traditional, pos0, dpos, q_out, kc, vc, cap); break;
    case 64: launch(qk_norm_rope_kv_kernel<2>, grid, dim3(256), s, q, k, v, T, H, Hkv, qn, kn, eps, inv_freq, traditional, pos0, dpos, q_out, kc, vc, cap); break;
    case 128: launch(qk_norm_rope_kv_kernel<4>, grid, dim3(256), s, q, k, v, T, H, Hkv, qn, kn, eps, inv_freq, traditional, pos0, dpos, q_out, kc, vc, cap); break;
    case 256: launch(qk_norm_rope_kv_kernel<8>, grid, dim3(256), s, q, k, v, T, H, Hkv, qn, kn, eps, inv_freq, traditional, pos0, dpos, q_out, kc, vc, cap); break;
    default: return false;
  }
  check_launch("qk_norm_rope_kv");
  return true;
}

void rope(uint16_t* x, int T, int heads, int head_dim, int rot_offset, int rot_dims, int pos0, const int* dpos,
          const float* inv_freq, bool traditional, cudaStream_t s) {
  const int half = rot_dims / 2;
  launch(rope_kernel, dim3(blocks_for(int64_t(T) * heads * half, 256)), dim3(256), s, x, T, heads, head_dim, rot_offset, half, pos0,
                                                                         dpos, inv_freq, traditional);
  check_launch("rope");
}

// ZMLX_CUDA_FUSED_MLA_SPLIT=0: q_b and the split as two launches (A/B runs;
// the same bits). Read once, as the other A/B switches.
bool linear_mla_split_fits(const QMat& m, int heads, int nope, int rope) {
  static const bool on = env_on("ZMLX_CUDA_FUSED_MLA_SPLIT");
  return on && !use_mma_linear(m) && m.cols / 32 <= 32 * kPreChunks && preload_weights() &&
         m.rows == int64_t(heads) * (nope + rope) && nope % 2 == 0 && rope % 2 == 0;
}

template <int B>
struct LinearMlaSplitL {
  static void go(const uint16_t* x, const QMat& m, const uint16_t* ckv, int nope, int rope, int kv_lora,
                 const uint16_t* kv_norm, float eps, const float* inv_freq, int pos0, const int* dpos,
                 uint16_t* q_nope, uint16_t* q_pe, uint16_t* kc, uint16_t* vc, int64_t cap, cudaStream_t s) {
    const unsigned qblocks = unsigned((m.rows + kRowsPerDecodeBlock - 1) / kRowsPerDecodeBlock);
    with_staged_x([&](auto sx) {
      launch(linear_mla_split_decode_kernel<B, decltype(sx)::value>, dim3(qblocks + 1), dim3(256), s, x, m, ckv, nope,
             rope, kv_lora, kv_norm, eps, inv_freq, pos0, dpos, q_nope, q_pe, kc, vc, cap, qblocks);
    });
  }
};

void linear_mla_rope_split_cache(const uint16_t* x, const QMat& m, const uint16_t* ckv, int nope, int rope,
                                 int kv_lora, const uint16_t* kv_norm, float eps, const float* inv_freq, int pos0,
                                 const int* dpos, uint16_t* q_nope, uint16_t* q_pe, uint16_t* kc, uint16_t* vc,
                                 int64_t cap, cudaStream_t s) {
  by_bits<LinearMlaSplitL>(m.bits, x, m, ckv, nope, rope, kv_lora, kv_norm, eps, inv_freq, pos0, dpos, q_nope, q_pe,
                           kc, vc, cap, s);
  check_launch("linear_mla_rope_split_cache");
}

void mla_rope_split_cache(const uint16_t* q, const uint16_t* ckv, int T, int heads, int nope, int rope, int kv_lora,
                          const uint16_t* kv_norm, float eps, const float* inv_freq, int pos0, const int* dpos,
                          uint16_t* q_nope, uint16_t* q_pe, uint16_t* kc, uint16_t* vc, int64_t cap, cudaStream_t s) {
  const unsigned qblocks = blocks_for(int64_t(T) * heads * (nope + rope / 2), 256);
  launch(mla_rope_split_cache_kernel, dim3(qblocks + unsigned((T + 7) / 8)), dim3(256), s, q, ckv, T, heads, nope, rope,
         kv_lora, kv_norm, eps, inv_freq, pos0, dpos, q_nope, q_pe, kc, vc, cap, qblocks);
  check_launch("mla_rope_split_cache");
}

void add(uint16_t* h, const uint16_t* x, int64_t n, cudaStream_t s) {
  launch_short(add_kernel, dim3(blocks_for(n, 256)), dim3(256), s, h, x, n);
  check_launch("add");
}

void swiglu(const uint16_t* g, const uint16_t* u, int64_t n, uint16_t* out, cudaStream_t s) {
  launch(swiglu_kernel, dim3(blocks_for(n, 256)), dim3(256), s, g, u, n, out);
  check_launch("swiglu");
}

void kv_write(uint16_t* kc, uint16_t* vc, int64_t capacity, int kv_heads, int head_dim, int v_dim, const uint16_t* k,
              const uint16_t* v, int T, int pos0, const int* dpos, cudaStream_t s) {
  launch(kv_write_kernel, dim3(blocks_for(int64_t(T) * kv_heads * (head_dim > v_dim ? head_dim : v_dim), 256)), dim3(256),
         s, kc, vc, capacity, kv_heads, head_dim, v_dim, k, v, T, pos0, dpos);
  check_launch("kv_write");
}

size_t attn_group_smem(int rows, int head_dim, int G) {
  return size_t(16 + 2 * attn_rows16(rows)) * head_dim * 2 + size_t(kAttnMmaWarps) * G * (head_dim + 4) * 4;
}
// The streamed form (ST): Q, the stage buffers and the new row's slot (the
// states reuse the key buffers), whatever the split's length.
size_t attn_stream_smem(int head_dim) { return size_t(16 + 2 * kAttnStages * kAttnStageRows + 2) * head_dim * 2; }
// Whether a grouped one-token launch streams its splits: when holding a
// split whole would take more shared memory than streaming it (Qwen3's
// shapes, 8 heads a group of 128 dimensions: splits of over 96 rows, i.e.
// capacities above 12,288 positions at 128 splits). ZMLX_CUDA_ATTN_STREAM=0: never (the one-shot form up to
// kAttnGroupMaxSmem, then the per-head kernel); =all: always (tests compare
// the two forms bit for bit; read per launch).
bool attention_streams(int rows, int head_dim, int G) {
  if (env_is("ZMLX_CUDA_ATTN_STREAM", "0")) return false;
  return env_is("ZMLX_CUDA_ATTN_STREAM", "all") || attn_group_smem(rows, head_dim, G) > attn_stream_smem(head_dim);
}
// The merge in the cluster's receive area: ceil(G / splits) heads' partials a block.
size_t attn_cluster_recv_smem(int splits, int head_dim, int G) {
  return size_t((G + splits - 1) / splits) * splits * (head_dim + 2) * 4;
}

// Whether a one-token step takes attn_group_mma_kernel: 2 to 8 query heads a
// kv group (the first 8 rows of the MMA tile: a thread keeps one row's
// softmax state; a lone head gains nothing from the tile), head_dim 64 or
// 128 (256 would hold 192 registers of fragments), and the longest split's
// rows fit kAttnGroupMaxSmem and the card. ZMLX_CUDA_GROUP_ATTN=0: never
// (A/B runs; read per launch).
bool attention_by_group(int heads, int kv_heads, int head_dim, int64_t capacity, int splits) {
  if (env_is("ZMLX_CUDA_GROUP_ATTN", "0") || kv_heads <= 0 || heads % kv_heads != 0) return false;
  const int G = heads / kv_heads;
  if (G < 2 || G > 8 || (head_dim != 64 && head_dim != 128)) return false;
  const int rows = int((capacity + splits - 1) / splits);
  return (attention_streams(rows, head_dim, G) ? attn_stream_smem(head_dim) : attn_group_smem(rows, head_dim, G)) <=
         std::min(kAttnGroupMaxSmem, smem_optin_limit());
}

// Whether the grouped one-token kernel runs each kv group's splits as one
// thread-block cluster, and merges there (attn_group_mma_kernel's CL, CM):
// on Hopper, 2 to 16 splits, at most kAttnClusterMaxGroups kv groups, the
// merge's register form on (ZMLX_CUDA_MERGE_REGS), and a cluster of that
// many blocks with their shared memory resident on this GPU (cluster_fits).
// ZMLX_CUDA_ATTN_CLUSTER=0: never; =all: any number of kv groups; =launch:
// the cluster launch without the merge, at any number of kv groups (a
// measurement); read per launch.
//
// The kv-group limit is measured (one H100, 2026-11-28, traces in
// docs/performance.md): a cluster's blocks become resident only together,
// beside the q/k/v mat-vec's blocks, so the launch's blocks start later
// (Qwen3: 15 of 48 after the release) and the q/k/v kernel's boundary grows
// ~0.6 us. With Qwen3's 4 clusters the merge kernel's ~2.8 us more than pay
// for that (+2.9 % decode); with LFM2's 8 (96 blocks, 34 late) the layer
// came out 0.3 us longer (-0.4 to -0.8 %).
constexpr int kAttnClusterMaxGroups = 4;
AttnCluster attention_cluster(int heads, int kv_heads, int head_dim, int64_t capacity, int splits) {
  if (env_is("ZMLX_CUDA_ATTN_CLUSTER", "0") || splits < 2 || splits > 16 || !merge_in_registers(splits) ||
      !attention_by_group(heads, kv_heads, head_dim, capacity, splits) ||
      attention_streams(int((capacity + splits - 1) / splits), head_dim, heads / kv_heads))
    return AttnCluster::off;
  if (kv_heads > kAttnClusterMaxGroups && !env_is("ZMLX_CUDA_ATTN_CLUSTER", "all") &&
      !env_is("ZMLX_CUDA_ATTN_CLUSTER", "launch"))
    return AttnCluster::off;
  const AttnCluster mode = env_is("ZMLX_CUDA_ATTN_CLUSTER", "launch") ? AttnCluster::launch : AttnCluster::merge;
  const int G = heads / kv_heads, rows = int((capacity + splits - 1) / splits);
  const size_t smem = attn_group_smem(rows, head_dim, G) +
                      (mode == AttnCluster::merge ? attn_cluster_recv_smem(splits, head_dim, G) : 0);
  if (smem > std::min(kAttnGroupMaxSmem, smem_optin_limit())) return AttnCluster::off;
  // Asked of both instances this shape may launch (with and without the
  // fused preparation, whose registers differ).
  auto fits = [&](auto hd) {
    constexpr int HD = decltype(hd)::value;
    auto ask = [&](const void* k) { return cluster_fits(k, splits, kAttnMmaWarps * 32, smem); };
    return mode == AttnCluster::merge
               ? ask(reinterpret_cast<const void*>(attn_group_mma_kernel<HD, true, true, true>)) &&
                     ask(reinterpret_cast<const void*>(attn_group_mma_kernel<HD, false, true, true>))
               : ask(reinterpret_cast<const void*>(attn_group_mma_kernel<HD, true, true, false>)) &&
                     ask(reinterpret_cast<const void*>(attn_group_mma_kernel<HD, false, true, false>));
  };
  const bool ok = head_dim == 64 ? fits(std::integral_constant<int, 64>{}) : fits(std::integral_constant<int, 128>{});
  return ok ? mode : AttnCluster::off;
}

// How many blocks of the streamed grouped kernel an SM of the current
// device holds (the fewer of its two instances, with and without the fused
// preparation; cached per device), or 0 where the query fails (its error
// cleared, so no later launch check reports it).
template <int HD>
struct StreamOccupancy {};
template <int HD>
int stream_blocks_per_sm() {
  return cached_per_device<StreamOccupancy<HD>>([](int) {
    auto occ = [](const void* k) {
      int blocks = 0;
      allow_dynamic_smem(k, attn_stream_smem(HD));
      if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, k, kAttnMmaWarps * 32, attn_stream_smem(HD)) !=
          cudaSuccess) {
        cudaGetLastError();
        return 0;
      }
      return blocks;
    };
    return std::min(occ(reinterpret_cast<const void*>(attn_group_mma_kernel<HD, true, false, false, true>)),
                    occ(reinterpret_cast<const void*>(attn_group_mma_kernel<HD, false, false, false, true>)));
  });
}

int splits_by_rows(int64_t capacity, int at_least) {
  return int(std::clamp<int64_t>(capacity / 64, at_least, kMaxMergeSplits));
}

int decode_attention_splits(int heads, int kv_heads, int head_dim, int64_t capacity) {
  const int by_rows = splits_by_rows(capacity);
  // Streaming or its split sizing switched off, or not the grouped kernel at
  // all (its shapes, its switch, the card's shared memory): 64 rows a split.
  if (env_is("ZMLX_CUDA_ATTN_WAVE_SPLITS", "0") || env_is("ZMLX_CUDA_ATTN_STREAM", "0") ||
      !attention_by_group(heads, kv_heads, head_dim, capacity, by_rows))
    return by_rows;
  // Held whole by default (=all streams these too, at the same splits).
  const int rows = int((capacity + by_rows - 1) / by_rows);
  if (attn_group_smem(rows, head_dim, heads / kv_heads) <= attn_stream_smem(head_dim)) return by_rows;
  const int per_sm = head_dim == 128 ? stream_blocks_per_sm<128>() : stream_blocks_per_sm<64>();
  if (per_sm <= 0) return by_rows;
  return int(std::clamp<int64_t>(per_sm * sm_count() / kv_heads, 1, by_rows));
}

// The split partials of T tokens (attn_partial_kernel<DPL, PREP> for
// head_dim = 32·DPL; the fused preparation needs DPL >= 2), then the merge.
template <bool PREP>
void attention_splits(const uint16_t* q, int T, int heads, int kv_heads, int head_dim, const uint16_t* kc,
                      const uint16_t* vc, int64_t capacity, int pos0, const int* dpos, float scale, int splits,
                      float* scratch, uint16_t* out, const AttnPrep& prep, cudaStream_t s) {
  if (T == 1 && attention_by_group(heads, kv_heads, head_dim, capacity, splits)) {
    const int rows = int((capacity + splits - 1) / splits);
    const int G = heads / kv_heads;
    const AttnCluster mode = attention_cluster(heads, kv_heads, head_dim, capacity, splits);
    const bool stream = attention_streams(rows, head_dim, G);  // then mode is off
    const size_t smem =
        stream ? attn_stream_smem(head_dim)
               : attn_group_smem(rows, head_dim, G) +
                     (mode == AttnCluster::merge ? attn_cluster_recv_smem(splits, head_dim, G) : 0);
    auto go = [&](auto kern, auto cl) {
      allow_dynamic_smem(reinterpret_cast<const void*>(kern), smem);
      if constexpr (decltype(cl)::value) {
        // Each instance opts into clusters past 8 itself; made only when a
        // launch is recorded or run eagerly, never on a graph replay.
        if (splits > 8) cudaFuncSetAttribute(kern, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
        launch_ex(kern, dim3(unsigned(splits), unsigned(kv_heads)), dim3(kAttnMmaWarps * 32), smem, unsigned(splits),
                  s, q, heads, kv_heads, kc, vc, capacity, pos0, dpos, scale, splits, rows, scratch, prep, out);
      } else {
        launch_smem(kern, dim3(unsigned(kv_heads), unsigned(splits)), dim3(kAttnMmaWarps * 32), smem, s, q, heads,
                    kv_heads, kc, vc, capacity, pos0, dpos, scale, splits, rows, scratch, prep, out);
      }
    };
    using On = std::true_type;
    using Off = std::false_type;
    auto by_mode = [&](auto hd) {
      constexpr int HD = decltype(hd)::value;
      switch (mode) {
        case AttnCluster::merge: go(attn_group_mma_kernel<HD, PREP, true, true>, On{}); break;
        case AttnCluster::launch: go(attn_group_mma_kernel<HD, PREP, true, false>, On{}); break;
        default:
          if (stream) go(attn_group_mma_kernel<HD, PREP, false, false, true>, Off{});
          else go(attn_group_mma_kernel<HD, PREP>, Off{});
          break;
      }
    };
    switch (head_dim) {
      case 64: by_mode(std::integral_constant<int, 64>{}); break;
      case 128: by_mode(std::integral_constant<int, 128>{}); break;
    }
    check_launch("attention (grouped, tensor cores)");
    if (mode != AttnCluster::merge) merge_attention_splits(scratch, T, heads, head_dim, splits, out, s);
    return;
  }
  const dim3 grid{unsigned(heads), unsigned(splits), unsigned(T)};
  auto go = [&](auto kern) {
    launch(kern, grid, dim3(kAttnWarps * 32), s, q, heads, kv_heads, kc, vc, capacity, pos0, dpos, scale, splits,
           scratch, preload_weights(), kv_prefetch(), prep);
  };
  switch (head_dim) {
    case 64: go(attn_partial_kernel<2, PREP>); break;
    case 128: go(attn_partial_kernel<4, PREP>); break;
    case 256: go(attn_partial_kernel<8, PREP>); break;
    case 32:
      if constexpr (!PREP) {
        go(attn_partial_kernel<1, false>);
        break;
      }
      [[fallthrough]];
    default:
      throw std::runtime_error("CUDA attention: head_dim " + std::to_string(head_dim) + " (supported: " +
                               (PREP ? "64, 128, 256)" : "32, 64, 128, 256)"));
  }
  check_launch("attention");
  merge_attention_splits(scratch, T, heads, head_dim, splits, out, s);
}

void attention(const uint16_t* q, int T, int heads, int kv_heads, int head_dim, const uint16_t* kc, const uint16_t* vc,
               int64_t capacity, int pos0, const int* dpos, float scale, int splits, float* scratch, uint16_t* out,
               cudaStream_t s) {
  attention_splits<false>(q, T, heads, kv_heads, head_dim, kc, vc, capacity, pos0, dpos, scale, splits, scratch, out,
                          AttnPrep{}, s);
}

void attention_decode_prep(const uint16_t* q, const uint16_t* k, const uint16_t* v, int heads, int kv_heads,
                           int head_dim, const uint16_t* qn, const uint16_t* kn, float eps, const float* inv_freq,
                           bool traditional, uint16_t* kc, uint16_t* vc, int64_t capacity, int pos0, const int* dpos,
                           float scale, int splits, float* scratch, uint16_t* out, cudaStream_t s) {
  attention_splits<true>(q, 1, heads, kv_heads, head_dim, kc, vc, capacity, pos0, dpos, scale, splits, scratch, out,
                         AttnPrep{k, v, qn, kn, eps, inv_freq, traditional, kc, vc}, s);
}

bool stage_x() { return env_on("ZMLX_CUDA_STAGE_X"); }
bool kv_prefetch() { return env_on("ZMLX_CUDA_KV_PREFETCH"); }
// ZMLX_CUDA_MERGE_REGS=0: the merge's shared-memory form at every split count.
bool merge_regs_switch() { return !env_is("ZMLX_CUDA_MERGE_REGS", "0"); }
bool merge_in_registers(int splits) { return splits <= kRegMergeSplits && merge_regs_switch(); }

bool combine_two_steps(const QMat& down, int k, bool routing_ready) {
  const int S = mma_splits(down.cols);
  const int64_t slabs = (down.cols + 127) / 128;
  return use_mma(down) && routing_ready && early_routing() && down.group >= 64 && slabs <= 4 * S &&
         k * S <= combine_warps(k, S) && two_step_combine();
}

bool combine_shared_capped(const QMat& down, int k, bool routing_ready) {
  return combine_two_steps(down, k, routing_ready) && combine_warps(k, mma_splits(down.cols)) == 16 &&
         env_on("ZMLX_CUDA_COMBINE_REG_CAP");
}

bool multi_linear_short_rows(int bits, int64_t cols) {
  return bits != 16 && cols % 32 == 0 && cols / 32 <= 16 && short_multi_linear();
}

void merge_attention_splits(const float* scratch, int T, int heads, int D, int splits, uint16_t* out, cudaStream_t s) {
  // A thread a dimension (up to 1024): a thread holding several loaded them
  // one round trip after another (GLM's 512-wide latent rows: four).
  // Above kRegMergeSplits splits, attn_merge_wide_kernel.
  // ZMLX_CUDA_MERGE_REGS=0: the shared-memory form at every split count
  // (the test compares them; read at every launch).
  if (splits > kRegMergeSplits && merge_regs_switch()) {
    launch_short(attn_merge_wide_kernel, dim3(unsigned(heads), unsigned(T), unsigned((D + 31) / 32)),
                 dim3(kWideMergeWarps * 32), s, scratch, heads, D, splits, out);
    check_launch("attention merge (wide)");
    return;
  }
  const unsigned threads = unsigned(std::min(1024, std::max(32, (D + 31) / 32 * 32)));
  launch_short(attn_merge_kernel, dim3(unsigned(heads), unsigned(T)), dim3(threads), s, scratch, heads, D, splits, out,
               merge_in_registers(splits));
  check_launch("attention merge");
}

// Router kernels keep PL = ceil(E / 32) values per lane in registers.
template <typename F>
void by_per_lane(int E, F&& f) {
  if (E <= 32) f(std::integral_constant<int, 1>{});
  else if (E <= 64) f(std::integral_constant<int, 2>{});
  else if (E <= 128) f(std::integral_constant<int, 4>{});
  else if (E <= 256) f(std::integral_constant<int, 8>{});
  else f(std::integral_constant<int, 16>{});
}

bool route_packed_topk(int E, int k) { return k <= E && env_on("ZMLX_CUDA_PACKED_TOPK"); }

void route_softmax(const uint16_t* logits, int T, int E, int k, bool normalize, int32_t* experts, uint16_t* scores,
                   cudaStream_t s) {
  if (E > 32 * kRouteMaxPerLane || k > 16) throw std::runtime_error("CUDA router: at most 512 experts, top-16");
  by_per_lane(E, [&](auto pl) {
    launch_short(route_softmax_kernel<decltype(pl)::value>, dim3(unsigned((T + 3) / 4)), dim3(128), s, logits, T, E, k,
           normalize, experts, scores, route_packed_topk(E, k));
  });
  check_launch("route_softmax_topk");
}

void route_sigmoid(const uint16_t* logits, const float* bias, int T, int E, int k, bool normalize, float eps,
                   float scaling, int32_t* experts, uint16_t* scores, cudaStream_t s) {
  if (E > 32 * kRouteMaxPerLane || k > 16) throw std::runtime_error("CUDA router: at most 512 experts, top-16");
  by_per_lane(E, [&](auto pl) {
    launch_short(route_sigmoid_kernel<decltype(pl)::value>, dim3(unsigned((T + 3) / 4)), dim3(128), s, logits, bias, T, E, k,
           normalize, eps, scaling, experts, scores);
  });
  check_launch("route_sigmoid_topk");
}

namespace {
// Whether this GPU runs clusters of 16 blocks of linear_route_decode_kernel
// (a size past the portable 8, which the kernel must opt into).
bool route_cluster_of_16_runs() {
  auto kernel = linear_route_decode_kernel<4, false, 4, false>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(16);
  cfg.blockDim = dim3(256);
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = 16, attr.val.clusterDim.y = 1, attr.val.clusterDim.z = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, kernel, &cfg) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return n >= 1;
}
}  // namespace

bool linear_route_fits(const QMat& w, int k) {
  static const bool clusters = runs_sm90_code(reinterpret_cast<const void*>(linear_route_decode_kernel<4, false, 4, false>));
  static const bool on = env_on("ZMLX_CUDA_ROUTE_IN_ROUTER");
  static const bool sixteen = clusters && route_cluster_of_16_runs();
  return on && clusters && (w.bits == 4 || w.bits == 8 || w.bits == 16) &&
         scalar_preloaded_decode(w, 32 * kPreChunks) && w.rows <= kRouteInRouterMaxE && k >= 1 && k <= 16 &&
         k <= w.rows && (route_in_router_blocks(w) <= 8 || sixteen);
}

void linear_route(const uint16_t* x, const QMat& w, uint16_t* y, const TopKRoute& r, cudaStream_t s) {
  if (!linear_route_fits(w, r.k)) throw std::runtime_error("linear_route: a router or a GPU it does not take");
  const int wb = route_in_router_blocks(w), E = int(w.rows);
  auto go = [&](auto wbits, auto pl) {
    with_staged_x([&](auto sx) {
      auto one = [&](auto kernel) {
        // Each instance opts into clusters past 8 itself (route_cluster_of_16_runs
        // asked for one instance); a host call, made only when a launch is
        // recorded or run eagerly, never on a graph replay.
        if (wb > 8) cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
        launch_ex(kernel, dim3(unsigned(wb)), dim3(256), 0, unsigned(wb), s, x, w, y, preload_weights(), r,
                  env_on("ZMLX_CUDA_ROUTE_DRY_RUN"));
      };
      constexpr int WB = decltype(wbits)::value, PL = decltype(pl)::value;
      if (r.sigmoid) one(linear_route_decode_kernel<WB, decltype(sx)::value, PL, true>);
      else one(linear_route_decode_kernel<WB, decltype(sx)::value, PL, false>);
    });
  };
  // route_softmax's and route_sigmoid's values a lane (by_per_lane), so the same bits.
  auto per_lane = [&](auto wbits) {
    if (E <= 32) go(wbits, std::integral_constant<int, 1>{});
    else if (E <= 64) go(wbits, std::integral_constant<int, 2>{});
    else go(wbits, std::integral_constant<int, 4>{});
  };
  switch (w.bits) {
    case 4: per_lane(std::integral_constant<int, 4>{}); break;
    case 8: per_lane(std::integral_constant<int, 8>{}); break;
    default: per_lane(std::integral_constant<int, 16>{}); break;
  }
  check_launch("linear + top-k");
}

void argmax(const uint16_t* x, int64_t V, int32_t* out, cudaStream_t s) {
  launch(argmax_kernel, dim3(1), dim3(1024), s, x, V, out, static_cast<int32_t*>(nullptr),
         static_cast<int32_t*>(nullptr), 1);
  check_launch("argmax");
}

void argmax_chain(const uint16_t* x, int64_t V, int32_t* step, int32_t* ring, int ring_len, cudaStream_t s) {
  launch(argmax_kernel, dim3(1), dim3(1024), s, x, V, static_cast<int32_t*>(nullptr), step, ring, ring_len);
  check_launch("argmax_chain");
}

void attention_pe(const uint16_t* q, const uint16_t* k, const uint16_t* v, const uint16_t* q_pe, const uint16_t* k_pe,
                  int T, int heads, int kv_heads, int dk, int dv, int dr, int pos0, const int* dpos, float scale,
                  int splits, float* scratch, uint16_t* out, cudaStream_t s) {
  if (dk > 32 * kPeMaxPerLane || dv > 32 * kPeMaxPerLane || dr > 64)
    throw std::runtime_error("CUDA attention_pe: head widths up to 512 (rotary up to 64)");
  launch(attn_pe_partial_kernel, dim3(unsigned(heads), unsigned(splits), unsigned(T)), dim3(kAttnWarps * 32), s, q, k,
         v, q_pe, k_pe, heads, kv_heads, dk, dv, dr, pos0, dpos, scale, splits, scratch);
  check_launch("attention_pe");
  merge_attention_splits(scratch, T, heads, dv, splits, out, s);
}

void multi_linear(const uint16_t* x, int T, int64_t ldx, int64_t xoff, int H, const QMat& w, bool transpose,
                  uint16_t* out, cudaStream_t s) {
  if (transpose) {
    by_bits<MultiLinearTL>(w.bits, x, T, ldx, xoff, H, w, out, s);
  } else {
    launch(multi_linear_n_kernel, dim3(blocks_for(int64_t(T) * H * w.cols, 256)), dim3(256), s, x, ldx, xoff, T, H, w,
           out);
  }
  check_launch("multi_linear");
}

void slice_cols(const uint16_t* x, int64_t T, int64_t cols, int64_t group, int64_t offset, int64_t width,
                uint16_t* out, cudaStream_t s) {
  launch(slice_cols_kernel, dim3(blocks_for(T * (cols / group) * width, 256)), dim3(256), s, x, T, cols, group, offset,
         width, out);
  check_launch("slice_cols");
}

void route_sigmoid_grouped(const uint16_t* logits, const float* bias, int T, int E, int k, int n_group, int topk_group,
                           bool normalize, float eps, float scaling, int32_t* experts, float* scores, cudaStream_t s) {
  if ((n_group == 1 || topk_group >= n_group) && E <= 32 * kRouteMaxPerLane && k <= 16) {
    by_per_lane(E, [&](auto pl) {
      launch_short(route_grouped_warp_kernel<decltype(pl)::value>, dim3(unsigned((T + 3) / 4)), dim3(128), s, logits, bias, T,
             E, k, normalize, eps, scaling, experts, scores);
    });
    check_launch("route_sigmoid_grouped_topk");
    return;
  }
  if (E > kGroupedMaxE || k > 16 || n_group > 64)
    throw std::runtime_error("CUDA grouped router: at most 256 experts, top-16, 64 groups");
  launch_short(route_grouped_kernel, dim3(blocks_for(T, 64)), dim3(64), s, logits, bias, T, E, k, n_group, topk_group,
         normalize, eps, scaling, experts, scores);
  check_launch("route_sigmoid_grouped_topk");
}

void short_conv(const uint16_t* bcx, int T, int C, uint16_t* state, const uint16_t* w, int L, uint16_t* out,
                cudaStream_t s) {
  if (L > kConvMaxL) throw std::runtime_error("CUDA short_conv: kernel length " + std::to_string(L) + " > 8");
  launch(short_conv_kernel, dim3(blocks_for(C, 128)), dim3(128), s, bcx, T, C, state, w, L, out);
  check_launch("short_conv");
}

// ZMLX_CUDA_CONV_LATE_TRIGGER=0: the fused conv block lets out_proj launch
// right after its own wait (A/B runs; the same bits).
bool conv_late_trigger() {
  static const bool on = env_on("ZMLX_CUDA_CONV_LATE_TRIGGER");
  return on;
}

// ZMLX_CUDA_FUSED_CONV=0: in_proj and the short conv as two launches (A/B
// runs; the same bits). Read once, as the other A/B switches.
bool linear_short_conv_fits(const QMat& m, int64_t C, int L) {
  static const bool on = env_on("ZMLX_CUDA_FUSED_CONV");
  return on && use_mma_linear(m) && m.rows == 3 * C && C % 16 == 0 && L >= 2 && L <= kConvMaxL &&
         mma_splits(m.cols) <= 4;
}

void linear_short_conv(const uint16_t* x, const QMat& m, uint16_t* state, const uint16_t* w, int L, uint16_t* out,
                       cudaStream_t s) {
  const int S = mma_splits(m.cols), warps = 3 * S;  // S warps for each of the B, C and x tiles
  auto go = [&](auto kernel) {
    const size_t smem = size_t(mma_stage_words(m.cols) + warps * 16) * 4;
    allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
    launch_smem(kernel, dim3(unsigned(m.rows / 48)), dim3(warps * 32), smem, s, x, m, state, w, L, out,
                preload_weights(), conv_late_trigger());
  };
  switch (S) {
    case 1: go(mma_conv_decode_kernel<1>); break;
    case 2: go(mma_conv_decode_kernel<2>); break;
    case 4: go(mma_conv_decode_kernel<4>); break;
    default: throw std::runtime_error("CUDA linear_short_conv: " + std::to_string(S) + " splits a tile (at most 4)");
  }
  check_launch("linear_short_conv");
}

bool programmatic_launch_on() { return pdl_enabled(reinterpret_cast<const void*>(add_kernel)); }
int kernels_ptx_version() { return kernel_ptx_version(reinterpret_cast<const void*>(add_kernel)); }

void kernel_trace_arm(void* device_buf) {
  dev::arm_kernel_trace(device_buf);
  mla::kernel_trace_arm(device_buf);
}

}  // namespace zmlx::cuda::k
