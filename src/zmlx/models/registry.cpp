#include <fmt/format.h>

#include <functional>
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

std::vector<std::unique_ptr<FeedForward>*> Model::feed_forwards() { return ffn_slots_; }

std::unique_ptr<Model> load_model(const std::string& dir, Backend& be) {
  ModelConfig cfg = load_config(dir);
  auto it = builders().find(cfg.model_type);
  ZMLX_CHECK(it != builders().end(), "{}: model_type '{}' is not supported (supported: {})", cfg.path,
             cfg.model_type, fmt::join(supported_families(), ", "));
  auto store = std::make_shared<io::WeightStore>(io::WeightStore::open_dir(dir));
  return it->second(std::move(cfg), std::move(store), be);
}

}  // namespace zmlx
