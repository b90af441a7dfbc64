// WeightLoader: builds Weights from checkpoint tensors, checking dtypes and
// shapes against the config, inferring bits and group size from the tensor
// shapes (spec §0.6) and cross-checking them with config["quantization"].
#pragma once
#include <memory>
#include <set>
#include <string>

#include "zmlx/core/log.h"
#include "zmlx/io/safetensors.h"
#include "zmlx/models/model.h"

namespace zmlx {

class WeightLoader {
 public:
  WeightLoader(Model& model, std::shared_ptr<io::WeightStore> store, Backend& be);

  // A Linear / Embedding (experts == 0) or stacked SwitchLinear (experts > 0)
  // with logical shape [experts?, rows, cols]. Quantized iff "<path>.scales"
  // exists, as in mlx-lm. `active_experts` (k of E) feeds inspect's
  // bytes-per-token figure.
  Weight linear(const std::string& path, int64_t rows, int64_t cols, int64_t experts = 0,
                int64_t active_experts = 0, bool reads_one_row = false);
  // A plain tensor (norm weights, biases) of the given dtype and shape.
  Tensor tensor(const std::string& name, DType dtype, const std::vector<int64_t>& shape);
  bool has(const std::string& name) const { return store_->has(name); }
  // Tensors in the checkpoint that no module claimed (reported, not fatal).
  std::vector<std::string> unused() const;

 private:
  Tensor view(const io::TensorInfo& info);
  Model& model_;
  std::shared_ptr<io::WeightStore> store_;
  Backend& be_;
  std::set<std::string> used_;
  std::unique_ptr<Progress> progress_;  // on a terminal: bytes of weights made ready
};

}  // namespace zmlx
