// zmlx inspect MODEL: family, layers, shapes, quantization, parameters and
// the bytes a decode step reads.
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <map>

#include "zmlx/cli/command.h"
#include "zmlx/cli/common.h"

namespace zmlx::cli {
namespace {

int run(const ModelArgs& ma, bool as_json) {
  LoadedModel m = load(ma, false);
  const auto& ws = m.model->weight_summaries();
  uint64_t bytes = 0, per_token = 0;
  int64_t params = 0, active = 0;
  for (auto& w : ws) {
    bytes += w.bytes;
    per_token += w.bytes_per_token;
    params += w.params;
    active += w.active_params;
  }
  const auto kinds = m.model->layer_kinds();
  const ModelConfig& c = m.model->config();
  if (as_json) {
    nlohmann::json mods = nlohmann::json::array();
    for (auto& w : ws)
      mods.push_back({{"path", w.path}, {"shape", w.shape}, {"quantized", w.quantized}, {"bits", w.bits},
                      {"group_size", w.group_size}, {"bytes", w.bytes}, {"bytes_per_token", w.bytes_per_token}});
    nlohmann::json j = {{"model", m.dir},          {"family", m.model->family()}, {"layers", kinds},
                        {"hidden_size", c.hidden_size}, {"vocab_size", c.vocab_size},
                        {"total_params", params},  {"active_params", active},     {"weight_bytes", bytes},
                        {"bytes_per_token", per_token}, {"modules", mods}};
    std::printf("%s\n", j.dump(2).c_str());
    return 0;
  }
  std::printf("model      %s\nfamily     %s\nlayers     %zu\n", m.dir.c_str(), m.model->family().c_str(), kinds.size());
  std::map<std::string, int> kind_count;
  for (auto& k : kinds) kind_count[k]++;
  for (auto& [k, n] : kind_count) std::printf("           %3d x %s\n", n, k.c_str());
  std::printf("params     %.3f B total, %.3f B active per token\n", params / 1e9, active / 1e9);
  std::printf("weights    %s stored, %s read per decoded token\n", human_bytes(double(bytes)).c_str(),
              human_bytes(double(per_token)).c_str());
  std::printf("\n%-52s %-20s %-10s %12s\n", "module", "shape", "quant", "bytes/token");
  for (auto& w : ws) {
    std::string shape = fmt::format("[{}]", fmt::join(w.shape, ", "));
    std::string q = w.quantized ? fmt::format("{}b g{}", w.bits, w.group_size) : "bf16";
    std::printf("%-52s %-20s %-10s %12s\n", w.path.c_str(), shape.c_str(), q.c_str(),
                human_bytes(double(w.bytes_per_token)).c_str());
  }
  return 0;
}

ZMLX_COMMAND("inspect", "Show a model's family, layers, quantization and per-token bytes", [](CLI::App& app) {
  auto a = std::make_shared<ModelArgs>();
  auto j = std::make_shared<bool>(false);
  add_model_args(app, *a);
  app.add_flag("--json", *j, "machine-readable output");
  return [a, j] { return run(*a, *j); };
});

}  // namespace
}  // namespace zmlx::cli
