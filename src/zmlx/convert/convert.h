// `zmlx convert`: a Hugging Face transformers checkpoint -> the mlx-community
// MLX layout, as mlx_lm.convert produces it:
//   1. every weight is cast to bf16;
//   2. a per-family plan renames keys and stacks experts
//      (experts.E.{gate,up,down}_proj -> switch_mlp.{gate,up,down}_proj [E, out, in]);
//   3. Linear / Embedding / SwitchLinear weights whose last dimension divides
//      the group size are quantized (MLX affine, quant/affine.h); norms stay bf16;
//   4. config.json gets "quantization" and "quantization_config", tokenizer and
//      generation files are copied, weights are written in 5 GB shards.
//
// A family is one function that maps source tensors to output tensors
// (convert_<family>.cpp) plus one line in the table in convert.cpp. Output
// tensors are built from element ranges of source tensors laid end to end,
// which covers renaming, expert stacking, splitting fused tensors and
// reshapes without any per-family numeric code.
#pragma once
#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "zmlx/io/safetensors.h"
#include "zmlx/quant/affine.h"

namespace zmlx::convert {

// ---- the plan a family produces ----

// A contiguous run of elements of a source tensor (row-major). count < 0: to the end.
// transpose_rows > 0: the run is a row-major [transpose_rows, count / transpose_rows]
// block that is emitted transposed (e.g. GLM's kv_b_proj -> embed_q swapaxes).
struct Piece {
  std::string source;
  int64_t offset = 0;
  int64_t count = -1;
  int64_t transpose_rows = 0;
};

enum class Role {
  Keep,    // stays bf16 (norms, biases, conv kernels, ...)
  Linear,  // weight of a Linear / Embedding / SwitchLinear: quantized along the last axis
  Router,  // a Linear that --quant-router-bits may quantize with other bits
};

struct OutputTensor {
  std::string name;             // logical key, e.g. "model.layers.0.mlp.switch_mlp.up_proj.weight"
  std::vector<int64_t> shape;   // logical shape; numel == sum of the pieces' counts
  std::vector<Piece> pieces;    // concatenated in order
  Role role = Role::Keep;
  // Stored dtype of a Keep tensor: BF16 (the cast mlx-lm applies), or F32 for
  // tensors mlx-lm excludes from the cast (e.g. GLM's e_score_correction_bias).
  DType keep_dtype = DType::BF16;
};

struct Plan {
  std::vector<OutputTensor> tensors;
  // Source tensors deliberately not converted, with the reason (every other
  // source tensor must feed some output, or the conversion fails).
  std::map<std::string, std::string> ignored;
};

// Everything a family's plan function may look at.
struct PlanInput {
  const io::WeightStore& weights;
  const nlohmann::json& config;
};

using PlanFn = Plan (*)(const PlanInput&);

struct Family {
  std::string_view model_type;    // config.json "model_type"
  std::string_view architecture;  // for messages, e.g. "Qwen3MoeForCausalLM"
  PlanFn plan;
  // Router bits when --quant-router-bits is not given (0: like every other
  // Linear); e.g. 8 for lfm2_moe, whose mlx-lm quant_predicate does that.
  int router_bits = 0;
};

// Plan functions, one per family file.
Plan plan_qwen3_moe(const PlanInput& in);      // convert_qwen3_moe.cpp
Plan plan_qwen3(const PlanInput& in);          // convert_qwen3_moe.cpp (dense Qwen3)
Plan plan_glm4_moe_lite(const PlanInput& in);  // convert_glm4_moe_lite.cpp
Plan plan_lfm2_moe(const PlanInput& in);       // convert_lfm2_moe.cpp

// The family table (convert.cpp).
const std::vector<Family>& families();
const Family* find_family(std::string_view model_type);

// ---- helpers for plan functions ----

// Config integer/bool with a default; throws zmlx::Error naming the field on a wrong type.
int64_t config_int(const nlohmann::json& config, const char* key, int64_t fallback);
bool config_bool(const nlohmann::json& config, const char* key, bool fallback);
// "model.layers.12.mlp.gate.weight" -> layer 12, rest "mlp.gate.weight". False if not a layer key.
bool split_layer_key(std::string_view name, std::string_view prefix, int64_t* layer, std::string* rest);
// "[2048, 768]"
std::string shape_str(const std::vector<int64_t>& shape);

// The expert tensors of a checkpoint's MoE layers, as a family's planner
// collects them: one tensor per expert and projection, or transformers 5.x's
// fused per-layer tensors.
struct ExpertTensors {
  // layer -> projection (gate_proj / up_proj / down_proj) -> expert -> source tensor
  std::map<int64_t, std::map<std::string, std::map<int64_t, std::string>>> per_expert;
  // layer -> {gate_up_proj, down_proj} -> source tensor ([E, 2I, D] and [E, D, I])
  std::map<int64_t, std::map<std::string, std::string>> fused;
};
struct ExpertLayout {
  std::string family;         // for messages: "[convert FAMILY] ..."
  std::string module;         // "mlp" or "feed_forward": sources model.layers.N.<module>.experts...,
                              // outputs model.layers.N.<module>.switch_mlp.<proj>.weight
  int64_t experts = 0;        // E
  int64_t intermediate = -1;  // I (moe_intermediate_size); -1: taken from the tensors
  int64_t hidden = -1;        // D (hidden_size); likewise
  // Checkpoint names of a projection besides gate_proj / up_proj / down_proj
  // (LFM2: w1, w3, w2); both spellings are accepted, not mixed.
  std::map<std::string, std::string> aliases;
};
// If `rest` (the key after "model.layers.<layer>.") is an expert tensor of
// this layout, records it and returns true.
bool collect_expert_tensor(const std::string& name, int64_t layer, const std::string& rest, const ExpertLayout& layout,
                           ExpertTensors& experts);
// Appends MLX's stacked [E, out, in] switch_mlp tensors of every MoE layer:
// per-expert tensors stacked in expert order, a fused gate_up split into gate
// and up, a fused down as it is. Every layer needs all E experts, one form
// only, and the configured shapes; errors name the tensor and the expectation.
void plan_switch_experts(const io::WeightStore& ws, const ExpertTensors& experts, const ExpertLayout& layout,
                         Plan& p);
// Every layer with a router has expert tensors, and every layer with expert
// tensors has a router (`router` names it for messages, e.g. "mlp.gate.weight").
void check_routers_match_experts(const std::set<int64_t>& routers, const ExpertTensors& experts,
                                 const ExpertLayout& layout, const std::string& router);

// ---- running a conversion ----

struct ConvertOptions {
  std::string source;   // HF directory or repo id in the HF cache
  std::string output;   // must not exist, or be an empty directory
  bool quantize = true; // false: plain bf16 (--dtype bf16)
  quant::QuantParams q{4, 64};
  int router_bits = 0;  // 0: the family's default (Family::router_bits); else {bits, group 64}
  uint64_t max_shard_bytes = 5ull << 30;
  bool progress = true;  // bar on a terminal
};

struct ConvertResult {
  std::string source_dir, family;
  size_t tensors_in = 0, tensors_out = 0, quantized_modules = 0, bf16_tensors = 0;
  uint64_t bytes_out = 0;
  std::vector<std::string> copied_files;
  std::vector<std::string> unquantized_linears;  // last dim not divisible by the group size
};

ConvertResult convert(const ConvertOptions& opt);
// The same with a given family, whatever config.json's model_type says
// (for tests of the generic machinery and for trying out a new family).
ConvertResult convert_as(const ConvertOptions& opt, const Family& family);

}  // namespace zmlx::convert
