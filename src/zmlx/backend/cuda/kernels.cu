// CUDA kernels (see kernels.h for the contracts).
//
// Quantized mat-vec design: one warp per output row; each lane walks the row
// in chunks of 32 values (16 bytes of 4-bit weights: one 128-bit load), with
// a fixed lane->chunk mapping and a butterfly warp reduction. Every kernel
// that needs "row r of W times x" calls row_dot(), so the unfused and fused
// MoE paths produce the same bits for the same inputs.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <string>

#include "zmlx/backend/cuda/kernels.h"

namespace zmlx::cuda::k {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;  // one warp per row, 256 threads
constexpr int kTokTile = 8;       // tokens per pass over a weight row (prefill)

void check_launch(const char* what) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw std::runtime_error(std::string("CUDA kernel ") + what + ": " + cudaGetErrorString(e));
}

__device__ __forceinline__ float bf(uint16_t u) { return __uint_as_float(uint32_t(u) << 16); }
__device__ __forceinline__ uint16_t to_bf(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
__device__ __forceinline__ float rbf(float f) { return bf(to_bf(f)); }
__device__ __forceinline__ float lo_bf(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float hi_bf(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// MLX silu(gate) * up with bf16 rounding after sigmoid, product and result.
__device__ __forceinline__ uint16_t swiglu_bf(uint16_t gate, uint16_t up) {
  const float g = bf(gate);
  const float sig = rbf(1.0f / (1.0f + expf(-g)));
  const float s = rbf(g * sig);
  return to_bf(s * bf(up));
}

// 32 bf16 inputs of one chunk, as 16 words of two values each.
struct XChunk {
  uint32_t v[16];
};
__device__ __forceinline__ XChunk load_x(const uint16_t* x) {
  XChunk c;
  const uint4* p = reinterpret_cast<const uint4*>(x);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint4 q = __ldg(p + i);
    c.v[4 * i] = q.x, c.v[4 * i + 1] = q.y, c.v[4 * i + 2] = q.z, c.v[4 * i + 3] = q.w;
  }
  return c;
}
__device__ __forceinline__ float x_at(const XChunk& c, int i) { return (i & 1) ? hi_bf(c.v[i >> 1]) : lo_bf(c.v[i >> 1]); }

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

// acc += Σ_i w_i·x_i over one chunk. Quantized: w_i = scale·q_i + bias, so
// the sum is scale·Σq·x + bias·Σx (fp32, fixed order).
template <int BITS>
__device__ __forceinline__ float chunk_dot(const WChunk<BITS>& w, const XChunk& x, float scale, float bias, float acc) {
  if constexpr (BITS == 16) {
#pragma unroll
    for (int i = 0; i < 32; ++i) acc = fmaf((i & 1) ? hi_bf(w.v[i >> 1]) : lo_bf(w.v[i >> 1]), x_at(x, i), acc);
    return acc;
  } else {
    constexpr uint32_t mask = (1u << BITS) - 1u;
    constexpr int per = 32 / BITS;
    float qx = 0.f, xs = 0.f;
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      const float q = float((w.v[i / per] >> (BITS * (i % per))) & mask);
      const float xv = x_at(x, i);
      qx = fmaf(q, xv, qx);
      xs += xv;
    }
    acc = fmaf(scale, qx, acc);
    return fmaf(bias, xs, acc);
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

__device__ __forceinline__ float combine_term(uint16_t y, const void* scores, bool f32, int mode, int64_t p) {
  if (mode == kBf16Products) return rbf(bf(y) * bf(static_cast<const uint16_t*>(scores)[p]));
  const float s = f32 ? static_cast<const float*>(scores)[p] : bf(static_cast<const uint16_t*>(scores)[p]);
  return bf(y) * s;
}

// ------------------------------------------------------------------ linear

template <int BITS, int TT>
__global__ void __launch_bounds__(256) linear_kernel(const uint16_t* x, int T, QMat m, uint16_t* y) {
  const int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (r >= m.rows) return;
  const int t0 = blockIdx.y * TT, ntok = min(TT, T - t0);
  float acc[TT];
  row_dot<BITS, TT>(m, 0, r, x + int64_t(t0) * m.cols, m.cols, ntok, acc);
  if ((threadIdx.x & 31) == 0)
    for (int t = 0; t < ntok; ++t) y[int64_t(t0 + t) * m.rows + r] = to_bf(acc[t]);
}

template <int BITS, int TT>
__global__ void __launch_bounds__(256) linear_swiglu_kernel(const uint16_t* x, int T, QMat g, QMat u, uint16_t* y) {
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
__global__ void __launch_bounds__(256) gather_linear_kernel(const uint16_t* x, bool per_slot, const int32_t* ex, int k,
                                                            QMat m, uint16_t* y) {
  const int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (r >= m.rows) return;
  const int64_t p = blockIdx.y;
  const int64_t xr = per_slot ? p : p / k;
  float acc[1];
  row_dot<BITS, 1>(m, ex[p], r, x + xr * m.cols, 0, 1, acc);
  if ((threadIdx.x & 31) == 0) y[p * m.rows + r] = to_bf(acc[0]);
}

template <int BITS>
__global__ void __launch_bounds__(256) gather_swiglu_kernel(const uint16_t* x, const int32_t* ex, int k, QMat g, QMat u,
                                                            uint16_t* y) {
  const int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (r >= g.rows) return;
  const int64_t p = blockIdx.y;
  const int32_t e = ex[p];
  float ga[1], ua[1];
  row_dot<BITS, 1>(g, e, r, x + (p / k) * g.cols, 0, 1, ga);
  row_dot<BITS, 1>(u, e, r, x + (p / k) * u.cols, 0, 1, ua);
  if ((threadIdx.x & 31) == 0) y[p * g.rows + r] = swiglu_bf(to_bf(ga[0]), to_bf(ua[0]));
}

template <int BITS>
__global__ void __launch_bounds__(256) gather_combine_kernel(const uint16_t* h, const int32_t* ex, const void* scores,
                                                             bool f32, int mode, int k, QMat m, uint16_t* out) {
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

__global__ void moe_combine_kernel(const uint16_t* y, const void* scores, bool f32, int mode, int T, int k, int64_t D,
                                   uint16_t* out) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= int64_t(T) * D) return;
  const int64_t t = i / D, d = i % D;
  float acc = 0.f;
  for (int j = 0; j < k; ++j) acc += combine_term(y[(t * k + j) * D + d], scores, f32, mode, t * k + j);
  out[i] = to_bf(acc);
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

template <int B>
struct LinearL {
  static void go(const uint16_t* x, int T, const QMat& m, uint16_t* y, cudaStream_t s) {
    const unsigned gx = unsigned((m.rows + kRowsPerBlock - 1) / kRowsPerBlock);
    if (T == 1)
      linear_kernel<B, 1><<<dim3(gx, 1), 256, 0, s>>>(x, T, m, y);
    else
      linear_kernel<B, kTokTile><<<dim3(gx, unsigned((T + kTokTile - 1) / kTokTile)), 256, 0, s>>>(x, T, m, y);
  }
};
template <int B>
struct LinearSwigluL {
  static void go(const uint16_t* x, int T, const QMat& g, const QMat& u, uint16_t* y, cudaStream_t s) {
    const unsigned gx = unsigned((g.rows + kRowsPerBlock - 1) / kRowsPerBlock);
    if (T == 1)
      linear_swiglu_kernel<B, 1><<<dim3(gx, 1), 256, 0, s>>>(x, T, g, u, y);
    else
      linear_swiglu_kernel<B, kTokTile><<<dim3(gx, unsigned((T + kTokTile - 1) / kTokTile)), 256, 0, s>>>(x, T, g, u, y);
  }
};
template <int B>
struct GatherL {
  static void go(const uint16_t* x, bool per_slot, const int32_t* ex, int P, int k, const QMat& m, uint16_t* y,
                 cudaStream_t s) {
    gather_linear_kernel<B><<<dim3(unsigned((m.rows + kRowsPerBlock - 1) / kRowsPerBlock), unsigned(P)), 256, 0, s>>>(
        x, per_slot, ex, k, m, y);
  }
};
template <int B>
struct GatherSwigluL {
  static void go(const uint16_t* x, const int32_t* ex, int P, int k, const QMat& g, const QMat& u, uint16_t* y,
                 cudaStream_t s) {
    gather_swiglu_kernel<B><<<dim3(unsigned((g.rows + kRowsPerBlock - 1) / kRowsPerBlock), unsigned(P)), 256, 0, s>>>(
        x, ex, k, g, u, y);
  }
};
template <int B>
struct GatherCombineL {
  static void go(const uint16_t* h, const int32_t* ex, const void* sc, bool f32, int mode, int T, int k, const QMat& m,
                 uint16_t* out, cudaStream_t s) {
    gather_combine_kernel<B><<<dim3(unsigned((m.rows + kRowsPerBlock - 1) / kRowsPerBlock), unsigned(T)), 256, 0, s>>>(
        h, ex, sc, f32, mode, k, m, out);
  }
};

// ------------------------------------------------------------ elementwise

__global__ void embed_kernel(QMat m, const int32_t* ids, int T, uint16_t* out) {
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

// One warp per row (D <= 1024) or one block per row.
__global__ void rms_norm_warp_kernel(const uint16_t* x, int64_t R, int D, const uint16_t* w, float eps, uint16_t* out) {
  const int64_t r = int64_t(blockIdx.x) * 8 + (threadIdx.x >> 5);
  if (r >= R) return;
  const int lane = threadIdx.x & 31;
  const uint16_t* xr = x + r * D;
  float ss = 0.f;
  for (int d = lane; d < D; d += 32) {
    const float v = bf(xr[d]);
    ss = fmaf(v, v, ss);
  }
  ss = warp_sum(ss);
  const float inv = 1.0f / sqrtf(ss / float(D) + eps);
  for (int d = lane; d < D; d += 32) out[r * D + d] = to_bf(bf(w[d]) * rbf(bf(xr[d]) * inv));
}

__global__ void rms_norm_block_kernel(const uint16_t* x, int D, const uint16_t* w, float eps, uint16_t* out) {
  __shared__ float part[32];
  const int64_t r = blockIdx.x;
  const uint16_t* xr = x + r * D;
  float ss = 0.f;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    const float v = bf(xr[d]);
    ss = fmaf(v, v, ss);
  }
  ss = warp_sum(ss);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = ss;
  __syncthreads();
  if (threadIdx.x < 32) {
    float v = threadIdx.x < blockDim.x / 32 ? part[threadIdx.x] : 0.f;
    v = warp_sum(v);
    if (threadIdx.x == 0) part[0] = v;
  }
  __syncthreads();
  const float inv = 1.0f / sqrtf(part[0] / float(D) + eps);
  for (int d = threadIdx.x; d < D; d += blockDim.x) out[r * D + d] = to_bf(bf(w[d]) * rbf(bf(xr[d]) * inv));
}

__global__ void rope_kernel(uint16_t* x, int T, int heads, int hd, int off, int half, int pos0, const int* dpos,
                            const float* inv_freq, bool traditional) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= int64_t(T) * heads * half) return;
  const int f = int(i % half);
  const int64_t th = i / half;
  const int t = int(th / heads), h = int(th % heads);
  const int pos = (dpos ? *dpos : pos0) + t;
  const float theta = float(pos) * inv_freq[f];
  const float c = cosf(theta), s = sinf(theta);
  uint16_t* v = x + (int64_t(t) * heads + h) * hd + off;
  const int a = traditional ? 2 * f : f, b = traditional ? 2 * f + 1 : f + half;
  const float x0 = bf(v[a]), x1 = bf(v[b]);
  v[a] = to_bf(x0 * c - x1 * s);
  v[b] = to_bf(x0 * s + x1 * c);
}

__global__ void add_kernel(uint16_t* h, const uint16_t* x, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) h[i] = to_bf(bf(h[i]) + bf(x[i]));
}

__global__ void swiglu_kernel(const uint16_t* g, const uint16_t* u, int64_t n, uint16_t* out) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = swiglu_bf(g[i], u[i]);
}

__global__ void kv_write_kernel(uint16_t* kc, uint16_t* vc, int64_t cap, int H, int hd, const uint16_t* k,
                                const uint16_t* v, int T, int pos0, const int* dpos) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= int64_t(T) * H * hd) return;
  const int d = int(i % hd);
  const int64_t th = i / hd;
  const int t = int(th / H), h = int(th % H);
  const int64_t pos = (dpos ? *dpos : pos0) + t;
  if (pos >= cap) return;
  kc[(h * cap + pos) * hd + d] = k[i];
  vc[(h * cap + pos) * hd + d] = v[i];
}

// --------------------------------------------------------------- attention

constexpr int kAttnWarps = 4;

// Partial softmax-attention of one (head, split, token): running max m, sum l
// and unnormalised output acc over the split's keys.
template <int DPL>
__global__ void __launch_bounds__(kAttnWarps * 32) attn_partial_kernel(const uint16_t* q, int heads, int kvh,
                                                                      const uint16_t* kc, const uint16_t* vc,
                                                                      int64_t cap, int pos0, const int* dpos,
                                                                      float scale, int splits, float* scratch) {
  constexpr int HD = 32 * DPL;
  const int h = blockIdx.x, s = blockIdx.y, t = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int visible = (dpos ? *dpos : pos0) + t + 1;
  const int chunk = (visible + splits - 1) / splits;
  const int j0 = s * chunk, j1 = min(visible, j0 + chunk);
  const int g = h / (heads / kvh);
  const uint16_t* qh = q + (int64_t(t) * heads + h) * HD + lane * DPL;
  float qv[DPL];
#pragma unroll
  for (int d = 0; d < DPL; ++d) qv[d] = bf(qh[d]);
  const uint16_t* K = kc + int64_t(g) * cap * HD + lane * DPL;
  const uint16_t* V = vc + int64_t(g) * cap * HD + lane * DPL;
  float m = -FLT_MAX, l = 0.f, acc[DPL];
#pragma unroll
  for (int d = 0; d < DPL; ++d) acc[d] = 0.f;
  for (int j = j0 + warp; j < j1; j += kAttnWarps) {
    float sc = 0.f;
#pragma unroll
    for (int d = 0; d < DPL; ++d) sc = fmaf(qv[d], bf(K[int64_t(j) * HD + d]), sc);
    sc = warp_sum(sc) * scale;
    const float mn = fmaxf(m, sc);
    const float corr = expf(m - mn), p = expf(sc - mn);
    l = l * corr + p;
#pragma unroll
    for (int d = 0; d < DPL; ++d) acc[d] = fmaf(p, bf(V[int64_t(j) * HD + d]), acc[d] * corr);
    m = mn;
  }
  __shared__ float sm[kAttnWarps], sl[kAttnWarps], sacc[kAttnWarps][HD];
  if (lane == 0) sm[warp] = m, sl[warp] = l;
#pragma unroll
  for (int d = 0; d < DPL; ++d) sacc[warp][lane * DPL + d] = acc[d];
  __syncthreads();
  float M = -FLT_MAX;
  for (int w = 0; w < kAttnWarps; ++w)
    if (sl[w] > 0.f) M = fmaxf(M, sm[w]);
  float* out = scratch + ((int64_t(t) * heads + h) * splits + s) * (HD + 2);
  for (int d = threadIdx.x; d < HD; d += blockDim.x) {
    float a = 0.f;
    for (int w = 0; w < kAttnWarps; ++w)
      if (sl[w] > 0.f) a = fmaf(sacc[w][d], expf(sm[w] - M), a);
    out[2 + d] = a;
  }
  if (threadIdx.x == 0) {
    float L = 0.f;
    for (int w = 0; w < kAttnWarps; ++w)
      if (sl[w] > 0.f) L = fmaf(sl[w], expf(sm[w] - M), L);
    out[0] = M, out[1] = L;
  }
}

__global__ void attn_merge_kernel(const float* scratch, int heads, int hd, int splits, uint16_t* out) {
  const int h = blockIdx.x, t = blockIdx.y;
  const float* base = scratch + (int64_t(t) * heads + h) * splits * (hd + 2);
  float M = -FLT_MAX;
  for (int s = 0; s < splits; ++s)
    if (base[s * (hd + 2) + 1] > 0.f) M = fmaxf(M, base[s * (hd + 2)]);
  float L = 0.f;
  for (int s = 0; s < splits; ++s) {
    const float* p = base + s * (hd + 2);
    if (p[1] > 0.f) L = fmaf(p[1], expf(p[0] - M), L);
  }
  const float inv = 1.0f / L;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float a = 0.f;
    for (int s = 0; s < splits; ++s) {
      const float* p = base + s * (hd + 2);
      if (p[1] > 0.f) a = fmaf(p[2 + d], expf(p[0] - M), a);
    }
    out[(int64_t(t) * heads + h) * hd + d] = to_bf(a * inv);
  }
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

// Selects the top k of `key` (ties to the lower id); returns ids in order.
__device__ void warp_topk(const float (&key)[kRouteMaxPerLane], int E, int k, int* sel) {
  const int lane = threadIdx.x & 31;
  uint32_t taken = 0;
  for (int j = 0; j < k; ++j) {
    float v = -INFINITY;
    int id = INT_MAX;
    for (int i = 0; i < kRouteMaxPerLane; ++i) {
      const int e = lane + 32 * i;
      if (e < E && !(taken >> i & 1u) && (key[i] > v || id == INT_MAX)) v = key[i], id = e;
    }
    float bv;
    int bid;
    warp_best(v, id, bv, bid);
    if ((bid & 31) == lane) taken |= 1u << (bid >> 5);
    sel[j] = bid;
  }
}

__global__ void route_softmax_kernel(const uint16_t* logits, int T, int E, int k, bool normalize, int32_t* ex,
                                     uint16_t* scores) {
  const int t = blockIdx.x * 4 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (t >= T) return;
  const uint16_t* l = logits + int64_t(t) * E;
  float z[kRouteMaxPerLane], p[kRouteMaxPerLane];
  float mx = -INFINITY;
  for (int i = 0; i < kRouteMaxPerLane; ++i) {
    const int e = lane + 32 * i;
    z[i] = e < E ? bf(l[e]) : -INFINITY;
    mx = fmaxf(mx, z[i]);
  }
  mx = warp_max(mx);
  float sum = 0.f;
  for (int i = 0; i < kRouteMaxPerLane; ++i) sum += (lane + 32 * i < E) ? expf(z[i] - mx) : 0.f;
  sum = warp_sum(sum);
  for (int i = 0; i < kRouteMaxPerLane; ++i) p[i] = lane + 32 * i < E ? rbf(expf(z[i] - mx) / sum) : -INFINITY;
  int sel[16];
  warp_topk(p, E, k, sel);
  // p of each selected expert, fetched from its owner lane.
  float ps[16];
  for (int j = 0; j < k; ++j) {
    float mine = 0.f;
    for (int i = 0; i < kRouteMaxPerLane; ++i)
      if (lane + 32 * i == sel[j]) mine = p[i];
    ps[j] = __shfl_sync(0xffffffffu, mine, sel[j] & 31);
  }
  if (lane == 0) {
    float total = 0.f;
    for (int j = 0; j < k; ++j) total += ps[j];
    const float denom = rbf(total);
    for (int j = 0; j < k; ++j) {
      ex[int64_t(t) * k + j] = sel[j];
      scores[int64_t(t) * k + j] = to_bf(normalize ? ps[j] / denom : ps[j]);
    }
  }
}

__global__ void route_sigmoid_kernel(const uint16_t* logits, const float* bias, int T, int E, int k, bool normalize,
                                     float eps, float scaling, int32_t* ex, uint16_t* scores) {
  const int t = blockIdx.x * 4 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (t >= T) return;
  const uint16_t* l = logits + int64_t(t) * E;
  float sw[kRouteMaxPerLane], sel_key[kRouteMaxPerLane];
  for (int i = 0; i < kRouteMaxPerLane; ++i) {
    const int e = lane + 32 * i;
    sw[i] = e < E ? rbf(1.0f / (1.0f + expf(-bf(l[e])))) : 0.f;
    sel_key[i] = e < E ? sw[i] + bias[e] : -INFINITY;
  }
  int sel[16];
  warp_topk(sel_key, E, k, sel);
  float ws[16];
  for (int j = 0; j < k; ++j) {
    float mine = 0.f;
    for (int i = 0; i < kRouteMaxPerLane; ++i)
      if (lane + 32 * i == sel[j]) mine = sw[i];
    ws[j] = __shfl_sync(0xffffffffu, mine, sel[j] & 31);
  }
  if (lane == 0) {
    float total = 0.f;
    for (int j = 0; j < k; ++j) total += ws[j];
    const float denom = rbf(rbf(total) + eps);
    for (int j = 0; j < k; ++j) {
      float w = ws[j];
      if (normalize) w = rbf(w / denom);
      ex[int64_t(t) * k + j] = sel[j];
      scores[int64_t(t) * k + j] = to_bf(w * scaling);
    }
  }
}

// ---------------------------------------------------------------- short conv

constexpr int kConvMaxL = 8;

__global__ void short_conv_kernel(const uint16_t* bcx, int T, int C, uint16_t* state, const uint16_t* w, int L,
                                  uint16_t* out) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  uint16_t win[kConvMaxL];  // the last L-1 Bx values, oldest first
  for (int i = 0; i < L - 1; ++i) win[i] = state[int64_t(i) * C + c];
  for (int t = 0; t < T; ++t) {
    const uint16_t* row = bcx + int64_t(t) * 3 * C;
    win[L - 1] = to_bf(bf(row[c]) * bf(row[2 * C + c]));
    float acc = 0.f;
    for (int i = 0; i < L; ++i) acc += bf(win[i]) * bf(w[int64_t(c) * L + i]);
    out[int64_t(t) * C + c] = to_bf(bf(row[C + c]) * rbf(acc));
    for (int i = 0; i + 1 < L; ++i) win[i] = win[i + 1];
  }
  for (int i = 0; i < L - 1; ++i) state[int64_t(i) * C + c] = win[i];
}

unsigned blocks_for(int64_t n, int threads) { return unsigned((n + threads - 1) / threads); }

}  // namespace

// -------------------------------------------------------------- host entry

void embed(const QMat& table, const int32_t* ids, int T, uint16_t* out, cudaStream_t s) {
  embed_kernel<<<blocks_for(int64_t(T) * table.cols, 256), 256, 0, s>>>(table, ids, T, out);
  check_launch("embed");
}

void linear(const uint16_t* x, int T, const QMat& w, uint16_t* y, cudaStream_t s) {
  by_bits<LinearL>(w.bits, x, T, w, y, s);
  check_launch("linear");
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
                   cudaStream_t s) {
  if (g.bits != u.bits) throw std::runtime_error("gather_qmm_swiglu: gate and up differ in format");
  by_bits<GatherSwigluL>(g.bits, x, experts, T * k, k, g, u, y, s);
  check_launch("gather_qmm_swiglu");
}

void gather_combine(const uint16_t* h, const int32_t* experts, const void* scores, bool scores_f32, Combine mode,
                    int T, int k, const QMat& down, uint16_t* out, cudaStream_t s) {
  by_bits<GatherCombineL>(down.bits, h, experts, scores, scores_f32, int(mode), T, k, down, out, s);
  check_launch("gather_qmm_combine");
}

void moe_combine(const uint16_t* y, const void* scores, bool scores_f32, Combine mode, int T, int k, int64_t D,
                 uint16_t* out, cudaStream_t s) {
  moe_combine_kernel<<<blocks_for(int64_t(T) * D, 256), 256, 0, s>>>(y, scores, scores_f32, int(mode), T, k, D, out);
  check_launch("moe_combine");
}

void rms_norm(const uint16_t* x, int64_t rows, int64_t D, const uint16_t* w, float eps, uint16_t* out,
              cudaStream_t s) {
  if (D <= 1024)
    rms_norm_warp_kernel<<<unsigned((rows + 7) / 8), 256, 0, s>>>(x, rows, int(D), w, eps, out);
  else
    rms_norm_block_kernel<<<unsigned(rows), 256, 0, s>>>(x, int(D), w, eps, out);
  check_launch("rms_norm");
}

void rope(uint16_t* x, int T, int heads, int head_dim, int rot_offset, int rot_dims, int pos0, const int* dpos,
          const float* inv_freq, bool traditional, cudaStream_t s) {
  const int half = rot_dims / 2;
  rope_kernel<<<blocks_for(int64_t(T) * heads * half, 256), 256, 0, s>>>(x, T, heads, head_dim, rot_offset, half, pos0,
                                                                         dpos, inv_freq, traditional);
  check_launch("rope");
}

void add(uint16_t* h, const uint16_t* x, int64_t n, cudaStream_t s) {
  add_kernel<<<blocks_for(n, 256), 256, 0, s>>>(h, x, n);
  check_launch("add");
}

void swiglu(const uint16_t* g, const uint16_t* u, int64_t n, uint16_t* out, cudaStream_t s) {
  swiglu_kernel<<<blocks_for(n, 256), 256, 0, s>>>(g, u, n, out);
  check_launch("swiglu");
}

void kv_write(uint16_t* kc, uint16_t* vc, int64_t capacity, int kv_heads, int head_dim, const uint16_t* k,
              const uint16_t* v, int T, int pos0, const int* dpos, cudaStream_t s) {
  kv_write_kernel<<<blocks_for(int64_t(T) * kv_heads * head_dim, 256), 256, 0, s>>>(kc, vc, capacity, kv_heads,
                                                                                    head_dim, k, v, T, pos0, dpos);
  check_launch("kv_write");
}

void attention(const uint16_t* q, int T, int heads, int kv_heads, int head_dim, const uint16_t* kc, const uint16_t* vc,
               int64_t capacity, int pos0, const int* dpos, float scale, int splits, float* scratch, uint16_t* out,
               cudaStream_t s) {
  const dim3 grid{unsigned(heads), unsigned(splits), unsigned(T)};
  switch (head_dim) {
    case 64: attn_partial_kernel<2><<<grid, kAttnWarps * 32, 0, s>>>(q, heads, kv_heads, kc, vc, capacity, pos0, dpos, scale, splits, scratch); break;
    case 128: attn_partial_kernel<4><<<grid, kAttnWarps * 32, 0, s>>>(q, heads, kv_heads, kc, vc, capacity, pos0, dpos, scale, splits, scratch); break;
    case 256: attn_partial_kernel<8><<<grid, kAttnWarps * 32, 0, s>>>(q, heads, kv_heads, kc, vc, capacity, pos0, dpos, scale, splits, scratch); break;
    default: throw std::runtime_error("CUDA attention: head_dim " + std::to_string(head_dim) + " (supported: 64, 128, 256)");
  }
  check_launch("attention");
  attn_merge_kernel<<<dim3(unsigned(heads), unsigned(T)), 128, 0, s>>>(scratch, heads, head_dim, splits, out);
  check_launch("attention merge");
}

void route_softmax(const uint16_t* logits, int T, int E, int k, bool normalize, int32_t* experts, uint16_t* scores,
                   cudaStream_t s) {
  if (E > 32 * kRouteMaxPerLane || k > 16) throw std::runtime_error("CUDA router: at most 512 experts, top-16");
  route_softmax_kernel<<<unsigned((T + 3) / 4), 128, 0, s>>>(logits, T, E, k, normalize, experts, scores);
  check_launch("route_softmax_topk");
}

void route_sigmoid(const uint16_t* logits, const float* bias, int T, int E, int k, bool normalize, float eps,
                   float scaling, int32_t* experts, uint16_t* scores, cudaStream_t s) {
  if (E > 32 * kRouteMaxPerLane || k > 16) throw std::runtime_error("CUDA router: at most 512 experts, top-16");
  route_sigmoid_kernel<<<unsigned((T + 3) / 4), 128, 0, s>>>(logits, bias, T, E, k, normalize, eps, scaling, experts,
                                                              scores);
  check_launch("route_sigmoid_topk");
}

void short_conv(const uint16_t* bcx, int T, int C, uint16_t* state, const uint16_t* w, int L, uint16_t* out,
                cudaStream_t s) {
  if (L > kConvMaxL) throw std::runtime_error("CUDA short_conv: kernel length " + std::to_string(L) + " > 8");
  short_conv_kernel<<<blocks_for(C, 128), 128, 0, s>>>(bcx, T, C, state, w, L, out);
  check_launch("short_conv");
}

}  // namespace zmlx::cuda::k
