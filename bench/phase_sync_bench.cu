// What a phase boundary of the decode step costs, and what one persistent
// kernel would save.
//
// The decode step is a chain of short, dependent phases: each mat-vec needs
// the whole output of the phase before it. zmlx runs every phase as its own
// kernel in a CUDA graph, with programmatic dependent launch (PDL): the next
// grid is launched early, loads its weights, and waits. The alternative is
// one persistent kernel whose blocks stay resident for the whole step and
// meet at a software grid barrier between phases, with the next phase's
// first weights already loaded before the barrier.
//
// This program runs the same synthetic step both ways and reports, per
// phase, the µs above the floor (all rows in one phase): the launch or the
// barrier, and each phase's ramp-up and tail. The step models one decoder layer of Qwen3-30B-A3B, 48
// times: ten phases, of which seven stream 4-bit weight rows (1,024 bytes a
// row, a dot product with the previous phase's output) and three are
// one-block reductions (the norms, the attention merge, the top-k). Each
// layer has its own weights (33 MB; 1.6 GB a step), so nothing stays in L2.
//
// Variants, each replayed `reps` times and checked bit for bit against the
// first (the rows are computed the same way in all of them):
//   chain-pdl     one kernel a phase in a CUDA graph, PDL, weights preloaded
//                 before the wait (zmlx's current execution model)
//   chain-plain   the same graph without PDL
//   chain-wide    chain-pdl with a warp a row (grids of rows / 8 blocks)
//   persistent    one kernel, a grid barrier between phases (fence, add by
//                 each block, acquire spin), the next phase's first row
//                 preloaded before the barrier where it is not routed
//   persist-rlx   the same, the barrier a release add, relaxed polls, one
//                 fence after
//   chain-flag    chain-wide's kernels and launches, but a phase waits for
//                 its producer through a counter in global memory (each
//                 producer block: barrier, fence, add; the consumer's thread
//                 0 spins on an acquire load) instead of griddepcontrol.wait,
//                 so it need not wait for the producer grid's exit and flush;
//                 it triggers its successor after that wait, as chain-pdl
//   chain-flag32  chain-flag with the count spread over 32 counters a phase
//   flag32-early  chain-flag32, every kernel triggering its successor at
//                 its start (grids launch as soon as the previous is resident)
// and, as the floor, every row of the step read by one kernel.
//
// Usage: phase_sync_bench [layers=48] [reps=20] [blocks_per_sm=0 (occupancy)]
//                         [experts=128 (0: the expert phases not routed)]
//                         [only_rows=0 (> 0: ten plain mat-vecs of this many
//                          rows a layer, to time one phase size alone)]
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cuda_check.h"

namespace {

constexpr int kThreads = 256;           // 8 warps a block in every variant
constexpr int kWarps = kThreads / 32;
constexpr int kIn = 2048;               // every phase reads 2,048 inputs
constexpr int kRowBytes = kIn / 2;      // 4-bit weights: 1,024 bytes a row
constexpr int kRowVecs = kRowBytes / 16;  // 64 uint4 a row, two a lane

struct Phase {
  const uint4* w;   // rows × 64 uint4; null for a one-block reduction
  int rows;         // output length (a reduction writes kIn)
  const float* in;  // kIn floats, the previous phase's output
  float* out;
  // Routed phases (the experts): output row r belongs to slot r / slot_rows,
  // whose expert is picked from in[slot]; `w` then holds experts × slot_rows
  // rows. Which rows to read is known only after the previous phase, so a
  // routed phase cannot load its weights before its wait.
  int experts = 0;
  int slot_rows = 0;
};

__device__ __forceinline__ int weight_row(const Phase& p, int r) {
  if (p.experts == 0) return r;
  const int slot = r / p.slot_rows;
  const uint32_t h = __float_as_uint(p.in[slot]) * 2654435761u;
  return int((h >> 8) % uint32_t(p.experts)) * p.slot_rows + r % p.slot_rows;
}

// One row's dot product, kept light so that the phases are bound by their
// loads, as zmlx's mat-vecs are: lane l holds the row's uint4 l and l + 32
// (the preload) and multiplies one byte of each word by an input staged in
// shared memory (2,048 floats; lane-strided, so no bank conflicts).
__device__ __forceinline__ float row_dot(uint4 a, uint4 b, const float* xs, int lane) {
  const uint32_t wv[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) acc += float(int(wv[i] & 255u) - 128) * xs[i * 256 + (wv[i] >> 26) + lane];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  return acc * (1.0f / 4096.0f);
}

// Programmatic dependent launch (sm_90+; a no-op on older cards, where
// the chain-pdl variant then equals chain-plain).
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}

__device__ __forceinline__ void load_row(const uint4* w, int row, int lane, uint4& a, uint4& b) {
  const uint4* r = w + size_t(row) * kRowVecs;
  a = __ldg(r + lane);
  b = __ldg(r + lane + 32);
}

__device__ __forceinline__ void stage_x(const float* in, float* xs) {
  for (int i = threadIdx.x; i < kIn; i += kThreads) xs[i] = in[i];
  __syncthreads();
}

// The one-block phases: an RMSNorm-like pass (sum of squares, then scale).
__device__ void reduce_phase(const Phase& p, float* xs, float* red) {
  float ss = 0.f;
  for (int i = threadIdx.x; i < kIn; i += kThreads) {
    const float v = p.in[i];
    xs[i] = v;
    ss += v * v;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x / 32] = ss;
  __syncthreads();
  float tot = 0.f;
  for (int i = 0; i < kWarps; ++i) tot += red[i];
  const float s = rsqrtf(tot / kIn + 1e-6f);
  for (int i = threadIdx.x; i < kIn; i += kThreads) p.out[i] = xs[i] * s;
}

// The rows of a mat-vec phase, grid-strided by warp; (a, b) already holds
// the first row of this warp, when it has one and the phase is not routed.
__device__ void matvec_phase(const Phase& p, const float* xs, int gwarp, int nwarps, uint4 a, uint4 b) {
  const int lane = threadIdx.x & 31;
  if (p.experts && gwarp < p.rows) load_row(p.w, weight_row(p, gwarp), lane, a, b);
  for (int row = gwarp; row < p.rows; row += nwarps) {
    uint4 na{}, nb{};
    if (row + nwarps < p.rows) load_row(p.w, weight_row(p, row + nwarps), lane, na, nb);  // next row in flight
    const float y = row_dot(a, b, xs, lane);
    if (lane == 0) p.out[row] = y;
    a = na;
    b = nb;
  }
}

// ---------------------------------------------------------------- chain

__global__ void __launch_bounds__(kThreads) chain_matvec(Phase p, int pdl) {
  __shared__ float xs[kIn];
  const int lane = threadIdx.x & 31;
  const int gwarp = blockIdx.x * kWarps + threadIdx.x / 32;
  const int nwarps = gridDim.x * kWarps;
  uint4 a{}, b{};
  if (!p.experts && gwarp < p.rows) load_row(p.w, gwarp, lane, a, b);  // weights need nothing upstream
  if (pdl) {  // as zmlx's pdl_begin(): wait, then let the next grid launch
    pdl_wait();
    pdl_trigger();
  }
  stage_x(p.in, xs);
  matvec_phase(p, xs, gwarp, nwarps, a, b);
}

__global__ void __launch_bounds__(kThreads) chain_reduce(Phase p, int pdl) {
  __shared__ float xs[kIn];
  __shared__ float red[kWarps];
  if (pdl) {  // a short kernel lets its successor launch first (zmlx's early trigger)
    pdl_trigger();
    pdl_wait();
  }
  reduce_phase(p, xs, red);
}

// ------------------------------------------------------------ flag chain

constexpr int kFlagStride = 32;  // counters 128 bytes apart: a line each

// A producer block's output is complete: make it visible at GPU scope and
// count the block (cooperative groups' grid barrier does the same). The
// count is spread over `lanes` counters (block b adds to counter b % lanes),
// in case adds to one address queue in its L2 slice (640 blocks, 640 adds);
// on an H100 that made no difference (2026-11-28): the handoff itself costs.
__device__ __forceinline__ void flag_signal(unsigned* cnt, int lanes) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(cnt + kFlagStride * (blockIdx.x % lanes), 1u);
  }
}

// Wait until all `target` producer blocks have signalled (null: first phase):
// lane i of warp 0 polls counter i for the blocks b = i mod lanes.
__device__ __forceinline__ void flag_wait(const unsigned* cnt, unsigned target, int lanes) {
  if (cnt && threadIdx.x < 32) {
    const unsigned i = threadIdx.x;
    const unsigned n = unsigned(lanes);
    const unsigned want = i < n && i < target ? (target - i + n - 1) / n : 0u;
    bool pending = want > 0;
    while (__any_sync(0xffffffffu, pending)) {
      if (pending) {
        unsigned v;
        asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(cnt + kFlagStride * i) : "memory");
        pending = v < want;
      }
    }
  }
  __syncthreads();
}

struct Flags {
  const unsigned* wait;  // the producer's counters (null for the first phase)
  unsigned target;       // the producer's grid size
  unsigned* signal;      // this phase's counters
  int early;             // trigger the successor at the start
  int lanes;             // counters a phase (1 or 32)
};

__global__ void __launch_bounds__(kThreads) flag_matvec(Phase p, Flags f) {
  __shared__ float xs[kIn];
  const int lane = threadIdx.x & 31;
  const int gwarp = blockIdx.x * kWarps + threadIdx.x / 32;
  const int nwarps = gridDim.x * kWarps;
  uint4 a{}, b{};
  if (f.early) pdl_trigger();
  if (!p.experts && gwarp < p.rows) load_row(p.w, gwarp, lane, a, b);
  flag_wait(f.wait, f.target, f.lanes);
  if (!f.early) pdl_trigger();
  stage_x(p.in, xs);
  matvec_phase(p, xs, gwarp, nwarps, a, b);
  flag_signal(f.signal, f.lanes);
}

__global__ void __launch_bounds__(kThreads) flag_reduce(Phase p, Flags f) {
  __shared__ float xs[kIn];
  __shared__ float red[kWarps];
  pdl_trigger();  // short kernels trigger first, as chain_reduce
  flag_wait(f.wait, f.target, f.lanes);
  reduce_phase(p, xs, red);
  flag_signal(f.signal, f.lanes);
}

// ----------------------------------------------------------- persistent

// All blocks are resident (the grid is sized from the occupancy, on a GPU
// this process has to itself — under MPS or beside other work a plain
// launch does not promise that, a cooperative launch would), so a spin on a
// monotonic counter cannot deadlock. `target` is the counter's
// value once every block has arrived at this barrier.
// kRelaxed: poll with relaxed loads and fence once after, instead of an
// acquire load every poll.
template <bool kRelaxed>
__device__ __forceinline__ void grid_barrier(unsigned* counter, unsigned target) {
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned v;
    if (kRelaxed) {
      asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(counter) : "memory");
      do {
        asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(counter) : "memory");
      } while (v < target);
      asm volatile("fence.acq_rel.gpu;" ::: "memory");
    } else {
      __threadfence();
      atomicAdd(counter, 1u);
      do {
        asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(counter) : "memory");
      } while (v < target);
    }
  }
  __syncthreads();
}

template <bool kRelaxed>
__global__ void __launch_bounds__(kThreads) persistent_step(const Phase* phases, int nphases, unsigned* counter) {
  __shared__ float xs[kIn];
  __shared__ float red[kWarps];
  const int lane = threadIdx.x & 31;
  const int gwarp = blockIdx.x * kWarps + threadIdx.x / 32;
  const int nwarps = gridDim.x * kWarps;
  uint4 a{}, b{};
  if (phases[0].w && !phases[0].experts && gwarp < phases[0].rows) load_row(phases[0].w, gwarp, lane, a, b);
  for (int i = 0; i < nphases; ++i) {
    const Phase p = phases[i];
    if (p.w) {
      stage_x(p.in, xs);
      matvec_phase(p, xs, gwarp, nwarps, a, b);
    } else if (blockIdx.x == 0) {
      reduce_phase(p, xs, red);
    }
    if (i + 1 < nphases && phases[i + 1].w && !phases[i + 1].experts && gwarp < phases[i + 1].rows)
      load_row(phases[i + 1].w, gwarp, lane, a, b);  // before the barrier, as PDL's preload
    grid_barrier<kRelaxed>(counter, unsigned(gridDim.x) * unsigned(i + 1));
  }
}

// ----------------------------------------------------------------- host

__global__ void fill_weights(uint4* w, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed;
    auto next = [&h] { h ^= h << 13; h ^= h >> 17; h ^= h << 5; return h; };
    w[i] = make_uint4(next(), next(), next(), next());
  }
}

// One phase: its mat-vec kernel, or for a reduction (no weights) its
// one-block kernel; `arg` is the kernels' second parameter.
template <typename A>
void launch_phase_with(void (*matvec)(Phase, A), void (*reduce)(Phase, A), const Phase& p, int grid, bool pdl, A arg,
                       cudaStream_t s) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(p.w ? grid : 1);
  cfg.blockDim = dim3(kThreads);
  cfg.stream = s;
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = pdl ? 1 : 0;
  CK(cudaLaunchKernelEx(&cfg, p.w ? matvec : reduce, p, arg));
}
void launch_phase(const Phase& p, int grid, bool pdl, cudaStream_t s) {
  launch_phase_with(chain_matvec, chain_reduce, p, grid, pdl, int(pdl), s);
}
// The flag chains launch with PDL too: the attribute lets a grid start
// before its producer ends; the flags, not griddepcontrol.wait, order them.
void launch_flag_phase(const Phase& p, int grid, const Flags& f, cudaStream_t s) {
  launch_phase_with(flag_matvec, flag_reduce, p, grid, true, f, s);
}

// chain-wide's grid: a warp a row.
int wide_grid(const Phase& p) { return p.w ? (p.rows + kWarps - 1) / kWarps : 1; }

}  // namespace

int main(int argc, char** argv) {
  const int layers = argc > 1 ? std::atoi(argv[1]) : 48;
  const int reps = argc > 2 ? std::atoi(argv[2]) : 20;
  int per_sm = argc > 3 ? std::atoi(argv[3]) : 0;
  const int experts = argc > 4 ? std::atoi(argv[4]) : 128;  // 0: the expert phases are not routed
  const int only_rows = argc > 5 ? std::atoi(argv[5]) : 0;  // > 0: every phase a plain mat-vec of this many rows

  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  int occ_mv = 0, occ_ps = 0;
  CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ_mv, chain_matvec, kThreads, 0));
  CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ_ps, persistent_step<false>, kThreads, 0));
  int occ_ps2 = 0;
  CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ_ps2, persistent_step<true>, kThreads, 0));
  occ_ps = occ_ps < occ_ps2 ? occ_ps : occ_ps2;
  if (per_sm <= 0 || per_sm > occ_ps) per_sm = occ_ps;
  const int grid = prop.multiProcessorCount * per_sm;

  // One Qwen3-30B-A3B decoder layer, as rows of 2,048 4-bit inputs
  // (bytes: q/k/v 5.2 MB, attention's keys and values at 512 tokens 1 MB,
  // o_proj 4.2 MB, router 0.13 MB, gate+up of 8 experts 12.6 MB, down 6.3 MB).
  // The last two are the experts: 8 slots of 1,536 (gate+up) and 768 (down)
  // rows, each slot reading one of `experts` experts.
  int layer_rows[] = {0, 5120, 1024, 0, 4096, 0, 128, 0, 12288, 6144};
  int slot_rows[] = {0, 0, 0, 0, 0, 0, 0, 0, 1536, 768};
  if (only_rows > 16384) {
    std::fprintf(stderr, "phase_sync_bench: only_rows %d is over 16,384 (the activation buffers)\n", only_rows);
    return 1;
  }
  if (only_rows > 0)
    for (int i = 0; i < 10; ++i) layer_rows[i] = only_rows, slot_rows[i] = 0;
  size_t rows_total = 0, rows_stored = 0;
  for (int l = 0; l < layers; ++l)
    for (int i = 0; i < 10; ++i) {
      rows_total += size_t(layer_rows[i]);
      rows_stored += experts && slot_rows[i] ? size_t(experts) * slot_rows[i] : size_t(layer_rows[i]);
    }
  const size_t wbytes = rows_total * kRowBytes;  // read a step

  uint4* w = nullptr;
  CK(cudaMalloc(&w, rows_stored * kRowBytes));
  fill_weights<<<1024, 256>>>(w, rows_stored * kRowBytes / 16, 12345u);
  CK(cudaGetLastError());
  // Two activation buffers, ping-ponged; the largest phase writes 12,288.
  float* act[2];
  for (float*& a : act) {  // zeroed: a phase of fewer than 2,048 rows leaves the rest as it was
    CK(cudaMalloc(&a, 16384 * sizeof(float)));
    CK(cudaMemset(a, 0, 16384 * sizeof(float)));
  }
  std::vector<float> x0(16384);
  for (int i = 0; i < 16384; ++i) x0[i] = float((i * 37) % 17) / 17.0f - 0.5f;

  std::vector<Phase> phases;
  size_t off = 0;
  for (int l = 0; l < layers; ++l)
    for (int i = 0; i < 10; ++i) {
      const int r = layer_rows[i];
      const int k = int(phases.size());
      Phase p{};
      p.w = r ? w + off * kRowVecs : nullptr;
      p.rows = r ? r : kIn;
      p.in = act[k % 2];
      p.out = act[(k + 1) % 2];
      if (experts && slot_rows[i]) {
        p.experts = experts;
        p.slot_rows = slot_rows[i];
        off += size_t(experts) * slot_rows[i];
      } else {
        off += size_t(r);
      }
      phases.push_back(p);
    }
  const int nphases = int(phases.size());
  Phase* d_phases = nullptr;
  CK(cudaMalloc(&d_phases, phases.size() * sizeof(Phase)));
  CK(cudaMemcpy(d_phases, phases.data(), phases.size() * sizeof(Phase), cudaMemcpyHostToDevice));
  unsigned* counter = nullptr;
  CK(cudaMalloc(&counter, sizeof(unsigned)));
  unsigned* flags = nullptr;  // 32 counters a phase, for the flag chains
  CK(cudaMalloc(&flags, phases.size() * 32 * kFlagStride * sizeof(unsigned)));

  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  auto reset = [&] {
    CK(cudaMemcpyAsync(act[0], x0.data(), x0.size() * sizeof(float), cudaMemcpyHostToDevice, s));
    CK(cudaMemsetAsync(counter, 0, sizeof(unsigned), s));
    CK(cudaMemsetAsync(flags, 0, phases.size() * 32 * kFlagStride * sizeof(unsigned), s));
  };

  // Graphs of the chain, with and without PDL; the matvec grid is the same
  // resident grid as the persistent kernel's.
  // A third graph gives every warp one row (grids of rows / 8 blocks, as
  // zmlx's kernels are launched), PDL on.
  auto capture = [&](auto&& launch_all) {
    cudaGraph_t g;
    cudaGraphExec_t exec;
    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    launch_all();
    CK(cudaStreamEndCapture(s, &g));
    CK(cudaGraphInstantiate(&exec, g, 0));
    CK(cudaGraphDestroy(g));
    return exec;
  };
  cudaGraphExec_t chain[3];
  for (int v = 0; v < 3; ++v)
    chain[v] = capture([&] {
      for (const Phase& p : phases) launch_phase(p, v == 2 ? wide_grid(p) : grid, v != 0, s);
    });
  // The flag chains: chain-wide's grids, a counter a phase (zeroed by reset()).
  // Variants: one counter a phase; 32; 32 with every kernel triggering first.
  const int flag_lanes[3] = {1, 32, 32}, flag_early[3] = {0, 0, 1};
  cudaGraphExec_t flag_chain[3];
  for (int v = 0; v < 3; ++v)
    flag_chain[v] = capture([&] {
      for (size_t k = 0; k < phases.size(); ++k) {
        unsigned* mine = flags + 32 * kFlagStride * k;
        const Flags f{k ? mine - 32 * kFlagStride : nullptr, k ? unsigned(wide_grid(phases[k - 1])) : 0u, mine,
                      flag_early[v], flag_lanes[v]};
        launch_flag_phase(phases[k], wide_grid(phases[k]), f, s);
      }
    });

  const float* final_out = phases.back().out;
  std::vector<float> ref(kIn), got(kIn);
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));

  struct Result { const char* name; double us; bool same; };
  std::vector<Result> results;
  auto run = [&](const char* name, auto&& step) {
    float best = 1e30f, total = 0.f;
    for (int r = 0; r < reps + 1; ++r) {
      reset();
      CK(cudaEventRecord(e0, s));
      step();
      CK(cudaEventRecord(e1, s));
      CK(cudaStreamSynchronize(s));
      float ms = 0;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      if (r > 0) { best = ms < best ? ms : best; total += ms; }  // the first is a warm-up
    }
    CK(cudaMemcpy(got.data(), final_out, kIn * sizeof(float), cudaMemcpyDeviceToHost));
    const bool first = results.empty();
    if (first) ref = got;
    const bool same = std::memcmp(ref.data(), got.data(), kIn * sizeof(float)) == 0;
    results.push_back({name, 1e3 * total / reps, same});
    std::printf("%-12s  step %9.1f us (best %9.1f)  %7.2f us/layer  %6.0f GB/s  %s\n", name, 1e3 * total / reps,
                1e3 * best, 1e3 * total / reps / layers, double(wbytes) / (total / reps / 1e3) / 1e9,
                first ? "(reference)" : same ? "bit-identical" : "DIFFERENT");
  };

  std::printf("{\"device\": \"%s\", \"sms\": %d, \"blocks_per_sm\": %d, \"grid\": %d, \"layers\": %d, "
              "\"phases\": %d, \"experts\": %d, \"weight_bytes\": %zu}\n",
              prop.name, prop.multiProcessorCount, per_sm, grid, layers, nphases, experts, wbytes);
  run("chain-pdl", [&] { CK(cudaGraphLaunch(chain[1], s)); });
  run("chain-plain", [&] { CK(cudaGraphLaunch(chain[0], s)); });
  run("chain-wide", [&] { CK(cudaGraphLaunch(chain[2], s)); });
  run("chain-flag", [&] { CK(cudaGraphLaunch(flag_chain[0], s)); });
  run("chain-flag32", [&] { CK(cudaGraphLaunch(flag_chain[1], s)); });
  run("flag32-early", [&] { CK(cudaGraphLaunch(flag_chain[2], s)); });
  run("persistent", [&] {
    persistent_step<false><<<grid, kThreads, 0, s>>>(d_phases, nphases, counter);
    CK(cudaGetLastError());
  });
  run("persist-rlx", [&] {
    persistent_step<true><<<grid, kThreads, 0, s>>>(d_phases, nphases, counter);
    CK(cudaGetLastError());
  });
  // What the weights alone cost: every row of the step in one kernel, no boundaries.
  {
    Phase all{};
    all.w = w;
    all.rows = int(rows_total);
    all.in = act[0];
    all.out = nullptr;
    float* big = nullptr;
    CK(cudaMalloc(&big, rows_total * sizeof(float)));
    all.out = big;
    float best = 1e30f, total = 0.f;
    for (int r = 0; r < reps + 1; ++r) {
      CK(cudaEventRecord(e0, s));
      launch_phase(all, grid, false, s);
      CK(cudaEventRecord(e1, s));
      CK(cudaStreamSynchronize(s));
      float ms = 0;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      if (r > 0) { best = ms < best ? ms : best; total += ms; }
    }
    std::printf("%-12s  step %9.1f us (best %9.1f)  %7.2f us/layer  %6.0f GB/s  (all rows in one phase: the floor)\n",
                "one-phase", 1e3 * total / reps, 1e3 * best, 1e3 * total / reps / layers,
                double(wbytes) / (total / reps / 1e3) / 1e9);
    const double floor_us = 1e3 * total / reps;
    for (const Result& r : results)
      std::printf("%-12s  %6.2f us a phase above the floor (%d phases; launch or barrier, ramp and tail)\n", r.name,
                  (r.us - floor_us) / nphases, nphases);
    CK(cudaFree(big));
  }
  bool ok = true;
  for (const Result& r : results) ok = ok && r.same;
  return ok ? 0 : 2;
}
