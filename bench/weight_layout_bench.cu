// How fast HBM serves the MoE gate+up kernel's weight loads, in the layout
// the checkpoint has (row-major) and in a tile-contiguous one.
//
// zmlx's decode gate+up (kernels.cu, mma_decode_kernel) gives each warp a
// 16-row tile and a share of its 64-byte slabs; a lane loads 16 bytes of
// row g and of row g + 8 for chunk 4·slab + t. In the row-major layout one
// load instruction of a warp touches 8 rows 1 KB apart, 64 bytes each, and
// a warp's step is 16 rows × 2 slabs of 64 bytes scattered over 16 KB. In
// the tiled layout the 16 rows of one 16-byte chunk are stored together
// (256 bytes), and a tile's chunks follow each other, so the same lane
// reads the same bytes but a warp's step is two contiguous 1 KB runs.
//
// The kernel reproduces only the loads: Qwen3-30B-A3B's shapes (gate and up
// of 768 × 2,048 4-bit, 8 experts of 128 picked per launch, 48 × 8 blocks of
// 4 warps, 4 splits, every load of a warp issued before any is used), then a
// XOR of everything loaded so nothing is optimised away. Both layouts hold
// the same random bytes, permuted, and the per-launch XORs are compared, so
// the two variants provably read the same data. Each launch picks other
// experts (201 MB of weights, beyond L2). Launches run in a CUDA graph,
// back to back, no PDL: µs a launch includes the launch boundary, the same
// for every variant.
//
// A third variant reads the row-major layout through bulk copies (TMA): one
// thread of each block copies its tile's 16 rows of gate and of up (two
// contiguous 16 KB ranges) into shared memory, the block waits on a
// transaction-count mbarrier, then every lane XORs the same words from
// shared memory. It asks whether the copy engine gets more out of HBM than
// the warps' 16-byte loads, and it holds no weights in registers (what would
// let another kernel's blocks sit beside gate+up's on an SM). A fourth
// launches the same grid with no weight loads: the launch boundary that
// every variant's µs a launch includes (H100, 2026-11-27: 1.22 µs, against
// 5.61 row-major and 5.80 bulk).
//
// Then, when each warp's data arrive: a timed form of the row-major and tiled
// loads records, per warp, the global timer before its loads go out and
// after it has used its first step's 8 loads and then its second's, and the
// program prints their percentiles after the launch's first warp started.
// A third timed form (tiled, "one step in flight") issues the second step's
// loads only after the first step's data were used; a fourth adds the
// steps' scale and bias loads, as the decode kernel makes them. It asks
// whether any warp's first step comes back early, or every warp's data only
// at the end of the launch's ~14 MB (what the decode trace shows for
// gate+up: the tensor-core work then runs after the last bytes,
// docs/performance.md). H100, 2026-11-28, the first three forms: alone, the
// first steps do come back early (row-major, median 2.2 us after the
// launch's first warp, the second step 3.6), unlike inside the decode step
// (~5 us after issue). (The timed launches are plain launches, no graph.)
// The later forms take the decode step's other differences apart: every
// block released at once (a PDL launch behind a one-warp hold); the experts
// spread over 10 GB as the real weights are; the chosen experts' pages
// touched first (prefetched or loaded, to rule address translation in or
// out); the scales and biases packed a lane's four to one 8-byte load.
// H100, 2026-11-28: the scales cost the median first step 1.1 us, the
// spread 0.3-0.4; release, touching and packing change nothing (packing:
// the first step later still); docs/performance.md, "Where gate+up's first
// steps go".
//
// Usage: weight_layout_bench [launches=400]  (needs sm_90 for the bulk variant)
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "cuda_check.h"
#include "zmlx/backend/cuda/device_common.cuh"

namespace {

constexpr int kExperts = 128, kPicked = 8;
constexpr int kRows = 768, kCols = 2048;          // one matrix (gate or up) of an expert
constexpr int kChunks = kCols / 32;               // 16-byte chunks of 32 4-bit weights a row
constexpr int kSlabs = kChunks / 4;               // 64-byte slabs
constexpr int kTiles = kRows / 16;
constexpr int kSplits = 4, kWarps = 4;            // a block: one tile, 4 warps = 4 splits
constexpr int64_t kMatrixU4 = int64_t(kRows) * kChunks;  // uint4 per matrix
constexpr int64_t kExpertU4 = 2 * kMatrixU4;             // gate and up

// uint4 index of (row, chunk) of one matrix.
__host__ __device__ inline int64_t row_major(int row, int chunk) { return int64_t(row) * kChunks + chunk; }
__host__ __device__ inline int64_t tiled(int row, int chunk) {
  return (int64_t(row >> 4) * kChunks + chunk) * 16 + (row & 15);
}

// The 16 uint4 a lane of warp `warp` reads, as the decode kernel's steps
// read them: split `warp` takes slabs warp, warp + 4, ... in pairs (X, Y) =
// (s, s + 4), two steps; for each step and matrix m, rows g and g + 8 of
// the tile at chunks 4X + t and 4Y + t. f(i, m, row, chunk): i = 0..15 in
// that order, row within the tile.
template <typename F>
__device__ __forceinline__ void for_each_lane_load(int warp, int lane, F&& f) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int step = 0; step < 2; ++step) {
    const int sx = warp + 2 * kSplits * step, sy = sx + kSplits;
    const int cx = 4 * sx + t, cy = 4 * sy + t;
#pragma unroll
    for (int m = 0; m < 2; ++m) {
      const int i = 8 * step + 4 * m;
      f(i, m, g, cx), f(i + 1, m, g + 8, cx), f(i + 2, m, g, cy), f(i + 3, m, g + 8, cy);
    }
  }
}
__device__ __forceinline__ uint32_t xor4(const uint4& v) { return v.x ^ v.y ^ v.z ^ v.w; }
// The block's XOR of what its lanes read, into *out.
__device__ __forceinline__ void xor_out(uint32_t x, uint32_t* out) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x ^= __shfl_xor_sync(0xffffffffu, x, o);
  if ((threadIdx.x & 31) == 0) atomicXor(out, x);
}

template <bool TILED>
__global__ void __launch_bounds__(kWarps * 32) gate_up_loads(const uint4* w, const int* ex, uint32_t* out) {
  const int tile = blockIdx.x, slot = blockIdx.y;
  const uint4* base = w + int64_t(ex[slot]) * kExpertU4;
  // Every load of the lane issued before any is used.
  uint4 v[16];
  for_each_lane_load(threadIdx.x >> 5, threadIdx.x & 31, [&](int i, int m, int r, int c) {
    const int row = tile * 16 + r;
    v[i] = __ldg(base + m * kMatrixU4 + (TILED ? tiled(row, c) : row_major(row, c)));
  });
  uint32_t x = 0;
#pragma unroll
  for (int i = 0; i < 16; ++i) x ^= xor4(v[i]);
  xor_out(x, out);
}

__device__ __forceinline__ unsigned long long now_ns(uint32_t after) {
  unsigned long long t;  // `after`: read once that value is computed (its loads have arrived)
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t) : "r"(after));
  return t;
}

// The same loads, timed: t[3 · warp + 0..2] = before the loads, after step 1
// was used, after step 2 (warp = the launch's global warp index). ONE: step
// 2's loads go out only after step 1's data were used.
// SB: also each step's scales and biases (bf16, groups of 64: [expert][m][row][group]), loaded as
// the decode kernel loads them (mma_load_step_at with both columns of a lane in one group): 2-byte
// loads of rows g and g + 8 for the lane's group, four a matrix a step.
constexpr int kGroups = kCols / 64;
// REL ("released together"): the launch follows hold_then_release with
// programmatic dependent launch, so every block is resident and waiting
// when the hold ends and all issue their loads at once, as the decode
// kernels' blocks do at their griddepcontrol.wait; the time starts after
// the wait.
// PK (with SB): the same number of scale and bias bytes, laid out so that
// a lane's four values of a matrix's step (scale and bias of rows g and
// g + 8 in its group) are one 8-byte load and a warp's 32 of them one
// contiguous 256 bytes: `sc` then holds, per expert, [matrix][tile][warp]
// [step][lane] of uint2 (ss: uint16 an expert); bi is unused.
template <bool TILED, bool ONE, bool SB = false, bool REL = false, bool PK = false>
__global__ void __launch_bounds__(kWarps * 32) gate_up_timed(const uint4* w, const int* ex, uint32_t* out,
                                                             unsigned long long* t, const uint16_t* sc = nullptr,
                                                             const uint16_t* bi = nullptr, int64_t es = kExpertU4,
                                                             int64_t ss = 2 * kRows * kGroups) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (REL) asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  const int tile = blockIdx.x, slot = blockIdx.y;
  const uint4* base = w + int64_t(ex[slot]) * es;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const unsigned long long t0 = now_ns(0);
  uint4 v[16];
  auto load = [&](int lo, int hi) {
    for_each_lane_load(warp, lane, [&](int i, int m, int r, int c) {
      if (i < lo || i >= hi) return;
      const int row = tile * 16 + r;
      v[i] = __ldg(base + m * kMatrixU4 + (TILED ? tiled(row, c) : row_major(row, c)));
    });
  };
  load(0, ONE ? 8 : 16);
  uint32_t sbv[2][2][4] = {};  // [step][matrix][scale g, bias g, scale g+8, bias g+8]
  if constexpr (SB) {
    const int g = lane >> 2, tt = lane & 3;
#pragma unroll
    for (int step = 0; step < 2; ++step) {
      const int sx = warp + 2 * kSplits * step, sy = sx + kSplits;
      const int gi = (4 * (tt < 2 ? sx : sy) + 2 * (tt & 1)) >> 1;
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        if constexpr (PK) {
          const uint2 q = __ldg(reinterpret_cast<const uint2*>(sc + int64_t(ex[slot]) * ss) +
                                (((m * kTiles + tile) * kWarps + warp) * 2 + step) * 32 + lane);
          sbv[step][m][0] = q.x & 0xFFFFu, sbv[step][m][1] = q.x >> 16;
          sbv[step][m][2] = q.y & 0xFFFFu, sbv[step][m][3] = q.y >> 16;
          continue;
        }
        const int64_t r0 = int64_t(ex[slot]) * ss + (int64_t(m) * kRows + tile * 16 + g) * kGroups + gi;
        sbv[step][m][0] = __ldg(sc + r0), sbv[step][m][1] = __ldg(bi + r0);
        sbv[step][m][2] = __ldg(sc + r0 + 8 * kGroups), sbv[step][m][3] = __ldg(bi + r0 + 8 * kGroups);
      }
    }
  }
  uint32_t x1 = 0, x2 = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) x1 ^= xor4(v[i]);
#pragma unroll
  for (int m = 0; m < 2; ++m) x1 ^= sbv[0][m][0] ^ sbv[0][m][1] ^ sbv[0][m][2] ^ sbv[0][m][3];
  x1 = __reduce_xor_sync(0xffffffffu, x1);  // every lane's step 1 arrived
  const unsigned long long t1 = now_ns(x1);
  if (ONE) load(8, 16);
#pragma unroll
  for (int i = 8; i < 16; ++i) x2 ^= xor4(v[i]);
#pragma unroll
  for (int m = 0; m < 2; ++m) x2 ^= sbv[1][m][0] ^ sbv[1][m][1] ^ sbv[1][m][2] ^ sbv[1][m][3];
  x2 = __reduce_xor_sync(0xffffffffu, x2);
  const unsigned long long t2 = now_ns(x2);
  if (lane == 0) {
    const int64_t gw = (int64_t(slot) * gridDim.x + tile) * kWarps + warp;
    t[3 * gw] = t0, t[3 * gw + 1] = t1, t[3 * gw + 2] = t2;
    atomicXor(out, x1 ^ x2);
  }
}

// One warp: lets the next launch's blocks in at once, then holds them at
// their griddepcontrol.wait for `ns`.
__global__ void hold_then_release(unsigned ns) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
  const unsigned long long end = now_ns(0) + ns;
  while (now_ns(0) < end) {
  }
}

// Pseudo-random words (a hash of the index) for the spread forms' 11 GB,
// filled on the device: no host copy of that size.
__global__ void fill_hash(uint32_t* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t x = uint32_t(i) * 0x9E3779B1u ^ uint32_t(i >> 32) ^ seed * 0x85EBCA6Bu;
    x ^= x >> 16, x *= 0x7FEB352Du, x ^= x >> 15, x *= 0x846CA68Bu, x ^= x >> 16;
    p[i] = x;
  }
}

// One block, before a spread form's PDL launch: lets it in at once, then
// (mode 1) prefetches to L2, or (mode 2) loads, one 16-byte line in every
// 64 KB of the 8 experts' gate and up words and scales and biases, so their
// address translations are cached; mode 0 touches nothing. Then it holds
// the launch at its wait for 2 us (what the top-k kernel's tail and
// boundary leave before gate+up's release in the decode step).
constexpr int64_t kSlotU4 = 2 * kMatrixU4, kSlotSbBytes = 2 * kRows * kGroups * 2;
__global__ void touch_pages(const uint4* w, const uint16_t* sc, const uint16_t* bi, const int* ex, uint32_t* out,
                            int mode) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
  const unsigned long long end = now_ns(0) + 2000;
  constexpr int kPerWords = int(kSlotU4 * 16 / 65536), kPerSb = int((kSlotSbBytes + 65535) / 65536);
  constexpr int kPer = kPerWords + 2 * kPerSb;
  uint32_t x = 0;
  for (int i = threadIdx.x; mode != 0 && i < kPicked * kPer; i += blockDim.x) {
    const int64_t e = ex[i / kPer];
    const int j = i % kPer;
    const char* p = j < kPerWords ? reinterpret_cast<const char*>(w + e * kSlotU4) + int64_t(j) * 65536
                    : j < kPerWords + kPerSb
                        ? reinterpret_cast<const char*>(sc) + e * kSlotSbBytes + int64_t(j - kPerWords) * 65536
                        : reinterpret_cast<const char*>(bi) + e * kSlotSbBytes + int64_t(j - kPerWords - kPerSb) * 65536;
    if (mode == 1) asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
    else x ^= __ldg(reinterpret_cast<const uint32_t*>(p));
  }
  while (now_ns(x) < end) {
  }
  if (mode == 2 && x == 0x12345678u) atomicXor(out, 1u);  // keeps the loads; practically never taken
}

using zmlx::cuda::dev::bulk_copy;
using zmlx::cuda::dev::mbar_expect_tx;
using zmlx::cuda::dev::mbar_init;
using zmlx::cuda::dev::mbar_init_fence;
using zmlx::cuda::dev::mbar_wait;

constexpr int kTileU4 = 16 * kChunks;  // one matrix's 16 rows of a tile, uint4

__global__ void __launch_bounds__(kWarps * 32) gate_up_bulk(const uint4* w, const int* ex, uint32_t* out) {
  extern __shared__ __align__(128) uint4 tile_smem[];  // gate's 16 rows, then up's
  __shared__ __align__(8) uint64_t bar;
  const int tile = blockIdx.x, slot = blockIdx.y;
  if (threadIdx.x == 0) {
    mbar_init(&bar, 1);
    mbar_init_fence();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    constexpr uint32_t bytes = kTileU4 * 16;
    mbar_expect_tx(&bar, 2 * bytes);
    const uint4* base = w + int64_t(ex[slot]) * kExpertU4 + row_major(tile * 16, 0);
    bulk_copy(tile_smem, base, bytes, &bar);
    bulk_copy(tile_smem + kTileU4, base + kMatrixU4, bytes, &bar);
  }
  mbar_wait(&bar, 0);
  uint32_t x = 0;
  for_each_lane_load(threadIdx.x >> 5, threadIdx.x & 31,
                     [&](int, int m, int r, int c) { x ^= xor4(tile_smem[m * kTileU4 + r * kChunks + c]); });
  xor_out(x, out);
}

// The launch alone: the same grid, no weight loads (the boundary every
// variant's µs a launch includes).
__global__ void __launch_bounds__(kWarps * 32) gate_up_none(const int* ex, uint32_t* out) {
  if (threadIdx.x == 0 && ex[blockIdx.y] < 0) atomicXor(out, 1u);
}

}  // namespace

int main(int argc, char** argv) {
  const int launches = argc > 1 ? std::atoi(argv[1]) : 400;
  static_assert(kSlabs == 2 * 2 * kSplits, "two steps of two slabs a split cover the row");
  const int64_t total_u4 = int64_t(kExperts) * kExpertU4;
  std::printf("weight_layout_bench: %d launches, %d of %d experts each, %.1f MB of weights a launch, %.0f MB in all\n",
              launches, kPicked, kExperts, kPicked * kExpertU4 * 16 / 1e6, total_u4 * 16 / 1e6);
  const size_t n_u4 = size_t(total_u4);
  std::vector<uint4> rm(n_u4), tl(n_u4);
  std::mt19937 rng(7);
  for (auto& u : rm) u = make_uint4(rng(), rng(), rng(), rng());
  for (int64_t m = 0; m < 2 * kExperts; ++m)
    for (int r = 0; r < kRows; ++r)
      for (int c = 0; c < kChunks; ++c) tl[size_t(m * kMatrixU4 + tiled(r, c))] = rm[size_t(m * kMatrixU4 + row_major(r, c))];
  std::vector<int> ex(size_t(launches) * kPicked);
  for (int l = 0; l < launches; ++l) {
    std::vector<int> all(kExperts);
    for (int e = 0; e < kExperts; ++e) all[size_t(e)] = e;
    std::shuffle(all.begin(), all.end(), rng);
    std::copy(all.begin(), all.begin() + kPicked, ex.begin() + size_t(l) * kPicked);
  }
  uint4 *d_rm, *d_tl;
  int* d_ex;
  uint32_t* d_out;
  CK(cudaMalloc(&d_rm, size_t(total_u4) * 16));
  CK(cudaMalloc(&d_tl, size_t(total_u4) * 16));
  CK(cudaMalloc(&d_ex, ex.size() * 4));
  constexpr int kVariants = 4;  // row-major, tiled, bulk (row-major through TMA), no loads
  const char* names[kVariants] = {"row-major", "tiled", "bulk", "no loads"};
  CK(cudaMalloc(&d_out, size_t(kVariants) * launches * 4));
  CK(cudaMemcpy(d_rm, rm.data(), rm.size() * 16, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_tl, tl.data(), tl.size() * 16, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_ex, ex.data(), ex.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemset(d_out, 0, size_t(kVariants) * launches * 4));
  cudaStream_t s;
  CK(cudaStreamCreate(&s));
  const dim3 grid(kTiles, kPicked), block(kWarps * 32);
  const size_t bulk_smem = size_t(2) * kTileU4 * 16;
  CK(cudaFuncSetAttribute(gate_up_bulk, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bulk_smem)));
  auto graph_of = [&](int v) {
    cudaGraph_t g;
    cudaGraphExec_t ge;
    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    for (int l = 0; l < launches; ++l) {
      uint32_t* o = d_out + size_t(v) * launches + l;
      const int* e = d_ex + l * kPicked;
      if (v == 0) gate_up_loads<false><<<grid, block, 0, s>>>(d_rm, e, o);
      else if (v == 1) gate_up_loads<true><<<grid, block, 0, s>>>(d_tl, e, o);
      else if (v == 2) gate_up_bulk<<<grid, block, bulk_smem, s>>>(d_rm, e, o);
      else gate_up_none<<<grid, block, 0, s>>>(e, o);
    }
    CK(cudaStreamEndCapture(s, &g));
    CK(cudaGraphInstantiate(&ge, g, 0));
    CK(cudaGraphDestroy(g));
    return ge;
  };
  cudaGraphExec_t graphs[kVariants];
  for (int v = 0; v < kVariants; ++v) graphs[v] = graph_of(v);
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  const double mb = kPicked * kExpertU4 * 16 / 1e6;
  for (int round = 0; round < 3; ++round)
    for (int v = 0; v < kVariants; ++v) {
      CK(cudaMemsetAsync(d_out + size_t(v) * launches, 0, size_t(launches) * 4, s));
      CK(cudaEventRecord(a, s));
      CK(cudaGraphLaunch(graphs[v], s));
      CK(cudaEventRecord(b, s));
      CK(cudaEventSynchronize(b));
      float ms = 0;
      CK(cudaEventElapsedTime(&ms, a, b));
      const double us = ms * 1e3 / launches;
      std::printf("round %d  %-10s  %7.2f us a launch  %7.1f GB/s\n", round, names[v], us, mb * 1e3 / us);
    }
  std::vector<uint32_t> out(size_t(kVariants) * launches);
  CK(cudaMemcpy(out.data(), d_out, out.size() * 4, cudaMemcpyDeviceToHost));
  for (int v = 1; v < kVariants - 1; ++v)
    for (int l = 0; l < launches; ++l)
      if (out[size_t(l)] != out[size_t(v) * launches + l]) {
        std::fprintf(stderr, "weight_layout_bench: launch %d of %s read other data than row-major\n", l, names[v]);
        return 1;
      }
  std::printf("every variant read the same bytes (XOR of every launch equal)\n");

  // When each warp's steps arrive (µs after the launch's first warp started).
  const int warps = kTiles * kPicked * kWarps;
  unsigned long long* d_t;
  CK(cudaMalloc(&d_t, size_t(launches) * warps * 3 * 8));
  constexpr int kTimed = 13;
  const char* tnames[kTimed] = {"row-major", "tiled", "tiled, one step in flight", "row-major + scales, biases",
                                "row-major, released together", "row-major + scales, released",
                                "row-major, 10 GB spread", "row-major + scales, spread",
                                "spread + scales, released", "spread + sc, released, prefetched",
                                "spread + sc, released, loaded", "row-major + packed scales",
                                "spread + packed scales"};
  // The spread forms: 48 "layers" of 128 experts (9.7 GB of weights, 1.2 GB
  // of scales and biases, as many 2 MB pages as Qwen3's routed gate and up
  // span), each launch 8 experts of a random layer, so the launches touch
  // pages all over the card's memory as the decode step does.
  constexpr int kLayersSpread = 48, kSlots = kLayersSpread * kExperts;
  constexpr int64_t kSlotSb = 2 * kRows * kGroups;  // uint16 of scales (or biases) a slot
  uint4* d_big;
  uint16_t *d_bsc, *d_bbi;
  int* d_ex_big;
  CK(cudaMalloc(&d_big, size_t(kSlots) * kExpertU4 * 16));
  CK(cudaMalloc(&d_bsc, size_t(kSlots) * kSlotSb * 2));
  CK(cudaMalloc(&d_bbi, size_t(kSlots) * kSlotSb * 2));
  fill_hash<<<1024, 256, 0, s>>>(reinterpret_cast<uint32_t*>(d_big), size_t(kSlots) * kExpertU4 * 4, 1u);
  fill_hash<<<1024, 256, 0, s>>>(reinterpret_cast<uint32_t*>(d_bsc), size_t(kSlots) * kSlotSb / 2, 2u);
  fill_hash<<<1024, 256, 0, s>>>(reinterpret_cast<uint32_t*>(d_bbi), size_t(kSlots) * kSlotSb / 2, 3u);
  // The packed forms' scales and biases: the same bytes a slot as both arrays together.
  uint16_t *d_pk, *d_bpk;
  CK(cudaMalloc(&d_pk, size_t(kExperts) * 2 * kSlotSb * 2));
  CK(cudaMalloc(&d_bpk, size_t(kSlots) * 2 * kSlotSb * 2));
  fill_hash<<<1024, 256, 0, s>>>(reinterpret_cast<uint32_t*>(d_pk), size_t(kExperts) * kSlotSb, 4u);
  fill_hash<<<1024, 256, 0, s>>>(reinterpret_cast<uint32_t*>(d_bpk), size_t(kSlots) * kSlotSb, 5u);
  CK(cudaGetLastError());
  {
    std::vector<int> exb(ex.size());
    for (int l = 0; l < launches; ++l) {
      const int layer = int(rng() % kLayersSpread);
      for (int i = 0; i < kPicked; ++i) exb[size_t(l * kPicked + i)] = layer * kExperts + ex[size_t(l * kPicked + i)];
    }
    CK(cudaMalloc(&d_ex_big, exb.size() * 4));
    CK(cudaMemcpy(d_ex_big, exb.data(), exb.size() * 4, cudaMemcpyHostToDevice));
  }
  // Random scales and biases for the fourth form (the XOR check leaves it out: it reads more).
  const size_t n_sb = size_t(kExperts) * 2 * kRows * kGroups;
  std::vector<uint16_t> h_sb(n_sb);
  for (auto& u : h_sb) u = uint16_t(rng());
  uint16_t *d_sc, *d_bi;
  CK(cudaMalloc(&d_sc, n_sb * 2));
  CK(cudaMalloc(&d_bi, n_sb * 2));
  CK(cudaMemcpy(d_sc, h_sb.data(), n_sb * 2, cudaMemcpyHostToDevice));
  std::reverse(h_sb.begin(), h_sb.end());
  CK(cudaMemcpy(d_bi, h_sb.data(), n_sb * 2, cudaMemcpyHostToDevice));
  // The released-together forms: a PDL launch behind a one-warp kernel
  // (hold_then_release, or touch_pages mode 0..2 for the spread forms).
  using Timed = void (*)(const uint4*, const int*, uint32_t*, unsigned long long*, const uint16_t*, const uint16_t*,
                         int64_t, int64_t);
  auto released = [&](Timed k, const uint4* w, const uint16_t* sc, const uint16_t* bi, int64_t ss, const int* e,
                      uint32_t* o, unsigned long long* tl_, int touch) {
    if (touch < 0) hold_then_release<<<1, 32, 0, s>>>(10000u);
    else touch_pages<<<1, 256, 0, s>>>(d_big, d_bsc, d_bbi, e, o, touch);
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.stream = s;
    cudaLaunchAttribute attr{};
    attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr.val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    CK(cudaLaunchKernelEx(&cfg, k, w, e, o, tl_, sc, bi, int64_t(kExpertU4), ss));
  };
  std::vector<unsigned long long> t(size_t(launches) * warps * 3);
  for (int v = 0; v < kTimed; ++v) {
    CK(cudaMemsetAsync(d_out, 0, size_t(launches) * 4, s));
    CK(cudaEventRecord(a, s));
    for (int l = 0; l < launches; ++l) {
      const int* e = d_ex + l * kPicked;
      unsigned long long* tl_ = d_t + size_t(l) * warps * 3;
      if (v == 0) gate_up_timed<false, false><<<grid, block, 0, s>>>(d_rm, e, d_out + l, tl_);
      else if (v == 1) gate_up_timed<true, false><<<grid, block, 0, s>>>(d_tl, e, d_out + l, tl_);
      else if (v == 2) gate_up_timed<true, true><<<grid, block, 0, s>>>(d_tl, e, d_out + l, tl_);
      else if (v == 3) gate_up_timed<false, false, true><<<grid, block, 0, s>>>(d_rm, e, d_out + l, tl_, d_sc, d_bi);
      else if (v == 4) released(gate_up_timed<false, false, false, true>, d_rm, d_sc, d_bi, kSlotSb, e, d_out + l, tl_, -1);
      else if (v == 5) released(gate_up_timed<false, false, true, true>, d_rm, d_sc, d_bi, kSlotSb, e, d_out + l, tl_, -1);
      else if (v == 6)
        gate_up_timed<false, false><<<grid, block, 0, s>>>(d_big, d_ex_big + l * kPicked, d_out + l, tl_, nullptr,
                                                           nullptr, kExpertU4);
      else if (v == 7)
        gate_up_timed<false, false, true><<<grid, block, 0, s>>>(d_big, d_ex_big + l * kPicked, d_out + l, tl_, d_bsc,
                                                                 d_bbi, kExpertU4, kSlotSb);
      else if (v < 11)
        released(gate_up_timed<false, false, true, true>, d_big, d_bsc, d_bbi, kSlotSb, d_ex_big + l * kPicked,
                 d_out + l, tl_, v - 8);
      else if (v == 11)
        gate_up_timed<false, false, true, false, true><<<grid, block, 0, s>>>(d_rm, e, d_out + l, tl_, d_pk, nullptr,
                                                                              kExpertU4, 2 * kSlotSb);
      else
        gate_up_timed<false, false, true, false, true><<<grid, block, 0, s>>>(
            d_big, d_ex_big + l * kPicked, d_out + l, tl_, d_bpk, nullptr, kExpertU4, 2 * kSlotSb);
    }
    CK(cudaGetLastError());
    CK(cudaEventRecord(b, s));
    CK(cudaEventSynchronize(b));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, a, b));
    CK(cudaMemcpy(t.data(), d_t, t.size() * 8, cudaMemcpyDeviceToHost));
    std::vector<uint32_t> o(static_cast<size_t>(launches));
    CK(cudaMemcpy(o.data(), d_out, o.size() * 4, cudaMemcpyDeviceToHost));
    for (int l = 0; l < launches && (v < 3 || v == 4); ++l)
      if (o[size_t(l)] != out[size_t(l)]) {
        std::fprintf(stderr, "weight_layout_bench: timed %s launch %d read other data than row-major\n", tnames[v], l);
        return 1;
      }
    std::vector<double> first, second, span;  // first, second step arrived; a warp's first step after its issue
    for (int l = 1; l < launches; ++l) {      // launch 0 is a warm-up
      const unsigned long long* tl_ = t.data() + size_t(l) * warps * 3;
      unsigned long long start = ~0ull;
      for (int w = 0; w < warps; ++w) start = std::min(start, tl_[3 * w]);
      for (int w = 0; w < warps; ++w) {
        first.push_back((tl_[3 * w + 1] - start) / 1e3);
        second.push_back((tl_[3 * w + 2] - start) / 1e3);
        span.push_back((tl_[3 * w + 1] - tl_[3 * w]) / 1e3);
      }
    }
    auto pct = [](std::vector<double>& x) {
      std::sort(x.begin(), x.end());
      auto at = [&](double p) { return x[size_t(p * double(x.size() - 1))]; };
      char buf[128];
      std::snprintf(buf, sizeof buf, "%5.2f %5.2f %5.2f %5.2f %5.2f", at(0.05), at(0.25), at(0.5), at(0.75), at(0.95));
      return std::string(buf);
    };
    std::printf("timed %-28s %6.2f us a launch; us after the launch's first warp, percentiles 5 25 50 75 95:\n",
                tnames[v], ms * 1e3 / launches);
    std::printf("   first step used  %s\n   second step used %s\n   first step after its own issue %s\n",
                pct(first).c_str(), pct(second).c_str(), pct(span).c_str());
  }
  return 0;
}
