// lfm2_moe (Lfm2MoeForCausalLM, LFM2-8B-A1B): Hugging Face keys -> MLX keys,
// as mlx-lm's lfm2_moe.sanitize + nn.quantize produce them.
//
//  - feed_forward.{w1,w3,w2} (HF names) -> feed_forward.{gate,up,down}_proj
//    (dense layers below num_dense_layers);
//  - routed experts, per expert (feed_forward.experts.E.{w1,w3,w2} or
//    .{gate,up,down}_proj) or fused (experts.gate_up_proj [E, 2I, D] +
//    experts.down_proj [E, D, I]) -> feed_forward.switch_mlp.{gate,up,down}_proj;
//  - conv.conv.weight: HF Conv1d [D, 1, L] -> MLX [D, L, 1] (the same bytes);
//  - the router feed_forward.gate is quantized with 8 bits, group 64, by
//    default (mlx-lm's quant_predicate for this family; Family::router_bits);
//    feed_forward.expert_bias stays F32;
//  - the output head is tied to the embedding (mlx-lm always ties): a stored
//    lm_head.weight is not converted.
#include <map>
#include <set>

#include "zmlx/convert/convert.h"
#include "zmlx/core/error.h"

namespace zmlx::convert {

namespace {

OutputTensor same(const io::TensorInfo& t, Role role) { return {t.name, t.shape, {{t.name}}, role}; }

const std::map<std::string, std::string>& kProjNames() {
  static const std::map<std::string, std::string> m = {
      {"w1", "gate_proj"}, {"w3", "up_proj"}, {"w2", "down_proj"},
      {"gate_proj", "gate_proj"}, {"up_proj", "up_proj"}, {"down_proj", "down_proj"}};
  return m;
}

}  // namespace

Plan plan_lfm2_moe(const PlanInput& in) {
  const io::WeightStore& ws = in.weights;
  const nlohmann::json& cfg = in.config;
  auto need = [&](const char* key) {
    const int64_t v = config_int(cfg, key, -1);
    ZMLX_CHECK(v > 0, "[convert lfm2_moe] config.json: '{}' missing or not positive", key);
    return v;
  };
  const int64_t n_layers = need("num_hidden_layers"), E = need("num_experts"), D = need("hidden_size"),
                I = need("moe_intermediate_size");

  static const std::set<std::string> kKeep = {"operator_norm.weight", "ffn_norm.weight",
                                              "self_attn.q_layernorm.weight", "self_attn.k_layernorm.weight"};
  static const std::set<std::string> kLinear = {"self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                "self_attn.v_proj.weight", "self_attn.out_proj.weight",
                                                "conv.in_proj.weight", "conv.out_proj.weight"};
  Plan p;
  const ExpertLayout layout{.family = "lfm2_moe",
                            .module = "feed_forward",
                            .experts = E,
                            .intermediate = I,
                            .hidden = D,
                            .aliases = kProjNames()};  // w1/w3/w2 = gate/up/down
  ExpertTensors experts;
  std::set<int64_t> routers;
  for (const std::string& name : ws.names()) {
    const io::TensorInfo& t = ws.get(name);
    if (name == "model.embed_tokens.weight") {
      p.tensors.push_back(same(t, Role::Linear));
      continue;
    }
    if (name == "lm_head.weight") {
      p.ignored[name] = "mlx-lm ties the output head to the embedding";
      continue;
    }
    if (name == "model.embedding_norm.weight") {
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
    ZMLX_CHECK(layer < n_layers, "[convert lfm2_moe] tensor '{}' belongs to layer {}, but config.json has "
               "num_hidden_layers = {}", name, layer, n_layers);
    const std::string pre = fmt::format("model.layers.{}.", layer);
    if (kKeep.count(rest)) {
      p.tensors.push_back(same(t, Role::Keep));
    } else if (kLinear.count(rest)) {
      p.tensors.push_back(same(t, Role::Linear));
    } else if (rest == "conv.conv.weight") {
      ZMLX_CHECK(t.shape.size() == 3 && t.shape[0] == D && (t.shape[1] == 1 || t.shape[2] == 1),
                 "[convert lfm2_moe] '{}': expected a depthwise kernel [{}, 1, L], found {}", name, D, t.shape_str());
      const int64_t L = t.shape[1] == 1 ? t.shape[2] : t.shape[1];
      p.tensors.push_back({name, {D, L, 1}, {{name}}, Role::Keep});  // [D, 1, L] and [D, L, 1]: same bytes
    } else if (rest == "feed_forward.gate.weight") {
      ZMLX_CHECK(t.shape == std::vector<int64_t>({E, D}), "[convert lfm2_moe] router '{}': expected [{}, {}], "
                 "found {}", name, E, D, t.shape_str());
      p.tensors.push_back(same(t, Role::Router));
      routers.insert(layer);
    } else if (rest == "feed_forward.expert_bias") {
      OutputTensor o = same(t, Role::Keep);
      o.keep_dtype = DType::F32;
      p.tensors.push_back(std::move(o));
    } else if (collect_expert_tensor(name, layer, rest, layout, experts)) {
      // an expert's projection (stacked below)
    } else if (rest.starts_with("feed_forward.") && rest.ends_with(".weight")) {
      auto it = kProjNames().find(rest.substr(13, rest.size() - 13 - 7));
      if (it != kProjNames().end())  // dense layer: w1/w3/w2 -> gate/up/down
        p.tensors.push_back({pre + "feed_forward." + it->second + ".weight", t.shape, {{name}}, Role::Linear});
    }
  }

  plan_switch_experts(ws, experts, layout, p);
  check_routers_match_experts(routers, experts, layout, "feed_forward.gate.weight");
  return p;
}

}  // namespace zmlx::convert
