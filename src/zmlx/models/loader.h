// WeightLoader: builds Weights from checkpoint tensors, checking dtypes and
// shapes against the config, inferring bits and group size from the tensor
// shapes (spec §0.6) and cross-checking them with config["quantization"].
#pragma once
#include <memory>
#include <set>
#include <string>

#include "zmlx/core/log.h"
#include "zmlx/io/safetensors.h"
#include "zmlx/models/blocks.h"
#include "zmlx/models/model.h"

namespace zmlx {

// Tensor parallel: which slice of a matrix this rank holds. Rows: output
// features [i·R/n, (i+1)·R/n) of every expert; Cols: input features, whose
// boundaries must fall on quantization groups; Stack: whole matrices
// [i·E/n, (i+1)·E/n) of a stacked [E, R, C] weight (GLM's per-head embed_q /
// unembed_out, split by head).
struct Shard {
  enum Axis { None, Rows, Cols, Stack } axis = None;
  int index = 0, count = 1;
};

class WeightLoader {
 public:
  WeightLoader(Model& model, std::shared_ptr<io::WeightStore> store, Backend& be);

  // A Linear / Embedding (experts == 0) or stacked SwitchLinear (experts > 0)
  // with logical shape [experts?, rows, cols]. Quantized iff "<path>.scales"
  // exists, as in mlx-lm. `active_experts` (k of E) feeds inspect's
  // bytes-per-token figure.
  Weight linear(const std::string& path, int64_t rows, int64_t cols, int64_t experts = 0,
                int64_t active_experts = 0, bool reads_one_row = false, Shard shard = {});
  // The same checks and bookkeeping, but the weight stays the checkpoint's
  // host view (for weights a family transforms at load, e.g. GLM's kv_b_proj).
  Weight linear_on_host(const std::string& path, int64_t rows, int64_t cols);
  // A plain tensor (norm weights, biases) of the given dtype and shape.
  Tensor tensor(const std::string& name, DType dtype, const std::vector<int64_t>& shape);
  bool has(const std::string& name) const { return store_->has(name); }

  // Module-level helpers shared by the families.
  // gate_proj / up_proj / down_proj under `prefix`.
  // With tp_count > 1 (tensor parallel), shard tp_index holds 1/tp_count of
  // the intermediate features: gate/up rows, down columns.
  std::unique_ptr<SwigluMlp> swiglu_mlp(const std::string& prefix, int64_t inter, int64_t dim, int tp_index = 0,
                                        int tp_count = 1);
  // switch_mlp.{gate,up,down}_proj under `prefix` into `moe` (k of E active).
  void switch_experts(MoeBlock& moe, const std::string& prefix, int64_t experts, int64_t inter, int64_t dim,
                      int64_t k, int tp_index = 0, int tp_count = 1);
  // q/k/v/o projections and q/k norms of a GQA block (names differ per family).
  GqaAttention gqa_attention(const std::string& prefix, const char* o_name, const char* q_norm_name,
                             const char* k_norm_name, int64_t heads, int64_t kv_heads, int64_t head_dim,
                             int64_t dim, int tp_index = 0, int tp_count = 1);
  // The output projection: lm_head, or (when `may_tie` and the checkpoint has
  // no lm_head) the embedding table itself.
  Weight output_projection(const Weight& embed, int64_t vocab, int64_t dim, bool may_tie);
  // Marks every tensor under `prefix` as belonging to another rank (pipeline:
  // not loaded here, not reported as unused).
  void skip(const std::string& prefix);
  // Throws when checkpoint tensors belong to no module (as mlx-lm's strict load).
  void check_all_used() const;
  // Tensors in the checkpoint that no module claimed (reported, not fatal).
  std::vector<std::string> unused() const;

 private:
  Weight load_linear(const std::string& path, int64_t rows, int64_t cols, int64_t experts, int64_t active_experts,
                     bool reads_one_row, Shard shard, bool adopt);
  Tensor view(const io::TensorInfo& info);
  Model& model_;
  std::shared_ptr<io::WeightStore> store_;
  Backend& be_;
  std::set<std::string> used_;
  std::unique_ptr<Progress> progress_;  // on a terminal: bytes of weights made ready
};

}  // namespace zmlx
