// Multi-process parallelism inside one test process: each rank is a thread
// with its own CPU backend and model, joined by an in-memory Communicator
// that does what the MPI one promises (all-reduce summed in fp32 in rank
// order, rounded once; point-to-point mailboxes; broadcasts). This lets unit
// tests compare a family's pipeline / tensor-parallel forward pass with one
// process without mpirun (tests/e2e/mpi.sh covers the real transport).
#pragma once
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <map>
#include <mutex>
#include <thread>

#include "model_test_helpers.h"
#include "zmlx/dist/comm.h"
#include "zmlx/patch/patch.h"

namespace zmlx::test {

// State shared by the ranks of one in-process job.
class ThreadRanksHub {
 public:
  explicit ThreadRanksHub(int n) : n_(n), posted_(size_t(n), nullptr) {}
  int size() const { return n_; }

  // Every rank reaches this point; throws (instead of hanging the test)
  // when a rank never arrives, e.g. because it threw.
  void wait_all() {
    std::unique_lock<std::mutex> lk(mu_);
    const uint64_t gen = generation_;
    if (++arrived_ == n_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    if (!cv_.wait_for(lk, std::chrono::seconds(60), [&] { return generation_ != gen; }))
      throw dist::PeerError("thread ranks: a rank did not reach the barrier within 60 s");
  }
  void post(int rank, void* buf) {
    std::lock_guard<std::mutex> lk(mu_);
    posted_[size_t(rank)] = buf;
  }
  // Valid between the wait_all() after every rank posted and the next one.
  void* posted(int rank) const { return posted_[size_t(rank)]; }

  void send(int src, int dst, const void* buf, size_t bytes) {
    std::lock_guard<std::mutex> lk(mu_);
    const auto* b = static_cast<const uint8_t*>(buf);
    mail_[{src, dst}].emplace_back(b, b + bytes);
    cv_.notify_all();
  }
  void recv(int src, int dst, void* buf, size_t bytes) {
    std::unique_lock<std::mutex> lk(mu_);
    auto& box = mail_[{src, dst}];
    if (!cv_.wait_for(lk, std::chrono::seconds(60), [&] { return !box.empty(); }))
      throw dist::PeerError("thread ranks: rank " + std::to_string(dst) + " got nothing from rank " +
                            std::to_string(src) + " within 60 s");
    ZMLX_CHECK(box.front().size() == bytes, "thread ranks: message of {} bytes, expected {}", box.front().size(),
               bytes);
    std::memcpy(buf, box.front().data(), bytes);
    box.pop_front();
  }

 private:
  const int n_;
  std::mutex mu_;
  std::condition_variable cv_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
  std::vector<void*> posted_;
  std::map<std::pair<int, int>, std::deque<std::vector<uint8_t>>> mail_;
};

class ThreadRanksComm final : public dist::Communicator {
 public:
  ThreadRanksComm(ThreadRanksHub& hub, int rank) : hub_(hub), rank_(rank), hosts_(size_t(hub.size()), "thread") {}
  std::string kind() const override { return "threads"; }
  int rank() const override { return rank_; }
  int size() const override { return hub_.size(); }
  const std::vector<std::string>& hosts() const override { return hosts_; }

  void allreduce_sum(void* buf, int64_t count, DType dtype) override {
    ZMLX_CHECK(dtype == DType::BF16 || dtype == DType::F32, "thread ranks: all-reduce of {}", dtype_name(dtype));
    hub_.post(rank_, buf);
    hub_.wait_all();
    // Every rank sums all buffers in rank order, so all get the same bits.
    std::vector<float> sum(size_t(count), 0.f);
    for (int r = 0; r < hub_.size(); ++r)
      for (int64_t i = 0; i < count; ++i)
        sum[size_t(i)] += dtype == DType::F32 ? static_cast<const float*>(hub_.posted(r))[i]
                                              : bf16_to_f32(static_cast<const uint16_t*>(hub_.posted(r))[i]);
    hub_.wait_all();  // nobody writes its buffer while another still reads it
    for (int64_t i = 0; i < count; ++i) {
      if (dtype == DType::F32) static_cast<float*>(buf)[i] = sum[size_t(i)];
      else static_cast<uint16_t*>(buf)[i] = f32_to_bf16_bits(sum[size_t(i)]);
    }
  }
  void send(const void* buf, size_t bytes, int dst) override { hub_.send(rank_, dst, buf, bytes); }
  void recv(void* buf, size_t bytes, int src) override { hub_.recv(src, rank_, buf, bytes); }
  void broadcast(void* buf, size_t bytes, int root, bool) override {
    hub_.post(rank_, buf);
    hub_.wait_all();
    if (rank_ != root) std::memcpy(buf, hub_.posted(root), bytes);
    hub_.wait_all();
  }
  void barrier(double) override { hub_.wait_all(); }
  [[noreturn]] void abort(int) override { std::abort(); }

 private:
  ThreadRanksHub& hub_;
  const int rank_;
  std::vector<std::string> hosts_;
};

// What prefill_then_greedy_logits returns for one process, computed by `n`
// thread ranks under `mode` (the logits rank's view: teacher-forced logits of
// `ids`, then `steps` greedy steps, the token broadcast from that rank as
// generate() does). `patched`: the family's default fused patches on every rank.
inline std::vector<float> ranks_prefill_then_greedy_logits(const std::string& dir, dist::Mode mode, int n,
                                                           const std::vector<int32_t>& ids, int steps = 6,
                                                           bool patched = false, const std::string& layers = "") {
  ThreadRanksHub hub(n);
  std::vector<float> out;
  std::vector<std::exception_ptr> errors(static_cast<size_t>(n));
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r)
    threads.emplace_back([&, r] {
      try {
        dist::Placement p;
        p.mode = mode;
        p.comm = std::make_shared<ThreadRanksComm>(hub, r);
        p.rank = r;
        p.size = n;
        p.layers_arg = layers;
        auto be = make_cpu_backend();
        auto m = load_model(dir, *be, p);
        if (patched) {
          patch::PatchOptions o;
          o.enabled = true;
          o.quiet = true;
          patch::patch(*m, o);
        }
        const dist::Placement& P = m->placement();
        const bool logits_rank = r == P.logits_rank();
        const int64_t V = m->config().vocab_size;
        std::vector<float> all;
        Cache c = m->new_cache(*be);
        Tensor l = m->forward(*be, ids, c, /*all_logits=*/true);
        std::vector<int32_t> next(1, 0);
        if (logits_rank) {
          for (int64_t row = 0; row < l.rows(); ++row) {
            auto v = logits_to_host(*be, l, row);
            all.insert(all.end(), v.begin(), v.end());
          }
          next[0] = argmax(all.data() + all.size() - V, V);
        }
        P.comm->broadcast_i32(next, P.logits_rank());
        for (int s = 0; s < steps; ++s) {
          l = m->forward(*be, next, c);
          if (logits_rank) {
            auto v = logits_to_host(*be, l, 0);
            all.insert(all.end(), v.begin(), v.end());
            next[0] = argmax(v.data(), int64_t(v.size()));
          }
          P.comm->broadcast_i32(next, P.logits_rank());
        }
        if (logits_rank) out = std::move(all);
      } catch (...) {
        errors[size_t(r)] = std::current_exception();
      }
    });
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
  return out;
}

}  // namespace zmlx::test
