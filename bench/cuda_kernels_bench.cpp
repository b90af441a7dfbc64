// GPU time of each decode kernel at Qwen3-30B-A3B shapes (hidden 2048, 32/4
// heads of 128, 128 experts of 768, top-8, 4-bit group 64): every kernel is
// launched `reps` times inside one CUDA graph, so the figure is GPU time per
// launch including the per-node cost a recorded decode step pays, without
// host launch overhead. Random bits stand in for weights (speed only).
// The quantized mat-vecs are timed twice: tensor-core path ("mma") and the
// scalar kernels ("scalar", ZMLX_CUDA_MMA=0), on the same buffers.
// With TP > 1, the shapes of one tensor-parallel rank of TP: 1/TP of the
// heads and of every expert's intermediate dimension (router and lm_head whole).
// With DRAM = 1 the mat-vecs read their weights from memory, as a decode
// step does, not from L2: launch i reads copy i of the weights (up to 256
// copies, enough to fill 4× the L2 where a matrix is big enough) and the
// expert kernels pick a different eight experts each launch (16 disjoint
// sets of 128). A matrix whose copies used (one a launch, `reps` at most)
// still fit twice in the L2 — the router, the smallest sweep entries — is
// marked "[L2-sized]": its figure is not a DRAM one.
//   build/cuda_kernels_bench [reps] [TP] [DRAM]
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "zmlx/backend/cuda/kernels.h"
#include "zmlx/backend/cuda/sampling.h"

namespace k = zmlx::cuda::k;

namespace {

// Device memory filled with random bits (bf16_small: bf16 values in
// [1, 2), for scales and activations). The bits come from one host block
// of each kind, drawn once and copied over and over: the DRAM mode needs
// gigabytes of weights, and their values do not matter for speed.
void* dev_random(size_t bytes, std::mt19937& rng, bool bf16_small = false) {
  static std::vector<uint16_t> block[2];
  constexpr size_t kBlock = size_t(1) << 22;  // uint16 values, 8 MiB
  std::vector<uint16_t>& b = block[bf16_small ? 1 : 0];
  if (b.empty()) {
    b.resize(kBlock);
    for (auto& v : b) v = bf16_small ? uint16_t(0x3c00 + (rng() & 0xff)) : uint16_t(rng());
  }
  void* d = nullptr;
  const size_t n = (bytes + 1) / 2;
  if (cudaMalloc(&d, n * 2) != cudaSuccess) {
    std::fprintf(stderr, "cudaMalloc failed\n");
    std::exit(1);
  }
  // Start each buffer at a random place in the block, so that buffers differ.
  for (size_t done = 0, at = rng() % kBlock; done < n;) {
    const size_t take = std::min(n - done, kBlock - at);
    cudaMemcpy(static_cast<uint16_t*>(d) + done, b.data() + at, take * 2, cudaMemcpyHostToDevice);
    done += take;
    at = 0;
  }
  return d;
}

k::QMat qmat(int64_t experts, int64_t rows, int64_t cols, std::mt19937& rng) {
  k::QMat m;
  m.rows = rows, m.cols = cols, m.bits = 4, m.group = 64;
  const int64_t E = experts > 0 ? experts : 1;
  m.w_stride = rows * cols / 8;
  m.s_stride = rows * cols / 64;
  m.w = static_cast<const uint32_t*>(dev_random(size_t(E * m.w_stride) * 4, rng));
  m.scales = static_cast<const uint16_t*>(dev_random(size_t(E * m.s_stride) * 2, rng, true));
  m.biases = static_cast<const uint16_t*>(dev_random(size_t(E * m.s_stride) * 2, rng, true));
  return m;
}

double bytes_of(const k::QMat& m, int64_t active) {
  return double(active) * double(m.rows) * double(m.cols) * (4.0 / 8.0 + 4.0 / 64.0);
}

// Copies of m (same shape, fresh weights) so that `copies` of them exceed
// the L2 `l2_fill` times over; m itself is copy 0.
std::vector<k::QMat> dram_copies(const k::QMat& m, int64_t experts, size_t l2_bytes, bool dram, std::mt19937& rng) {
  std::vector<k::QMat> out{m};
  if (!dram) return out;
  const int64_t E = experts > 0 ? experts : 1;
  const double bytes = double(E) * double(m.rows) * double(m.cols) * (4.0 / 8.0 + 4.0 / 64.0);
  const int copies = int(std::min(256.0, std::ceil(4.0 * double(l2_bytes) / bytes)));
  for (int i = 1; i < copies; ++i) out.push_back(qmat(experts, m.rows, m.cols, rng));
  return out;
}

void time_it(cudaStream_t s, int reps, const char* name, double bytes, const std::function<void(int)>& launch) {
  cudaGraph_t g;
  cudaGraphExec_t ge;
  cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed);
  for (int i = 0; i < reps; ++i) launch(i);
  cudaStreamEndCapture(s, &g);
  cudaGraphInstantiate(&ge, g, 0);
  cudaGraphLaunch(ge, s);  // warm-up
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  cudaEventRecord(a, s);
  cudaGraphLaunch(ge, s);
  cudaEventRecord(b, s);
  cudaEventSynchronize(b);
  float ms = 0;
  cudaEventElapsedTime(&ms, a, b);
  const double us = 1000.0 * ms / reps;
  std::printf("%-38s %8.2f us  %7.0f GB/s\n", name, us, bytes > 0 ? bytes / (us * 1e-6) / 1e9 : 0.0);
  cudaGraphExecDestroy(ge);
  cudaGraphDestroy(g);
  if (cudaGetLastError() != cudaSuccess) std::printf("  (CUDA error)\n");
}

}  // namespace

int main(int argc, char** argv) {
  const int reps = argc > 1 ? std::atoi(argv[1]) : 200;
  const int tp = argc > 2 ? std::atoi(argv[2]) : 1;
  const bool dram = argc > 3 && std::atoi(argv[3]) != 0;
  if (tp < 1 || 32 % tp != 0 || 4 % tp != 0 || 768 % (64 * tp) != 0) {
    std::fprintf(stderr, "cuda_kernels_bench: TP must divide the heads (32/4) and 768/64 expert groups\n");
    return 1;
  }
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    std::fprintf(stderr, "cuda_kernels_bench: no GPU\n");
    return 1;
  }
  std::mt19937 rng(7);
  cudaStream_t s;
  cudaStreamCreate(&s);
  const int64_t D = 2048, H = 32 / tp, Hkv = 4 / tp, hd = 128, E = 128, kk = 8, I = 768 / tp, S = 512, cap = 1024;
  k::QMat q = qmat(0, H * hd, D, rng), kp = qmat(0, Hkv * hd, D, rng), vp = qmat(0, Hkv * hd, D, rng),
          o = qmat(0, D, H * hd, rng), router = qmat(0, E, D, rng), gate = qmat(E, I, D, rng),
          up = qmat(E, I, D, rng), down = qmat(E, D, I, rng), head = qmat(0, 151936, D, rng);
  auto* x = static_cast<uint16_t*>(dev_random(size_t(D) * 2, rng, true));
  auto* h = static_cast<uint16_t*>(dev_random(size_t(D) * 2, rng, true));
  auto* nw = static_cast<uint16_t*>(dev_random(size_t(D) * 2, rng, true));
  auto* yq = static_cast<uint16_t*>(dev_random(size_t(H * hd) * 2, rng, true));
  auto* yk = static_cast<uint16_t*>(dev_random(size_t(Hkv * hd) * 2, rng, true));
  auto* yv = static_cast<uint16_t*>(dev_random(size_t(Hkv * hd) * 2, rng, true));
  auto* att = static_cast<uint16_t*>(dev_random(size_t(H * hd) * 2, rng, true));
  auto* logits = static_cast<uint16_t*>(dev_random(size_t(E) * 2, rng, true));
  auto* big = static_cast<uint16_t*>(dev_random(size_t(151936) * 2, rng, true));
  auto* hmid = static_cast<uint16_t*>(dev_random(size_t(kk * I) * 2, rng, true));
  auto* kc = static_cast<uint16_t*>(dev_random(size_t(Hkv * cap * hd) * 2, rng, true));
  auto* vc = static_cast<uint16_t*>(dev_random(size_t(Hkv * cap * hd) * 2, rng, true));
  auto* scratch = static_cast<float*>(dev_random(size_t(H * 64 * (hd + 2)) * 4, rng));
  auto* freq = static_cast<float*>(dev_random(size_t(hd) * 4, rng));
  int32_t* ex = nullptr;
  uint16_t* sc = nullptr;
  cudaMalloc(&ex, kk * 4);
  cudaMalloc(&sc, kk * 2);
  std::vector<int32_t> hex;
  for (int j = 0; j < kk; ++j) hex.push_back(int32_t(j * 13 % E));
  cudaMemcpy(ex, hex.data(), kk * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(sc, nw, kk * 2, cudaMemcpyDeviceToDevice);
  // DRAM mode: 16 disjoint sets of kk experts, set i % 16 for launch i.
  constexpr int kSets = 16;
  int32_t* ex_sets = nullptr;
  cudaMalloc(&ex_sets, kSets * kk * 4);
  {
    std::vector<int32_t> all(E);
    for (int64_t e = 0; e < E; ++e) all[e] = int32_t(e);
    std::shuffle(all.begin(), all.end(), rng);
    all.resize(kSets * kk);
    cudaMemcpy(ex_sets, all.data(), all.size() * 4, cudaMemcpyHostToDevice);
  }
  auto ex_of = [&](int i) { return dram ? ex_sets + (i % kSets) * kk : ex; };

  cudaDeviceProp p{};
  cudaGetDeviceProperties(&p, 0);
  const size_t l2 = size_t(p.l2CacheSize);
  const auto qs = dram_copies(q, 0, l2, dram, rng), ks = dram_copies(kp, 0, l2, dram, rng),
             vs = dram_copies(vp, 0, l2, dram, rng), os = dram_copies(o, 0, l2, dram, rng),
             rs = dram_copies(router, 0, l2, dram, rng);
  std::printf("%s, %d launches per kernel in one graph, shapes of tensor-parallel rank 1/%d, weights from %s\n",
              p.name, reps, tp, dram ? "DRAM (a fresh copy or expert set each launch)" : "the same buffers (L2)");
  uint16_t* const ys[3] = {yq, yk, yv};
  // Both mat-vec paths: the kernels read ZMLX_CUDA_MMA when launched (captured).
  // copies: how many weight copies the launches cycle through (DRAM mode).
  auto both = [&](const char* name, double bytes, const std::function<void(int)>& fn, size_t copies = 0) {
    const bool l2_sized = dram && copies > 0 && double(std::min<size_t>(copies, size_t(reps))) * bytes < 2.0 * double(l2);
    for (bool mma : {true, false}) {
      setenv("ZMLX_CUDA_MMA", mma ? "1" : "0", 1);
      time_it(s, reps, (std::string(name) + (mma ? " [mma]" : " [scalar]") + (l2_sized ? " [L2-sized]" : "")).c_str(),
              bytes, fn);
    }
    unsetenv("ZMLX_CUDA_MMA");
  };
  time_it(s, reps, "add_rms_norm [2048]", 0, [&](int) { k::add_rms_norm(h, x, 1, D, nw, 1e-6f, x, s); });
  both("linear_multi q/k/v", bytes_of(q, 1) + 2 * bytes_of(kp, 1), [&](int i) {
    const k::QMat qkv[3] = {qs[i % qs.size()], ks[i % ks.size()], vs[i % vs.size()]};
    k::linear_multi(x, 1, qkv, ys, 3, s);
  }, std::min({qs.size(), ks.size(), vs.size()}));
  time_it(s, reps, "qk_norm_rope_kv", 0, [&](int) {
    k::qk_norm_rope_kv(yq, yk, yv, 1, H, Hkv, hd, nw, nw, 1e-6f, freq, false, S, nullptr, yq, kc, vc, cap, s);
  });
  time_it(s, reps, "attention S=512 (split 16)", double(2 * Hkv * S * hd * 2),
          [&](int) { k::attention(yq, 1, H, Hkv, hd, kc, vc, cap, S - 1, nullptr, 0.088f, 16, scratch, att, s); });
  both("linear o_proj", bytes_of(o, 1), [&](int i) { k::linear(att, 1, os[i % os.size()], x, s); }, os.size());
  both("linear router", bytes_of(router, 1), [&](int i) { k::linear(x, 1, rs[i % rs.size()], logits, s); }, rs.size());
  time_it(s, reps, "route_softmax", 0, [&](int) { k::route_softmax(logits, 1, E, kk, true, ex, sc, s); });
  cudaMemcpy(ex, hex.data(), kk * 4, cudaMemcpyHostToDevice);
  both("gather_qmm_swiglu", bytes_of(gate, kk) + bytes_of(up, kk),
          [&](int i) { k::gather_swiglu(x, ex_of(i), 1, kk, gate, up, hmid, s); });
  both("gather_qmm_combine", bytes_of(down, kk),
          [&](int i) { k::gather_combine(hmid, ex_of(i), sc, false, k::kBf16Products, 1, kk, down, h, s); });
  both("gather_qmm (down, unfused)", bytes_of(down, kk),
          [&](int i) { k::gather_linear(hmid, true, ex_of(i), 1, kk, down, big, s); });
  both("lm_head 151936", bytes_of(head, 1), [&](int) { k::linear(x, 1, head, big, s); });
  {  // The device sampler (T 1, top-p 0.95) on a row of random logits (normal, standard deviation 3;
     // the head's output here is NaN, its weights being random bits) and on a row of one value (one
     // crowded bin); without penalties (a sort of 16 key bits) and with a repetition window of 64 and
     // a frequency penalty (32 bits).
    k::SamplingWorkspace ws;
    cudaMalloc(&ws.state, sizeof(k::SamplingState));
    k::sampling_workspace_alloc(ws, 151936);
    int32_t *tok = nullptr, *counts = nullptr, *window_counts = nullptr;
    uint16_t *flat = nullptr, *logits = nullptr;
    {
      std::normal_distribution<float> normal(0.f, 3.f);
      std::vector<uint16_t> host(151936);
      for (auto& v : host) {
        const float f = normal(rng);
        uint32_t u;
        std::memcpy(&u, &f, 4);
        v = uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // round to nearest even (finite values)
      }
      cudaMalloc(&logits, host.size() * 2);
      cudaMemcpy(logits, host.data(), host.size() * 2, cudaMemcpyHostToDevice);
    }
    cudaMalloc(&tok, 4);
    cudaMalloc(&flat, 151936 * 2);
    cudaMemset(flat, 0, 151936 * 2);
    cudaMalloc(&counts, size_t(zmlx::sampling::kMaxVocab) * 4);
    cudaMalloc(&window_counts, size_t(zmlx::sampling::kMaxVocab) * 4);
    cudaMemset(counts, 0, size_t(zmlx::sampling::kMaxVocab) * 4);
    cudaMemset(window_counts, 0, size_t(zmlx::sampling::kMaxVocab) * 4);
    for (auto [row, what] : {std::pair{static_cast<const uint16_t*>(logits), "random logits"}, std::pair{static_cast<const uint16_t*>(flat), "one value"}}) {
      for (bool penalized : {false, true}) {
        k::SamplingState st{};
        st.params.inv_temp = 1.f, st.params.top_p = 0.95f, st.params.seed = 1;
        if (penalized) st.params.penalty = 1.1f, st.params.window_cap = 64, st.params.frequency = 0.5f;
        st.counts = counts, st.window_counts = window_counts;
        cudaMemcpy(ws.state, &st, sizeof st, cudaMemcpyHostToDevice);
        const std::string name = std::string("sampler, ") + what + (penalized ? " [penalties, sort 32]" : " [sort 16]");
        time_it(s, reps, name.c_str(), 0, [&](int) { k::sample_token(row, ws, st.params, tok, nullptr, nullptr, 0, s); });
      }
    }
  }
  // Where the tensor-core path starts to pay for plain linears (use_mma_linear).
  std::printf("plain linear sweep (rows x K):\n");
  for (int64_t K : {1024, 2048, 4096}) {
    auto* xin = static_cast<uint16_t*>(dev_random(size_t(K) * 2, rng, true));
    for (int64_t rows : {512, 1024, 2048, 4096, 8192, 16384}) {
      const k::QMat m = qmat(0, rows, K, rng);
      const std::string name = "linear " + std::to_string(rows) + " x " + std::to_string(K);
      const auto ms = dram_copies(m, 0, l2, dram, rng);
      both(name.c_str(), bytes_of(m, 1), [&](int i) { k::linear(xin, 1, ms[i % ms.size()], big, s); }, ms.size());
    }
  }
  return 0;
}
