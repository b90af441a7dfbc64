// Times the tensor-core prefill GEMMs (src/zmlx/backend/cuda/gemm.h) at
// Qwen3-30B-A3B shapes: one MoE layer (hidden 2048, 128 experts, top-8,
// expert intermediate 768, 4-bit group 64) for a T-token prompt, and the
// attention projections as dense GEMMs. Prints one JSON object per kernel:
// microseconds per call (median of reps, cudaEvents), TFLOP/s (2·M·N·K of
// useful work) and GB/s (weight bytes of the experts actually used + the
// activations read and written, each counted once). After each quantized
// kernel's line, a {"bits_of", "fnv1a"} line: an FNV-1a hash of its output,
// so two builds of gemm.cu can be compared for the same bits in one run
// (same toolchain: the routing comes from std::shuffle).
//
//   gemm_bench [T=512] [reps=50]
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cuda_check.h"
#include "zmlx/backend/cuda/gemm.h"

namespace g = zmlx::cuda::gemm;

__global__ void fill_words(uint32_t* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 15, h *= 2246822519u, h ^= h >> 13, h *= 3266489917u, h ^= h >> 16;
    p[i] = h;
  }
}
// bf16 values lo + (hash & 63) / 64 · span, as bit patterns.
__global__ void fill_bf16(uint16_t* p, size_t n, uint32_t seed, float lo, float span) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 15, h *= 2246822519u, h ^= h >> 13;
    const float f = lo + float(h & 63u) / 64.f * span;
    p[i] = uint16_t(__float_as_uint(f) >> 16);
  }
}

struct DevQ {
  uint32_t* w = nullptr;
  uint16_t *s = nullptr, *b = nullptr;
  g::QMat m;
  DevQ(int E, int64_t rows, int64_t cols, int bits, int group, uint32_t seed) {
    const size_t words = size_t(E) * rows * cols * bits / 32, groups = size_t(E) * rows * cols / group;
    CK(cudaMalloc(&w, words * 4));
    CK(cudaMalloc(&s, groups * 2));
    CK(cudaMalloc(&b, groups * 2));
    fill_words<<<1024, 256>>>(w, words, seed);
    fill_bf16<<<1024, 256>>>(s, groups, seed + 1, -0.02f, 0.04f);
    fill_bf16<<<1024, 256>>>(b, groups, seed + 2, -0.1f, 0.2f);
    m.w = w, m.scales = s, m.biases = b, m.rows = rows, m.cols = cols, m.bits = bits, m.group = group;
    m.w_stride = int64_t(rows) * cols * bits / 32, m.s_stride = int64_t(rows) * cols / group;
  }
  ~DevQ() { cudaFree(w), cudaFree(s), cudaFree(b); }
  double bytes_per_expert() const {
    return double(m.rows) * m.cols * m.bits / 8 + 2.0 * 2 * double(m.rows) * m.cols / m.group;
  }
};

template <class F>
double time_us(F&& f, int reps) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) f();  // warm-up
  CK(cudaDeviceSynchronize());
  std::vector<float> ms(static_cast<size_t>(reps));
  for (int i = 0; i < reps; ++i) {
    CK(cudaEventRecord(a));
    f();
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    CK(cudaEventElapsedTime(&ms[size_t(i)], a, b));
  }
  CK(cudaGetLastError());
  std::sort(ms.begin(), ms.end());
  cudaEventDestroy(a), cudaEventDestroy(b);
  return 1000.0 * ms[ms.size() / 2];
}

// FNV-1a over a device buffer's bytes (the same input gives the same hash
// only if every output bit is the same).
uint64_t device_hash(const void* d, size_t bytes) {
  std::vector<uint8_t> h(bytes);
  CK(cudaMemcpy(h.data(), d, bytes, cudaMemcpyDeviceToHost));
  uint64_t x = 1469598103934665603ull;
  for (uint8_t b : h) x = (x ^ b) * 1099511628211ull;
  return x;
}

void report(const char* name, double us, double flops, double bytes) {
  std::printf("{\"kernel\": \"%s\", \"us\": %.1f, \"tflops\": %.1f, \"gbps\": %.0f}\n", name, us,
              flops / (us * 1e-6) / 1e12, bytes / (us * 1e-6) / 1e9);
}

void report_bits(const char* name, const void* d, size_t bytes) {
  std::printf("{\"bits_of\": \"%s\", \"fnv1a\": \"%016llx\"}\n", name, (unsigned long long)device_hash(d, bytes));
}

// gemm_dense of T rows of x through m into y, timed, with the split-K
// workspace it asks for (gemm_dense_workspace_bytes: short prompts split).
double time_dense(const uint16_t* x, int T, const g::QMat& m, uint16_t* y, int reps) {
  float* split_ws = nullptr;
  const size_t split_bytes = g::gemm_dense_workspace_bytes(T, m, false);
  if (split_bytes) CK(cudaMalloc(&split_ws, split_bytes));
  const double us = time_us([&] { g::gemm_dense(x, T, m, y, nullptr, split_ws); }, reps);
  cudaFree(split_ws);
  return us;
}

int main(int argc, char** argv) {
  const int T = argc > 1 ? std::atoi(argv[1]) : 512;
  const int reps = argc > 2 ? std::atoi(argv[2]) : 50;
  const int E = 128, k = 8, D = 2048, I = 768, bits = 4, group = 64;
  const int64_t P = int64_t(T) * k;
  int dev_count = 0;
  if (cudaGetDeviceCount(&dev_count) != cudaSuccess || dev_count == 0) {
    std::fprintf(stderr, "gemm_bench: no CUDA device\n");
    return 1;
  }
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("{\"device\": \"%s\", \"T\": %d, \"experts\": %d, \"top_k\": %d, \"hidden\": %d, \"moe_inter\": %d}\n",
              prop.name, T, E, k, D, I);

  // Routing: k distinct uniformly random experts per token.
  std::mt19937 rng(1);
  std::vector<int32_t> ex(static_cast<size_t>(P));
  std::vector<int> used(size_t(E), 0);
  for (int t = 0; t < T; ++t) {
    std::vector<int> perm(static_cast<size_t>(E));
    for (int e = 0; e < E; ++e) perm[size_t(e)] = e;
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int j = 0; j < k; ++j) ex[size_t(t) * k + j] = perm[size_t(j)], used[size_t(perm[size_t(j)])] = 1;
  }
  int active = 0;
  for (int u : used) active += u;

  DevQ gate(E, I, D, bits, group, 11), up(E, I, D, bits, group, 22), down(E, D, I, bits, group, 33);
  uint16_t *x, *h, *y, *out, *scores;
  int32_t* dex;
  void* ws;
  CK(cudaMalloc(&x, size_t(T) * D * 2));
  CK(cudaMalloc(&h, size_t(P) * I * 2));
  CK(cudaMalloc(&y, size_t(P) * D * 2));
  CK(cudaMalloc(&out, size_t(T) * D * 2));
  CK(cudaMalloc(&scores, size_t(P) * 2));
  CK(cudaMalloc(&dex, size_t(P) * 4));
  const size_t wsb = g::moe_workspace_bytes(T, k, E);
  CK(cudaMalloc(&ws, wsb));
  fill_bf16<<<1024, 256>>>(x, size_t(T) * D, 5, -1.f, 2.f);
  fill_bf16<<<1024, 256>>>(scores, size_t(P), 6, 0.f, 0.25f);
  CK(cudaMemcpy(dex, ex.data(), size_t(P) * 4, cudaMemcpyHostToDevice));
  CK(cudaDeviceSynchronize());

  const double gu_flops = 2.0 * 2 * double(P) * D * I;
  const double gu_bytes = active * (gate.bytes_per_expert() + up.bytes_per_expert()) + 2.0 * T * D + 2.0 * P * I;
  const double gu = time_us([&] { g::moe_gate_up_swiglu(x, dex, T, k, gate.m, up.m, h, ws, nullptr, E); }, reps);
  report("moe_gate_up_swiglu", gu, gu_flops, gu_bytes);
  report_bits("moe_gate_up_swiglu", h, size_t(P) * I * 2);

  const double dn_flops = 2.0 * double(P) * I * D;
  const double dn_bytes = active * down.bytes_per_expert() + 2.0 * P * I + 2.0 * P * D;
  const double dn = time_us([&] { g::moe_down(h, dex, T, k, down.m, y, ws, nullptr, E); }, reps);
  report("moe_down", dn, dn_flops, dn_bytes);
  report_bits("moe_down", y, size_t(P) * D * 2);

  const double cb = time_us(
      [&] { g::moe_combine(y, scores, false, zmlx::cuda::k::kBf16Products, T, k, D, out, nullptr); }, reps);
  report("moe_combine", cb, 2.0 * P * D, 2.0 * P * D + 2.0 * T * D + 2.0 * P);

  const double layer = time_us(
      [&] {
        g::moe_gate_up_swiglu(x, dex, T, k, gate.m, up.m, h, ws, nullptr, E);
        g::moe_down(h, dex, T, k, down.m, y, ws, nullptr, E);
        g::moe_combine(y, scores, false, zmlx::cuda::k::kBf16Products, T, k, D, out, nullptr);
      },
      reps);
  report("moe_layer_total", layer, gu_flops + dn_flops, gu_bytes + dn_bytes);

  // The same expert ops over pairs bucketed by expert, the short-prompt form
  // (zmlx::cuda::k::gather_*_grouped), with their bucketing, as the backend
  // runs them per op.
  namespace kn = zmlx::cuda::k;
  if (kn::grouped_fits(gate.m) && kn::grouped_fits(down.m)) {
    void* gws;
    CK(cudaMalloc(&gws, g::pair_groups_workspace_bytes(P)));
    const double ggu = time_us(
        [&] {
          const kn::PairGroups grp = g::bucket_pairs(dex, P, gws, nullptr, E);
          kn::gather_swiglu_grouped(x, k, gate.m, up.m, h, grp, nullptr);
        },
        reps);
    report("moe_gate_up_swiglu grouped", ggu, gu_flops, gu_bytes);
    const double gdn = time_us(
        [&] {
          const kn::PairGroups grp = g::bucket_pairs(dex, P, gws, nullptr, E);
          kn::gather_linear_grouped(h, true, k, down.m, y, grp, nullptr);
        },
        reps);
    report("moe_down grouped", gdn, dn_flops, dn_bytes);
    // The bucketing alone (counted in both lines above), with the expert
    // count and as for an unknown one (kMaxExperts scatter blocks).
    report("bucket_pairs alone", time_us([&] { g::bucket_pairs(dex, P, gws, nullptr, E); }, reps), 0, 0);
    report("bucket_pairs alone, experts unknown", time_us([&] { g::bucket_pairs(dex, P, gws, nullptr, 0); }, reps), 0, 0);
    CK(cudaFree(gws));
  }

  // Attention projections of the same model as dense GEMMs.
  struct Shape {
    const char* name;
    int64_t N, K;
  };
  const Shape shapes[] = {{"dense q_proj 2048->4096", 4096, 2048},
                          {"dense k_proj 2048->512", 512, 2048},
                          {"dense o_proj 4096->2048", 2048, 4096},
                          {"dense moe-sized 2048->768", 768, 2048},
                          {"dense router 2048->128", 128, 2048},
                          // GLM-4.7-Flash's dense projections (its prefill's other big share)
                          {"glm q_a 2048->768", 768, 2048},
                          {"glm kv_a 2048->576", 576, 2048},
                          {"glm q_b 768->5120", 5120, 768},
                          {"glm o_proj 5120->2048", 2048, 5120},
                          {"glm shared down 1536->2048", 2048, 1536},
                          {"glm router 2048->64", 64, 2048}};
  uint16_t *ax, *ay;
  constexpr int64_t kWidest = 5120;  // the widest K or N below (GLM's q_b and o_proj)
  CK(cudaMalloc(&ax, size_t(T) * kWidest * 2));
  CK(cudaMalloc(&ay, size_t(T) * kWidest * 2));
  fill_bf16<<<1024, 256>>>(ax, size_t(T) * kWidest, 9, -1.f, 2.f);
  for (const Shape& s : shapes) {
    DevQ w(1, s.N, s.K, bits, group, 44);
    // Small tile grids split K (gemm.h); the split sums are timed too.
    const double us = time_dense(ax, T, w.m, ay, reps);
    report(s.name, us, 2.0 * T * s.N * s.K, w.bytes_per_expert() + 2.0 * T * s.K + 2.0 * T * s.N);
    report_bits(s.name, ay, size_t(T) * s.N * 2);
  }
  {
    // Dense bf16 weights, for comparison with cuBLAS-class numbers.
    uint16_t* wb;
    CK(cudaMalloc(&wb, size_t(4096) * 2048 * 2));
    fill_bf16<<<1024, 256>>>(wb, size_t(4096) * 2048, 10, -0.05f, 0.1f);
    g::QMat m;
    m.w = reinterpret_cast<const uint32_t*>(wb), m.rows = 4096, m.cols = 2048, m.bits = 16;
    const double us = time_dense(ax, T, m, ay, reps);
    report("dense bf16 2048->4096", us, 2.0 * T * 4096 * 2048, 2.0 * 4096 * 2048 + 2.0 * T * 2048 + 2.0 * T * 4096);
    cudaFree(wb);
  }
  std::printf("{\"active_experts\": %d, \"workspace_bytes\": %zu}\n", active, wsb);
  return 0;
}
