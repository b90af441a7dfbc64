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
// for both.
//
// Usage: weight_layout_bench [launches=400]
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cuda_check.h"

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

template <bool TILED>
__global__ void __launch_bounds__(kWarps * 32) gate_up_loads(const uint4* w, const int* ex, uint32_t* out) {
  const int tile = blockIdx.x, slot = blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int ra = tile * 16 + g, rb = ra + 8;
  const uint4* base = w + int64_t(ex[slot]) * kExpertU4;
  // Split `warp` takes slabs warp, warp + 4, ... in pairs (X, Y) = (s, s + 4): two steps.
  uint4 v[2][2][4];
#pragma unroll
  for (int step = 0; step < 2; ++step) {
    const int sx = warp + 2 * kSplits * step, sy = sx + kSplits;
    const int cx = 4 * sx + t, cy = 4 * sy + t;
#pragma unroll
    for (int m = 0; m < 2; ++m) {
      const uint4* mat = base + m * kMatrixU4;
      auto at = [&](int r, int c) { return TILED ? tiled(r, c) : row_major(r, c); };
      v[step][m][0] = __ldg(mat + at(ra, cx));
      v[step][m][1] = __ldg(mat + at(rb, cx));
      v[step][m][2] = __ldg(mat + at(ra, cy));
      v[step][m][3] = __ldg(mat + at(rb, cy));
    }
  }
  uint32_t x = 0;
#pragma unroll
  for (int step = 0; step < 2; ++step)
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int i = 0; i < 4; ++i) x ^= v[step][m][i].x ^ v[step][m][i].y ^ v[step][m][i].z ^ v[step][m][i].w;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x ^= __shfl_xor_sync(0xffffffffu, x, o);
  if (lane == 0) atomicXor(out, x);
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
  CK(cudaMalloc(&d_out, size_t(2) * launches * 4));
  CK(cudaMemcpy(d_rm, rm.data(), rm.size() * 16, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_tl, tl.data(), tl.size() * 16, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_ex, ex.data(), ex.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemset(d_out, 0, size_t(2) * launches * 4));
  cudaStream_t s;
  CK(cudaStreamCreate(&s));
  const dim3 grid(kTiles, kPicked), block(kWarps * 32);
  auto graph_of = [&](bool tiled_layout) {
    cudaGraph_t g;
    cudaGraphExec_t ge;
    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    for (int l = 0; l < launches; ++l) {
      uint32_t* o = d_out + (tiled_layout ? launches : 0) + l;
      if (tiled_layout)
        gate_up_loads<true><<<grid, block, 0, s>>>(d_tl, d_ex + l * kPicked, o);
      else
        gate_up_loads<false><<<grid, block, 0, s>>>(d_rm, d_ex + l * kPicked, o);
    }
    CK(cudaStreamEndCapture(s, &g));
    CK(cudaGraphInstantiate(&ge, g, 0));
    CK(cudaGraphDestroy(g));
    return ge;
  };
  cudaGraphExec_t g_rm = graph_of(false), g_tl = graph_of(true);
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  const double mb = kPicked * kExpertU4 * 16 / 1e6;
  for (int round = 0; round < 3; ++round)
    for (int v = 0; v < 2; ++v) {
      CK(cudaMemsetAsync(d_out + (v ? launches : 0), 0, size_t(launches) * 4, s));
      CK(cudaEventRecord(a, s));
      CK(cudaGraphLaunch(v ? g_tl : g_rm, s));
      CK(cudaEventRecord(b, s));
      CK(cudaEventSynchronize(b));
      float ms = 0;
      CK(cudaEventElapsedTime(&ms, a, b));
      const double us = ms * 1e3 / launches;
      std::printf("round %d  %-10s  %7.2f us a launch  %7.1f GB/s\n", round, v ? "tiled" : "row-major", us,
                  mb * 1e3 / us);
    }
  std::vector<uint32_t> out(size_t(2) * launches);
  CK(cudaMemcpy(out.data(), d_out, out.size() * 4, cudaMemcpyDeviceToHost));
  for (int l = 0; l < launches; ++l)
    if (out[size_t(l)] != out[size_t(launches + l)]) {
      std::fprintf(stderr, "weight_layout_bench: launch %d read different data in the two layouts\n", l);
      return 1;
    }
  std::printf("both layouts read the same bytes (XOR of every launch equal)\n");
  return 0;
}
