// Temperature sampling on the GPU (sampling.h): keys, a CUB radix sort, the
// running weight by a CUB scan, and one block that cuts and picks. Every
// number is computed by gen/sampling_math.h, as the host sampler does.
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "zmlx/backend/cuda/device_common.cuh"
#include "zmlx/backend/cuda/sampling.h"

namespace zmlx::cuda::k {
namespace {

using namespace zmlx::sampling;
using zmlx::cuda::dev::publish_chained_token;

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("CUDA sampler, ") + what + ": " + cudaGetErrorString(e));
}

constexpr int kKeyThreads = 256;
constexpr int kPickThreads = 1024;

// Each logit's order key with the penalties applied (the repetition
// penalty once to an id the window holds, by its count there), and the ids
// 0..V-1 for the sort to carry.
__global__ void __launch_bounds__(kKeyThreads) sampling_keys_kernel(const uint16_t* logits, int64_t V,
                                                                    const SamplingState* st, uint32_t* keys,
                                                                    int32_t* ids) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= V) return;
  const Params& p = st->params;
  float l = __uint_as_float(uint32_t(logits[i]) << 16);
  if (p.penalty != 1.f && st->window_counts[i] > 0) l = penalize(l, p.penalty);
  if (p.counts_output()) l = penalize_count(l, st->counts[i], p.frequency, p.presence);
  keys[i] = order_key(l);
  ids[i] = int32_t(i);
}

// The weight of each candidate in sorted order (the scan sums them in place).
__global__ void __launch_bounds__(kKeyThreads) sampling_weights_kernel(const uint32_t* sorted_keys, int64_t V,
                                                                       const SamplingState* st, uint64_t* w) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= V) return;
  const float inv_temp = st->params.inv_temp;
  w[i] = inv_temp == 0.f ? 0 : exp_weight(scaled_z(key_logit(sorted_keys[i]), key_logit(sorted_keys[0]), inv_temp));
}

// The smallest i in [0, n) with pred(i), or n; pred must be false then true
// along i. Two rounds of one probe a thread (n <= kPickThreads^2).
__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

template <class Pred>
__device__ int64_t block_find_first(int64_t n, Pred pred) {
  __shared__ int64_t found;
  const int t = threadIdx.x;
  const int64_t chunk = (n + kPickThreads - 1) / kPickThreads;
  if (t == 0) found = n;
  __syncthreads();
  // Round 1: the first chunk whose last element holds.
  const int64_t last = min64(n, (int64_t(t) + 1) * chunk) - 1;
  if (int64_t(t) * chunk < n && pred(last)) atomicMin(reinterpret_cast<unsigned long long*>(&found), (unsigned long long)t);
  __syncthreads();
  const int64_t c = found;
  __syncthreads();
  if (c == n) return n;
  if (t == 0) found = min64(n, (c + 1) * chunk) - 1;  // holds
  __syncthreads();
  // Round 2: the first element of that chunk that holds.
  const int64_t i = c * chunk + t;
  if (t < chunk && i < n && pred(i)) atomicMin(reinterpret_cast<unsigned long long*>(&found), (unsigned long long)i);
  __syncthreads();
  const int64_t r = found;
  __syncthreads();
  return r;
}

// Steps 2 and 4-8 of gen/sampler.h over the sorted candidates (the host's
// `finish`), then the token's bookkeeping.
__global__ void __launch_bounds__(kPickThreads) sampling_pick_kernel(const uint32_t* sorted_keys, const int32_t* sorted_ids,
                                                                     const uint64_t* cum, int64_t V, SamplingState* st,
                                                                     int32_t* out, int32_t* step, int32_t* ring,
                                                                     int ring_len) {
  const Params p = st->params;
  int32_t token = sorted_ids[0];
  if (p.inv_temp != 0.f) {
    const int64_t keep = p.top_k > 0 && p.top_k < V ? p.top_k : V;
    const uint64_t S = cum[keep - 1];
    int64_t n = keep;
    if (p.use_min_p) {
      const float mx = key_logit(sorted_keys[0]);
      n = min64(n, block_find_first(V, [&](int64_t i) {
                     return !(scaled_z(key_logit(sorted_keys[i]), mx, p.inv_temp) >= p.ln_min_p);
                   }));
    }
    if (p.top_p < 1.f) {
      const uint64_t target = top_p_target(p.top_p, S);
      if (target == 0) n = 0;
      else n = min64(n, block_find_first(V, [&](int64_t i) { return cum[i] >= target; }) + 1);
    }
    if (n < 1) n = 1;
    const uint64_t M = cum[n - 1];
    if (M != 0) {
      const uint64_t r = scale_to(random_bits(p.seed, st->draw), M);
      token = sorted_ids[block_find_first(V, [&](int64_t i) { return cum[i] > r; })];
    }
  }
  __syncthreads();  // every thread has read st->draw
  if (threadIdx.x != 0) return;
  if (p.inv_temp != 0.f) st->draw += 1;
  if (p.counts_output()) st->counts[token] += 1;
  if (p.penalty != 1.f && p.window_cap > 0) {
    if (st->window_len < p.window_cap) {
      st->window[st->window_len++] = token;
    } else {
      const int32_t old = st->window[st->window_head];
      if (old >= 0 && old < kMaxVocab) st->window_counts[old] -= 1;  // as add_token_counts counted it
      st->window[st->window_head] = token;
      st->window_head = (st->window_head + 1) % p.window_cap;
    }
    st->window_counts[token] += 1;
  }
  if (out) *out = token;
  if (step) publish_chained_token(token, step, ring, ring_len);
}

__global__ void add_counts_kernel(const int32_t* ids, int n, int32_t* counts) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n && ids[i] >= 0 && ids[i] < kMaxVocab) atomicAdd(&counts[ids[i]], 1);
}

size_t cub_bytes(int64_t V) {
  size_t sort = 0, scan = 0;
  check(cub::DeviceRadixSort::SortPairsDescending(nullptr, sort, static_cast<const uint32_t*>(nullptr),
                                                   static_cast<uint32_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                                   static_cast<int32_t*>(nullptr), int(V)),
        "sort size");
  check(cub::DeviceScan::InclusiveSum(nullptr, scan, static_cast<uint64_t*>(nullptr), int(V)), "scan size");
  return std::max(sort, scan);
}

}  // namespace

void sampling_workspace_alloc(SamplingWorkspace& ws, int64_t V) {
  if (V < 1 || V > kMaxVocab)
    throw std::runtime_error("CUDA sampler: " + std::to_string(V) + " logits (expected 1 to " +
                             std::to_string(kMaxVocab) + ")");
  sampling_workspace_free(ws);
  ws.V = V;
  ws.cub_bytes = cub_bytes(V);
  check(cudaMalloc(&ws.keys, size_t(2 * V) * sizeof(uint32_t)), "cudaMalloc");
  check(cudaMalloc(&ws.ids, size_t(2 * V) * sizeof(int32_t)), "cudaMalloc");
  check(cudaMalloc(&ws.cum, size_t(V) * sizeof(uint64_t)), "cudaMalloc");
  check(cudaMalloc(&ws.cub_temp, std::max<size_t>(ws.cub_bytes, 16)), "cudaMalloc");
}

void sampling_workspace_free(SamplingWorkspace& ws) {
  cudaFree(ws.keys);
  cudaFree(ws.ids);
  cudaFree(ws.cum);
  cudaFree(ws.cub_temp);
  SamplingState* state = ws.state;
  ws = SamplingWorkspace{};
  ws.state = state;
}

void add_token_counts(const int32_t* ids, int n, int32_t* counts, cudaStream_t s) {
  if (n <= 0) return;
  add_counts_kernel<<<(n + 255) / 256, 256, 0, s>>>(ids, n, counts);
  check(cudaGetLastError(), "count kernel");
}

void sample_token(const uint16_t* logits, SamplingWorkspace& ws, const sampling::Params& p, int32_t* out, int32_t* step,
                  int32_t* ring, int ring_len, cudaStream_t s) {
  const int64_t V = ws.V;
  const unsigned blocks = unsigned((V + kKeyThreads - 1) / kKeyThreads);
  uint32_t* keys = ws.keys;
  uint32_t* sorted_keys = ws.keys + V;
  int32_t* ids = ws.ids;
  int32_t* sorted_ids = ws.ids + V;
  sampling_keys_kernel<<<blocks, kKeyThreads, 0, s>>>(logits, V, ws.state, keys, ids);
  check(cudaGetLastError(), "keys kernel");
  size_t bytes = ws.cub_bytes;
  // bf16 logits' keys have all-0 or all-1 low halves, equal within a top
  // half: without the penalty's float results, 2 passes give the same order.
  check(cub::DeviceRadixSort::SortPairsDescending(ws.cub_temp, bytes, keys, sorted_keys, ids, sorted_ids, int(V),
                                                   p.penalized() ? 0 : 16, 32, s),
        "radix sort");
  sampling_weights_kernel<<<blocks, kKeyThreads, 0, s>>>(sorted_keys, V, ws.state, ws.cum);
  check(cudaGetLastError(), "weights kernel");
  bytes = ws.cub_bytes;
  check(cub::DeviceScan::InclusiveSum(ws.cub_temp, bytes, ws.cum, int(V), s), "scan");
  sampling_pick_kernel<<<1, kPickThreads, 0, s>>>(sorted_keys, sorted_ids, ws.cum, V, ws.state, out, step, ring,
                                                  ring_len);
  check(cudaGetLastError(), "pick kernel");
}

}  // namespace zmlx::cuda::k
