// Model instances of the node and their request scheduler. An Instance owns
// one loaded model (backend, weights, tokenizer, patch report) and a worker
// thread that runs one generation at a time from a FIFO queue. A request is
// a GenJob: the worker streams text into it, the HTTP thread drains it, and
// either side can end it (the client by cancelling, the worker by finishing).
#pragma once
#include <nlohmann/json.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "zmlx/gen/generator.h"
#include "zmlx/models/model.h"
#include "zmlx/patch/patch.h"
#include "zmlx/text/tokenizer.h"

namespace zmlx::serve {

class GenJob {
 public:
  GenJob(std::vector<int32_t> prompt, GenerateOptions opt) : prompt_ids(std::move(prompt)), options(std::move(opt)) {}
  const std::vector<int32_t> prompt_ids;
  const GenerateOptions options;

  void cancel() { cancelled_ = true; }
  bool cancelled() const { return cancelled_; }

  // HTTP side: waits up to `timeout` for new text or the end. Returns the
  // text released since the last call (possibly empty).
  std::string wait_text(std::chrono::milliseconds timeout);
  bool done() const;
  bool started() const;
  // Valid once done(): the result, or an error message.
  GenerateResult result() const;
  std::string error() const;
  double ttft_seconds() const;  // from submission to the first text

  // Worker side.
  void mark_started();
  void push_text(const std::string& s);
  void finish(GenerateResult r, std::string error = "");

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::string pending_;
  bool done_ = false, started_ = false;
  GenerateResult result_;
  std::string error_;
  std::atomic<bool> cancelled_{false};
  std::chrono::steady_clock::time_point submitted_ = std::chrono::steady_clock::now();
  std::optional<std::chrono::steady_clock::time_point> first_text_;
};

struct LoadOptions {
  patch::PatchOptions patch;
  std::string backend = "auto";
  // Multi-process node (--parallel): rank 0 serves; one model, loaded at start.
  dist::Placement parallel;
  bool parallel_started = false;  // the one model has been loaded
};

// Numbers of one finished request, for the state endpoint.
struct RequestStats {
  int64_t prompt_tokens = 0, completion_tokens = 0;
  double prefill_tps = 0, decode_tps = 0, ttft_s = 0;
  std::string finish_reason;
};

class Instance {
 public:
  // Loads `dir` (already resolved). Throws zmlx::Error.
  Instance(std::string id, std::string model_id, std::string ref, std::string dir, const LoadOptions& opt);
  ~Instance();
  Instance(const Instance&) = delete;
  Instance& operator=(const Instance&) = delete;

  const std::string& id() const { return id_; }
  const std::string& model_id() const { return model_id_; }
  const std::string& ref() const { return ref_; }
  const std::string& dir() const { return dir_; }
  Model& model() { return *model_; }
  const text::Tokenizer* tokenizer() const { return tokenizer_ ? &*tokenizer_ : nullptr; }
  const patch::PatchReport& patch_report() const { return report_; }
  std::string backend_name() const;
  int64_t context_length() const { return model_->config().max_position_embeddings; }

  // Queues a generation; throws ApiError(503) once the instance is shutting down.
  std::shared_ptr<GenJob> submit(std::vector<int32_t> prompt, GenerateOptions opt);
  // Stops the worker: the running generation is cancelled, queued jobs fail.
  void shutdown();

  size_t queued() const;
  bool busy() const { return busy_; }
  nlohmann::json info() const;  // for GET /state

 private:
  void worker_loop();
  std::string id_, model_id_, ref_, dir_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<Model> model_;
  std::optional<text::Tokenizer> tokenizer_;
  patch::PatchReport report_;
  double load_seconds_ = 0;
  uint64_t weight_bytes_ = 0;
  int64_t created_ = 0;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<GenJob>> queue_;
  std::shared_ptr<GenJob> current_;
  bool stopping_ = false;
  std::atomic<bool> busy_{false};
  std::deque<RequestStats> recent_;
  int64_t served_ = 0;
  std::thread worker_;
};

// The set of loaded instances. Thread-safe.
class InstanceManager {
 public:
  explicit InstanceManager(LoadOptions opt) : opt_(std::move(opt)) {}
  ~InstanceManager();
  // Resolves `ref` (directory or HF repo id) and loads it; a model already
  // loaded from the same directory is returned as is (second = false).
  std::pair<std::shared_ptr<Instance>, bool> load(const std::string& ref);
  // By instance id or model id; false when nothing matched.
  bool unload(const std::string& key);
  // By model id, instance id, the reference it was loaded with, or its directory.
  std::shared_ptr<Instance> find(const std::string& key) const;
  std::vector<std::shared_ptr<Instance>> list() const;

 private:
  LoadOptions opt_;
  mutable std::mutex mu_;
  std::mutex load_mu_;  // one load at a time
  std::vector<std::shared_ptr<Instance>> instances_;
  int next_id_ = 1;
};

// Process memory: current and peak resident set size in bytes.
uint64_t current_rss_bytes();
uint64_t peak_rss_bytes_now();

}  // namespace zmlx::serve
