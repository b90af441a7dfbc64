// The MPI communicator: nonblocking MPI calls polled against a deadline, so
// a dead or hung peer becomes a PeerError naming it rather than a hang.
// Collectives are written as point-to-point exchanges (N is small: one rank
// per host or device) so that the waiting rank knows exactly which peer is
// missing, and so the all-reduce sums in a fixed rank order on every rank.
#include <fmt/format.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <system_error>
#include <thread>

#include "zmlx/dist/comm.h"

#ifdef ZMLX_HAVE_MPI
#include <mpi.h>
#endif

namespace zmlx::dist {

namespace {
std::shared_ptr<Communicator> g_world;
std::mutex g_mu;
}  // namespace

bool world_started() { return g_world != nullptr; }

#ifndef ZMLX_HAVE_MPI

bool mpi_available() { return false; }

std::shared_ptr<Communicator> world(double) {
  fail("--parallel: this zmlx was built without MPI (install libopenmpi-dev / openmpi-bin and rebuild; "
       "CMake reports 'zmlx: MPI ON' when it is found), so it cannot run multi-process");
}

void finalize(bool) {}

#else

bool mpi_available() { return true; }

namespace {

enum Tag : int { kTagP2P = 11, kTagBcast = 12, kTagReduce = 13, kTagBarrier = 14 };

class MpiComm final : public Communicator {
 public:
  explicit MpiComm(double timeout) {
    timeout_s_ = timeout;
    int inited = 0;
    MPI_Initialized(&inited);
    if (!inited) {
      int provided = 0;
      MPI_Init_thread(nullptr, nullptr, MPI_THREAD_MULTIPLE, &provided);
      ZMLX_CHECK(provided >= MPI_THREAD_SERIALIZED, "MPI: the library offers thread level {}, zmlx needs SERIALIZED",
                 provided);
    }
    MPI_Query_thread(&thread_level_);
    owner_ = std::this_thread::get_id();
    MPI_Comm_dup(MPI_COMM_WORLD, &comm_);
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
    char name[MPI_MAX_PROCESSOR_NAME] = {0};
    int len = 0;
    MPI_Get_processor_name(name, &len);
    // Host names of every rank, fixed-width exchange.
    std::vector<char> all(size_t(size_) * MPI_MAX_PROCESSOR_NAME, 0);
    MPI_Allgather(name, MPI_MAX_PROCESSOR_NAME, MPI_CHAR, all.data(), MPI_MAX_PROCESSOR_NAME, MPI_CHAR, comm_);
    for (int r = 0; r < size_; ++r) hosts_.emplace_back(all.data() + size_t(r) * MPI_MAX_PROCESSOR_NAME);
  }

  std::string kind() const override { return "mpi"; }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::vector<std::string>& hosts() const override { return hosts_; }

  void send(const void* buf, size_t bytes, int dst) override {
    std::vector<MPI_Request> rq(1);
    check(MPI_Isend(buf, count(bytes), MPI_BYTE, dst, kTagP2P, comm_, &rq[0]), "send");
    wait(rq, {dst}, "sending activations to", 1.0);
  }
  void recv(void* buf, size_t bytes, int src) override {
    std::vector<MPI_Request> rq(1);
    check(MPI_Irecv(buf, count(bytes), MPI_BYTE, src, kTagP2P, comm_, &rq[0]), "recv");
    wait(rq, {src}, "waiting for activations from", 1.0);
  }

  void broadcast(void* buf, size_t bytes, int root, bool wait_forever) override {
    if (size_ == 1) return;
    std::vector<MPI_Request> rq;
    std::vector<int> peers;
    if (rank_ == root) {
      for (int r = 0; r < size_; ++r)
        if (r != root) {
          rq.emplace_back();
          check(MPI_Isend(buf, count(bytes), MPI_BYTE, r, kTagBcast, comm_, &rq.back()), "broadcast");
          peers.push_back(r);
        }
    } else {
      rq.emplace_back();
      check(MPI_Irecv(buf, count(bytes), MPI_BYTE, root, kTagBcast, comm_, &rq.back()), "broadcast");
      peers.push_back(root);
    }
    wait(rq, peers, rank_ == root ? "broadcasting to" : "waiting for a broadcast from", wait_forever ? -1 : 1.0);
  }

  void allreduce_sum(void* buf, int64_t n, DType dtype) override {
    ZMLX_CHECK(dtype == DType::BF16 || dtype == DType::F32, "allreduce_sum: {} buffers are not supported",
               dtype_name(dtype));
    if (size_ == 1) return;
    const size_t bytes = size_t(n) * dtype_size(dtype);
    scratch_.resize(bytes * size_t(size_));
    std::memcpy(scratch_.data() + bytes * size_t(rank_), buf, bytes);
    std::vector<MPI_Request> rq;
    std::vector<int> peers;
    for (int r = 0; r < size_; ++r) {
      if (r == rank_) continue;
      rq.emplace_back();
      check(MPI_Irecv(scratch_.data() + bytes * size_t(r), count(bytes), MPI_BYTE, r, kTagReduce, comm_, &rq.back()),
            "allreduce");
      peers.push_back(r);
    }
    for (int r = 0; r < size_; ++r) {
      if (r == rank_) continue;
      rq.emplace_back();
      check(MPI_Isend(buf, count(bytes), MPI_BYTE, r, kTagReduce, comm_, &rq.back()), "allreduce");
      peers.push_back(r);
    }
    wait(rq, peers, "all-reduce: waiting for", 1.0);
    // Sum in rank order, in fp32, round once.
    if (dtype == DType::F32) {
      float* out = static_cast<float*>(buf);
      for (int64_t i = 0; i < n; ++i) {
        float s = 0.f;
        for (int r = 0; r < size_; ++r) s += reinterpret_cast<const float*>(scratch_.data() + bytes * size_t(r))[i];
        out[i] = s;
      }
    } else {
      uint16_t* out = static_cast<uint16_t*>(buf);
      for (int64_t i = 0; i < n; ++i) {
        float s = 0.f;
        for (int r = 0; r < size_; ++r)
          s += bf16_to_f32(reinterpret_cast<const uint16_t*>(scratch_.data() + bytes * size_t(r))[i]);
        out[i] = f32_to_bf16_bits(s);
      }
    }
  }

  void barrier(double patience) override {
    if (size_ == 1) return;
    // Everyone tells everyone "here"; the missing ones are named.
    char here = 1;
    std::vector<char> got(size_t(size_), 0);
    std::vector<MPI_Request> rq;
    std::vector<int> peers;
    for (int r = 0; r < size_; ++r) {
      if (r == rank_) continue;
      rq.emplace_back();
      check(MPI_Irecv(&got[size_t(r)], 1, MPI_BYTE, r, kTagBarrier, comm_, &rq.back()), "barrier");
      peers.push_back(r);
      rq.emplace_back();
      check(MPI_Isend(&here, 1, MPI_BYTE, r, kTagBarrier, comm_, &rq.back()), "barrier");
      peers.push_back(r);
    }
    wait(rq, peers, "waiting at a barrier for", patience);
  }

  [[noreturn]] void abort(int code) override {
    // MPI_Abort asks the launcher to end every rank. Should it not return or
    // end this process (a launcher that does not answer), a rank that exits
    // non-zero without MPI_Finalize still makes mpirun end the job.
    // Below THREAD_MULTIPLE, another thread (a GPU rank's watchdog) may not
    // call MPI while this one might be inside it: exit at once instead.
    if (thread_level_ < MPI_THREAD_MULTIPLE && std::this_thread::get_id() != owner_) std::_Exit(code);
    try {
      std::thread([code] {
        std::this_thread::sleep_for(std::chrono::seconds(10));
        std::_Exit(code);
      }).detach();
    } catch (const std::system_error&) {
    }
    MPI_Abort(MPI_COMM_WORLD, code);
    std::_Exit(code);
  }

  void finalize() {
    MPI_Comm_free(&comm_);
    MPI_Finalize();
  }

 private:
  int thread_level_ = MPI_THREAD_SINGLE;  // what MPI_Init_thread granted
  std::thread::id owner_;                 // the thread that set MPI up
  static int count(size_t bytes) {
    ZMLX_CHECK(bytes <= size_t(INT32_MAX), "MPI: a message of {} bytes is too large", bytes);
    return int(bytes);
  }
  void check(int rc, const char* what) {
    if (rc == MPI_SUCCESS) return;
    char msg[MPI_MAX_ERROR_STRING] = {0};
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    throw PeerError(fmt::format("rank {}: MPI {} failed: {}", rank_, what, msg));
  }

  // Polls the requests until all complete or the deadline (timeout × patience;
  // patience < 0: none) passes; then names the peers whose requests are still open.
  void wait(std::vector<MPI_Request>& rq, const std::vector<int>& peers, const char* what, double patience) {
    using Clock = std::chrono::steady_clock;
    const auto t0 = Clock::now();
    const double limit = patience < 0 ? -1 : timeout_s_ * patience;
    for (long spin = 0;; ++spin) {
      int done = 0;
      check(MPI_Testall(int(rq.size()), rq.data(), &done, MPI_STATUSES_IGNORE), what);
      if (done) return;
      if (limit >= 0 && std::chrono::duration<double>(Clock::now() - t0).count() > limit) {
        std::string missing;
        for (size_t i = 0; i < rq.size(); ++i) {
          int flag = 0;
          if (rq[i] != MPI_REQUEST_NULL) MPI_Test(&rq[i], &flag, MPI_STATUS_IGNORE);
          else flag = 1;
          if (!flag) {
            const std::string r = fmt::format("rank {} ({})", peers[i], hosts_.at(size_t(peers[i])));
            if (missing.find(r) == std::string::npos) missing += (missing.empty() ? "" : ", ") + r;
          }
        }
        throw PeerError(fmt::format(
            "rank {}: {} {}: no answer within {:g} s — that rank died or hangs (raise --dist-timeout if a stage "
            "legitimately needs longer)",
            rank_, what, missing, limit));
      }
      if (spin > 2000) std::this_thread::sleep_for(std::chrono::microseconds(spin > 20000 ? 200 : 20));
    }
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
  std::vector<std::string> hosts_;
  std::vector<uint8_t> scratch_;
};

}  // namespace

std::shared_ptr<Communicator> world(double timeout_seconds) {
  std::lock_guard<std::mutex> lk(g_mu);
  if (!g_world) g_world = std::make_shared<MpiComm>(timeout_seconds);
  g_world->set_timeout_seconds(timeout_seconds);
  return g_world;
}

void finalize(bool ok) {
  std::lock_guard<std::mutex> lk(g_mu);
  if (!g_world) return;
  auto* m = static_cast<MpiComm*>(g_world.get());
  if (!ok && m->size() > 1) {
    std::fflush(stdout);
    std::fflush(stderr);
    m->abort(1);
  }
  m->finalize();
}

#endif

}  // namespace zmlx::dist
