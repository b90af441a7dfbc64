#include "zmlx/cli/common.h"

#include <omp.h>
#include <sys/resource.h>

#include <chrono>
#include <filesystem>

#include "zmlx/core/error.h"
#include "zmlx/core/log.h"
#include "zmlx/io/model_path.h"

namespace zmlx::cli {

void add_model_args(CLI::App& app, ModelArgs& a) {
  app.add_option("model", a.model, "model directory or Hugging Face repo id (looked up offline in the HF cache)")
      ->required();
  app.add_option("--backend", a.backend, "cpu, cuda or auto")->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  app.add_option("--threads", a.threads, "CPU threads (default: all cores)");
}

LoadedModel load(const ModelArgs& a, bool need_tokenizer) {
  LoadedModel m;
  if (a.threads > 0) omp_set_num_threads(a.threads);
  ZMLX_CHECK(a.backend != "cuda", "--backend cuda: the CUDA backend is not available in this build yet; use --backend cpu");
  m.dir = io::resolve_model_path(a.model);
  auto t0 = std::chrono::steady_clock::now();
  m.backend = make_cpu_backend();
  m.model = load_model(m.dir, *m.backend);
  m.load_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
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
