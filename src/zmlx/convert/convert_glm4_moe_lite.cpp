// glm4_moe_lite (Glm4MoeLiteForCausalLM, GLM-4.7-Flash): Hugging Face keys ->
// MLX keys, as mlx-lm's glm4_moe_lite.sanitize + nn.quantize produce them.
//
//  - model.layers.<n >= num_hidden_layers>.* is the multi-token-prediction
//    layer: dropped (mlx-lm does not run it).
//  - self_attn.kv_b_proj [H*(dn+dv), kv_lora] is split per head into
//    self_attn.embed_q [H, kv_lora, dn] (the first dn rows of every head,
//    transposed) and self_attn.unembed_out [H, dv, kv_lora] (the other dv rows),
//    both quantized like any Linear (MLX MultiLinear).
//  - routed experts, per expert (mlp.experts.E.{gate,up,down}_proj.weight) or
//    fused (mlp.experts.gate_up_proj [E, 2I, D] + mlp.experts.down_proj [E, D, I]),
//    are stacked into mlp.switch_mlp.{gate,up,down}_proj [E, out, in].
//  - the router mlp.gate.weight stays bf16 (mlx-lm's MoEGate is not a Linear,
//    so it is never quantized); mlp.gate.e_score_correction_bias stays F32
//    (excluded from the dtype cast).
//  - the dense layers (first_k_dense_replace) and the shared experts are
//    ordinary Linears.
#include <map>
#include <set>

#include "zmlx/convert/convert.h"
#include "zmlx/core/error.h"

namespace zmlx::convert {

namespace {

OutputTensor same(const io::TensorInfo& t, Role role) { return {t.name, t.shape, {{t.name}}, role}; }

}  // namespace

Plan plan_glm4_moe_lite(const PlanInput& in) {
  const io::WeightStore& ws = in.weights;
  const nlohmann::json& cfg = in.config;
  auto need = [&](const char* key) {
    const int64_t v = config_int(cfg, key, -1);
    ZMLX_CHECK(v > 0, "[convert glm4_moe_lite] config.json: '{}' missing or not positive", key);
    return v;
  };
  const int64_t n_layers = need("num_hidden_layers"), E = need("n_routed_experts"), H = need("num_attention_heads"),
                L = need("kv_lora_rank"), dn = need("qk_nope_head_dim"), dv = need("v_head_dim"),
                D = need("hidden_size"), I = need("moe_intermediate_size");

  static const std::set<std::string> kKeep = {
      "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_a_layernorm.weight",
      "self_attn.kv_a_layernorm.weight"};
  static const std::set<std::string> kLinear = {
      "self_attn.q_proj.weight",   "self_attn.q_a_proj.weight", "self_attn.q_b_proj.weight",
      "self_attn.kv_a_proj_with_mqa.weight", "self_attn.o_proj.weight", "mlp.gate_proj.weight",
      "mlp.up_proj.weight",        "mlp.down_proj.weight",      "mlp.shared_experts.gate_proj.weight",
      "mlp.shared_experts.up_proj.weight", "mlp.shared_experts.down_proj.weight"};

  Plan p;
  const ExpertLayout layout{
      .family = "glm4_moe_lite", .module = "mlp", .experts = E, .intermediate = I, .hidden = D, .aliases = {}};
  ExpertTensors experts;
  std::set<int64_t> routers, biases;
  for (const std::string& name : ws.names()) {
    const io::TensorInfo& t = ws.get(name);
    if (name == "model.embed_tokens.weight" || name == "lm_head.weight") {
      p.tensors.push_back(same(t, Role::Linear));
      continue;
    }
    if (name == "model.norm.weight") {
      p.tensors.push_back(same(t, Role::Keep));
      continue;
    }
    if (name.ends_with("rotary_emb.inv_freq")) {
      p.ignored[name] = "recomputed from rope_theta";
      continue;
    }
    int64_t layer = 0;
    std::string rest;
    if (!split_layer_key(name, "model.layers.", &layer, &rest)) continue;  // reported as unknown
    if (layer >= n_layers) {
      p.ignored[name] = "multi-token-prediction layer (mlx-lm drops it)";
      continue;
    }
    if (kKeep.count(rest)) {
      p.tensors.push_back(same(t, Role::Keep));
    } else if (kLinear.count(rest)) {
      p.tensors.push_back(same(t, Role::Linear));
    } else if (rest == "self_attn.kv_b_proj.weight") {
      ZMLX_CHECK(t.shape == std::vector<int64_t>({H * (dn + dv), L}),
                 "[convert glm4_moe_lite] '{}' in '{}': expected [num_attention_heads*(qk_nope_head_dim+v_head_dim), "
                 "kv_lora_rank] = [{}, {}], found {}", name, t.file, H * (dn + dv), L, t.shape_str());
      const std::string pre = fmt::format("model.layers.{}.self_attn.", layer);
      OutputTensor eq{pre + "embed_q.weight", {H, L, dn}, {}, Role::Linear};
      OutputTensor uo{pre + "unembed_out.weight", {H, dv, L}, {}, Role::Linear};
      for (int64_t h = 0; h < H; ++h) {
        const int64_t base = h * (dn + dv) * L;
        eq.pieces.push_back({name, base, dn * L, /*transpose_rows=*/dn});  // [dn, L] -> [L, dn]
        uo.pieces.push_back({name, base + dn * L, dv * L});
      }
      p.tensors.push_back(std::move(eq));
      p.tensors.push_back(std::move(uo));
    } else if (rest == "mlp.gate.weight") {
      ZMLX_CHECK(t.shape == std::vector<int64_t>({E, D}), "[convert glm4_moe_lite] router '{}': expected [{}, {}], "
                 "found {}", name, E, D, t.shape_str());
      p.tensors.push_back(same(t, Role::Keep));
      routers.insert(layer);
    } else if (rest == "mlp.gate.e_score_correction_bias") {
      ZMLX_CHECK(t.shape == std::vector<int64_t>({E}), "[convert glm4_moe_lite] '{}': expected [{}], found {}", name,
                 E, t.shape_str());
      OutputTensor o = same(t, Role::Keep);
      o.keep_dtype = DType::F32;
      p.tensors.push_back(std::move(o));
      biases.insert(layer);
    } else {
      collect_expert_tensor(name, layer, rest, layout, experts);
    }
  }

  plan_switch_experts(ws, experts, layout, p);
  check_routers_match_experts(routers, experts, layout, "mlp.gate.weight");
  for (int64_t layer : routers)
    ZMLX_CHECK(biases.count(layer), "[convert glm4_moe_lite] layer {} has a router but no "
               "'mlp.gate.e_score_correction_bias'", layer);
  return p;
}

}  // namespace zmlx::convert
