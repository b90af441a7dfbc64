// The NCCL communicator of GPU ranks: activations (the tensor-parallel
// all-reduce, the hidden state between pipeline stages) move GPU to GPU
// through NCCL on the backend's stream, so they are ordered with its kernels
// and never pass through host memory. Control messages (tokens, requests,
// stop flags, barriers) stay on the MPI communicator this one wraps.
//
// Fail-fast: NCCL operations are asynchronous; a dead or hung peer leaves
// the NCCL kernel spinning and this rank blocked in its next stream
// synchronisation. So every operation gets an event recorded after it, and
// a watchdog thread checks that the events complete: an operation still
// pending `timeout` seconds after it became the oldest one (or an error NCCL
// reports asynchronously, e.g. a broken connection) ends the whole job with a
// message naming the peer, as the MPI communicator's deadlines do. An
// operation issued while the backend records a CUDA graph (a decode step)
// runs at every replay instead: the caller then hands each launched replay
// to the watchdog as one operation (watch_device_work).
//
// Teardown: ncclCommDestroy and ncclCommAbort wait for the other ranks on the
// node to take part, so a peer that hangs (alive, not answering) would keep
// a failing rank in them forever, its error never printed and the job never
// aborted, and at an orderly end not every rank reaches them (a node's rank 0
// leaves with _exit). So no rank destroys its communicator: an orderly end
// leaves it to the exiting process, a failing rank abandons it (abandon()).
//
// libnccl is loaded when the first GPU-rank communicator is made (dlopen),
// not linked: it is large, often lives outside the loader's path (e.g. in a
// Python wheel), and a single-GPU or CPU run must not need it.
#include <fmt/format.h>

#include <cstdio>
#include <cstdlib>

#include "zmlx/dist/comm.h"
#ifdef ZMLX_HAVE_NCCL
#include "zmlx/backend/cuda/env_switch.h"
#include "zmlx/dist/nccl_lsa_allreduce.h"
#endif

#ifdef ZMLX_HAVE_NCCL
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <system_error>
#include <thread>
#include <type_traits>
#endif

namespace zmlx::dist {

#ifndef ZMLX_HAVE_NCCL

bool nccl_available() { return false; }

std::shared_ptr<Communicator> make_nccl_comm(std::shared_ptr<Communicator>, int, void*) {
  fail("--backend cuda with --parallel: this zmlx was built without NCCL (CMake reports 'zmlx: NCCL ON' when it "
       "finds nccl.h and libnccl next to the CUDA toolkit or under NCCL_ROOT), so GPU ranks cannot exchange "
       "activations; use --backend cpu");
}

#else

bool nccl_available() { return true; }

namespace {

using Clock = std::chrono::steady_clock;

// The NCCL entry points zmlx uses, resolved from libnccl.so.2 at first use.
struct NcclApi {
  decltype(&ncclGetUniqueId) GetUniqueId;
  decltype(&ncclCommInitRankConfig) CommInitRankConfig;
  decltype(&ncclCommGetAsyncError) CommGetAsyncError;
  decltype(&ncclCommAbort) CommAbort;
  decltype(&ncclAllReduce) AllReduce;
  decltype(&ncclSend) Send;
  decltype(&ncclRecv) Recv;
  decltype(&ncclGetErrorString) GetErrorString;
  decltype(&ncclGetLastError) GetLastError;
  // Optional (null where the library lacks them): the device all-reduce.
  decltype(&ncclGetVersion) GetVersion;
  void* MemAlloc;
  void* CommWindowRegister;
  void* DevCommCreate;
};

// The loader's search path first (LD_LIBRARY_PATH, ldconfig), then the
// library CMake found at build time.
const NcclApi& nccl() {
  static const NcclApi api = [] {
    void* lib = dlopen("libnccl.so.2", RTLD_NOW | RTLD_LOCAL);
    if (!lib) lib = dlopen(ZMLX_NCCL_LIBRARY, RTLD_NOW | RTLD_LOCAL);
    if (!lib)
      fail("GPU ranks need NCCL, but libnccl.so.2 was not found ({}); add its directory to LD_LIBRARY_PATH "
           "(the nvidia-nccl Python wheel keeps it in nvidia/nccl/lib), or use --backend cpu", dlerror());
    auto resolve = [lib](auto& fn, const char* name) {
      void* p = dlsym(lib, name);
      ZMLX_CHECK(p != nullptr, "libnccl.so.2 has no {} (NCCL older than 2.14?)", name);
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(p);
    };
    NcclApi a{};
    resolve(a.GetUniqueId, "ncclGetUniqueId");
    resolve(a.CommInitRankConfig, "ncclCommInitRankConfig");
    resolve(a.CommGetAsyncError, "ncclCommGetAsyncError");
    resolve(a.CommAbort, "ncclCommAbort");
    resolve(a.AllReduce, "ncclAllReduce");
    resolve(a.Send, "ncclSend");
    resolve(a.Recv, "ncclRecv");
    resolve(a.GetErrorString, "ncclGetErrorString");
    resolve(a.GetLastError, "ncclGetLastError");
    a.GetVersion = reinterpret_cast<decltype(&ncclGetVersion)>(dlsym(lib, "ncclGetVersion"));
    a.MemAlloc = dlsym(lib, "ncclMemAlloc");
    a.CommWindowRegister = dlsym(lib, "ncclCommWindowRegister");
    a.DevCommCreate = dlsym(lib, "ncclDevCommCreate");
    return a;
  }();
  return api;
}

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

class NcclComm final : public Communicator {
 public:
  NcclComm(std::shared_ptr<Communicator> control, int device, cudaStream_t stream)
      : control_(std::move(control)), device_(device), stream_(stream) {
    timeout_s_ = control_->timeout_seconds();
    (void)nccl();  // a missing libnccl fails here, on every rank alike, before any exchange
    check_cuda(cudaSetDevice(device_), "cudaSetDevice");
    ncclUniqueId id{};
    if (rank() == 0) check_nccl(nccl().GetUniqueId(&id), "ncclGetUniqueId");
    control_->broadcast(&id, sizeof id, 0);
    // Nonblocking: initialisation (and later calls) return at once and are
    // polled here against a deadline, so a peer that never joins is reported
    // instead of blocking in ncclCommInitRank forever.
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    ncclResult_t rc = nccl().CommInitRankConfig(&comm_, size(), id, rank(), &config);
    if (rc != ncclSuccess && rc != ncclInProgress) {
      const std::string why = nccl_error(rc);
      if (comm_) abandon();  // the peers may not answer: never wait for them here
      throw PeerError(fmt::format("rank {}: NCCL initialisation on GPU {} failed: {}", rank(), device_, why));
    }
    // Peers reach this point after their own CUDA start-up: allow more than one exchange.
    try {
      settle("NCCL initialisation: waiting for", /*patience=*/5);
    } catch (...) {
      abandon();  // a peer that does not answer would keep a waiting abort here forever
      throw;
    }
    start_device_allreduce();
    watchdog_ = std::thread([this] { watch(); });
  }

  ~NcclComm() override {
    // Destroyed while an exception unwinds the stack (a peer failed, or any
    // other error on this rank): the job is being ended (main() aborts it
    // after printing the error), so never wait here for a peer.
    const bool failing = std::uncaught_exceptions() > 0;
    bool drained;
    {
      // Normally nothing is pending (the last step synchronised). Otherwise
      // the watchdog still guards these operations: wait for them or for it
      // to end the job.
      std::unique_lock<std::mutex> lk(mu_);
      drained = failing ? pending_.empty()
                        : idle_.wait_for(lk, std::chrono::duration<double>(timeout_s_ + 1),
                                         [&] { return pending_.empty(); });
      stop_ = true;
    }
    wake_.notify_all();
    if (watchdog_.joinable()) watchdog_.join();
    if (!failing && drained) {
      // An orderly end. ncclCommDestroy is an intra-node collective (it
      // waits for the peers' NCCL connections to close), and not every rank
      // reaches it: a node's rank 0 ends the job with MPI_Finalize and
      // _exit without unwinding its model, while its followers unwind
      // theirs. So no rank waits on it; the communicator's resources go with
      // the process, which ends right after this.
      cudaSetDevice(device_);
      for (cudaEvent_t e : free_events_) cudaEventDestroy(e);
      comm_ = nullptr;
      return;
    }
    abandon();
  }

  std::string kind() const override { return "nccl"; }
  int rank() const override { return control_->rank(); }
  int size() const override { return control_->size(); }
  const std::vector<std::string>& hosts() const override { return control_->hosts(); }
  bool accepts(Device d) const override { return d == Device::CUDA; }

  void allreduce_sum(void* buf, int64_t count, DType dtype) override {
    ZMLX_CHECK(dtype == DType::BF16 || dtype == DType::F32, "allreduce_sum: only BF16 and F32 buffers are supported");
    if (size() == 1) return;
    // NCCL sums bf16 in fp32 and rounds each partial sum: with 2 ranks that
    // is one rounding, as the MPI path; every rank receives the same bits.
    const bool recording = begin_op();
    if (dtype == DType::BF16 && lsa_ && lsa_->fits(count, buf)) {
      // Same bits as ncclAllReduce for two ranks (nccl_lsa_allreduce.h).
      device_op(recording, [&] { lsa_->run(static_cast<uint16_t*>(buf), count, stream_); });
      return;
    }
    {
      std::lock_guard<std::mutex> api(api_mu_);
      check_nccl(nccl().AllReduce(buf, buf, size_t(count), dtype == DType::BF16 ? ncclBfloat16 : ncclFloat32, ncclSum,
                                  comm_, stream_),
                 "ncclAllReduce");
    }
    end_op("all-reduce on the GPU: waiting for", others(), recording);
  }

  bool allreduce_add_rms_norm(void* x, void* h, const void* w, int64_t D, float eps, void* out) override {
    if (!lsa_ || !fused_norm_ || !lsa_->fits_add_rms_norm(D, x, h, w, out)) return false;  // lsa_: 2+ ranks
    device_op(begin_op(), [&] {
      lsa_->run_add_rms_norm(static_cast<uint16_t*>(x), static_cast<uint16_t*>(h), static_cast<const uint16_t*>(w), D,
                             eps, static_cast<uint16_t*>(out), stream_);
    });
    return true;
  }

  void send(const void* buf, size_t bytes, int dst) override {
    const bool recording = begin_op();
    {
      std::lock_guard<std::mutex> api(api_mu_);
      check_nccl(nccl().Send(buf, bytes, ncclUint8, dst, comm_, stream_), "ncclSend");
    }
    end_op("sending activations (GPU) to", {dst}, recording);
  }

  void recv(void* buf, size_t bytes, int src) override {
    const bool recording = begin_op();
    {
      std::lock_guard<std::mutex> api(api_mu_);
      check_nccl(nccl().Recv(buf, bytes, ncclUint8, src, comm_, stream_), "ncclRecv");
    }
    end_op("waiting for activations (GPU) from", {src}, recording);
  }

  void watch_device_work(const std::string& what) override {
    check_cuda(cudaSetDevice(device_), "cudaSetDevice");
    watch_stream(fmt::format("{}: waiting for {}", what, who(others())));
  }

  // Control messages: host memory, over MPI.
  void broadcast(void* buf, size_t bytes, int root, bool wait_forever) override {
    control_->broadcast(buf, bytes, root, wait_forever);
  }
  void barrier(double patience) override { control_->barrier(patience); }
  [[noreturn]] void abort(int code) override {
    control_->abort(code);
    std::_Exit(code);  // not reached: control_'s abort ends the job
  }

 private:
  struct Pending {
    cudaEvent_t done;
    Clock::time_point since;  // when it was enqueued, or when the one before it completed
    std::string what;         // "waiting for activations (GPU) from rank 1 (host)"
  };

  // Operations run on the caller's thread (a node runs forwards on a worker
  // thread): make the GPU current. Returns whether the stream is recording a
  // CUDA graph (the operation then runs at each replay of the recording, and
  // the caller guards those with watch_device_work()).
  bool begin_op() {
    check_cuda(cudaSetDevice(device_), "cudaSetDevice");
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    check_cuda(cudaStreamIsCapturing(stream_, &capture), "cudaStreamIsCapturing");
    ZMLX_CHECK(capture != cudaStreamCaptureStatusInvalidated, "NCCL operation on an invalidated CUDA graph recording");
    return capture == cudaStreamCaptureStatusActive;
  }

  // After a NCCL call was issued: let a nonblocking enqueue finish, then hand
  // the operation's completion to the watchdog (not while recording: the
  // recorded operation has not run, and its replays are guarded as a whole).
  void end_op(const char* what, const std::vector<int>& peers, bool recording) {
    settle(what, 1.0);
    if (!recording) watch_stream(fmt::format("{} {}", what, who(peers)));
  }

  std::vector<int> others() const {
    std::vector<int> peers;
    for (int r = 0; r < size(); ++r)
      if (r != rank()) peers.push_back(r);
    return peers;
  }

  // "rank 1 (host-a), rank 2 (host-b)"
  std::string who(const std::vector<int>& peers) const {
    std::string s;
    for (int p : peers) s += fmt::format("{}rank {} ({})", s.empty() ? "" : ", ", p, hosts().at(size_t(p)));
    return s;
  }

  // Enqueues one of lsa_'s kernels (launch) and, outside a recording, hands
  // it to the watchdog like an NCCL operation (a peer that never reaches its
  // barrier leaves it spinning).
  template <typename F>
  void device_op(bool recording, const F& launch) {
    try {
      launch();
    } catch (const std::exception& e) {
      throw PeerError(fmt::format("rank {}: {}", rank(), e.what()));
    }
    if (!recording) watch_stream(fmt::format("all-reduce on the GPU (device API): waiting for {}", who(others())));
  }

  // Small bf16 all-reduces (decode) through our kernel on NCCL's device API
  // (nccl_lsa_allreduce.h), where the library loaded is the exact version
  // of the headers that kernel was compiled with and NCCL sets it up; else
  // ncclAllReduce, with one line saying why. ZMLX_NCCL_DEVICE_ALLREDUCE=0
  // keeps ncclAllReduce (A/B runs). Every rank decides alike: the checks
  // depend on the library and the node, and the set-up calls are collective.
  void start_device_allreduce() {
    if (size() == 1 || !zmlx::cuda::env_on("ZMLX_NCCL_DEVICE_ALLREDUCE")) return;
#ifndef ZMLX_HAVE_NCCL_DEVICE
    if (rank() == 0)
      std::fprintf(stderr, "[zmlx] NCCL device all-reduce off: built against NCCL headers without the device API "
                           "(2.28+); using ncclAllReduce\n");
#else
    const NcclApi& a = nccl();
    int version = 0;
    if (a.GetVersion) a.GetVersion(&version);
    std::string why;
    if (!a.MemAlloc || !a.CommWindowRegister || !a.DevCommCreate)
      why = "this libnccl has no device API (NCCL 2.28 or newer has)";
    else if (version != NCCL_VERSION_CODE)
      why = fmt::format("libnccl is version {}, zmlx was compiled against {} (the device API's structs must match; "
                        "put a libnccl.so.2 of that version first on LD_LIBRARY_PATH)",
                        version, NCCL_VERSION_CODE);
    if (why.empty()) {
      try {
        LsaAllReduce::Api api{a.MemAlloc, a.CommWindowRegister, a.DevCommCreate};
        lsa_ = LsaAllReduce::create(comm_, api, kDeviceAllReduceBytes, [this](int rc, const char* what) {
          check_nccl(ncclResult_t(rc), what);
          settle(what, 1.0);
        });
      } catch (const PeerError&) {
        throw;
      } catch (const std::exception& e) {
        why = e.what();
      }
    }
    if (rank() != 0) return;
    if (why.empty())
      std::fprintf(stderr, "[zmlx] NCCL device all-reduce on (NCCL %d, %d ranks over NVLink): decode rows skip "
                           "ncclAllReduce\n", version, size());
    else
      std::fprintf(stderr, "[zmlx] NCCL device all-reduce off: %s; using ncclAllReduce\n", why.c_str());
#endif
  }

  // The work queued on the stream so far becomes the newest pending operation.
  void watch_stream(std::string what) {
    cudaEvent_t e = take_event();
    check_cuda(cudaEventRecord(e, stream_), "cudaEventRecord");
    {
      std::lock_guard<std::mutex> lk(mu_);
      pending_.push_back({e, Clock::now(), std::move(what)});
    }
    wake_.notify_one();
  }

  // Polls the communicator until it leaves ncclInProgress (a nonblocking
  // call's background work: initialisation, first connections to a peer).
  void settle(const char* what, double patience) {
    const auto t0 = Clock::now();
    for (;;) {
      ncclResult_t state = ncclSuccess;
      {
        std::lock_guard<std::mutex> api(api_mu_);
        check_nccl(nccl().CommGetAsyncError(comm_, &state), "ncclCommGetAsyncError");
      }
      if (state == ncclSuccess) return;
      if (state != ncclInProgress)
        throw PeerError(fmt::format("rank {}: NCCL: {} the other ranks failed: {}", rank(), what, nccl_error(state)));
      if (seconds_since(t0) > timeout_s_ * patience)
        throw PeerError(fmt::format("rank {}: NCCL: {} the other ranks: no answer within {:g} s — a rank died or "
                                    "hangs",
                                    rank(), what, timeout_s_ * patience));
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
  }

  // The watchdog thread: completes pending operations in order, ends the job
  // when the oldest one is overdue or NCCL reports an asynchronous error.
  void watch() {
    cudaSetDevice(device_);
    std::unique_lock<std::mutex> lk(mu_);
    while (!stop_) {
      if (pending_.empty()) {
        wake_.wait(lk, [&] { return stop_ || !pending_.empty(); });
        continue;
      }
      Pending& p = pending_.front();
      const cudaEvent_t done = p.done;
      lk.unlock();
      const cudaError_t q = cudaEventQuery(done);
      // NCCL calls on one communicator must not overlap (ncclCommGetAsyncError
      // also completes the background job of a nonblocking call): skip this
      // check while the main thread is in one; it is back within microseconds.
      ncclResult_t state = ncclSuccess;
      {
        std::unique_lock<std::mutex> api(api_mu_, std::try_to_lock);
        if (api.owns_lock()) nccl().CommGetAsyncError(comm_, &state);
      }
      lk.lock();
      if (q == cudaSuccess) {
        free_events_.push_back(done);
        pending_.pop_front();
        // The next operation's deadline counts from now: it may legitimately
        // have waited behind this one (a long prefill on a peer).
        if (!pending_.empty()) pending_.front().since = std::max(pending_.front().since, Clock::now());
        else idle_.notify_all();
        continue;
      }
      if (q != cudaErrorNotReady)
        die(fmt::format("rank {}: {}: the GPU reported {}", rank(), p.what, cudaGetErrorString(q)));
      if (state != ncclSuccess && state != ncclInProgress)
        die(fmt::format("rank {}: {}: NCCL failed: {}", rank(), p.what, nccl_error(state)));
      const double waited = seconds_since(p.since);
      if (waited > timeout_s_)
        die(fmt::format("rank {}: {}: no answer within {:g} s — that rank died or hangs (raise --dist-timeout if "
                        "a stage legitimately needs longer)",
                        rank(), p.what, timeout_s_));
      // Poll briskly while operations complete quickly (decode), gently when one waits long.
      lk.unlock();
      std::this_thread::sleep_for(std::chrono::microseconds(waited < 0.01 ? 20 : 1000));
      lk.lock();
    }
  }

  // The failure path's teardown. ncclCommDestroy and ncclCommAbort both wait
  // until every peer on the node takes part (NCCL's proxy thread exits only
  // when the peers' connections to it close): a peer that hangs, alive,
  // keeps them waiting forever, and a rank blocked there never reports its
  // error or aborts the job. So the abort runs on a thread of its own, which
  // nobody joins: its first act raises NCCL's abort flag, which ends any NCCL
  // kernel still running on this rank's stream (so later stream
  // synchronisations return); then it may wait for the peer until the job
  // is ended (MPI_Abort). The communicator's memory is left to the exiting
  // process.
  void abandon() {
    ncclComm_t comm = comm_;
    const int device = device_;
    comm_ = nullptr;
    try {
      std::thread([comm, device] {
        cudaSetDevice(device);
        nccl().CommAbort(comm);
      }).detach();
    } catch (const std::system_error&) {
      // No thread: leave the communicator as it is; the job is ended anyway.
    }
  }

  // Ends the job from the watchdog thread: the rank's main thread may be
  // blocked in a stream synchronisation that only this can end. MPI_Abort
  // terminates every rank (MPI runs with THREAD_MULTIPLE); the driver frees
  // the GPU work of the ending processes.
  [[noreturn]] void die(const std::string& msg) {
    std::fprintf(stderr, "zmlx: error: %s\n", msg.c_str());
    std::fflush(stderr);
    std::fflush(stdout);
    control_->abort(1);
    std::_Exit(1);  // not reached: control_'s abort ends the job
  }

  cudaEvent_t take_event() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (!free_events_.empty()) {
        cudaEvent_t e = free_events_.back();
        free_events_.pop_back();
        return e;
      }
    }
    cudaEvent_t e = nullptr;
    check_cuda(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate");
    return e;
  }

  std::string nccl_error(ncclResult_t rc) const {
    const char* detail = comm_ ? nccl().GetLastError(comm_) : nullptr;
    return fmt::format("{}{}{}", nccl().GetErrorString(rc), detail && *detail ? " — " : "", detail ? detail : "");
  }
  void check_nccl(ncclResult_t rc, const char* what) const {
    // ncclInProgress: a nonblocking call continues in the background (settle() waits for it).
    if (rc == ncclSuccess || rc == ncclInProgress) return;
    throw PeerError(fmt::format("rank {}: {} failed: {}", rank(), what, nccl_error(rc)));
  }
  void check_cuda(cudaError_t e, const char* what) const {
    if (e != cudaSuccess) throw PeerError(fmt::format("rank {}: CUDA: {} failed: {}", rank(), what, cudaGetErrorString(e)));
  }

  std::shared_ptr<Communicator> control_;
  int device_;
  cudaStream_t stream_;
  ncclComm_t comm_ = nullptr;
  // All-reduces of up to this many bytes (a decode step's [1, hidden] bf16,
  // hidden up to 32768) go through lsa_ when it is set up.
  static constexpr size_t kDeviceAllReduceBytes = 64 << 10;
  std::unique_ptr<LsaAllReduce> lsa_;
  // ZMLX_TP_FUSED_NORM=0: allreduce_add_rms_norm declines (A/B runs; same bits).
  bool fused_norm_ = zmlx::cuda::env_on("ZMLX_TP_FUSED_NORM");
  std::thread watchdog_;
  std::mutex mu_;      // guards pending_, free_events_, stop_
  std::mutex api_mu_;  // serialises the NCCL calls of the main thread and the watchdog
  std::condition_variable wake_, idle_;
  std::deque<Pending> pending_;
  std::vector<cudaEvent_t> free_events_;
  bool stop_ = false;
};

}  // namespace

std::shared_ptr<Communicator> make_nccl_comm(std::shared_ptr<Communicator> control, int device, void* stream) {
  ZMLX_CHECK(stream != nullptr, "NCCL communicator: the backend has no CUDA stream");
  return std::make_shared<NcclComm>(std::move(control), device, static_cast<cudaStream_t>(stream));
}

#endif

}  // namespace zmlx::dist
