#include <fmt/format.h>

#include <atomic>
#include <functional>
#include <cstdlib>
#include <map>

#include "zmlx/core/error.h"
#include "zmlx/models/families.h"

namespace zmlx {

using Builder = std::function<std::unique_ptr<Model>(ModelConfig, std::shared_ptr<io::WeightStore>, Backend&)>;

static const std::map<std::string, Builder>& builders() {
  static const std::map<std::string, Builder> m = {
      {"glm4_moe_lite", build_glm4_moe_lite},
      {"lfm2_moe", build_lfm2_moe},
      {"qwen3", build_qwen3},
      {"qwen3_moe", build_qwen3_moe},
  };
  return m;
}

std::vector<std::string> supported_families() {
  std::vector<std::string> out;
  for (auto& [k, v] : builders()) out.push_back(k);
  return out;
}

// Pipeline stages: --layers by hand, else contiguous ranges balancing the
// stored bytes of each layer's tensors ("model.layers.N.*").
static std::vector<std::pair<int64_t, int64_t>> pipeline_stages(const io::WeightStore& store, int64_t n_layers,
                                                                 const dist::Placement& p) {
  if (!p.layers_arg.empty()) return dist::parse_layer_ranges(p.layers_arg, n_layers, p.size);
  std::vector<uint64_t> bytes(size_t(n_layers), 0);
  const std::string pre = "model.layers.";
  for (auto& n : store.names()) {
    if (n.compare(0, pre.size(), pre) != 0) continue;
    const int64_t l = std::atoll(n.c_str() + pre.size());
    if (l >= 0 && l < n_layers) bytes[size_t(l)] += store.get(n).nbytes;
  }
  return dist::split_layers_by_bytes(bytes, p.size);
}

std::vector<std::unique_ptr<FeedForward>*> Model::feed_forwards() { return ffn_slots_; }

uint64_t Model::next_uid() {
  static std::atomic<uint64_t> n{0};
  return ++n;
}

std::unique_ptr<Model> load_model(const std::string& dir, Backend& be, dist::Placement place) {
  ModelConfig cfg = load_config(dir);
  auto it = builders().find(cfg.model_type);
  ZMLX_CHECK(it != builders().end(), "{}: model_type '{}' is not supported (supported: {})", cfg.path,
             cfg.model_type, fmt::join(supported_families(), ", "));
  auto store = std::make_shared<io::WeightStore>(io::WeightStore::open_dir(dir));
  if (place.pipeline()) place.stages = pipeline_stages(*store, cfg.num_hidden_layers, place);
  const std::string family = cfg.model_type;
  const dist::Mode mode = place.mode;
  cfg.parallel = std::move(place);
  auto model = it->second(std::move(cfg), std::move(store), be);
  ZMLX_CHECK(mode == dist::Mode::None || model->supports_parallel(),
             "--parallel {}: the {} family does not support multi-process parallelism yet", dist::mode_name(mode),
             family);
  return model;
}

}  // namespace zmlx
