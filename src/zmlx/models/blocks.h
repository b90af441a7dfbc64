// Feed-forward blocks shared by the families: the dense SwiGLU MLP and the
// mixture-of-experts block (router -> SwitchGLU experts -> weighted combine,
// plus an optional shared expert). The patch layer swaps these modules for
// fused equivalents (patch/), which is why layers hold them by pointer.
#pragma once
#include <memory>
#include <string>

#include "zmlx/ops/backend.h"

namespace zmlx {

// Grouped-query attention with per-head RMSNorm on q and k before RoPE
// (Qwen3 and LFM2): returns the output projection, to be added to h.
struct GqaAttention {
  Weight q_proj, k_proj, v_proj, o_proj;
  Tensor q_norm, k_norm;
  int64_t heads = 0, kv_heads = 0, head_dim = 0;
  float scale = 1.f, rope_theta = 10000.f, eps = 1e-6f;

  Tensor forward(Backend& be, const Tensor& x, KvLayer& cache, int64_t pos0) const;
};

// Multi-latent attention (GLM-4.7-Flash / mlx-lm glm4_moe_lite + mla.py,
// spec §2.2). The cache holds, per token, only the normalised kv latent
// (kv_lora_rank wide, as K of a one-head KvLayer) and the roped shared key
// (qk_rope_head_dim wide, as V). Two forms of the same math:
//   absorbed (decode, T == 1): q_lat = embed_q(q_nope); attention over the
//     latent cache as keys and values; o = unembed_out(o_lat)
//   expanded (prefill, T > 1): k_nope = latent @ embed_q, v = unembed_out(latent)
//     for every cached row, then ordinary attention.
// Both add the rotary term scale·q_pe·k_pe (traditional / interleaved RoPE).
struct MlaAttention {
  enum class Form { Auto, Absorbed, Expanded };  // Auto: MLX's choice (by T)
  Weight q_proj;                        // q_lora_rank == 0: [H*(dn+dr), D]
  Weight q_a_proj, q_b_proj;            // else [q_lora, D] and [H*(dn+dr), q_lora]
  Tensor q_a_layernorm;                 // [q_lora]
  Weight kv_a_proj_with_mqa;            // [kv_lora + dr, D]
  Tensor kv_a_layernorm;                // [kv_lora]
  Weight embed_q;                       // stacked per head [H, kv_lora, dn]
  Weight unembed_out;                   // stacked per head [H, dv, kv_lora]
  Weight o_proj;                        // [D, H*dv]
  int64_t heads = 0, kv_lora = 0, nope_dim = 0, rope_dim = 0, v_dim = 0;
  float scale = 1.f, rope_theta = 10000.f, eps = 1e-5f;
  Form form = Form::Auto;

  Tensor forward(Backend& be, const Tensor& x, KvLayer& cache, int64_t pos0) const;
};

class FeedForward {
 public:
  virtual ~FeedForward() = default;
  virtual Tensor forward(Backend& be, const Tensor& x) = 0;
  // "swiglu_mlp", "moe" (unfused) or a patched kind ("fused:moe_mlp", ...).
  virtual std::string kind() const = 0;
  std::string path;  // checkpoint module path, e.g. "model.layers.3.mlp"
};

// down(silu(gate(x)) * up(x))
class SwigluMlp : public FeedForward {
 public:
  Weight gate_proj, up_proj, down_proj;
  Tensor forward(Backend& be, const Tensor& x) override;
  std::string kind() const override { return "swiglu_mlp"; }
};

enum class RouterKind {
  SoftmaxTopK,      // Qwen3-MoE: softmax, top-k, optional renormalisation
  SigmoidBiasTopK,  // LFM2: sigmoid, top-k of sigmoid + expert_bias, renorm (+eps), x scaling
  SigmoidGroupedTopK,  // GLM: fp32 sigmoid, group-limited top-k of sigmoid + bias, renorm, x scaling (F32 scores)
};

class MoeBlock : public FeedForward {
 public:
  RouterKind router_kind = RouterKind::SoftmaxTopK;
  Weight router;                          // [E, D]
  Weight gate_proj, up_proj, down_proj;   // stacked experts [E, I, D] / [E, D, I]
  int64_t top_k = 0;
  bool norm_topk_prob = true;
  Tensor expert_bias;          // Sigmoid*: F32 [E], used for selection only
  float route_eps = 1e-6f;     // Sigmoid*: added to the renormalisation denominator
  float routed_scaling = 1.0f; // Sigmoid*: routed_scaling_factor
  int64_t n_group = 1, topk_group = 1;  // SigmoidGroupedTopK: group-limited selection
  CombineMode combine = CombineMode::Bf16Products;
  std::unique_ptr<SwigluMlp> shared_expert;  // GLM; null otherwise

  Tensor forward(Backend& be, const Tensor& x) override;
  std::string kind() const override { return "moe"; }
  Routing route(Backend& be, const Tensor& x) const;
  // The routing from the router's logits (route = route_logits of linear(x, router)).
  Routing route_logits(Backend& be, const Tensor& logits) const;
  // route_sigmoid_grouped_topk's parameters (router_kind SigmoidGroupedTopK).
  GroupedRouter grouped_router() const;
  // route_softmax_topk's or route_sigmoid_topk's parameters (the other kinds).
  TopKRouter topk_router() const;

 protected:
  // The expert computation for routed tokens -> [T, D]. The unfused form
  // (three gather_qmm calls, swiglu, combine) is the "unpatched" baseline.
  virtual Tensor experts(Backend& be, const Tensor& x, const Routing& r);
};

}  // namespace zmlx
