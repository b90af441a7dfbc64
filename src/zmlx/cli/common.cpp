#include "zmlx/cli/common.h"

#include <omp.h>
#include <sys/resource.h>

#include <chrono>
#include <exception>
#include <filesystem>

#include "zmlx/core/error.h"
#include "zmlx/core/log.h"
#include "zmlx/dist/comm.h"
#include "zmlx/io/model_path.h"

namespace zmlx::cli {

void add_model_args(CLI::App& app, ModelArgs& a, bool with_patch_flags) {
  app.add_option("model", a.model, "model directory or Hugging Face repo id (looked up offline in the HF cache)")
      ->required();
  app.add_option("--backend", a.backend, "cpu, cuda or auto")->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  app.add_option("--threads", a.threads, "CPU threads (default: all cores)");
  app.add_option("--parallel", a.parallel,
                 "multi-process parallelism across the ranks of `mpirun -np N`: none, pipeline (layers split) or "
                 "tensor (heads, MLPs and experts split)")
      ->check(CLI::IsMember({"none", "pipeline", "tensor"}));
  app.add_option("--layers", a.layers, "pipeline: layer ranges per rank, e.g. 0-23,24-47 (default: balanced by bytes)");
  app.add_option("--dist-timeout", a.dist_timeout, "seconds a rank waits for a peer before failing (default 60)")
      ->check(CLI::Range(0.1, 1e6));
  if (!with_patch_flags) return;
  app.add_flag_function("--patch", [&a](int64_t) { a.patch = 1; }, "apply fused-kernel patches (as EXO_ZMLX=1)");
  app.add_flag_function("--no-patch", [&a](int64_t) { a.patch = 0; }, "run unpatched (as EXO_ZMLX=0)");
  app.add_option("--patterns", a.patterns, "comma-separated patterns, overriding the family defaults (as EXO_ZMLX_PATTERNS)");
  app.add_option("--exclude", a.exclude, "comma-separated patterns to exclude (as EXO_ZMLX_EXCLUDE)");
  app.add_flag("--patch-verbose", a.patch_verbose, "log every patched module (as EXO_ZMLX_VERBOSE=1)");
}

dist::Placement make_placement(const ModelArgs& a) {
  dist::Placement p;
  const int launched = dist::launcher_size();
  if (a.parallel == "none") {
    ZMLX_CHECK(a.layers.empty(), "--layers needs --parallel pipeline");
    if (launched > 1)
      std::fprintf(stderr,
                   "[zmlx] warning: launched as one of %d ranks but --parallel is none: every rank runs the whole "
                   "model on its own\n", launched);
    return p;
  }
  p.mode = a.parallel == "pipeline" ? dist::Mode::Pipeline : dist::Mode::Tensor;
  ZMLX_CHECK(a.layers.empty() || p.pipeline(), "--layers needs --parallel pipeline");
  p.layers_arg = a.layers;
  p.comm = dist::world(a.dist_timeout);
  p.rank = p.comm->rank();
  p.size = p.comm->size();
  return p;
}

patch::PatchOptions patch_options(const ModelArgs& a) {
  patch::PatchOptions o = patch::PatchOptions::from_env();
  if (a.patch >= 0) o.enabled = a.patch == 1;
  if (!a.patterns.empty()) {
    o.patterns = patch::parse_pattern_list(a.patterns);
    patch::check_pattern_names(*o.patterns);
    if (a.patch < 0) o.enabled = true;  // naming patterns implies patching
  }
  if (!a.exclude.empty()) {
    o.exclude = patch::parse_pattern_list(a.exclude);
    patch::check_pattern_names(o.exclude);
  }
  if (a.patch_verbose) o.verbose = true;
  if (a.parallel != "none") {
    o.distributed = true;
    o.parallelism = a.parallel;
  }
  return o;
}

LoadedModel::~LoadedModel() {
  if (std::uncaught_exceptions() == 0 || !model || !backend) return;
  const dist::Placement& P = model->placement();
  if (!P.active() || backend->device() != Device::CUDA) return;  // CPU ranks: nothing can block
  (void)model.release();
  (void)backend.release();
}

LoadedModel load(const ModelArgs& a, bool need_tokenizer) {
  LoadedModel m;
  const patch::PatchOptions popt = patch_options(a);  // flag/env errors before the (slow) load
  (void)popt;
  if (a.threads > 0) omp_set_num_threads(a.threads);
  m.dir = io::resolve_model_path(a.model);
  auto t0 = std::chrono::steady_clock::now();
  dist::Placement place = make_placement(a);
  m.backend = make_backend_for_ranks(a.backend, place);  // GPU ranks: place.comm becomes NCCL
  m.model = load_model(m.dir, *m.backend, place);
  // One line per rank: where it runs and what it holds.
  if (place.active()) std::fprintf(stderr, "[zmlx] %s\n", m.model->placement().describe().c_str());
  m.load_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  patch::PatchOptions po = patch_options(a);
  po.placement = m.model->placement().describe();
  m.patch_report = patch::patch(*m.model, po);
  // Every rank has loaded before the first collective (loads may take long).
  if (place.active()) place.comm->barrier(/*patience=*/20);
  if (std::filesystem::exists(std::filesystem::path(m.dir) / "tokenizer.json"))
    m.tokenizer = text::Tokenizer::from_dir(m.dir);
  else
    ZMLX_CHECK(!need_tokenizer, "{}: no tokenizer.json (pass token ids with --ids instead)", m.dir);
  return m;
}

std::vector<int32_t> parse_id_list(const std::string& s) {
  std::vector<int32_t> out;
  size_t i = 0;
  while (i < s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    std::string part = s.substr(i, j - i);
    try {
      size_t used = 0;
      long v = std::stol(part, &used);
      ZMLX_CHECK(used == part.size() && v >= 0 && v < (1L << 31), "bad token id '{}'", part);
      out.push_back(int32_t(v));
    } catch (const std::logic_error&) {
      fail("bad token id '{}' in --ids (expected comma-separated integers)", part);
    }
    i = j + 1;
  }
  return out;
}

uint64_t peak_rss_bytes() {
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  return uint64_t(ru.ru_maxrss) * 1024;
}

std::string human_bytes(double b) {
  const char* u[] = {"B", "KB", "MB", "GB", "TB"};
  int i = 0;
  while (b >= 1000 && i < 4) b /= 1000, ++i;
  return fmt::format("{:.2f} {}", b, u[i]);
}

}  // namespace zmlx::cli
