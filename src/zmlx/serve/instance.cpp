#include "zmlx/serve/instance.h"

#include <sys/resource.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>

#include "zmlx/core/error.h"
#include "zmlx/dist/comm.h"
#include "zmlx/io/model_path.h"
#include "zmlx/serve/api.h"

namespace zmlx::serve {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

// ---- GenJob ----

std::string GenJob::wait_text(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lk(mu_);
  cv_.wait_for(lk, timeout, [&] { return done_ || !pending_.empty(); });
  std::string out;
  out.swap(pending_);
  return out;
}

bool GenJob::done() const {
  std::lock_guard<std::mutex> lk(mu_);
  return done_ && pending_.empty();
}

bool GenJob::started() const {
  std::lock_guard<std::mutex> lk(mu_);
  return started_;
}

GenerateResult GenJob::result() const {
  std::lock_guard<std::mutex> lk(mu_);
  return result_;
}

std::string GenJob::error() const {
  std::lock_guard<std::mutex> lk(mu_);
  return error_;
}

double GenJob::ttft_seconds() const {
  std::lock_guard<std::mutex> lk(mu_);
  return first_text_ ? std::chrono::duration<double>(*first_text_ - submitted_).count() : 0.0;
}

void GenJob::mark_started() {
  std::lock_guard<std::mutex> lk(mu_);
  started_ = true;
}

void GenJob::push_text(const std::string& s) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (!first_text_) first_text_ = Clock::now();
    pending_ += s;
  }
  cv_.notify_all();
}

void GenJob::finish(GenerateResult r, std::string error) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (!first_text_ && !r.token_ids.empty()) first_text_ = Clock::now();
    result_ = std::move(r);
    error_ = std::move(error);
    done_ = true;
  }
  cv_.notify_all();
}

// ---- Instance ----

Instance::Instance(std::string id, std::string model_id, std::string ref, std::string dir, const LoadOptions& opt)
    : id_(std::move(id)), model_id_(std::move(model_id)), ref_(std::move(ref)), dir_(std::move(dir)) {
  auto t0 = Clock::now();
  dist::Placement place = opt.parallel;  // GPU ranks: its comm becomes NCCL, the model keeps that one
  backend_ = make_backend_for_ranks(opt.backend, place);
  model_ = load_model(dir_, *backend_, place);
  load_seconds_ = std::chrono::duration<double>(Clock::now() - t0).count();
  patch::PatchOptions po = opt.patch;
  po.placement = model_->placement().describe();
  report_ = patch::patch(*model_, po);
  if (place.active()) place.comm->barrier(/*patience=*/20);  // every rank loaded
  ZMLX_CHECK(fs::exists(fs::path(dir_) / "tokenizer.json"), "{}: no tokenizer.json; the node needs one to serve text",
             dir_);
  tokenizer_ = text::Tokenizer::from_dir(dir_);
  for (auto& w : model_->weight_summaries()) weight_bytes_ += w.bytes;
  created_ = std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
  worker_ = std::thread([this] { worker_loop(); });
}

Instance::~Instance() { shutdown(); }

std::string Instance::backend_name() const { return backend_->name(); }

std::shared_ptr<GenJob> Instance::submit(std::vector<int32_t> prompt, GenerateOptions opt) {
  auto job = std::make_shared<GenJob>(std::move(prompt), std::move(opt));
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (stopping_) throw ApiError(503, "model '" + model_id_ + "' is being unloaded", "model", "model_unloading");
    queue_.push_back(job);
  }
  cv_.notify_all();
  return job;
}

void Instance::shutdown() {
  std::deque<std::shared_ptr<GenJob>> dropped;
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (stopping_ && !worker_.joinable()) return;
    stopping_ = true;
    dropped.swap(queue_);
    if (current_) current_->cancel();
  }
  cv_.notify_all();
  for (auto& j : dropped) {
    GenerateResult r;
    r.finish_reason = "cancelled";
    j->finish(r, "model '" + model_id_ + "' was unloaded");
  }
  if (worker_.joinable() && worker_.get_id() != std::this_thread::get_id()) worker_.join();
}

size_t Instance::queued() const {
  std::lock_guard<std::mutex> lk(mu_);
  return queue_.size();
}

void Instance::worker_loop() {
  for (;;) {
    std::shared_ptr<GenJob> job;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return stopping_ || !queue_.empty(); });
      if (stopping_) return;
      job = queue_.front();
      queue_.pop_front();
      current_ = job;
    }
    if (job->cancelled()) {  // the client left while it waited
      GenerateResult r;
      r.finish_reason = "cancelled";
      job->finish(r);
      std::lock_guard<std::mutex> lk(mu_);
      current_.reset();
      continue;
    }
    busy_ = true;
    job->mark_started();
    GenerateResult r;
    std::string err;
    try {
      r = generate(*model_, *backend_, tokenizer(), job->prompt_ids, job->options, [&](const std::string& piece) {
        job->push_text(piece);
        return !job->cancelled();
      });
      if (job->cancelled()) {
        r.finish_reason = "cancelled";
        std::lock_guard<std::mutex> lk(mu_);
        if (stopping_) err = "model '" + model_id_ + "' was unloaded during generation";
      }
    } catch (const std::exception& e) {
      err = e.what();
      r.finish_reason = "error";
    }
    busy_ = false;
    RequestStats st;
    st.prompt_tokens = int64_t(r.prompt_ids.size());
    st.completion_tokens = int64_t(r.token_ids.size());
    st.prefill_tps = r.prefill_tps();
    st.decode_tps = r.decode_tps();
    st.finish_reason = r.finish_reason;
    job->finish(std::move(r), err);
    st.ttft_s = job->ttft_seconds();
    std::lock_guard<std::mutex> lk(mu_);
    current_.reset();
    ++served_;
    recent_.push_back(st);
    while (recent_.size() > 20) recent_.pop_front();
  }
}

nlohmann::json Instance::info() const {
  nlohmann::json recent = nlohmann::json::array();
  double sum_decode = 0, sum_prefill = 0;
  int n_decode = 0, n_prefill = 0;
  int64_t served;
  size_t queued;
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (auto& s : recent_) {
      recent.push_back({{"prompt_tokens", s.prompt_tokens},
                        {"completion_tokens", s.completion_tokens},
                        {"prefill_tps", s.prefill_tps},
                        {"decode_tps", s.decode_tps},
                        {"ttft_s", s.ttft_s},
                        {"finish_reason", s.finish_reason}});
      if (s.decode_tps > 0) sum_decode += s.decode_tps, ++n_decode;
      if (s.prefill_tps > 0) sum_prefill += s.prefill_tps, ++n_prefill;
    }
    served = served_;
    queued = queue_.size();
  }
  const ModelConfig& c = model_->config();
  return {{"id", id_},
          {"model", model_id_},
          {"ref", ref_},
          {"path", dir_},
          {"family", model_->family()},
          {"backend", backend_->name()},
          {"device", backend_->name()},
          {"parallelism", "none"},
          {"context_length", c.max_position_embeddings},
          {"load_seconds", load_seconds_},
          {"created", created_},
          {"patch", nlohmann::json::parse(report_.json())},
          {"patch_summary", report_.enabled ? fmt::format("{} modules: {}", report_.total(), report_.counts_str())
                                            : std::string("not patched")},
          {"memory", {{"weights_bytes", weight_bytes_}, {"process_rss_bytes", current_rss_bytes()},
                      {"process_peak_rss_bytes", peak_rss_bytes_now()}}},
          {"busy", busy_.load()},
          {"queued", queued},
          {"requests_served", served},
          {"recent_decode_tps", n_decode ? sum_decode / n_decode : 0.0},
          {"recent_prefill_tps", n_prefill ? sum_prefill / n_prefill : 0.0},
          {"recent_requests", recent}};
}

// ---- InstanceManager ----

InstanceManager::~InstanceManager() {
  std::vector<std::shared_ptr<Instance>> all;
  {
    std::lock_guard<std::mutex> lk(mu_);
    all.swap(instances_);
  }
  for (auto& i : all) i->shutdown();
}

static std::string model_id_for(const std::string& ref, const std::string& dir) {
  if (fs::is_directory(ref)) {
    fs::path p = fs::path(ref).lexically_normal();
    std::string name = p.filename().string();
    if (name.empty()) name = p.parent_path().filename().string();
    return name.empty() ? dir : name;
  }
  return ref;  // a repo id
}

std::pair<std::shared_ptr<Instance>, bool> InstanceManager::load(const std::string& ref) {
  std::lock_guard<std::mutex> load_lock(load_mu_);
  std::string dir = io::resolve_model_path(ref);
  if (opt_.parallel.active()) {
    std::lock_guard<std::mutex> lk(mu_);
    if (!instances_.empty() && fs::weakly_canonical(instances_[0]->dir()) == fs::weakly_canonical(dir))
      return {instances_[0], false};
    if (!instances_.empty() || opt_.parallel_started)
      throw ApiError(409,
                     "this node runs --parallel " + std::string(dist::mode_name(opt_.parallel.mode)) +
                         " across ranks: its one model is given on the command line and cannot be changed",
                     "model", "parallel_fixed_model");
  }
  std::string canon = fs::weakly_canonical(dir).string();
  std::string mid = model_id_for(ref, dir);
  std::string iid;
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (auto& i : instances_)
      if (fs::weakly_canonical(i->dir()).string() == canon) return {i, false};
    // Another directory with the same name gets a suffix.
    std::string base = mid;
    for (int k = 2;; ++k) {
      bool taken = false;
      for (auto& i : instances_) taken |= i->model_id() == mid;
      if (!taken) break;
      mid = base + "-" + std::to_string(k);
    }
    iid = "inst-" + std::to_string(next_id_++);
  }
  auto inst = std::make_shared<Instance>(iid, mid, ref, dir, opt_);
  opt_.parallel_started = true;
  std::lock_guard<std::mutex> lk(mu_);
  instances_.push_back(inst);
  return {inst, true};
}

bool InstanceManager::unload(const std::string& key) {
  if (opt_.parallel.active())
    throw ApiError(409, "this node runs across ranks (--parallel): its model cannot be unloaded", "id",
                   "parallel_fixed_model");
  std::shared_ptr<Instance> victim;
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (auto it = instances_.begin(); it != instances_.end(); ++it)
      if ((*it)->id() == key || (*it)->model_id() == key) {
        victim = *it;
        instances_.erase(it);
        break;
      }
  }
  if (!victim) return false;
  victim->shutdown();
  return true;
}

std::shared_ptr<Instance> InstanceManager::find(const std::string& key) const {
  std::lock_guard<std::mutex> lk(mu_);
  for (auto& i : instances_)
    if (i->model_id() == key || i->id() == key) return i;
  for (auto& i : instances_)
    if (i->ref() == key || i->dir() == key) return i;
  return nullptr;
}

std::vector<std::shared_ptr<Instance>> InstanceManager::list() const {
  std::lock_guard<std::mutex> lk(mu_);
  return instances_;
}

uint64_t current_rss_bytes() {
  FILE* f = std::fopen("/proc/self/statm", "r");
  if (!f) return 0;
  unsigned long size = 0, rss = 0;
  int n = std::fscanf(f, "%lu %lu", &size, &rss);
  std::fclose(f);
  return n == 2 ? uint64_t(rss) * uint64_t(sysconf(_SC_PAGESIZE)) : 0;
}

uint64_t peak_rss_bytes_now() {
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  return uint64_t(ru.ru_maxrss) * 1024;
}

}  // namespace zmlx::serve
