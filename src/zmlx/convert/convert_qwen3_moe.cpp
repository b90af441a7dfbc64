// qwen3_moe (Qwen3MoeForCausalLM): Hugging Face keys -> MLX keys, as
// mlx-lm's qwen3_moe.sanitize + nn.quantize produce them.
//
// Source layouts accepted for the routed experts of layer N:
//  - per expert (what transformers 4.x saves, and what 5.x save_pretrained
//    writes by default, save_original_format=True):
//      model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight   [I, D] / [D, I]
//  - fused (transformers 5.x in-memory Qwen3MoeExperts, written when saving
//    with save_original_format=False; its conversion_mapping builds it with
//    MergeModulelist(dim=0) + Concatenate(dim=1) of [gate, up]):
//      model.layers.N.mlp.experts.gate_up_proj   [E, 2*I, D]  (rows 0..I-1 gate, I..2I-1 up)
//      model.layers.N.mlp.experts.down_proj      [E, D, I]
// Output: model.layers.N.mlp.switch_mlp.{gate,up,down}_proj.weight [E, out, in].
// Layers listed in mlp_only_layers (or skipped by decoder_sparse_step) have a
// dense MLP: model.layers.N.mlp.{gate,up,down}_proj.weight, kept as is.
#include <map>
#include <set>

#include "zmlx/convert/convert.h"
#include "zmlx/core/error.h"

namespace zmlx::convert {

namespace {

OutputTensor same(const io::TensorInfo& t, Role role) { return {t.name, t.shape, {{t.name}}, role}; }

// Per-layer tensors (key after "model.layers.N.") kept as they are, and the
// Linears that get quantized: the same in the MoE and the dense family.
const std::set<std::string> kKeep = {
    "input_layernorm.weight",  "post_attention_layernorm.weight", "self_attn.q_norm.weight",
    "self_attn.k_norm.weight", "self_attn.q_proj.bias",           "self_attn.k_proj.bias",
    "self_attn.v_proj.bias",   "self_attn.o_proj.bias"};
const std::set<std::string> kLinear = {
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.o_proj.weight", "mlp.gate_proj.weight",    "mlp.up_proj.weight",
    "mlp.down_proj.weight"};

// The tensors both Qwen3 families share (embedding, head, final norm, RoPE
// buffer, attention and dense-MLP tensors): planned here, returning true.
// Anything else (experts, routers, unknown names) returns false; `layer` and
// `rest` are set for per-layer keys.
bool plan_shared(const io::TensorInfo& t, bool tied, int64_t n_layers, const char* family, Plan& p, int64_t* layer,
                 std::string* rest) {
  const std::string& name = t.name;
  *layer = -1;
  if (name == "model.embed_tokens.weight") {
    p.tensors.push_back(same(t, Role::Linear));
  } else if (name == "lm_head.weight") {
    if (tied) p.ignored[name] = "tie_word_embeddings: the embedding is the output head";
    else p.tensors.push_back(same(t, Role::Linear));
  } else if (name == "model.norm.weight") {
    p.tensors.push_back(same(t, Role::Keep));
  } else if (name.ends_with("rotary_emb.inv_freq")) {
    p.ignored[name] = "recomputed from rope_theta";
  } else {
    if (!split_layer_key(name, "model.layers.", layer, rest)) {
      *layer = -1;
      return false;  // reported as unknown
    }
    ZMLX_CHECK(*layer < n_layers, "[convert {}] tensor '{}' belongs to layer {}, but config.json has "
               "num_hidden_layers = {}", family, name, *layer, n_layers);
    if (kKeep.count(*rest)) p.tensors.push_back(same(t, Role::Keep));
    else if (kLinear.count(*rest)) p.tensors.push_back(same(t, Role::Linear));
    else return false;
  }
  return true;
}

}  // namespace

Plan plan_qwen3_moe(const PlanInput& in) {
  const io::WeightStore& ws = in.weights;
  const nlohmann::json& cfg = in.config;
  const int64_t n_layers = config_int(cfg, "num_hidden_layers", -1);
  ZMLX_CHECK(n_layers > 0, "[convert qwen3_moe] config.json: 'num_hidden_layers' missing or not positive");
  // transformers 5 writes num_local_experts in some versions, num_experts in others.
  int64_t n_experts = config_int(cfg, "num_experts", -1);
  if (n_experts < 0) n_experts = config_int(cfg, "num_local_experts", -1);
  ZMLX_CHECK(n_experts > 0, "[convert qwen3_moe] config.json: 'num_experts' (or 'num_local_experts') missing or "
             "not positive");
  const int64_t hidden = config_int(cfg, "hidden_size", -1);
  const int64_t inter = config_int(cfg, "moe_intermediate_size", -1);
  const bool tied = config_bool(cfg, "tie_word_embeddings", false);

  Plan p;
  const ExpertLayout layout{
      .family = "qwen3_moe", .module = "mlp", .experts = n_experts, .intermediate = inter, .hidden = hidden,
      .aliases = {}};
  ExpertTensors experts;
  std::set<int64_t> routers;

  for (const std::string& name : ws.names()) {
    const io::TensorInfo& t = ws.get(name);
    int64_t layer = 0;
    std::string rest;
    if (plan_shared(t, tied, n_layers, "qwen3_moe", p, &layer, &rest) || layer < 0) continue;  // < 0: unknown
    if (rest == "mlp.gate.weight") {
      ZMLX_CHECK(t.shape.size() == 2 && t.shape[0] == n_experts,
                 "[convert qwen3_moe] router '{}' in '{}': expected [{}, hidden], found {}", name, t.file,
                 n_experts, t.shape_str());
      p.tensors.push_back(same(t, Role::Router));
      routers.insert(layer);
    } else {
      collect_expert_tensor(name, layer, rest, layout, experts);
    }
  }

  plan_switch_experts(ws, experts, layout, p);
  check_routers_match_experts(routers, experts, layout, "mlp.gate.weight");
  return p;
}

// Dense Qwen3 (model_type "qwen3", Qwen3ForCausalLM): the same names with a
// SwiGLU MLP in every layer; nothing is stacked, the tied head is dropped.
Plan plan_qwen3(const PlanInput& in) {
  const int64_t n_layers = config_int(in.config, "num_hidden_layers", -1);
  ZMLX_CHECK(n_layers > 0, "[convert qwen3] config.json: 'num_hidden_layers' missing or not positive");
  const bool tied = config_bool(in.config, "tie_word_embeddings", false);
  Plan p;
  int64_t layer = 0;
  std::string rest;
  for (const std::string& name : in.weights.names())
    plan_shared(in.weights.get(name), tied, n_layers, "qwen3", p, &layer, &rest);  // the rest: unknown
  return p;
}

}  // namespace zmlx::convert
