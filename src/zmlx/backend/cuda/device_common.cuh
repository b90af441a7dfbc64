// Device helpers shared by the CUDA kernel files (kernels.cu, gemm.cu,
// mla.cu): bf16 conversions, warp reductions, the tensor-core and async-copy
// instructions, the split-partial bookkeeping of flash-decoding style
// attention, and the kernel launch with programmatic dependent launch. Header-only, every function inline; each .cu file pulls the
// names into its own anonymous namespace with `using namespace
// zmlx::cuda::dev;`. All files build with --fmad=false, so the helpers give
// the same bits wherever they are used.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "zmlx/backend/cuda/env_switch.h"
#include "zmlx/backend/cuda/kernel_trace.h"

namespace zmlx::cuda::dev {

// ---------------------------------------------------------------- bf16

__device__ __forceinline__ float bf(uint16_t u) { return __uint_as_float(uint32_t(u) << 16); }
__device__ __forceinline__ uint16_t to_bf(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
// f rounded to bf16 and back: MLX's rounding points inside fp32 arithmetic.
__device__ __forceinline__ float rbf(float f) { return bf(to_bf(f)); }
// The low / high bf16 of a packed pair as floats.
__device__ __forceinline__ float lo_bf(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float hi_bf(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }
__device__ __forceinline__ uint32_t pack_bf2(float lo, float hi) {
  return uint32_t(to_bf(lo)) | (uint32_t(to_bf(hi)) << 16);
}

// MLX's silu(gate) * up with bf16 rounding after the sigmoid and the
// product (the caller rounds the result).
__device__ __forceinline__ float swiglu_f(float g, float u) {
  const float sig = rbf(1.0f / (1.0f + expf(-g)));
  const float s = rbf(g * sig);
  return s * u;
}

// ---------------------------------------------------------- reductions

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

// ------------------------------------------- tensor cores, async copies

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16-byte async copy global -> shared; valid = false fills the destination with zeros.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
// Sends the 128-byte line holding p to L2 (a hint: data another kernel
// still writes is not read early by it, the write updates the line).
__device__ __forceinline__ void prefetch_l2_line(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}
// Sends [p, p + bytes) to L2 (p 16-byte aligned, bytes a multiple of 16):
// one bulk prefetch on sm_90, nothing below (it is only a hint).
__device__ __forceinline__ void prefetch_l2_bulk(const void* p, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
#else
  (void)p, (void)bytes;
#endif
}
// Sends rows [j0, j1) of a row-major 16-bit matrix of `cols` columns to L2
// (rows 16-byte aligned, cols a multiple of 8); nothing when the range is empty.
__device__ __forceinline__ void prefetch_rows_l2(const uint16_t* base, int64_t cols, int j0, int j1) {
  if (j1 > j0) prefetch_l2_bulk(base + int64_t(j0) * cols, uint32_t(int64_t(j1 - j0) * cols * 2));
}
// Bulk copies (TMA) into shared memory, completed through transaction-count
// mbarriers. They are sm_90 instructions: an sm_80 pass compiles them to a
// trap, and a kernel using them runs only where its caller has checked for a
// Hopper GPU running this binary's sm_90 code (kernel_ptx_version below).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define ZMLX_SM90_ASM(...) __trap()
#else
#define ZMLX_SM90_ASM(...) asm volatile(__VA_ARGS__)
#endif
// Thread-block clusters (sm_90) and their shared-memory barriers.
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  ZMLX_SM90_ASM("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count));
}
// After the block's barriers are initialised, before a bulk copy uses them.
__device__ __forceinline__ void mbar_init_fence() { ZMLX_SM90_ASM("fence.mbarrier_init.release.cluster;" ::: "memory"); }
// The one arrival of the barrier's phase, announcing `bytes` of copies.
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  ZMLX_SM90_ASM("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done)
    ZMLX_SM90_ASM("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                  : "=r"(done)
                  : "r"(smem_addr(bar)), "r"(parity)
                  : "memory");
}
// bytes (a multiple of 16, 16-byte aligned at both ends) from global src to
// shared dst, counted against bar's transaction bytes.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  ZMLX_SM90_ASM("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                    smem_addr(dst)),
                "l"(src), "r"(bytes), "r"(smem_addr(bar))
                : "memory");
}
// One 32-bit word into block `rank`'s shared memory at `local`'s offset,
// counted (4 bytes) against that block's barrier at `bar`'s offset
// (st.async): the target learns of it from its barrier, so the writer needs
// no cluster-wide release (whose fence also waits for the block's global
// stores).
__device__ __forceinline__ void st_async_cluster_u32(const void* local, const uint64_t* bar, uint32_t rank,
                                                     uint32_t v) {
  [[maybe_unused]] uint32_t ra = 0, rb = 0;  // unused where the sm_80 pass traps
  ZMLX_SM90_ASM("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(ra) : "r"(smem_addr(local)), "r"(rank));
  ZMLX_SM90_ASM("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(rb) : "r"(smem_addr(bar)), "r"(rank));
  ZMLX_SM90_ASM("st.async.shared::cluster.mbarrier::complete_tx::bytes.u32 [%0], %1, [%2];" ::"r"(ra), "r"(v), "r"(rb)
                : "memory");
}
// Two 32-bit words (8-byte aligned) the same way: 8 bytes against the barrier.
__device__ __forceinline__ void st_async_cluster_v2(const void* local, const uint64_t* bar, uint32_t rank, float a,
                                                    float b) {
  [[maybe_unused]] uint32_t ra = 0, rb = 0;  // unused where the sm_80 pass traps
  ZMLX_SM90_ASM("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(ra) : "r"(smem_addr(local)), "r"(rank));
  ZMLX_SM90_ASM("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(rb) : "r"(smem_addr(bar)), "r"(rank));
  ZMLX_SM90_ASM("st.async.shared::cluster.mbarrier::complete_tx::bytes.v2.f32 [%0], {%1, %2}, [%3];" ::"r"(ra),
                "f"(a), "f"(b), "r"(rb)
                : "memory");
}
// mbar_wait for words other blocks of the cluster stored (st.async): acquire
// at cluster scope.
__device__ __forceinline__ void mbar_wait_cluster(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done)
    ZMLX_SM90_ASM(
        "{ .reg .pred p; mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
}
// The cluster's barrier ordering no memory: after mbar_init_fence, barriers a
// block initialised before it are usable from every block after it.
__device__ __forceinline__ void cluster_sync_relaxed() {
  ZMLX_SM90_ASM("barrier.cluster.arrive.relaxed;\n\tbarrier.cluster.wait;" ::: "memory");
}
// Before a cluster's blocks store into each other's shared memory by
// st.async: where `receives`, this block's thread 0 sets up `bar` to expect
// `bytes` (the phase's one arrival; it completes with those bytes); then
// every block of the cluster passes one relaxed cluster barrier, so every
// barrier exists before any block stores to it. Every thread of every block
// of the cluster calls it.
__device__ __forceinline__ void mbar_prepare_cluster(uint64_t* bar, bool receives, uint32_t bytes) {
  if (receives && threadIdx.x == 0) {
    mbar_init(bar, 1);
    mbar_init_fence();
    mbar_expect_tx(bar, bytes);
  }
  cluster_sync_relaxed();
}
#undef ZMLX_SM90_ASM
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
// Transposed: for a [k][n] tile (rows = k) this yields the B fragment of
// mma m16n8k16 (col-major B) directly.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
// Byte offset of 16-byte chunk c of row r in a swizzled tile with rows of
// `row_bytes` (a multiple of 128): the low 3 bits of the chunk index are
// XORed with r & 7, so the 8 rows an ldmatrix phase reads hit 8 different
// bank groups.
__device__ __forceinline__ uint32_t swz(int r, int c, int row_bytes) {
  return uint32_t(r * row_bytes + ((c ^ (r & 7)) << 4));
}
// c += a·b for one m16n8k16 tile, bf16 inputs, fp32 accumulators.
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ----------------------------------------- split attention partials
// Decode attention splits one (token, head)'s keys over blocks; each block's
// W warps keep an online-softmax state (running max m, sum l, unnormalised
// output acc[D]). A split's partial is D + 2 floats: (M, L, acc[D]).

// Combines the W warps' states (in shared memory, after a __syncthreads)
// into the block's partial at `out`, of n <= D output dimensions (out holds
// n + 2 floats); warps that saw no key have l = 0.
template <int W, int D>
__device__ __forceinline__ void store_split_partial(const float (&sm)[W], const float (&sl)[W],
                                                    const float (&sacc)[W][D], int n, float* out) {
  float M = -FLT_MAX;
  for (int w = 0; w < W; ++w)
    if (sl[w] > 0.f) M = fmaxf(M, sm[w]);
  for (int d = threadIdx.x; d < n; d += blockDim.x) {
    float a = 0.f;
    for (int w = 0; w < W; ++w)
      if (sl[w] > 0.f) a = fmaf(sacc[w][d], expf(sm[w] - M), a);
    out[2 + d] = a;
  }
  if (threadIdx.x == 0) {
    float L = 0.f;
    for (int w = 0; w < W; ++w)
      if (sl[w] > 0.f) L = fmaf(sl[w], expf(sm[w] - M), L);
    out[0] = M, out[1] = L;
  }
}

constexpr int kMaxMergeSplits = 128;  // the most key splits a decode attention uses
constexpr int kRegMergeSplits = 16;   // up to this many, the merge holds every split in registers

// The `splits` partials at `base` (one after another) -> the bf16 output
// row out[D]; the block's threads share the dimensions (every thread of the
// block calls this). Split s weighs exp(m_s - M) (M the largest m of the
// splits that saw a key), L = Σ l_s·w_s in split order, out = Σ v_s·w_s / L.
// Up to kRegMergeSplits splits, every thread loads all m, l and its values at
// once and works out the weights itself: one round trip to L2 and no barrier
// on the critical path (the merge took ~4 us a layer in a Qwen3 decode step
// with a barrier, one thread's exp loop and a second round of loads).
// in_registers = false keeps the shared-memory form for those too (the
// reference the register form is tested against; the same bits).
__device__ __forceinline__ void merge_split_partials(const float* base, int D, int splits, uint16_t* out,
                                                     bool in_registers = true) {
  if (in_registers && splits <= kRegMergeSplits) {
    float m[kRegMergeSplits], l[kRegMergeSplits], v[kRegMergeSplits];
    int d = threadIdx.x;
#pragma unroll
    for (int s = 0; s < kRegMergeSplits; ++s) {
      m[s] = s < splits ? base[s * (D + 2)] : 0.f;
      l[s] = s < splits ? base[s * (D + 2) + 1] : 0.f;
      v[s] = s < splits && d < D ? base[s * (D + 2) + 2 + d] : 0.f;
    }
    float M = -FLT_MAX;
#pragma unroll
    for (int s = 0; s < kRegMergeSplits; ++s)
      if (s < splits && l[s] > 0.f) M = fmaxf(M, m[s]);
    float w[kRegMergeSplits], L = 0.f;
#pragma unroll
    for (int s = 0; s < kRegMergeSplits; ++s) {
      w[s] = s < splits && l[s] > 0.f ? expf(m[s] - M) : 0.f;  // 0: the split saw no key
      if (s < splits && l[s] > 0.f) L = fmaf(l[s], w[s], L);
    }
    const float inv = 1.0f / L;
    for (; d < D; d += blockDim.x) {
      if (d != int(threadIdx.x))
#pragma unroll
        for (int s = 0; s < kRegMergeSplits; ++s) v[s] = s < splits ? base[s * (D + 2) + 2 + d] : 0.f;
      float a = 0.f;
#pragma unroll
      for (int s = 0; s < kRegMergeSplits; ++s)
        if (s < splits && w[s] > 0.f) a = fmaf(v[s], w[s], a);
      out[d] = to_bf(a * inv);
    }
    return;
  }
  __shared__ float s_m[kMaxMergeSplits], s_w[kMaxMergeSplits];
  __shared__ float s_inv;
  for (int s = threadIdx.x; s < splits; s += blockDim.x) {
    s_m[s] = base[s * (D + 2)];
    s_w[s] = base[s * (D + 2) + 1];  // l, for now
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float M = -FLT_MAX;
    for (int s = 0; s < splits; ++s)
      if (s_w[s] > 0.f) M = fmaxf(M, s_m[s]);
    float L = 0.f;
    for (int s = 0; s < splits; ++s) {
      const float w = s_w[s] > 0.f ? expf(s_m[s] - M) : 0.f;  // 0: the split saw no key
      if (s_w[s] > 0.f) L = fmaf(s_w[s], w, L);
      s_w[s] = w;
    }
    s_inv = 1.0f / L;
  }
  __syncthreads();
  const float inv = s_inv;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float a = 0.f;
    for (int s0 = 0; s0 < splits; s0 += 8) {
      float v[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = s0 + i < splits ? base[(s0 + i) * (D + 2) + 2 + d] : 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (s0 + i < splits && s_w[s0 + i] > 0.f) a = fmaf(v[i], s_w[s0 + i], a);
    }
    out[d] = to_bf(a * inv);
  }
}

// Sum of one float per thread over the block (blockDim.x a multiple of 32,
// at most 1024), the same value returned to every thread.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float part[32];
  v = warp_sum(v);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    float t = threadIdx.x < blockDim.x / 32 ? part[threadIdx.x] : 0.f;
    t = warp_sum(t);
    if (threadIdx.x == 0) part[0] = t;
  }
  __syncthreads();
  return part[0];
}

// add_rms_norm of one row of D = 8·blockDim.x values, 8 (one 16-byte
// vector) a thread: hn = bf16(h + x), out = bf16(w · bf16(hn · inv)), inv =
// 1/sqrt(mean(hn²) + eps). Every thread of the block calls it (block_sum).
// The CUDA backend's add_rms_norm and the tensor-parallel all-reduce kernel
// that folds it in (dist/nccl_lsa_allreduce.cu) both use it: one set of bits.
__device__ __forceinline__ void add_rms_norm_row8(uint4 hv, uint4 xv, uint4 wv, int D, float eps, uint4& hn,
                                                  uint4& out) {
  const uint32_t hw[4] = {hv.x, hv.y, hv.z, hv.w}, xw[4] = {xv.x, xv.y, xv.z, xv.w}, ww[4] = {wv.x, wv.y, wv.z, wv.w};
  float v[8];
  uint32_t o[4];
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint16_t a = to_bf(lo_bf(hw[i]) + lo_bf(xw[i])), b = to_bf(hi_bf(hw[i]) + hi_bf(xw[i]));
    o[i] = uint32_t(a) | (uint32_t(b) << 16);
    v[2 * i] = bf(a), v[2 * i + 1] = bf(b);
    ss = fmaf(v[2 * i], v[2 * i], ss);
    ss = fmaf(v[2 * i + 1], v[2 * i + 1], ss);
  }
  hn = make_uint4(o[0], o[1], o[2], o[3]);
  const float inv = 1.0f / sqrtf(block_sum(ss) / float(D) + eps);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint16_t a = to_bf(lo_bf(ww[i]) * rbf(v[2 * i] * inv)), b = to_bf(hi_bf(ww[i]) * rbf(v[2 * i + 1] * inv));
    o[i] = uint32_t(a) | (uint32_t(b) << 16);
  }
  out = make_uint4(o[0], o[1], o[2], o[3]);
}

// ------------------------------------------------------ chained decoding

// A chained decode step's chosen token (argmax or the sampler; one thread):
// the next step's input, step[0] = token, and the host's mapped ring at the
// step's position, ring[step[1] % ring_len] = token; then step[1] += 1.
__device__ __forceinline__ void publish_chained_token(int32_t token, int32_t* step, int32_t* ring, int ring_len) {
  const int32_t pos = step[1];
  step[0] = token;
  ring[pos % ring_len] = token;
  step[1] = pos + 1;
}

// ---------------------------------------------------------------- launch

// Programmatic dependent launch (Hopper): every kernel waits for its
// predecessor's results before touching memory, then lets its successor
// start launching, so launch latency overlaps the previous kernel's tail.
// Without the launch attribute the two instructions are no-ops. Launch with
// launch() / launch_smem(); ZMLX_CUDA_PDL=0 launches without the attribute.
//
// trigger_first (short kernels, launched with launch_short: RMSNorm, add +
// RMSNorm, add, the attention merge, the routers' top-k): the successor may
// launch before this kernel's wait, so its launch latency (1.5-2.5 us, seen
// in kernel traces) and its preloads overlap this kernel instead of
// following it. What a successor reads before its own wait must then be
// complete three kernels back, not two: the early-input flags
// (gather_combine's routing, gather_swiglu's x) hold that, since neither
// follows such a kernel directly with data of the one before it.
//
// A -DZMLX_KERNEL_TRACE=ON build also keeps, for every block, when it
// reached the wait and when the wait released; the kernel's
// ZMLX_TRACE_BLOCK_END guard writes them, with the block's end, into the
// buffer arm_kernel_trace gave this .cu file (kernel_trace.h).
#ifdef ZMLX_KERNEL_TRACE
static __device__ KernelTraceBuf* g_kernel_trace;  // one per .cu file (no relocatable device code)
// This block's start and release, kept by thread 0 in pdl_begin until the
// block leaves (the first pdl_begin of a block counts).
static __shared__ unsigned long long g_trace_start_ns, g_trace_go_ns;
static __shared__ unsigned long long g_trace_mark_ns[kTraceMarks];
__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
// Declared first in every kernel that calls pdl_begin (ZMLX_TRACE_BLOCK_END):
// on every way out of the kernel, thread 0 writes its block's record
// (start, release, end) and, for block (0,0,0), the kernel's. Writing them
// at the end keeps the atomics off the block's path after its release
// (they had stretched one-block kernels by ~0.7 us a record).
struct TraceBlockEnd {
  // The marks are cleared here, in warp 0 at the kernel's start; the
  // other warps reach their first mark after the programmatic-launch wait,
  // long after (a diagnostic build: no barrier added for it).
  __device__ TraceBlockEnd() {
    if (threadIdx.x == 0 && threadIdx.y == 0) {
      g_trace_go_ns = 0;
      for (int i = 0; i < kTraceMarks; ++i) g_trace_mark_ns[i] = 0;
    }
  }
  __device__ ~TraceBlockEnd() {
    if (threadIdx.x != 0 || threadIdx.y != 0) return;
    const unsigned long long t_end = global_ns(), t_start = g_trace_start_ns, t_go = g_trace_go_ns;
    KernelTraceBuf* tr = *const_cast<KernelTraceBuf* volatile*>(&g_kernel_trace);
    if (!tr || t_go == 0) return;
    if (blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0) {
      const unsigned long long i = atomicAdd(&tr->n, 1ull);
      if (i < KernelTraceBuf::kMax) {
        KernelTraceRec& r = tr->rec[i];
        r.start_ns = t_start, r.go_ns = t_go;
        r.grid_x = gridDim.x, r.grid_y = gridDim.y, r.block = blockDim.x * blockDim.y;
      }
    }
    const unsigned long long b = atomicAdd(&tr->nb, 1ull);
    if (b < KernelTraceBuf::kMaxBlocks) {
      KernelBlockRec& r = tr->blk[b];
      r.start_ns = t_start, r.go_ns = t_go, r.end_ns = t_end;
      for (int i = 0; i < kTraceMarks; ++i) r.mark_ns[i] = g_trace_mark_ns[i];
      r.grid_x = gridDim.x, r.grid_y = gridDim.y;
      unsigned sm;
      asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
      r.sm = sm;
    }
  }
};
#define ZMLX_TRACE_BLOCK_END() ::zmlx::cuda::dev::TraceBlockEnd zmlx_trace_block_end_
// Phase mark i: lane 0 of every warp that passes it (the block's last one wins).
__device__ __forceinline__ void trace_mark(int i) {
  if ((threadIdx.x & 31) == 0) atomicMax(&g_trace_mark_ns[i], global_ns());
}
#define ZMLX_TRACE_MARK(i) ::zmlx::cuda::dev::trace_mark(i)
#else
#define ZMLX_TRACE_BLOCK_END() static_cast<void>(0)
#define ZMLX_TRACE_MARK(i) static_cast<void>(0)
#endif
// Points this .cu file's kernels at a device KernelTraceBuf (nullptr: off);
// nothing without ZMLX_KERNEL_TRACE. static: each file sets its own pointer.
static inline void arm_kernel_trace(void* device_buf) {
#ifdef ZMLX_KERNEL_TRACE
  auto* p = static_cast<KernelTraceBuf*>(device_buf);
  cudaMemcpyToSymbol(g_kernel_trace, &p, sizeof p);
#else
  (void)device_buf;
#endif
}

// trigger = false (with trigger_first false): the kernel lets its successor
// launch later itself, with pdl_trigger(), e.g. once most of its work is done.
__device__ __forceinline__ void pdl_begin(bool trigger_first = false, bool trigger = true) {
#ifdef ZMLX_KERNEL_TRACE
  const unsigned long long t_start = global_ns();
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (trigger_first) asm volatile("griddepcontrol.launch_dependents;");
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
#ifdef ZMLX_KERNEL_TRACE
  if (threadIdx.x == 0 && threadIdx.y == 0 && g_trace_go_ns == 0) g_trace_start_ns = t_start, g_trace_go_ns = global_ns();
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (!trigger_first && trigger) asm volatile("griddepcontrol.launch_dependents;");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}

// ZMLX_CUDA_EARLY_TRIGGER=0: the short kernels trigger after their wait like
// the others (A/B runs; the same bits either way).
inline bool early_trigger() {
  static const bool on = env_on("ZMLX_CUDA_EARLY_TRIGGER");
  return on;
}

// The PTX target a kernel of this binary was built from (80, 90, ...; 0 if
// the runtime cannot say).
inline int kernel_ptx_version(const void* kernel) {
  cudaFuncAttributes a{};
  if (cudaFuncGetAttributes(&a, kernel) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return a.ptxVersion;
}
// pdl_enabled: whether launches carry the programmatic-launch attribute
// (runs_sm90_code, and ZMLX_CUDA_PDL not "0"). A binary built for sm_80 alone
// (-DZMLX_CUDA_ARCHS=80) has no griddepcontrol.wait in its kernels (pdl_begin
// is empty below sm_90): nothing would then make a predecessor's writes
// visible to a kernel launched early.
// Whether the current device is a Hopper (or newer) GPU running `kernel`'s
// sm_90 code: what programmatic launch, bulk copies and thread-block
// clusters need. A binary built for sm_80 alone runs on such a card from its
// PTX, without them. `kernel`: any kernel of this binary (all are built for
// the same targets).
inline bool runs_sm90_code(const void* kernel) {
  int dev = 0, major = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  return major >= 9 && kernel_ptx_version(kernel) >= 90;
}
inline bool pdl_enabled(const void* kernel) {
  static const bool on = runs_sm90_code(kernel) && env_on("ZMLX_CUDA_PDL");
  return on;
}

// Every launch: programmatic dependent launch where pdl_enabled, and, when
// cluster > 0, thread-block clusters of `cluster` blocks along x (grid.x a
// multiple of it; sm_90 code only).
template <typename... KArgs, typename... Args>
void launch_ex(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, unsigned cluster, cudaStream_t s,
               Args... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  cudaLaunchAttribute attr[2];
  unsigned n = 0;
  if (pdl_enabled(reinterpret_cast<const void*>(kernel))) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  if (cluster > 0) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n].val.clusterDim.x = cluster, attr[n].val.clusterDim.y = 1, attr[n].val.clusterDim.z = 1;
    ++n;
  }
  cfg.attrs = attr;
  cfg.numAttrs = n;
  cudaLaunchKernelEx(&cfg, kernel, static_cast<KArgs>(args)...);
}
template <typename... KArgs, typename... Args>
void launch_smem(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t s, Args... args) {
  launch_ex(kernel, grid, block, smem, 0, s, args...);
}
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, cudaStream_t s, Args... args) {
  launch_smem(kernel, grid, block, 0, s, args...);
}

// f(device) for the current device, computed once a device (a process may
// drive several); a result <= 0 is returned but not kept. Tag: one cache a use.
template <class Tag, class F>
inline int cached_per_device(F&& f) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> values[kMaxDevices] = {};
  int dev = 0;
  cudaGetDevice(&dev);
  const bool cached = dev >= 0 && dev < kMaxDevices;
  if (cached)
    if (const int n = values[dev].load(std::memory_order_relaxed); n > 0) return n;
  const int n = f(dev);
  if (cached && n > 0) values[dev].store(n, std::memory_order_relaxed);
  return n;
}

// Attribute A of the current device, cached per device; `fallback` where
// the query fails.
template <cudaDeviceAttr A>
inline int device_attribute(int fallback) {
  return cached_per_device<std::integral_constant<int, int(A)>>([&](int dev) {
    int n = 0;
    return cudaDeviceGetAttribute(&n, A, dev) == cudaSuccess && n > 0 ? n : fallback;
  });
}

// The current device's SM count.
inline int64_t sm_count() { return device_attribute<cudaDevAttrMultiProcessorCount>(132); }

// The shared memory a block of the current device may opt in to: 227 KiB on
// an H100, 163 on an A100, 99 on sm_86 / sm_89 cards. Kernels whose shared
// memory grows with their shapes check it and take another form past it.
// ZMLX_CUDA_SMEM_LIMIT (bytes) lowers it, so a test on a large card takes the
// paths a smaller one would (read per call).
inline size_t smem_optin_limit() {
  size_t limit = size_t(device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(48 * 1024));
  if (const char* e = std::getenv("ZMLX_CUDA_SMEM_LIMIT"); e && std::atoll(e) > 0)
    limit = std::min(limit, size_t(std::atoll(e)));
  return limit;
}

// A kernel launched with more than the default 48 KB of dynamic shared memory
// opts in first, once per (device, kernel, size); a size the card cannot
// give throws, naming it.
inline void allow_dynamic_smem(const void* kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return;
  int dev = 0;
  cudaGetDevice(&dev);
  struct Allowed {
    int dev;
    const void* kernel;
    size_t bytes;
  };
  static std::mutex mu;
  static std::vector<Allowed> allowed;
  std::lock_guard<std::mutex> lock(mu);
  for (const Allowed& a : allowed)
    if (a.dev == dev && a.kernel == kernel && a.bytes >= bytes) return;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)) != cudaSuccess)
    throw std::runtime_error("CUDA: a kernel needs " + std::to_string(bytes) + " bytes of shared memory");
  allowed.push_back({dev, kernel, bytes});
}

// Whether `kernel` runs as thread-block clusters of n blocks along x
// (n > 8: a non-portable size, which this opts the kernel into) of
// `threads` threads and `smem` bytes of dynamic shared memory on the current
// GPU, with its sm_90 code: asked of the driver once per (device, kernel, n,
// smem). The kernel is opted into `smem` too (allow_dynamic_smem).
inline bool cluster_fits(const void* kernel, int n, int threads, size_t smem) {
  int dev = 0;
  cudaGetDevice(&dev);
  struct Asked {
    int dev;
    const void* kernel;
    int n, threads;
    size_t smem;
    bool fits;
  };
  static std::mutex mu;
  static std::vector<Asked> asked;
  {
    std::lock_guard<std::mutex> lock(mu);
    for (const Asked& a : asked)
      if (a.dev == dev && a.kernel == kernel && a.n == n && a.threads == threads && a.smem == smem) return a.fits;
  }
  // A failed query clears its own error (cudaGetLastError) and answers no.
  auto ok = [](cudaError_t e) { return e == cudaSuccess || (cudaGetLastError(), false); };
  bool fits = runs_sm90_code(kernel);
  if (fits) allow_dynamic_smem(kernel, smem);
  fits = fits && (n <= 8 || ok(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1)));
  if (fits) {
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(unsigned(n));
    cfg.blockDim = dim3(unsigned(threads));
    cfg.dynamicSmemBytes = smem;
    cudaLaunchAttribute attr{};
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = unsigned(n), attr.val.clusterDim.y = 1, attr.val.clusterDim.z = 1;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    int clusters = 0;
    fits = ok(cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg)) && clusters >= 1;
  }
  std::lock_guard<std::mutex> lock(mu);
  asked.push_back({dev, kernel, n, threads, smem, fits});
  return fits;
}

// A short kernel, whose last parameter is pdl_begin's trigger_first: on when
// the grid is one wave at most, a block an SM (a prefill-sized grid would
// have its successor's blocks take SM slots its own blocks still need).
template <typename... KArgs, typename... Args>
void launch_short(void (*kernel)(KArgs...), dim3 grid, dim3 block, cudaStream_t s, Args... args) {
  const int64_t blocks = int64_t(grid.x) * grid.y * grid.z;
  launch(kernel, grid, block, s, args..., blocks <= sm_count() && early_trigger());
}

}  // namespace zmlx::cuda::dev
