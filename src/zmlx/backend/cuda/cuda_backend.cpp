// The CUDA backend: the Backend ops on one GPU and one stream.
//
// Memory: weights are uploaded once (adopt) into their own allocations;
// everything else comes from a caching pool (stream-ordered reuse is safe on
// a single stream). Decode steps can be recorded as a CUDA graph and
// replayed (decode_step): blocks handed out while recording belong to the
// graph until it is dropped, so nothing else can reuse them.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "zmlx/backend/cuda/env_switch.h"
#include "zmlx/backend/cuda/gemm.h"
#include "zmlx/backend/cuda/kernel_trace.h"
#include "zmlx/backend/cuda/kernels.h"
#include "zmlx/backend/cuda/mla.h"
#include "zmlx/backend/cuda/sampling.h"
#include "zmlx/core/error.h"
#include "zmlx/core/log.h"
#include "zmlx/ops/backend.h"

namespace zmlx {
namespace {

namespace kern = zmlx::cuda::k;
namespace tc = zmlx::cuda::gemm;  // tensor-core GEMMs for many-token (prefill) calls
namespace mla = zmlx::cuda::mla;  // faster multi-latent attention kernels (GLM)

// ZMLX_CUDA_MLA=0 keeps GLM's attention_pe / multi_linear on the plain
// reference kernels (A/B runs, bisecting a mismatch).
bool mla_fast() {
  static const bool on = zmlx::cuda::env_on("ZMLX_CUDA_MLA");
  return on;
}

// ZMLX_CUDA_FLASH=0 keeps GQA prefill attention on the plain split kernels
// (the reference the flash kernel is tested against). Read at every call,
// so a test can compare both paths in one process.
bool flash_prefill() {
  return zmlx::cuda::env_on("ZMLX_CUDA_FLASH");
}

// Token counts from which the tensor-core GEMMs replace the mat-vec kernels
// (the choice depends only on T and k, so patched and unpatched paths agree).
constexpr int64_t kGemmMinTokens = 16;
constexpr int64_t kGemmMinPairs = 64;

// From kGemmMinPairs pairs up to this many pairs an expert on average
// (T·k <= experts · this), the expert matrices run as mat-vecs over pairs
// bucketed by expert (kern::gather_*_grouped: each expert's weights read
// once a tile of kern::kGroupPairs pairs) instead of the expert GEMM, whose
// cost hardly falls below 64 pairs an expert. Prefill with it against the
// GEMM (H200, 2026-11-29, docs/performance.md "Short prompts"): at 1-4
// pairs an expert +27-40 % (16-64 tokens, all three families), at 8 +5-7 %
// (Qwen3 and GLM at 128 tokens, LFM2 at 64), at 16 the GEMM 1.4x faster
// (Qwen3 and GLM at 256 tokens); rechecked with the wider loads (10:23):
// at 16 an expert still 0.7-3.5 % slower than the GEMM. ZMLX_MOE_GROUPED_MAX=N
// overrides it (0: the GEMM from kGemmMinPairs, as before; read per call,
// and every expert op asks alike, so fused and unfused agree).
constexpr int64_t kGroupedMaxPairsPerExpert = 8;
int64_t grouped_max_pairs_per_expert() {
  return zmlx::cuda::env_count("ZMLX_MOE_GROUPED_MAX", kGroupedMaxPairsPerExpert, 0, 1L << 20);
}

// The most rows one op call takes where a kernel puts them on a grid's y
// (65,535 blocks): attention's queries, gather_qmm's token-expert pairs.
constexpr int64_t kMaxCallRows = 65535;

void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) fail("CUDA: {} failed: {}", what, cudaGetErrorString(e));
}

// Size-bucketed free lists of device blocks.
class DevicePool {
 public:
  ~DevicePool() {
    for (auto& [size, list] : free_)
      for (void* p : list) cudaFree(p);
  }

  void* get(size_t bytes) {
    std::lock_guard<std::mutex> lk(mu_);
    const size_t size = bucket(bytes);
    auto& list = free_[size];
    void* p = nullptr;
    if (!list.empty()) {
      p = list.back();
      list.pop_back();
    } else {
      cudaError_t e = cudaMalloc(&p, size);
      if (e != cudaSuccess) {  // give the cached free blocks back and try once more
        cudaGetLastError();
        trim_locked();
        e = cudaMalloc(&p, size);
      }
      if (e != cudaSuccess) {
        cudaGetLastError();
        size_t fr = 0, total = 0;
        cudaMemGetInfo(&fr, &total);
        fail("out of GPU memory: needed {:.1f} MiB more, {:.1f} of {:.1f} MiB free", size / 1048576.0,
             fr / 1048576.0, total / 1048576.0);
      }
    }
    if (!sizes_.count(p)) held_ += size;
    sizes_[p] = size;
    peak_ = std::max(peak_, held_);
    if (capturing_) graph_blocks_.insert(p);
    return p;
  }

  void put(void* p) {
    std::lock_guard<std::mutex> lk(mu_);
    const size_t size = sizes_.at(p);
    if (graph_blocks_.count(p)) {
      graph_freed_.push_back(p);  // still used by the recorded graph
      return;
    }
    free_[size].push_back(p);
  }

  // Frees every cached block nobody holds (after synchronising the device,
  // so no queued kernel still uses one).
  void trim() {
    std::lock_guard<std::mutex> lk(mu_);
    trim_locked();
  }

  uint64_t peak_bytes() {
    std::lock_guard<std::mutex> lk(mu_);
    return peak_;
  }

  // Bytes of cached blocks nobody holds (get() frees them when it runs short).
  uint64_t idle_bytes() {
    std::lock_guard<std::mutex> lk(mu_);
    uint64_t n = 0;
    for (auto& [size, list] : free_) n += uint64_t(size) * list.size();
    return n;
  }

  void set_capturing(bool on) {
    std::lock_guard<std::mutex> lk(mu_);
    capturing_ = on;
  }

  // The recorded graph is gone: its blocks may be reused.
  void release_graph_blocks() {
    std::lock_guard<std::mutex> lk(mu_);
    for (void* p : graph_freed_) free_[sizes_.at(p)].push_back(p);
    graph_freed_.clear();
    graph_blocks_.clear();  // blocks still held by tensors return through put()
  }

 private:
  static size_t bucket(size_t bytes) {
    if (bytes <= 4096) return 4096;
    // Round to 1/8 of the next power of two so varying prompt lengths reuse blocks.
    size_t p2 = 1;
    while (p2 < bytes) p2 <<= 1;
    const size_t step = std::max<size_t>(4096, p2 / 8);
    return (bytes + step - 1) / step * step;
  }
  void trim_locked() {
    cudaDeviceSynchronize();
    for (auto& [size, list] : free_) {
      for (void* p : list) {
        cudaFree(p);
        held_ -= sizes_.at(p);
        sizes_.erase(p);
      }
      list.clear();
    }
  }

  std::mutex mu_;
  uint64_t held_ = 0, peak_ = 0;  // bytes obtained from cudaMalloc (in use or cached)
  std::unordered_map<size_t, std::vector<void*>> free_;
  std::unordered_map<void*, size_t> sizes_;
  bool capturing_ = false;
  std::unordered_set<void*> graph_blocks_;
  std::vector<void*> graph_freed_;
};

kern::QMat qmat(const Weight& w) {
  ZMLX_CHECK(w.w.device == Device::CUDA, "{}: weight is not on the GPU (load the model with the CUDA backend)", w.name);
  ZMLX_CHECK(w.cols % 32 == 0, "{}: the CUDA kernels need a multiple of 32 input features, got {}", w.name, w.cols);
  kern::QMat m;
  m.w = static_cast<const uint32_t*>(w.w.data);
  m.rows = w.rows;
  m.cols = w.cols;
  if (w.quantized) {
    ZMLX_CHECK(w.q.bits == 2 || w.q.bits == 4 || w.q.bits == 8, "{}: {}-bit weights are not supported on CUDA", w.name,
               w.q.bits);
    m.bits = w.q.bits;
    m.group = w.q.group_size;
    m.scales = static_cast<const uint16_t*>(w.scales.data);
    m.biases = static_cast<const uint16_t*>(w.biases.data);
    m.w_stride = w.rows * w.cols * w.q.bits / 32;
    m.s_stride = w.rows * (w.cols / w.q.group_size);
  } else {
    ZMLX_CHECK(w.w.dtype == DType::BF16, "{}: dense weights must be bf16 on CUDA, got {}", w.name, dtype_name(w.w.dtype));
    m.bits = 16;
    m.w_stride = w.rows * w.cols / 2;
  }
  return m;
}

// A weight for kernels that address single elements (no chunk alignment needed).
kern::QMat qmat_any(const Weight& w) {
  ZMLX_CHECK(w.w.device == Device::CUDA, "{}: weight is not on the GPU (load the model with the CUDA backend)", w.name);
  kern::QMat m;
  m.w = static_cast<const uint32_t*>(w.w.data);
  m.rows = w.rows;
  m.cols = w.cols;
  m.bits = w.quantized ? w.q.bits : 16;
  m.group = w.quantized ? w.q.group_size : 64;
  m.scales = static_cast<const uint16_t*>(w.scales.data);
  m.biases = static_cast<const uint16_t*>(w.biases.data);
  return m;
}

const uint16_t* bf16p(const Tensor& t) { return static_cast<const uint16_t*>(t.data); }
uint16_t* bf16p(Tensor& t) { return static_cast<uint16_t*>(t.data); }

class CudaBackend;

// ZMLX_PROFILE=1: GPU time per op (CUDA events; recording is off), printed
// at exit — for tuning, like the CPU backend's profile.
struct GpuProfile {
  bool on = std::getenv("ZMLX_PROFILE") != nullptr;
  std::map<std::string, std::pair<double, long>> ms;
  std::vector<std::tuple<const char*, cudaEvent_t, cudaEvent_t>> pending;
  void collect() {
    for (auto& [name, a, b] : pending) {
      float t = 0;
      cudaEventElapsedTime(&t, a, b);
      auto& e = ms[name];
      e.first += t;
      e.second++;
      cudaEventDestroy(a);
      cudaEventDestroy(b);
    }
    pending.clear();
  }
  ~GpuProfile() {
    if (!on) return;
    double total = 0;
    for (auto& [k, v] : ms) total += v.first;
    for (auto& [k, v] : ms)
      fmt::print(stderr, "[zmlx profile] {:<20} {:9.3f} ms {:6.1f}%  {} calls  {:.2f} us/call\n", k, v.first,
                 100 * v.first / total, v.second, 1000 * v.first / v.second);
  }
};

// ZMLX_PROFILE_STEPS=1: GPU time of each replayed decode step (graphs stay
// on), printed at exit next to the wall time between replays, so a step's
// host overhead shows as the difference.
struct StepProfile {
  bool on = std::getenv("ZMLX_PROFILE_STEPS") != nullptr;
  std::vector<std::pair<cudaEvent_t, cudaEvent_t>> events;  // not yet folded into gpu_ms
  std::vector<std::chrono::steady_clock::time_point> launches;
  double gpu_ms = 0;
  long steps = 0;
  void add(cudaEvent_t a, cudaEvent_t b) {
    events.emplace_back(a, b);
    launches.push_back(std::chrono::steady_clock::now());
    if (events.size() >= 64) fold();
  }
  // Adds the recorded steps' GPU times and frees their events (a server
  // replays steps for as long as it runs).
  void fold() {
    for (auto& [a, b] : events) {
      float t = 0;
      cudaEventSynchronize(b);
      cudaEventElapsedTime(&t, a, b);
      gpu_ms += t;
      ++steps;
      cudaEventDestroy(a);
      cudaEventDestroy(b);
    }
    events.clear();
  }
  // The median gap between consecutive launches: the step rate while
  // decoding, without the pauses between runs. (Printed by the backend
  // before it destroys its stream.)
  void report() {
    if (!on) return;
    fold();
    if (steps < 2 || launches.size() < 2) return;
    std::vector<double> gaps;
    for (size_t i = 1; i < launches.size(); ++i)
      gaps.push_back(std::chrono::duration<double, std::milli>(launches[i] - launches[i - 1]).count());
    std::nth_element(gaps.begin(), gaps.begin() + gaps.size() / 2, gaps.end());
    fmt::print(stderr, "[zmlx profile] {} replayed steps: GPU {:.3f} ms/step, median launch-to-launch {:.3f} ms\n",
               steps, gpu_ms / double(steps), gaps[gaps.size() / 2]);
  }
};

// ZMLX_KERNEL_TRACE_STEP=N in a -DZMLX_KERNEL_TRACE=ON build: the kernel
// timeline of the N-th replayed decode step, printed to stderr
// (kernel_trace.h says what the columns mean).
struct KernelTrace {
  long step = [] {
    const char* v = std::getenv("ZMLX_KERNEL_TRACE_STEP");
    return v ? std::atol(v) : 0L;
  }();
  bool armed_for(long replay) const { return step > 0 && replay == step; }
  void replay(cudaGraphExec_t exec, cudaStream_t s, cudaEvent_t done) {
#ifdef ZMLX_KERNEL_TRACE
    using zmlx::cuda::dev::KernelTraceBuf;
    static_assert(zmlx::cuda::dev::kTraceMarks == 4, "the block lines print four marks");
    KernelTraceBuf* buf = nullptr;
    cuda_check(cudaMalloc(&buf, sizeof(KernelTraceBuf)), "cudaMalloc (kernel trace)");
    cuda_check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
    cudaMemset(buf, 0, 2 * sizeof(unsigned long long));  // n, nb
    kern::kernel_trace_arm(buf);
    cuda_check(cudaGraphLaunch(exec, s), "cudaGraphLaunch");
    cuda_check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
    kern::kernel_trace_arm(nullptr);
    auto host = std::make_unique<KernelTraceBuf>();
    cudaMemcpy(host.get(), buf, sizeof(KernelTraceBuf), cudaMemcpyDeviceToHost);
    cudaFree(buf);
    const auto n = std::min(host->n, KernelTraceBuf::kMax);
    const auto nb = std::min(host->nb, KernelTraceBuf::kMaxBlocks);
    // Blocks write their records as they leave: kernel order is release order.
    std::sort(host->rec, host->rec + n, [](const auto& a, const auto& b) { return a.go_ns < b.go_ns; });
    const auto t0 = n ? host->rec[0].go_ns : 0;
    // Each block to its kernel: the same grid, the latest block-0 release at
    // most 1 us after the block's own (blocks of one kernel release within
    // a few hundred ns of each other; kernels of one shape are 5+ us apart).
    struct BlockStats {
      unsigned blocks = 0, late = 0;
      int64_t last_start = INT64_MIN, last_end = INT64_MIN;
    };
    std::vector<BlockStats> bs(n);
    std::vector<long> owner(nb, -1);  // each block's kernel
    for (unsigned long long b = 0; b < nb; ++b) {
      const auto& r = host->blk[b];
      long best = -1;
      for (unsigned long long i = 0; i < n; ++i) {
        const auto& k = host->rec[i];
        if (k.grid_x == r.grid_x && k.grid_y == r.grid_y && k.go_ns <= r.go_ns + 1000 &&
            (best < 0 || k.go_ns > host->rec[best].go_ns))
          best = long(i);
      }
      owner[b] = best;
      if (best < 0) continue;
      auto& st = bs[best];
      const int64_t rel = int64_t(r.start_ns) - int64_t(host->rec[best].go_ns);
      ++st.blocks;
      st.late += rel > 0;
      st.last_start = std::max(st.last_start, rel);
      st.last_end = std::max(st.last_end, int64_t(r.end_ns) - int64_t(host->rec[best].go_ns));
    }
    fmt::print(stderr,
               "[zmlx trace] step {}: {} kernels, {} blocks (i start_ns go_ns grid_x grid_y block blocks "
               "late_blocks last_block_start_after_go_ns last_block_end_after_go_ns)\n",
               step, n, nb);
    for (unsigned long long i = 0; i < n; ++i) {
      const auto& r = host->rec[i];
      fmt::print(stderr, "[zmlx trace] {} {} {} {} {} {} {} {} {} {}\n", i, int64_t(r.start_ns - t0),
                 int64_t(r.go_ns - t0), r.grid_x, r.grid_y, r.block, bs[i].blocks, bs[i].late,
                 bs[i].blocks ? bs[i].last_start : 0, bs[i].blocks ? bs[i].last_end : 0);
    }
    // ZMLX_KERNEL_TRACE_BLOCKS=1: every block's own line too (its kernel's
    // index, start, release and end in ns from the step's first release,
    // its grid, then its phase marks, -1 where none, then the SM it ran
    // on), for questions like "when did the late blocks finish", "which
    // phase takes the time" or "were the slow blocks sharing an SM".
    if (const char* v = std::getenv("ZMLX_KERNEL_TRACE_BLOCKS"); v && std::strcmp(v, "1") == 0)
      for (unsigned long long b = 0; b < nb; ++b) {
        const auto& r = host->blk[b];
        auto mark = [&](int i) { return r.mark_ns[i] ? int64_t(r.mark_ns[i] - t0) : int64_t(-1); };
        fmt::print(stderr, "[zmlx trace block] {} {} {} {} {} {} {} {} {} {} {}\n", owner[b], int64_t(r.start_ns - t0),
                   int64_t(r.go_ns - t0), int64_t(r.end_ns - t0), r.grid_x, r.grid_y, mark(0), mark(1), mark(2),
                   mark(3), r.sm);
      }
#else
    log_info("[zmlx] ZMLX_KERNEL_TRACE_STEP: this build records no kernel trace (cmake -DZMLX_KERNEL_TRACE=ON)");
    cuda_check(cudaGraphLaunch(exec, s), "cudaGraphLaunch");
#endif
    cuda_check(cudaEventRecord(done, s), "cudaEventRecord");
  }
};

struct Prof {
  GpuProfile* p;
  cudaStream_t s;
  const char* name;
  cudaEvent_t a = nullptr;
  template <typename B>
  Prof(B* be, const char* n) : p(be->profile_.on ? &be->profile_ : nullptr), s(be->stream_), name(n) {
    ++be->op_seq_;
    if (!p) return;
    cudaEventCreate(&a);
    cudaEventRecord(a, s);
  }
  ~Prof() {
    if (!p) return;
    cudaEvent_t b;
    cudaEventCreate(&b);
    cudaEventRecord(b, s);
    p->pending.emplace_back(name, a, b);
  }
};

class CudaBackend final : public Backend {
  friend struct Prof;

 public:
  explicit CudaBackend(int device) : pool_(std::make_shared<DevicePool>()), device_(device) {
    cuda_check(cudaSetDevice(device), "cudaSetDevice");
    cuda_check(cudaEventCreateWithFlags(&step_done_, cudaEventDisableTiming), "cudaEventCreate");
    cudaDeviceProp p{};
    cuda_check(cudaGetDeviceProperties(&p, device), "cudaGetDeviceProperties");
    name_ = fmt::format("cuda:{} ({}, sm_{}{})", device, p.name, p.major, p.minor);
    // A build for sm_80 alone runs on a Hopper (or newer) card from its PTX,
    // without programmatic dependent launch (device_common.cuh, pdl_enabled):
    // decode is ~20 % slower there (docs/performance.md). Said once, and in the name.
    const int ptx = kern::kernels_ptx_version();
    if (p.major >= 9 && ptx > 0 && ptx < 90) {
      name_ = fmt::format("cuda:{} ({}, sm_{}{}, kernels built for sm_{})", device, p.name, p.major, p.minor, ptx);
      log_info("[zmlx] warning: the CUDA kernels were built for sm_{} only: on this sm_{}{} GPU they run without "
               "programmatic dependent launch, decode ~20 % slower (build with -DZMLX_CUDA_ARCHS=\"80;90a\")",
               ptx, p.major, p.minor);
    }
    cuda_check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    cuda_check(cudaMallocHost(&h_step_, 4 * sizeof(int32_t)), "cudaMallocHost");
    cuda_check(cudaMalloc(&d_step_, 4 * sizeof(int32_t)), "cudaMalloc");
    cuda_check(cudaHostAlloc(&h_ring_, kRing * sizeof(int32_t), cudaHostAllocMapped), "cudaHostAlloc");
    cuda_check(cudaHostGetDevicePointer(reinterpret_cast<void**>(&d_ring_), h_ring_, 0), "cudaHostGetDevicePointer");
    for (auto& e : chain_done_) cuda_check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate");
    graphs_enabled_ = zmlx::cuda::env_on("ZMLX_CUDA_GRAPHS") && !profile_.on;
    poison_ = zmlx::cuda::env_is("ZMLX_CUDA_POISON", "1");
  }

  ~CudaBackend() override {
    step_profile_.report();
    drop_graph();
    cudaStreamSynchronize(stream_);
    for (auto& [k, v] : rope_tables_) cudaFree(v);
    for (auto& [V, ws] : sampling_ws_by_vocab_) kern::sampling_workspace_free(ws);
    cudaFree(sampling_state_);
    cudaFree(sampling_counts_);
    cudaFree(window_counts_);
    cudaFree(sampler_ids_);
    cudaFreeHost(h_sampling_);
    cudaFree(d_step_);
    cudaFreeHost(h_step_);
    cudaFreeHost(h_ring_);
    for (auto& e : chain_done_) cudaEventDestroy(e);
    cudaEventDestroy(step_done_);
    cudaStreamDestroy(stream_);
  }

  std::string name() const override { return name_; }
  Device device() const override { return Device::CUDA; }
  void* native_stream() const override { return stream_; }
  int device_index() const override { return device_; }

  // ------------------------------------------------------------ memory

  Tensor alloc(DType dtype, std::vector<int64_t> shape) override {
    Tensor t;
    t.dtype = dtype;
    t.shape = std::move(shape);
    t.device = Device::CUDA;
    const size_t bytes = std::max<size_t>(t.nbytes(), 1);
    void* p = pool_->get(bytes);
    auto pool = pool_;
    t.storage = std::shared_ptr<void>(p, [pool](void* q) { pool->put(q); });
    t.data = p;
    // A pooled block may hold an earlier op's result, even the very values
    // a kernel that skips an element would have written: poisoned, such an
    // element reads as NaN (bf16, f32) or -1 (ints).
    if (poison_) cuda_check(cudaMemsetAsync(p, 0xff, bytes, stream_), "cudaMemsetAsync (poison)");
    return t;
  }

  Tensor from_host(const Tensor& h) override {
    if (h.device == Device::CUDA) return h;
    Tensor t = alloc(h.dtype, h.shape);
    cuda_check(cudaMemcpyAsync(t.data, h.data, h.nbytes(), cudaMemcpyHostToDevice, stream_), "upload");
    return t;
  }

  Tensor to_host(const Tensor& t) override {
    if (t.device == Device::CPU) return t;
    ZMLX_CHECK(!capturing_, "to_host inside a recorded decode step");
    Tensor h = host_tensor(t.dtype, t.shape);
    cuda_check(cudaMemcpyAsync(h.data, t.data, t.nbytes(), cudaMemcpyDeviceToHost, stream_), "download");
    cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (a kernel failed)");
    if (profile_.on) profile_.collect();
    return h;
  }

  // Weights and constant tensors: uploaded once. (A tied output head is the
  // already adopted embedding, so nothing is uploaded twice.)
  Tensor adopt(const Tensor& t) override {
    if (t.device == Device::CUDA || t.empty()) return t;
    void* p = nullptr;
    if (cudaMalloc(&p, std::max<size_t>(t.nbytes(), 1)) != cudaSuccess) {
      cudaGetLastError();
      pool_->trim();
      if (cudaMalloc(&p, std::max<size_t>(t.nbytes(), 1)) != cudaSuccess) {
        cudaGetLastError();
        size_t fr = 0, total = 0;
        cudaMemGetInfo(&fr, &total);
        fail("out of GPU memory uploading weights: {:.1f} MiB more needed, {:.1f} of {:.1f} MiB free",
             t.nbytes() / 1048576.0, fr / 1048576.0, total / 1048576.0);
      }
    }
    cuda_check(cudaMemcpy(p, t.data, t.nbytes(), cudaMemcpyHostToDevice), "weight upload");
    Tensor d = t;
    d.device = Device::CUDA;
    d.storage = std::shared_ptr<void>(p, [](void* q) { cudaFree(q); });
    d.data = p;
    ++weights_epoch_;
    weight_bytes_ += t.nbytes();
    return d;
  }

  uint64_t peak_device_bytes() const override { return weight_bytes_ + pool_->peak_bytes(); }
  // Passes of 8,192 prompt tokens where the card has 16 GiB of room (free
  // memory + the pool's idle blocks), 4,096 above 8, 1,024 above 2, else
  // 512. On an H200 a 32,768-token prompt prefilled 1.2-2.1x faster in
  // passes of 4,096 than of 512 at no higher GPU peak memory, and in passes of
  // 8,192 another 0.8 / 7.3 / 1.9 % (Qwen3 / GLM / LFM2; GLM re-expands its
  // latent cache once a pass; LFM2's peak +0.22 GB) (docs/performance.md).
  // prefill_pass caps a pass at max_prefill_pass: 8,191 tokens for Qwen3's
  // 8 experts a token. The smaller margins are for smaller cards, not
  // measured ones. Decided once, at the first prompt, and kept for the
  // backend's life (a node's instance keeps it as other models load): the
  // pass length changes the prefill GEMMs' split-K and so the bits, and two
  // runs of one prompt (validate's, a seeded request's) must agree.
  int prefill_chunk() const override {
    std::call_once(prefill_chunk_once_, [this] {
      cudaSetDevice(device_);  // the caller may be another thread (the node's worker)
      size_t free = 0, total = 0;
      if (cudaMemGetInfo(&free, &total) != cudaSuccess) {
        cudaGetLastError();
        prefill_chunk_ = 512;
        return;
      }
      const double room = double(free) + double(pool_->idle_bytes());
      constexpr double GiB = 1024.0 * 1024.0 * 1024.0;
      prefill_chunk_ = room >= 16 * GiB ? 8192 : room >= 8 * GiB ? 4096 : room >= 2 * GiB ? 1024 : 512;
    });
    return prefill_chunk_;
  }
  // One call's limits: 65,535 query rows (attention, attention_pe) and
  // 65,535 token-expert pairs (gather_qmm, the unpatched MoE block's).
  int max_prefill_pass(int64_t experts_per_token) const override {
    return int(kMaxCallRows / std::max<int64_t>(1, experts_per_token));
  }

  Weight adopt(const Weight& w) override {
    // The kernels read a row's groups as cols / group_size (the loader
    // demands as much of a checkpoint; a weight built in code must too).
    ZMLX_CHECK(!w.quantized || (w.q.group_size > 0 && w.cols % w.q.group_size == 0 &&
                                w.scales.numel() == std::max<int64_t>(w.experts, 1) * w.rows * (w.cols / w.q.group_size)),
               "{}: {} columns in groups of {} with {} scales: not whole groups of every row", w.name, w.cols,
               w.q.group_size, w.scales.numel());
    Weight d = w;
    d.tiles = d.tile_scales = d.tile_biases = Tensor{};
    d.w = adopt(w.w);
    if (w.quantized) {
      d.scales = adopt(w.scales);
      d.biases = adopt(w.biases);
    }
    return d;
  }

  // --------------------------------------------------------------- ops

  Tensor embed(const Weight& table, const std::vector<int32_t>& ids) override {
    cudaSetDevice(device_);  // a forward may run on another thread than the one that made the backend
    const int64_t T = int64_t(ids.size()), D = table.cols;
    for (int32_t id : ids)
      ZMLX_CHECK(id >= 0 && id < table.rows, "token id {} is outside the vocabulary [0, {})", id, table.rows);
    const int32_t* dids;
    Tensor tmp;
    if (capturing_) {
      ZMLX_CHECK(T == 1, "a recorded decode step takes one token");
      dids = d_step_;  // filled from h_step_ by the graph's first node
    } else {
      tmp = alloc(DType::I32, {T});
      cuda_check(cudaMemcpyAsync(tmp.data, ids.data(), size_t(T) * 4, cudaMemcpyHostToDevice, stream_), "ids upload");
      dids = static_cast<const int32_t*>(tmp.data);
    }
    Tensor out = alloc(DType::BF16, {T, D});
    kern::QMat m;
    m.w = static_cast<const uint32_t*>(table.w.data);
    m.rows = table.rows;
    m.cols = D;
    m.bits = table.quantized ? table.q.bits : 16;
    m.group = table.quantized ? table.q.group_size : 64;
    m.scales = static_cast<const uint16_t*>(table.scales.data);
    m.biases = static_cast<const uint16_t*>(table.biases.data);
    Prof p_(this, "embed");
    kern::embed(m, dids, int(T), bf16p(out), stream_);
    return out;
  }

  // The tensor-core GEMMs of a prefill, with the split-K workspace a small
  // tile grid needs (gemm.h; none when the shape does not split).
  void gemm_dense(const uint16_t* x, int64_t T, const kern::QMat& m, uint16_t* y) {
    Tensor ws = gemm_workspace(T, m, false);
    tc::gemm_dense(x, int(T), m, y, stream_, static_cast<float*>(ws.data));
  }
  void gemm_dense_swiglu(const uint16_t* x, int64_t T, const kern::QMat& g, const kern::QMat& u, uint16_t* y) {
    Tensor ws = gemm_workspace(T, g, true);
    tc::gemm_dense_swiglu(x, int(T), g, u, y, stream_, static_cast<float*>(ws.data));
  }
  Tensor gemm_workspace(int64_t T, const kern::QMat& m, bool swiglu) {
    const size_t n = tc::gemm_dense_workspace_bytes(int(T), m, swiglu);
    return n ? alloc(DType::F32, {int64_t(n / 4)}) : Tensor{};
  }

  Tensor linear(const Tensor& x, const Weight& w) override {
    check_input(x, w);
    Tensor y = alloc(DType::BF16, {x.rows(), w.rows});
    const kern::QMat m = qmat(w);
    Prof p_(this, "linear");
    last_linear_input_ = x.data, last_linear_op_ = op_seq_;
    if (x.rows() >= kGemmMinTokens && tc::gemm_supported(m))
      gemm_dense(bf16p(x), x.rows(), m, bf16p(y));
    else
      kern::linear(bf16p(x), int(x.rows()), m, bf16p(y), stream_);
    return y;
  }

  std::vector<Tensor> linear_multi(const Tensor& x, const std::vector<const Weight*>& ws) override {
    std::vector<kern::QMat> ms;
    std::vector<Tensor> out;
    std::vector<uint16_t*> ys;
    bool same = ws.size() <= 4;
    for (const Weight* w : ws) {
      check_input(x, *w);
      ms.push_back(qmat(*w));
      same = same && ms.back().bits == ms[0].bits;
      out.push_back(alloc(DType::BF16, {x.rows(), w->rows}));
      ys.push_back(bf16p(out.back()));
    }
    Prof p_(this, "linear");
    bool gemm = x.rows() >= kGemmMinTokens;
    for (auto& m : ms) gemm = gemm && tc::gemm_supported(m);
    if (gemm) {
      for (size_t i = 0; i < ms.size(); ++i) gemm_dense(bf16p(x), x.rows(), ms[i], ys[i]);
    } else if (same) {
      kern::linear_multi(bf16p(x), int(x.rows()), ms.data(), ys.data(), int(ms.size()), stream_);
    } else {
      for (size_t i = 0; i < ms.size(); ++i) kern::linear(bf16p(x), int(x.rows()), ms[i], ys[i], stream_);
    }
    return out;
  }

  Tensor rms_norm(const Tensor& x, const Tensor& w, float eps) override {
    const int64_t D = w.numel();
    ZMLX_CHECK(x.dtype == DType::BF16 && x.numel() % D == 0, "rms_norm: {} elements do not split into rows of {}",
               x.numel(), D);
    Tensor out = alloc(DType::BF16, x.shape);
    Prof p_(this, "rms_norm");
    kern::rms_norm(bf16p(x), x.numel() / D, D, bf16p(w), eps, bf16p(out), stream_);
    return out;
  }

  void rope(Tensor& x, int64_t heads, int64_t head_dim, int64_t rot_offset, int64_t rot_dims, int64_t pos0, float base,
            bool traditional) override {
    ZMLX_CHECK(x.cols() == heads * head_dim, "rope: row has {} values, expected {}x{}", x.cols(), heads, head_dim);
    Prof p_(this, "rope");
    kern::rope(bf16p(x), int(x.rows()), int(heads), int(head_dim), int(rot_offset), int(rot_dims), int(pos0), dpos(),
            rope_table(base, rot_dims), traditional, stream_);
  }

  void add(Tensor& h, const Tensor& x) override {
    ZMLX_CHECK(h.numel() == x.numel(), "add: {} vs {} elements", h.numel(), x.numel());
    Prof p_(this, "add");
    kern::add(bf16p(h), bf16p(x), h.numel(), stream_);
  }

  Tensor add_rms_norm(Tensor& h, const Tensor& x, const Tensor& w, float eps) override {
    const int64_t D = w.numel();
    ZMLX_CHECK(h.numel() == x.numel() && h.numel() % D == 0, "add_rms_norm: {} + {} elements in rows of {}",
               h.numel(), x.numel(), D);
    Tensor out = alloc(DType::BF16, h.shape);
    Prof p_(this, "add_rms_norm");
    kern::add_rms_norm(bf16p(h), bf16p(x), h.numel() / D, D, bf16p(w), eps, bf16p(out), stream_);
    return out;
  }

  Tensor qk_norm_rope_cache(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& qn, const Tensor& kn,
                            float eps, int64_t heads, int64_t kv_heads, int64_t hd, int64_t pos0, float base,
                            bool traditional, KvLayer& cache) override {
    const int64_t T = q.rows();
    ZMLX_CHECK(q.cols() == heads * hd && k.cols() == kv_heads * hd && v.cols() == kv_heads * hd &&
                   qn.numel() == hd && kn.numel() == hd,
               "qk_norm_rope_cache: shapes do not match {} + {} heads of {}", heads, kv_heads, hd);
    if (hd != 32 && hd != 64 && hd != 128 && hd != 256)
      return Backend::qk_norm_rope_cache(q, k, v, qn, kn, eps, heads, kv_heads, hd, pos0, base, traditional, cache);
    ensure_capacity(cache, pos0 + T, pos0);  // grow first, so the fused kernel always runs
    Tensor qo = alloc(DType::BF16, q.shape);
    Prof p_(this, "qk_norm_rope_kv");
    kern::qk_norm_rope_kv(bf16p(q), bf16p(k), bf16p(v), int(T), int(heads), int(kv_heads), int(hd), bf16p(qn),
                          bf16p(kn), eps, rope_table(base, hd), traditional, int(pos0), dpos(), bf16p(qo),
                          bf16p(cache.k), bf16p(cache.v), cache.capacity, stream_);
    return qo;
  }

  // One-token steps: q/k norm, RoPE, the cache write and the attention
  // partials in one kernel (kern::attention_decode_prep), bit-identical to
  // qk_norm_rope_cache + attention. ZMLX_CUDA_FUSED_ATTN=0 keeps the two
  // everywhere, =all fuses them everywhere (read at every call, so a test
  // can compare the forms in one process).
  //
  // By default the two stay apart where the attention runs as merging
  // thread-block clusters (kern::attention_cluster; Qwen3's shapes at KV
  // cache capacities of 128 to 1,087, i.e. 2 to 16 splits) of more than
  // kern::kFusedPrepClusterSplits splits. There, a trace
  // of the fused form showed 20 of 48 blocks resident only after their
  // release: the q/k/v mat-vec's blocks hold the SMs until they leave, a
  // cluster's blocks become resident only together, and the preparation
  // then runs after their wait. The likely reason the small norm + RoPE
  // kernel in between pays is that the clusters become resident while it
  // runs (not traced after the change). Same bits. One H200, 2026-11-28
  // (docs/performance.md): Qwen3 decode +0.9 % patched and +1.8 % unpatched
  // at 512 + 128 positions (12 splits). At 4 splits (the first cache of 256
  // positions: a prompt of 1 to 64 tokens, llama-bench tg128's condition)
  // the fused form is ahead: +0.2 to +1.2 % in each of 6 rounds on an H200,
  // 2026-11-29 (as ZMLX_CUDA_FUSED_ATTN=all); at 8 and 12 one round each way.
  Tensor norm_rope_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& qn, const Tensor& kn,
                             float eps, int64_t heads, int64_t kv_heads, int64_t hd, int64_t pos0, float base,
                             bool traditional, KvLayer& cache, float scale) override {
    auto two_kernels = [&] {
      return Backend::norm_rope_attention(q, k, v, qn, kn, eps, heads, kv_heads, hd, pos0, base, traditional, cache,
                                          scale);
    };
    const bool fused = zmlx::cuda::env_on("ZMLX_CUDA_FUSED_ATTN");
    if (!fused || q.rows() != 1 || (hd != 64 && hd != 128 && hd != 256) || heads % kv_heads != 0 ||
        cache.k.dim(0) != kv_heads || cache.k.dim(2) != hd || cache.v.dim(2) != hd)
      return two_kernels();
    ZMLX_CHECK(q.cols() == heads * hd && k.cols() == kv_heads * hd && v.cols() == kv_heads * hd &&
                   qn.numel() == hd && kn.numel() == hd,
               "norm_rope_attention: shapes do not match {} + {} heads of {}", heads, kv_heads, hd);
    ensure_capacity(cache, pos0 + 1, pos0);
    const int splits = kern::decode_attention_splits(int(heads), int(kv_heads), int(hd), cache.capacity);
    if (!zmlx::cuda::env_is("ZMLX_CUDA_FUSED_ATTN", "all") && splits > kern::kFusedPrepClusterSplits &&
        kern::attention_cluster(int(heads), int(kv_heads), int(hd), cache.capacity, splits) == kern::AttnCluster::merge)
      return two_kernels();
    Tensor scratch = alloc(DType::F32, {heads * splits * (hd + 2)});
    Tensor out = alloc(DType::BF16, {1, heads * hd});
    Prof p_(this, "norm_rope_attention");  // the name tests look for (the fused kernel ran)
    kern::attention_decode_prep(bf16p(q), bf16p(k), bf16p(v), int(heads), int(kv_heads), int(hd), bf16p(qn),
                                bf16p(kn), eps, rope_table(base, hd), traditional, bf16p(cache.k), bf16p(cache.v),
                                cache.capacity, int(pos0), dpos(), scale, splits, static_cast<float*>(scratch.data),
                                bf16p(out), stream_);
    return out;
  }

  Tensor swiglu(const Tensor& gate, const Tensor& up) override {
    ZMLX_CHECK(gate.numel() == up.numel(), "swiglu: gate {} vs up {} elements", gate.numel(), up.numel());
    Tensor out = alloc(DType::BF16, gate.shape);
    Prof p_(this, "swiglu");
    kern::swiglu(bf16p(gate), bf16p(up), gate.numel(), bf16p(out), stream_);
    return out;
  }

  KvLayer new_kv_layer(int64_t kv_heads, int64_t head_dim, int64_t capacity) override {
    KvLayer c;
    c.capacity = capacity;
    c.k = alloc(DType::BF16, {kv_heads, capacity, head_dim});
    c.v = alloc(DType::BF16, {kv_heads, capacity, head_dim});
    return c;
  }

  KvLayer new_latent_kv_layer(int64_t k_dim, int64_t v_dim, int64_t capacity) override {
    KvLayer c;
    c.capacity = capacity;
    c.k = alloc(DType::BF16, {1, capacity, k_dim});
    c.v = alloc(DType::BF16, {1, capacity, v_dim});
    return c;
  }

  void kv_write(KvLayer& c, const Tensor& k, const Tensor& v, int64_t pos0) override {
    const int64_t H = c.k.dim(0), hd = c.k.dim(2), vd = c.v.dim(2), T = k.rows();
    ZMLX_CHECK(k.numel() == T * H * hd && v.numel() == T * H * vd, "kv_write: k/v do not match the cache rows");
    ZMLX_CHECK(v.rows() == T, "kv_write: {} key rows but {} value rows", T, v.rows());
    ensure_capacity(c, pos0 + T, pos0);
    Prof p_(this, "kv_write");
    kern::kv_write(bf16p(c.k), bf16p(c.v), c.capacity, int(H), int(hd), int(vd), bf16p(k), bf16p(v), int(T),
                   int(pos0), dpos(), stream_);
  }

  Tensor attention_pe(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& q_pe, const Tensor& k_pe,
                      int64_t pos0, int64_t heads, int64_t kv_heads, float scale, int64_t capacity) override {
    const int64_t T = q.rows();
    ZMLX_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0 && q.cols() % heads == 0 &&
                   q_pe.cols() % heads == 0 && v.cols() % kv_heads == 0 && q_pe.rows() == T,
               "attention_pe: {} heads / {} kv heads do not fit q [{}, {}], v [{}, {}]", heads, kv_heads, q.rows(),
               q.cols(), v.rows(), v.cols());
    const int64_t dk = q.cols() / heads, dv = v.cols() / kv_heads, dr = q_pe.cols() / heads;
    ZMLX_CHECK(k.cols() == kv_heads * dk && k_pe.cols() == dr, "attention_pe: k/k_pe widths do not match q");
    ZMLX_CHECK(k.rows() >= pos0 + T && v.rows() >= pos0 + T && k_pe.rows() >= pos0 + T && T <= kMaxCallRows,
               "attention_pe: k [{}] / v [{}] / k_pe [{}] rows do not cover {} positions (or over 65535 queries)",
               k.rows(), v.rows(), k_pe.rows(), pos0 + T);
    // Decode: the key splits follow the cache's capacity (kern::splits_by_rows:
    // 64 rows a split, so eager and replayed steps agree), as GQA's do (a
    // recorded step serves every length up to it), at least 16: with 16 at
    // every length a split's warps took ~33 dependent steps at 8K positions.
    // No capacity given, or ZMLX_CUDA_MLA_SPLITS=16: 16 (A/B runs; read per call).
    const bool by_capacity = capacity > 0 && !zmlx::cuda::env_is("ZMLX_CUDA_MLA_SPLITS", "16");
    const int splits = T > 1 ? 1 : by_capacity ? kern::splits_by_rows(capacity, 16) : 16;
    Tensor scratch = alloc(DType::F32, {T * heads * splits * (dv + 2)});
    Tensor out = alloc(DType::BF16, {T, heads * dv});
    Prof p_(this, "attention_pe");
    if (mla_fast()) {
      const bool done =
          T > 1 ? mla::attention_prefill(bf16p(q), bf16p(k), bf16p(v), bf16p(q_pe), bf16p(k_pe), int(T), int(heads),
                                         int(kv_heads), int(dk), int(dv), int(dr), int(pos0), dpos(), scale,
                                         bf16p(out), stream_)
                : mla::attention_decode(bf16p(q), bf16p(k), bf16p(v), bf16p(q_pe), bf16p(k_pe), int(T), int(heads),
                                        int(kv_heads), int(dk), int(dv), int(dr), int(pos0), dpos(), scale, splits,
                                        static_cast<float*>(scratch.data), bf16p(out), stream_);
      if (done) return out;
    }
    kern::attention_pe(bf16p(q), bf16p(k), bf16p(v), bf16p(q_pe), bf16p(k_pe), int(T), int(heads), int(kv_heads),
                       int(dk), int(dv), int(dr), int(pos0), dpos(), scale, splits,
                       static_cast<float*>(scratch.data), bf16p(out), stream_);
    return out;
  }

  Tensor multi_linear(const Tensor& x, const Weight& w, bool transpose) override {
    const int64_t H = w.experts, T = x.rows(), Kin = transpose ? w.cols : w.rows, N = transpose ? w.rows : w.cols;
    ZMLX_CHECK(H > 0, "{}: multi_linear needs stacked per-head matrices", w.name);
    const bool shared = x.cols() == Kin;
    ZMLX_CHECK(shared || x.cols() == H * Kin, "{}: input rows have {} values, expected {} or {}x{}", w.name, x.cols(),
               Kin, H, Kin);
    Tensor out = alloc(DType::BF16, {T, H * N});
    const kern::QMat m = transpose ? qmat(w) : qmat_any(w);
    Prof p_(this, "multi_linear");
    if (mla_fast() && transpose && shared && T >= kGemmMinTokens) {
      // The heads' matrices are stored back to back, so a shared input times
      // every head is one [T, Kin] x [H·N, Kin]ᵀ GEMM with out[t, h·N + r].
      kern::QMat all = m;
      all.rows = H * N;
      if (m.w_stride == N * Kin * m.bits / 32 && (m.bits == 16 || m.s_stride == N * (Kin / m.group)) &&
          tc::gemm_supported(all)) {
        gemm_dense(bf16p(x), T, all, bf16p(out));
        return out;
      }
    }
    if (mla_fast() && !transpose &&
        mla::multi_linear_n(bf16p(x), int(T), x.cols(), shared ? 0 : Kin, int(H), m, bf16p(out), stream_))
      return out;
    kern::multi_linear(bf16p(x), int(T), x.cols(), shared ? 0 : Kin, int(H), m, transpose, bf16p(out), stream_);
    return out;
  }

  // mla_rope_split_cache's inputs (q: T rows of q_cols) against each other and the cache.
  static void check_mla_split(int64_t T, int64_t q_cols, const Tensor& ckv, const Tensor& kv_norm, int64_t heads,
                              int64_t nope_dim, int64_t rope_dim, const KvLayer& cache) {
    const int64_t kv_lora = ckv.cols() - rope_dim;
    ZMLX_CHECK(ckv.dtype == DType::BF16 && q_cols == heads * (nope_dim + rope_dim) && ckv.rows() == T && kv_lora > 0 &&
                   kv_norm.numel() == kv_lora && rope_dim % 2 == 0 && cache.k.dim(0) == 1 &&
                   cache.k.dim(2) == kv_lora && cache.v.dim(2) == rope_dim,
               "mla_rope_split_cache: q [{}, {}] / ckv {} do not match {} heads of {} + {} and a latent cache of {} + {}",
               T, q_cols, ckv.shape_str(), heads, nope_dim, rope_dim, cache.k.dim(2), cache.v.dim(2));
  }

  // The cache grown to hold rows pos0 .. pos0 + T - 1, and {q_nope, q_pe} for T tokens.
  std::pair<Tensor, Tensor> mla_split_outputs(int64_t T, int64_t heads, int64_t nope_dim, int64_t rope_dim,
                                              int64_t pos0, KvLayer& cache) {
    ensure_capacity(cache, pos0 + T, pos0);
    return {alloc(DType::BF16, {T, heads * nope_dim}), alloc(DType::BF16, {T, heads * rope_dim})};
  }

  // One token: q_b and the MLA split in one launch where the kernels allow
  // it (kern::linear_mla_split_fits), with linear + mla_rope_split_cache's bits.
  std::pair<Tensor, Tensor> linear_mla_rope_split_cache(const Tensor& x, const Weight& q_b, const Tensor& ckv,
                                                        const Tensor& kv_norm, float eps, int64_t heads,
                                                        int64_t nope_dim, int64_t rope_dim, int64_t pos0, float base,
                                                        KvLayer& cache) override {
    const kern::QMat m = qmat(q_b);
    if (x.rows() == 1 && kern::linear_mla_split_fits(m, int(heads), int(nope_dim), int(rope_dim))) {
      check_input(x, q_b);
      check_mla_split(1, q_b.rows, ckv, kv_norm, heads, nope_dim, rope_dim, cache);
      const int64_t kv_lora = ckv.cols() - rope_dim;
      auto [q_nope, q_pe] = mla_split_outputs(1, heads, nope_dim, rope_dim, pos0, cache);
      Prof p_(this, "linear_mla_rope_split_cache");
      kern::linear_mla_rope_split_cache(bf16p(x), m, bf16p(ckv), int(nope_dim), int(rope_dim), int(kv_lora),
                                        bf16p(kv_norm), eps, rope_table(base, rope_dim), int(pos0), dpos(),
                                        bf16p(q_nope), bf16p(q_pe), bf16p(cache.k), bf16p(cache.v), cache.capacity,
                                        stream_);
      return {std::move(q_nope), std::move(q_pe)};
    }
    return Backend::linear_mla_rope_split_cache(x, q_b, ckv, kv_norm, eps, heads, nope_dim, rope_dim, pos0, base,
                                                cache);
  }

  std::pair<Tensor, Tensor> mla_rope_split_cache(const Tensor& q, const Tensor& ckv, const Tensor& kv_norm, float eps,
                                                 int64_t heads, int64_t nope_dim, int64_t rope_dim, int64_t pos0,
                                                 float base, KvLayer& cache) override {
    const int64_t T = q.rows(), kv_lora = ckv.cols() - rope_dim;
    ZMLX_CHECK(q.dtype == DType::BF16, "mla_rope_split_cache: q is {}, expected bf16", dtype_name(q.dtype));
    check_mla_split(T, q.cols(), ckv, kv_norm, heads, nope_dim, rope_dim, cache);
    auto [q_nope, q_pe] = mla_split_outputs(T, heads, nope_dim, rope_dim, pos0, cache);
    Prof p_(this, "mla_rope_split_cache");
    kern::mla_rope_split_cache(bf16p(q), bf16p(ckv), int(T), int(heads), int(nope_dim), int(rope_dim), int(kv_lora),
                               bf16p(kv_norm), eps, rope_table(base, rope_dim), int(pos0), dpos(), bf16p(q_nope),
                               bf16p(q_pe), bf16p(cache.k), bf16p(cache.v), cache.capacity, stream_);
    return {std::move(q_nope), std::move(q_pe)};
  }

  Tensor slice_cols(const Tensor& x, int64_t group, int64_t offset, int64_t width) override {
    ZMLX_CHECK(x.dtype == DType::BF16 && group > 0 && x.cols() % group == 0 && offset >= 0 && width > 0 &&
                   offset + width <= group,
               "slice_cols: columns [{}, {}) of groups of {} in rows of {}", offset, offset + width, group, x.cols());
    Tensor out = alloc(DType::BF16, {x.rows(), x.cols() / group * width});
    Prof p_(this, "slice_cols");
    kern::slice_cols(bf16p(x), x.rows(), x.cols(), group, offset, width, bf16p(out), stream_);
    return out;
  }

  Routing route_sigmoid_grouped_topk(const Tensor& logits, const Tensor& bias, int64_t k, int64_t n_group,
                                     int64_t topk_group, bool normalize, float eps, float scaling) override {
    const int64_t T = logits.rows(), E = logits.cols();
    Routing r = new_routing(logits, k, DType::F32, &bias, n_group, topk_group);
    Prof p_(this, "route_grouped");
    note_routing(routed_by_last_linear());
    kern::route_sigmoid_grouped(bf16p(logits), static_cast<const float*>(bias.data), int(T), int(E), int(k),
                                int(n_group), int(topk_group), normalize, eps, scaling,
                                static_cast<int32_t*>(r.experts.data), static_cast<float*>(r.scores.data), stream_);
    return r;
  }

  Tensor attention(const Tensor& q, const KvLayer& c, int64_t pos0, int64_t heads, int64_t kv_heads, int64_t hd,
                   float scale) override {
    const int64_t T = q.rows();
    ZMLX_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0 && q.cols() == heads * hd && c.k.dim(0) == kv_heads &&
                   c.k.dim(2) == hd && c.v.dim(2) == hd && pos0 + T <= c.capacity,
               "attention: q [{}, {}] with {} heads / {} kv heads of {} does not fit the cache [{}, {}, {}] at {}+{}",
               q.rows(), q.cols(), heads, kv_heads, hd, c.k.dim(0), c.capacity, c.k.dim(2), pos0, T);
    ZMLX_CHECK(T <= kMaxCallRows, "attention: {} query rows in one call (at most {}; prefill in chunks)", T,
               kMaxCallRows);
    const int splits = T == 1 ? kern::decode_attention_splits(int(heads), int(kv_heads), int(hd), c.capacity) : 1;
    Tensor out = alloc(DType::BF16, {T, heads * hd});
    Prof p_(this, "attention");
    // Prefill: flash attention on tensor cores (a block per 64 or 128 queries and
    // head); the split kernels below give every query its own block and
    // were ~300 us a layer for a 512-token Qwen3 prompt on an H100.
    if (T > 1 && flash_prefill() &&
        mla::attention_prefill_cache(bf16p(q), bf16p(c.k), bf16p(c.v), c.capacity, int(T), int(heads), int(kv_heads),
                                     int(hd), int(pos0), dpos(), scale, bf16p(out), stream_))
      return out;
    Tensor scratch = alloc(DType::F32, {T * heads * splits * (hd + 2)});
    kern::attention(bf16p(q), int(T), int(heads), int(kv_heads), int(hd), bf16p(c.k), bf16p(c.v), c.capacity, int(pos0),
                    dpos(), scale, splits, static_cast<float*>(scratch.data), bf16p(out), stream_);
    return out;
  }

  Routing route_softmax_topk(const Tensor& logits, int64_t k, bool normalize) override {
    const int64_t T = logits.rows(), E = logits.cols();
    Routing r = new_routing(logits, k, DType::BF16);
    Prof p_(this, "route_softmax");
    note_routing(routed_by_last_linear());
    kern::route_softmax(bf16p(logits), int(T), int(E), int(k), normalize, static_cast<int32_t*>(r.experts.data),
                     bf16p(r.scores), stream_);
    return r;
  }

  Routing route_sigmoid_topk(const Tensor& logits, const Tensor& bias, int64_t k, bool normalize, float eps,
                             float scaling) override {
    const int64_t T = logits.rows(), E = logits.cols();
    Routing r = new_routing(logits, k, DType::BF16, &bias);
    Prof p_(this, "route_sigmoid");
    note_routing(routed_by_last_linear());
    kern::route_sigmoid(bf16p(logits), static_cast<const float*>(bias.data), int(T), int(E), int(k), normalize, eps,
                     scaling, static_cast<int32_t*>(r.experts.data), bf16p(r.scores), stream_);
    return r;
  }

  Tensor short_conv(const Tensor& bcx, Tensor& state, const Tensor& w) override {
    ZMLX_CHECK(bcx.cols() % 3 == 0, "short_conv: input rows have {} values, expected 3 x channels", bcx.cols());
    const int64_t T = bcx.rows(), C = bcx.cols() / 3, L = w.dim(1);
    check_short_conv(C, L, state, w);
    Tensor out = alloc(DType::BF16, {T, C});
    Prof p_(this, "short_conv");
    kern::short_conv(bf16p(bcx), int(T), int(C), bf16p(state), bf16p(w), int(L), bf16p(out), stream_);
    return out;
  }

  static void check_short_conv(int64_t C, int64_t L, const Tensor& state, const Tensor& w) {
    ZMLX_CHECK(w.dim(0) == C && state.numel() == (L - 1) * C, "short_conv: weight/state do not fit {} channels", C);
  }

  // One token: in_proj and the short conv in one launch where the kernels
  // allow it (kern::linear_short_conv_fits), with linear + short_conv's bits.
  Tensor linear_short_conv(const Tensor& x, const Weight& in_proj, Tensor& state, const Tensor& w) override {
    const kern::QMat m = qmat(in_proj);
    const int64_t C = in_proj.rows / 3, L = w.shape.size() >= 2 ? w.dim(1) : 0;
    if (x.rows() == 1 && kern::linear_short_conv_fits(m, C, int(L))) {
      check_input(x, in_proj);
      check_short_conv(C, L, state, w);
      Tensor out = alloc(DType::BF16, {1, C});
      Prof p_(this, "linear_short_conv");
      kern::linear_short_conv(bf16p(x), m, bf16p(state), bf16p(w), int(L), bf16p(out), stream_);
      return out;
    }
    return Backend::linear_short_conv(x, in_proj, state, w);
  }

  Tensor gather_qmm(const Tensor& x, const Weight& w, const Routing& r) override {
    const int64_t T = r.experts.rows(), k = r.k, N = w.rows;
    ZMLX_CHECK(x.cols() == w.cols, "{}: input has {} features, experts expect {}", w.name, x.cols(), w.cols);
    const bool per_slot = x.rows() == T * k;
    ZMLX_CHECK(per_slot || x.rows() == T, "{}: {} input rows for {} tokens x {} slots", w.name, x.rows(), T, k);
    ZMLX_CHECK(T * k <= kMaxCallRows, "{}: {} token-expert pairs in one call (at most {}; prefill in chunks)", w.name,
               T * k, kMaxCallRows);
    Tensor out = alloc(DType::BF16, {T, k, N});
    const kern::QMat m = qmat(w);
    Prof p_(this, "gather_linear");
    if (moe_grouped(T, k, m, w.experts)) {
      Tensor ws;
      const kern::PairGroups grp = bucket_pairs(r, T * k, w.experts, ws);
      kern::gather_linear_grouped(bf16p(x), per_slot, int(k), m, bf16p(out), grp, stream_);
    } else if (T * k >= kGemmMinPairs && tc::gemm_supported(m)) {
      Tensor ws = alloc(DType::U8, {int64_t(tc::moe_workspace_bytes(int(T), int(k), int(w.experts)))});
      tc::moe_linear(bf16p(x), per_slot, experts_of(r), int(T), int(k), m, bf16p(out), ws.data, stream_,
                     int(w.experts));
    } else {
      kern::gather_linear(bf16p(x), per_slot, experts_of(r), int(T), int(k), m, bf16p(out), stream_);
    }
    return out;
  }

  Tensor moe_combine(const Tensor& y, const Routing& r, CombineMode mode) override {
    check_combine_scores(r, mode, "moe_combine");
    const int64_t T = r.experts.rows(), k = r.k, D = y.cols();
    ZMLX_CHECK(y.rows() == T * k, "moe_combine: {} rows for {} tokens x {} slots", y.rows(), T, k);
    Tensor out = alloc(DType::BF16, {T, D});
    Prof p_(this, "moe_combine");
    kern::moe_combine(bf16p(y), r.scores.data, r.scores.dtype == DType::F32, combine_of(mode), int(T), int(k), D,
                   bf16p(out), stream_);
    return out;
  }

  Tensor gather_qmm_swiglu(const Tensor& x, const Weight& gate, const Weight& up, const Routing& r) override {
    const int64_t T = r.experts.rows(), k = r.k, I = gate.rows;
    ZMLX_CHECK(x.rows() == T && x.cols() == gate.cols && x.cols() == up.cols && up.rows == I,
               "{}: gather_qmm_swiglu shape mismatch", gate.name);
    Tensor out = alloc(DType::BF16, {T, k, I});
    const kern::QMat g = qmat(gate), u = qmat(up);
    Prof p_(this, "gather_swiglu");
    // The MoE block's input as the router read it, routed by the op just
    // before: complete one kernel before the one enqueued last, so the
    // kernel may stage it before its programmatic-launch wait.
    const bool x_ready = x.data == routed_input_ && op_seq_ == routed_op_ + 1;
    if (moe_grouped(T, k, g, gate.experts) && moe_grouped(T, k, u, up.experts)) {
      Tensor ws;
      const kern::PairGroups grp = bucket_pairs(r, T * k, gate.experts, ws);
      kern::gather_swiglu_grouped(bf16p(x), int(k), g, u, bf16p(out), grp, stream_);
    } else if (T * k >= kGemmMinPairs && tc::gemm_supported(g) && tc::gemm_supported(u)) {
      Tensor ws = alloc(DType::U8, {int64_t(tc::moe_workspace_bytes(int(T), int(k), int(gate.experts)))});
      tc::moe_gate_up_swiglu(bf16p(x), experts_of(r), int(T), int(k), g, u, bf16p(out), ws.data, stream_,
                             int(gate.experts));
    } else {
      kern::gather_swiglu(bf16p(x), experts_of(r), int(T), int(k), g, u, bf16p(out), stream_, x_ready);
    }
    routing_consumed_ = r.experts.data;
    return out;
  }

  // Whether the expert op of T tokens x k slots runs over bucketed pairs
  // (grouped_max_pairs_per_expert above).
  static bool moe_grouped(int64_t T, int64_t k, const kern::QMat& m, int64_t experts) {
    const int64_t P = T * k;
    return P >= kGemmMinPairs && experts <= tc::kMaxExperts && kern::grouped_fits(m) &&
           P <= std::max<int64_t>(experts, 1) * grouped_max_pairs_per_expert();
  }
  // The P pairs of routing r bucketed by expert; ws: the workspace (from the
  // pool, stream-ordered like every op tensor), kept by the caller for the op.
  // A MoE block's expert ops bucket one routing two or three times (gate+up
  // and down; unfused gate, up and down), so the last bucketing is kept
  // (pair_buckets_) and reused by an expert op of the same routing within
  // kBucketReuseOps ops. It holds the routing's experts tensor, so the pool
  // cannot give that memory to another routing while it is kept; no op
  // writes a routing in place (a route op makes a new one, note_routing).
  kern::PairGroups bucket_pairs(const Routing& r, int64_t P, int64_t experts, Tensor& ws) {
    PairBuckets& b = pair_buckets_;
    if (b.experts.data == r.experts.data && b.P == P && b.E == experts && op_seq_ - b.op <= kBucketReuseOps &&
        bucket_reuse()) {
      ws = b.ws;
      b.op = op_seq_;
      return b.grp;
    }
    ws = alloc(DType::U8, {int64_t(tc::pair_groups_workspace_bytes(P))});
    const kern::PairGroups grp = tc::bucket_pairs(experts_of(r), P, ws.data, stream_, int(experts));
    b = PairBuckets{r.experts, ws, P, experts, op_seq_, grp};
    return grp;
  }
  struct PairBuckets {
    Tensor experts, ws;
    int64_t P = 0, E = 0;
    uint64_t op = 0;
    kern::PairGroups grp{};
  };
  static constexpr uint64_t kBucketReuseOps = 4;  // unfused: gate, up, swiglu, down
  PairBuckets pair_buckets_;
  // ZMLX_MOE_BUCKET_REUSE=0: every expert op buckets its pairs again (A/B
  // runs; the same tiles and bits either way).
  static bool bucket_reuse() {
    static const bool on = zmlx::cuda::env_on("ZMLX_MOE_BUCKET_REUSE");
    return on;
  }

  // How gather_qmm_combine runs: over bucketed pairs (moe_grouped: a few
  // pairs an expert), the expert GEMM (prefill-sized), two launches (rows
  // the short-row kernel cannot hold in registers: the generic one-launch
  // form keeps one expert's loads in flight at a time, so the two-launch form
  // of the unfused path is faster), or one launch (gather_combine).
  static bool combine_by_gemm(int64_t T, int64_t k, const kern::QMat& m) {
    return T * k >= kGemmMinPairs && tc::gemm_supported(m);
  }
  static bool combine_in_two_launches(int64_t k, const Weight& down) {
    return down.cols > 2048 || (down.cols > 1024 && k > 4);
  }

  Tensor gather_qmm_combine(const Tensor& h, const Weight& down, const Routing& r, CombineMode mode) override {
    check_combine_scores(r, mode, "gather_qmm_combine");
    const int64_t T = r.experts.rows(), k = r.k, D = down.rows;
    ZMLX_CHECK(h.rows() == T * k && h.cols() == down.cols, "{}: gather_qmm_combine shape mismatch", down.name);
    Tensor out = alloc(DType::BF16, {T, D});
    const kern::QMat m = qmat(down);
    Prof p_(this, "gather_combine");
    if (moe_grouped(T, k, m, down.experts)) {
      // Down over the bucketed pairs into y [T·k, D], then the unfused path's combine kernel.
      Tensor y = alloc(DType::BF16, {T * k, D});
      Tensor ws;
      const kern::PairGroups grp = bucket_pairs(r, T * k, down.experts, ws);
      kern::gather_linear_grouped(bf16p(h), true, int(k), m, bf16p(y), grp, stream_);
      kern::moe_combine(bf16p(y), r.scores.data, r.scores.dtype == DType::F32, combine_of(mode), int(T), int(k), D,
                        bf16p(out), stream_);
    } else if (combine_by_gemm(T, k, m)) {
      // Expert GEMM into y [T·k, D], then the same combine kernel the unfused path uses.
      Tensor ws = alloc(DType::U8, {int64_t(tc::moe_workspace_bytes(int(T), int(k), int(down.experts)))});
      Tensor y = alloc(DType::BF16, {T * k, D});
      tc::moe_down(bf16p(h), experts_of(r), int(T), int(k), m, bf16p(y), ws.data, stream_, int(down.experts));
      kern::moe_combine(bf16p(y), r.scores.data, r.scores.dtype == DType::F32, combine_of(mode), int(T), int(k), D,
                        bf16p(out), stream_);
    } else if (combine_in_two_launches(k, down)) {
      Tensor y = alloc(DType::BF16, {T * k, D});
      kern::gather_linear(bf16p(h), true, experts_of(r), int(T), int(k), m, bf16p(y), stream_);
      kern::moe_combine(bf16p(y), r.scores.data, r.scores.dtype == DType::F32, combine_of(mode), int(T), int(k), D,
                        bf16p(out), stream_);
    } else {
      kern::gather_combine(bf16p(h), experts_of(r), r.scores.data, r.scores.dtype == DType::F32, combine_of(mode),
                           int(T), int(k), m, bf16p(out), stream_, routing_consumed_ == r.experts.data);
    }
    return out;
  }

  // One token, the kernels' conditions met: the shared expert's down
  // projection and the add inside gather_combine (kern::gather_combine_shared).
  Tensor gather_qmm_combine_shared(const Tensor& h, const Weight& down, const Routing& r, CombineMode mode,
                                   const Tensor& shared_h, const Weight& shared_down) override {
    ZMLX_CHECK(shared_down.rows == down.rows, "{}: {} rows, the routed experts' down projection has {}",
               shared_down.name, shared_down.rows, down.rows);
    const int64_t T = r.experts.rows(), k = r.k;
    const kern::QMat m = qmat(down), ms = qmat(shared_down);
    if (T == 1 && !combine_by_gemm(T, k, m) && !combine_in_two_launches(k, down) &&
        kern::gather_combine_shared_fits(m, ms)) {
      check_combine_scores(r, mode, "gather_qmm_combine");
      ZMLX_CHECK(h.rows() == T * k && h.cols() == down.cols, "{}: gather_qmm_combine shape mismatch", down.name);
      check_input(shared_h, shared_down);
      Tensor out = alloc(DType::BF16, {T, down.rows});
      Prof p_(this, "gather_combine");
      kern::gather_combine_shared(bf16p(h), experts_of(r), r.scores.data, r.scores.dtype == DType::F32,
                                  combine_of(mode), int(k), m, kern::SharedDown{ms, bf16p(shared_h)}, bf16p(out),
                                  stream_, routing_consumed_ == r.experts.data);
      return out;
    }
    return Backend::gather_qmm_combine_shared(h, down, r, mode, shared_h, shared_down);
  }

  // The one-launch forms' input checks: linear(x, w)'s and linear_swiglu(x, gate, up)'s.
  void check_router_and_shared(const Tensor& x, const Weight& w, const Weight& gate, const Weight& up) {
    check_input(x, w);
    ZMLX_CHECK(x.cols() == gate.cols && x.cols() == up.cols && up.rows == gate.rows, "{}: linear_swiglu shape mismatch",
               gate.name);
  }

  // One token: the router and the shared expert's gate+up in one launch
  // (kern::linear_and_swiglu) when both take the scalar decode kernels.
  std::pair<Tensor, Tensor> linear_and_swiglu(const Tensor& x, const Weight& w, const Weight& gate,
                                              const Weight& up) override {
    const kern::QMat mw = qmat(w), mg = qmat(gate), mu = qmat(up);
    if (x.rows() == 1 && kern::linear_and_swiglu_fits(mw, mg, mu)) {
      check_router_and_shared(x, w, gate, up);
      Tensor y = alloc(DType::BF16, {1, w.rows}), yh = alloc(DType::BF16, {1, gate.rows});
      Prof p_(this, "linear");
      kern::linear_and_swiglu(bf16p(x), mw, bf16p(y), mg, mu, bf16p(yh), stream_);
      // The router's input, as linear() notes it (gather_qmm_swiglu's x_ready).
      last_linear_input_ = x.data, last_linear_op_ = op_seq_;
      return {std::move(y), std::move(yh)};
    }
    return Backend::linear_and_swiglu(x, w, gate, up);
  }

  // The same launch picking the grouped router's experts too
  // (kern::linear_route_and_swiglu): GLM's top-k kernel leaves the step.
  std::pair<Routing, Tensor> linear_route_grouped_and_swiglu(const Tensor& x, const Weight& w,
                                                             const GroupedRouter& gr, const Weight& gate,
                                                             const Weight& up) override {
    const kern::QMat mw = qmat(w), mg = qmat(gate), mu = qmat(up);
    if (x.rows() == 1 && gr.bias &&
        kern::linear_route_and_swiglu_fits(mw, mg, mu, int(gr.k), int(gr.n_group), int(gr.topk_group))) {
      check_router_and_shared(x, w, gate, up);
      Tensor logits = alloc(DType::BF16, {1, w.rows}), yh = alloc(DType::BF16, {1, gate.rows});
      Routing r = new_routing(logits, gr.k, DType::F32, gr.bias, gr.n_group, gr.topk_group);
      Prof p_(this, "linear_route");
      const kern::GroupedRoute kr{static_cast<const float*>(gr.bias->data), int(gr.k), int(gr.n_group),
                                  int(gr.topk_group), gr.normalize, gr.eps, gr.scaling,
                                  static_cast<int32_t*>(r.experts.data), static_cast<float*>(r.scores.data)};
      kern::linear_route_and_swiglu(bf16p(x), mw, bf16p(logits), kr, mg, mu, bf16p(yh), stream_);
      // x was complete before this launch, which lets its successor launch
      // only after its own wait.
      note_routing(x.data);
      return {std::move(r), std::move(yh)};
    }
    return Backend::linear_route_grouped_and_swiglu(x, w, gr, gate, up);
  }

  // The router's linear and its softmax or sigmoid top-k in one launch
  // (kern::linear_route): Qwen3's and LFM2's top-k kernel leaves the step.
  Routing linear_route(const Tensor& x, const Weight& w, const TopKRouter& tr) override {
    const kern::QMat mw = qmat(w);
    if (x.rows() == 1 && (!tr.sigmoid || tr.bias) && kern::linear_route_fits(mw, int(tr.k))) {
      check_input(x, w);
      Tensor logits = alloc(DType::BF16, {1, w.rows});
      Routing r = new_routing(logits, tr.k, DType::BF16, tr.sigmoid ? tr.bias : nullptr);
      Prof p_(this, "linear_route");
      const kern::TopKRoute kr{tr.sigmoid,
                               tr.sigmoid ? static_cast<const float*>(tr.bias->data) : nullptr,
                               int(tr.k),
                               tr.normalize,
                               tr.eps,
                               tr.scaling,
                               !tr.sigmoid && kern::route_packed_topk(int(w.rows), int(tr.k)),
                               static_cast<int32_t*>(r.experts.data),
                               static_cast<uint16_t*>(r.scores.data)};
      kern::linear_route(bf16p(x), mw, bf16p(logits), kr, stream_);
      note_routing(x.data);
      return r;
    }
    return Backend::linear_route(x, w, tr);
  }

  Tensor linear_swiglu(const Tensor& x, const Weight& gate, const Weight& up) override {
    ZMLX_CHECK(x.cols() == gate.cols && x.cols() == up.cols && up.rows == gate.rows, "{}: linear_swiglu shape mismatch",
               gate.name);
    Tensor out = alloc(DType::BF16, {x.rows(), gate.rows});
    const kern::QMat g = qmat(gate), u = qmat(up);
    Prof p_(this, "linear_swiglu");
    if (x.rows() >= kGemmMinTokens && tc::gemm_supported(g) && tc::gemm_supported(u))
      gemm_dense_swiglu(bf16p(x), x.rows(), g, u, bf16p(out));
    else
      kern::linear_swiglu(bf16p(x), int(x.rows()), g, u, bf16p(out), stream_);
    return out;
  }

  int32_t argmax_row(const Tensor& logits, int64_t row) override {
    if (logits.device != Device::CUDA) return Backend::argmax_row(logits, row);
    const int64_t V = logits.cols();
    kern::argmax(bf16p(logits) + row * V, V, d_step_ + 2, stream_);
    cuda_check(cudaMemcpyAsync(h_step_ + 2, d_step_ + 2, 4, cudaMemcpyDeviceToHost, stream_), "argmax download");
    cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (a kernel failed)");
    if (profile_.on) profile_.collect();
    return h_step_[2];
  }

  // ------------------------------------------------------------ sampling

  int32_t sample_row(const Tensor& logits, int64_t row, const sampling::Params& p, std::span<const int32_t> window,
                     std::span<const int32_t> output, uint64_t draw) override {
    if (logits.device != Device::CUDA || !samples_chained(p))
      return Backend::sample_row(logits, row, p, window, output, draw);
    cudaSetDevice(device_);
    const int64_t V = logits.cols();
    ZMLX_CHECK(row >= 0 && row < logits.rows(), "sample_row: row {} of {}", row, logits.rows());
    upload_sampling_state(p, window, output, draw);
    kern::sample_token(bf16p(logits) + row * V, sampling_workspace(V), p, d_step_ + 2, nullptr, nullptr,
                       0, stream_);
    cuda_check(cudaMemcpyAsync(h_step_ + 2, d_step_ + 2, 4, cudaMemcpyDeviceToHost, stream_), "sampled token download");
    cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (a kernel failed)");
    if (profile_.on) profile_.collect();
    return h_step_[2];
  }

  bool samples_chained(const sampling::Params& p) const override {
    return p.window_cap >= 0 && p.window_cap <= kern::kMaxSamplingWindow;
  }

  void set_chain_sampler(const sampling::Params* p, std::span<const int32_t> window, std::span<const int32_t> output,
                         uint64_t draw) override {
    Backend::set_chain_sampler(p, window, output, draw);  // checks samples_chained
    cudaSetDevice(device_);
    chain_params_.reset();
    if (p) chain_params_ = *p, upload_sampling_state(*p, window, output, draw);
  }

  // ------------------------------------------------------ recorded steps

  Tensor decode_step(uint64_t key, int32_t token, int64_t pos, const std::function<Tensor()>& step) override {
    cudaSetDevice(device_);
    if (key == 0) return step();
    key ^= weights_epoch_ * 0x9e3779b97f4a7c15ull;
    if (!graphs_enabled_ || failed_keys_.count(key)) return step();
    if (exec_ && key == graph_key_) {
      set_step_inputs(token, pos);
      launch_graph();
      return graph_logits_;
    }
    if (key != warm_key_) {  // first step under this key: run eagerly so the pool holds the sizes it needs
      warm_key_ = key;
      return step();
    }
    set_step_inputs(token, pos);
    Tensor logits;
    // The graph's first node copies the pinned token and position in.
    if (record_and_launch(key, [&] {
          cuda_check(cudaMemcpyAsync(d_step_, h_step_, 2 * sizeof(int32_t), cudaMemcpyHostToDevice, stream_),
                     "step input copy");
          return step();
        }, logits))
      return logits;
    return step();
  }

  void decode_step_chained(uint64_t key, int32_t token, int64_t pos,
                           const std::function<Tensor(int32_t)>& step) override {
    cudaSetDevice(device_);
    if (key != 0) key ^= weights_epoch_ * 0x9e3779b97f4a7c15ull;
    if (key != 0 && chain_params_)  // its recording ends in the sampler's launches, shaped by the params
      key ^= chain_params_->penalized() ? 0x3c6ef372fe94f82bull : 0x5a3f1e2d4c6b8a79ull;
    const bool usable = key != 0 && graphs_enabled_ && !failed_keys_.count(key);
    const bool replay = usable && exec_ && key == graph_key_;
    const bool record = usable && !replay && key == warm_key_;
    if (token >= 0) {  // the first step of a chain: its inputs come from the host
      set_step_inputs(token, pos);
      cuda_check(cudaMemcpyAsync(d_step_, h_step_, 2 * sizeof(int32_t), cudaMemcpyHostToDevice, stream_),
                 "step input copy");
    } else {
      // d_step_ holds the previous chained step's token and pos (its argmax wrote them).
      ZMLX_CHECK(chained_pos_ == pos - 1, "chained decode step at position {}: the last chained step was at {}", pos,
                 chained_pos_);
      if (!replay && !record) token = chained_token(pos - 1);  // an eager step embeds on the host's id
    }
    auto body = [&](int32_t t) {
      Tensor logits = step(t);
      ZMLX_CHECK(logits.device == Device::CUDA && logits.rows() >= 1, "chained step: expected device logits");
      if (chain_params_)
        kern::sample_token(bf16p(logits), sampling_workspace(logits.cols()), *chain_params_, nullptr, d_step_, d_ring_,
                           kRing, stream_);
      else
        kern::argmax_chain(bf16p(logits), logits.cols(), d_step_, d_ring_, kRing, stream_);
      return logits;
    };
    Tensor unused;
    if (replay) {
      launch_graph();
    } else if (!(record && record_and_launch(key, [&] { return body(0); }, unused))) {
      // First step under this key, or a failed recording (which ran
      // nothing, so d_step_ still holds step pos - 1's result): eagerly.
      if (usable) warm_key_ = key;
      if (token < 0) token = chained_token(pos - 1);
      body(token);
    }
    cuda_check(cudaEventRecord(step_done_, stream_), "cudaEventRecord");
    cuda_check(cudaEventRecord(chain_done_[pos & 3], stream_), "cudaEventRecord");
    chained_pos_ = pos;
  }

  int32_t chained_token(int64_t pos) override {
    ZMLX_CHECK(pos <= chained_pos_ && pos > chained_pos_ - kRing, "chained_token({}): the last chained step was at "
               "position {}", pos, chained_pos_);
    if (pos + 3 > chained_pos_) cuda_check(cudaEventSynchronize(chain_done_[pos & 3]), "cudaEventSynchronize");
    else cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    return h_ring_[pos % kRing];
  }

 private:
  // The sampler's buffers for rows of V logits, allocated by an eager step
  // before any recording that uses them, and kept (one set a vocabulary
  // size): a recording of another model's step may still point at them.
  kern::SamplingWorkspace& sampling_workspace(int64_t V) {
    auto it = sampling_ws_by_vocab_.find(V);
    if (it == sampling_ws_by_vocab_.end()) {
      ZMLX_CHECK(!capturing_, "the CUDA sampler's buffers must exist before a step is recorded");
      kern::SamplingWorkspace ws;
      ws.state = sampling_state_;
      kern::sampling_workspace_alloc(ws, V);
      it = sampling_ws_by_vocab_.emplace(V, ws).first;
    }
    return it->second;
  }
  // The sampler's options, next draw, penalty window and output counts to
  // the device, in stream order (the pinned copy is rewritten only once the
  // stream is idle).
  void upload_sampling_state(const sampling::Params& p, std::span<const int32_t> window,
                             std::span<const int32_t> output, uint64_t draw) {
    if (!sampling_state_) {
      cuda_check(cudaMalloc(&sampling_state_, sizeof(kern::SamplingState)), "cudaMalloc");
      cuda_check(cudaMallocHost(&h_sampling_, sizeof(kern::SamplingState)), "cudaMallocHost");
      cuda_check(cudaMalloc(&sampling_counts_, size_t(sampling::kMaxVocab) * sizeof(int32_t)), "cudaMalloc");
      cuda_check(cudaMalloc(&window_counts_, size_t(sampling::kMaxVocab) * sizeof(int32_t)), "cudaMalloc");
    }
    cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    const size_t n = std::min(window.size(), size_t(std::max(p.window_cap, 0)));
    const std::span<const int32_t> kept = window.last(n);  // the ring: the last window_cap ids
    // The output's and the window's counts, rebuilt from their ids.
    if (p.counts_output()) count_ids_on_device(output, sampling_counts_);
    if (p.penalty != 1.f) count_ids_on_device(kept, window_counts_);
    kern::SamplingState& st = *h_sampling_;
    st.params = p;
    st.draw = draw;
    std::copy(kept.begin(), kept.end(), st.window);
    st.window_len = int32_t(n);
    st.window_head = 0;  // full: index 0 is the oldest
    st.counts = sampling_counts_;
    st.window_counts = window_counts_;
    cuda_check(cudaMemcpyAsync(sampling_state_, h_sampling_, sizeof st, cudaMemcpyHostToDevice, stream_),
               "sampler state upload");
  }

  // counts[id] = how often `ids` holds id, for every id below kMaxVocab.
  void count_ids_on_device(std::span<const int32_t> ids, int32_t* counts) {
    cuda_check(cudaMemsetAsync(counts, 0, size_t(sampling::kMaxVocab) * sizeof(int32_t), stream_), "cudaMemsetAsync");
    if (ids.empty()) return;
    if (ids.size() > sampler_ids_cap_) {
      cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");  // an earlier count may still read it
      cudaFree(sampler_ids_);
      sampler_ids_cap_ = std::max(ids.size(), size_t(4096));
      cuda_check(cudaMalloc(&sampler_ids_, sampler_ids_cap_ * sizeof(int32_t)), "cudaMalloc");
    }
    // Pageable source: the copy has read it when the call returns. The
    // buffer is reused by the next count, after this one in stream order.
    cuda_check(cudaMemcpyAsync(sampler_ids_, ids.data(), ids.size_bytes(), cudaMemcpyHostToDevice, stream_),
               "sampler ids upload");
    kern::add_token_counts(sampler_ids_, int(ids.size()), counts, stream_);
  }

  void launch_graph() {
    if (kernel_trace_.armed_for(++replays_)) return kernel_trace_.replay(exec_, stream_, step_done_);
    if (!step_profile_.on) {
      cuda_check(cudaGraphLaunch(exec_, stream_), "cudaGraphLaunch");
    } else {
      cudaEvent_t a, b;
      cudaEventCreate(&a);
      cudaEventCreate(&b);
      cudaEventRecord(a, stream_);
      cuda_check(cudaGraphLaunch(exec_, stream_), "cudaGraphLaunch");
      cudaEventRecord(b, stream_);
      step_profile_.add(a, b);
    }
    cuda_check(cudaEventRecord(step_done_, stream_), "cudaEventRecord");
  }

  // Records `body` (the step's kernels) as the graph for `key` and launches
  // it once. A failed recording is forgotten and the key remembered, so its
  // steps run eagerly from then on: returns false, and nothing ran.
  bool record_and_launch(uint64_t key, const std::function<Tensor()>& body, Tensor& out) {
    drop_graph();
    cuda_check(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeRelaxed), "cudaStreamBeginCapture");
    pool_->set_capturing(true);
    capturing_ = true;
    std::string why;
    try {
      out = body();
    } catch (const std::exception& e) {
      why = e.what();
    }
    capturing_ = false;
    pool_->set_capturing(false);
    cudaGraph_t graph = nullptr;
    cudaError_t ec = cudaStreamEndCapture(stream_, &graph);
    if (why.empty() && ec == cudaSuccess) ec = cudaGraphInstantiate(&exec_, graph, 0);
    if (graph) cudaGraphDestroy(graph);
    if (!why.empty() || ec != cudaSuccess) {
      // The step recomputes everything eagerly; a real error shows up there.
      if (why.empty()) why = cudaGetErrorString(ec);
      cudaGetLastError();
      exec_ = nullptr;
      out = Tensor{};
      pool_->release_graph_blocks();
      failed_keys_.insert(key);
      warm_key_ = 0;
      log_info("[zmlx] CUDA graph recording of a decode step failed ({}); running decode steps eagerly", why);
      return false;
    }
    graph_key_ = key;
    graph_logits_ = out;
    launch_graph();
    return true;
  }

  // Grows a cache layer to hold `needed` positions, keeping rows [0, keep).
  void ensure_capacity(KvLayer& c, int64_t needed, int64_t keep) {
    if (needed <= c.capacity) return;
    ZMLX_CHECK(!capturing_, "KV cache growth inside a recorded decode step");
    const int64_t H = c.k.dim(0), hd = c.k.dim(2), vd = c.v.dim(2);
    const int64_t cap = std::max<int64_t>(c.capacity * 2, needed + 256);
    KvLayer n;
    n.capacity = cap;
    n.k = alloc(DType::BF16, {H, cap, hd});
    n.v = alloc(DType::BF16, {H, cap, vd});
    const size_t kr = size_t(hd) * 2, vr = size_t(vd) * 2;
    if (keep > 0) {
      cuda_check(cudaMemcpy2DAsync(n.k.data, size_t(cap) * kr, c.k.data, size_t(c.capacity) * kr, size_t(keep) * kr,
                                   size_t(H), cudaMemcpyDeviceToDevice, stream_), "KV grow");
      cuda_check(cudaMemcpy2DAsync(n.v.data, size_t(cap) * vr, c.v.data, size_t(c.capacity) * vr, size_t(keep) * vr,
                                   size_t(H), cudaMemcpyDeviceToDevice, stream_), "KV grow");
    }
    c = std::move(n);
  }

  // The pinned inputs of a recorded step are read by the graph's first node:
  // wait for the previous launch to have consumed them before rewriting.
  void set_step_inputs(int32_t token, int64_t pos) {
    cuda_check(cudaEventSynchronize(step_done_), "cudaEventSynchronize");
    h_step_[0] = token;
    h_step_[1] = int32_t(pos);
  }

  void drop_graph() {
    if (!exec_) return;
    cudaStreamSynchronize(stream_);
    cudaGraphExecDestroy(exec_);
    exec_ = nullptr;
    graph_key_ = 0;
    graph_logits_ = Tensor{};
    pool_->release_graph_blocks();
  }

  const int* dpos() const { return capturing_ ? d_step_ + 1 : nullptr; }

  static void check_input(const Tensor& x, const Weight& w) {
    ZMLX_CHECK(x.dtype == DType::BF16, "{}: expected a bf16 input, got {}", w.name, dtype_name(x.dtype));
    ZMLX_CHECK(x.cols() == w.cols, "{}: input has {} features, weight expects {}", w.name, x.cols(), w.cols);
  }

  static const int32_t* experts_of(const Routing& r) {
    ZMLX_CHECK(r.experts.device == Device::CUDA, "routing was computed on another device");
    return static_cast<const int32_t*>(r.experts.data);
  }
  static kern::Combine combine_of(CombineMode m) {
    return m == CombineMode::Bf16Products ? kern::kBf16Products : kern::kF32Products;
  }

  // RoPE inverse frequencies, computed on the host exactly as the CPU backend does.
  const float* rope_table(float base, int64_t rot_dims) {
    const auto key = std::make_pair(base, rot_dims);
    auto it = rope_tables_.find(key);
    if (it != rope_tables_.end()) return it->second;
    const int64_t half = rot_dims / 2;
    std::vector<float> f(static_cast<size_t>(half));
    const float lb = std::log2(base);
    for (int64_t i = 0; i < half; ++i) f[size_t(i)] = std::exp2(-(float(i) / float(half)) * lb);
    float* d = nullptr;
    cuda_check(cudaMalloc(&d, f.size() * 4), "cudaMalloc");
    cuda_check(cudaMemcpy(d, f.data(), f.size() * 4, cudaMemcpyHostToDevice), "rope table upload");
    rope_tables_[key] = d;
    return d;
  }

  std::string name_;
  GpuProfile profile_;
  StepProfile step_profile_;
  KernelTrace kernel_trace_;
  long replays_ = 0;
  cudaStream_t stream_ = nullptr;
  std::shared_ptr<DevicePool> pool_;
  uint64_t weights_epoch_ = 0;
  std::map<std::pair<float, int64_t>, float*> rope_tables_;
  // Recorded decode step: token and position live in pinned host memory and
  // are copied to the device by the graph's first node.
  int32_t* h_step_ = nullptr;
  int32_t* d_step_ = nullptr;
  // ZMLX_CUDA_POISON=1 (read when the backend is made; tests): every new
  // tensor filled with 0xff bytes first (alloc).
  bool poison_ = false;
  // The experts tensor of the last routing an expert kernel has read (null
  // after a route op makes a new one). A routing some enqueued kernel has
  // read was complete before that kernel ran, so later kernels may read it
  // before their programmatic-launch wait (gather_combine does).
  const void* routing_consumed_ = nullptr;
  // Ops enqueued so far (every op's Prof counts it); the input and number of
  // the last plain linear; and, for the newest routing, the op that made it
  // and the input its router read (null: not known). gather_qmm_swiglu's x
  // is ready before its wait when it is that input and the routing op is
  // the one just before.
  uint64_t op_seq_ = 0, last_linear_op_ = 0, routed_op_ = 0;
  const void* last_linear_input_ = nullptr;
  const void* routed_input_ = nullptr;
  // The input of the linear enqueued just before this op (a route op's
  // logits then come from it), else null.
  const void* routed_by_last_linear() const { return last_linear_op_ + 1 == op_seq_ ? last_linear_input_ : nullptr; }
  // A new routing, made by the current op from the router's input
  // router_input: no kernel has read it yet.
  void note_routing(const void* router_input) {
    pair_buckets_ = PairBuckets{};
    routing_consumed_ = nullptr;
    routed_input_ = router_input;
    routed_op_ = op_seq_;
  }
  // Chained greedy steps: each step's argmax lands in d_step_ (the next
  // step's input) and in a mapped pinned ring the host reads by position.
  static constexpr int kRing = 64;
  int32_t* h_ring_ = nullptr;
  int32_t* d_ring_ = nullptr;
  cudaEvent_t chain_done_[4] = {};
  int64_t chained_pos_ = -1;
  // Temperature sampling on the device (sample_row; chained steps while
  // chain_params_ is set): buffers, and the pinned state staged for upload.
  std::map<int64_t, kern::SamplingWorkspace> sampling_ws_by_vocab_;
  kern::SamplingState* sampling_state_ = nullptr;
  kern::SamplingState* h_sampling_ = nullptr;
  int32_t* sampling_counts_ = nullptr;  // kMaxVocab: the output's counts
  int32_t* window_counts_ = nullptr;    // kMaxVocab: the penalty window's counts
  int32_t* sampler_ids_ = nullptr;      // staging for the ids they count
  size_t sampler_ids_cap_ = 0;
  std::optional<sampling::Params> chain_params_;  // set while chained steps sample
  bool graphs_enabled_ = true, capturing_ = false;
  int device_ = 0;
  mutable std::once_flag prefill_chunk_once_;  // prefill_chunk(): decided once
  mutable int prefill_chunk_ = 512;
  uint64_t weight_bytes_ = 0;
  cudaEvent_t step_done_ = nullptr;
  std::unordered_set<uint64_t> failed_keys_;
  cudaGraphExec_t exec_ = nullptr;
  uint64_t graph_key_ = 0, warm_key_ = 0;
  Tensor graph_logits_;
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(int device) { return std::make_unique<CudaBackend>(device); }

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

bool cuda_device_present() { return cuda_device_count() > 0; }

}  // namespace zmlx
