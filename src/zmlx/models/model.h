// Model: a loaded checkpoint of one family, as a tree of modules named like
// the checkpoint keys, run through a Backend. Families live in one file each
// (qwen3_moe.cpp, ...) and are listed in registry.cpp.
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "zmlx/io/safetensors.h"
#include "zmlx/models/blocks.h"
#include "zmlx/models/config.h"
#include "zmlx/ops/backend.h"

namespace zmlx {

// Everything a sequence carries between steps.
struct Cache {
  int64_t pos = 0;              // tokens already processed
  std::vector<KvLayer> kv;      // one per attention layer (qwen3); per layer, empty for conv layers (lfm2)
  std::vector<Tensor> conv;     // lfm2: per layer, the last L-1 conv inputs [L-1, C] (empty for attention layers)
};

// One row of `zmlx inspect`: a weight as stored.
struct WeightSummary {
  std::string path;
  std::vector<int64_t> shape;   // logical [experts?, rows, cols]
  bool quantized;
  int bits, group_size;
  uint64_t bytes;               // stored bytes (all experts)
  uint64_t bytes_per_token;     // bytes a decode step reads
  int64_t params, active_params;
};

class Model {
 public:
  virtual ~Model() = default;
  const ModelConfig& config() const { return config_; }
  virtual std::string family() const = 0;
  // Unique per loaded model in this process (never reused), e.g. to key
  // recorded decode steps.
  uint64_t uid() const { return uid_; }

  // Runs `ids` at positions cache.pos.. and advances the cache. Returns bf16
  // logits [1, V] for the last token, or [T, V] for all when all_logits.
  virtual Tensor forward(Backend& be, const std::vector<int32_t>& ids, Cache& cache,
                         bool all_logits = false) = 0;
  virtual Cache new_cache(Backend& be) const = 0;

  // The swappable feed-forward modules, in layer order (patch layer, inspect).
  std::vector<std::unique_ptr<FeedForward>*> feed_forwards();
  // Per-layer descriptions for inspect ("attention+moe", ...).
  virtual std::vector<std::string> layer_kinds() const = 0;
  const std::vector<WeightSummary>& weight_summaries() const { return summaries_; }
  // Where this rank sits in a multi-process run (dist/placement.h). Under
  // pipeline parallel, forward() returns an empty tensor on every stage but
  // the last.
  const dist::Placement& placement() const { return config_.parallel; }
  bool supports_parallel() const { return parallel_supported_; }

 protected:
  // The step every family's forward() runs around its blocks: this stage's
  // h (embedded, or received from the previous pipeline stage), then
  // block(l, h, f) for each of this rank's layers in order (f: the previous
  // block's output, which the block adds to h with its first norm,
  // tp_reduce_add_rms_norm; the block leaves its own output in f), then the
  // last add, the cache's position, the hand-off to the next stage and, on
  // the last, the final norm and the head (the last row's logits unless
  // all_logits). n_layers: the model's whole depth (the placement picks this
  // rank's share).
  using BlockFn = std::function<void(size_t l, Tensor& h, Tensor& f)>;
  Tensor forward_layers(Backend& be, const std::vector<int32_t>& ids, Cache& cache, bool all_logits,
                        const Weight& embed, const Tensor& norm, const Weight& lm_head, size_t n_layers,
                        const BlockFn& block);
  // forward_layers over pre-norm attention + feed-forward blocks (Qwen3,
  // GLM): each Layer has input_layernorm, attn.forward(be, x, kv, pos),
  // post_attention_layernorm and mlp.
  template <typename Layer>
  Tensor forward_attention_blocks(Backend& be, const std::vector<int32_t>& ids, Cache& cache, bool all_logits,
                                  const Weight& embed, const Tensor& norm, const Weight& lm_head,
                                  std::vector<Layer>& layers) {
    const float eps = config_.rms_norm_eps;
    const int64_t pos0 = cache.pos;
    return forward_layers(be, ids, cache, all_logits, embed, norm, lm_head, layers.size(),
                          [&](size_t l, Tensor& h, Tensor& f) {
                            Layer& L = layers[l];
                            Tensor x = tp_reduce_add_rms_norm(be, h, f, L.input_layernorm, eps);
                            Tensor a = L.attn.forward(be, x, cache.kv[l], pos0);
                            // tensor parallel: a and f are summed over the ranks' shards (heads,
                            // intermediate dimension) together with the residual add and the next norm.
                            f = L.mlp->forward(be, tp_reduce_add_rms_norm(be, h, a, L.post_attention_layernorm, eps));
                          });
  }

  // Parallel glue (models/parallel.cpp), no-ops in a single process:
  // the first stage embeds, later stages receive [T, D] from the previous one;
  bool stage_input(Backend& be, const std::vector<int32_t>& ids, const Weight& embed, Tensor& h);
  // a stage that is not the last sends h on and returns true;
  bool stage_output(Backend& be, const Tensor& h);
  // tensor parallel: t = Σ over ranks (the one all-reduce per block).
  void tp_reduce(Backend& be, Tensor& t);
  // The residual stream between blocks. h = bf16(h + x) and rms_norm(h)·w
  // (Backend::add_rms_norm), x (a block's output) first summed over the
  // tensor-parallel ranks: one GPU kernel for a decode row where the
  // transport offers it (Communicator::allreduce_add_rms_norm), else
  // tp_reduce + add_rms_norm; same bits either way. x empty (before a
  // stage's first block): rms_norm(h)·w.
  Tensor tp_reduce_add_rms_norm(Backend& be, Tensor& h, Tensor& x, const Tensor& w, float eps);
  // After a stage's last block: h = bf16(h + x), x summed over the ranks
  // first (nothing when x is empty).
  void tp_reduce_add(Backend& be, Tensor& h, Tensor& x);
  // Set by a family that honours config_.parallel; load_model refuses otherwise.
  bool parallel_supported_ = false;

  ModelConfig config_;
  std::shared_ptr<io::WeightStore> store_;
  std::vector<std::unique_ptr<FeedForward>*> ffn_slots_;
  std::vector<WeightSummary> summaries_;
  friend class WeightLoader;

 private:
  static uint64_t next_uid();
  const uint64_t uid_ = next_uid();
};

// Loads a model directory (already resolved) onto `be`. Unknown model_type
// is an error listing the supported families. With an active `place`, only
// this rank's layers (pipeline) or shards (tensor) are loaded.
std::unique_ptr<Model> load_model(const std::string& dir, Backend& be, dist::Placement place = {});
std::vector<std::string> supported_families();

}  // namespace zmlx
