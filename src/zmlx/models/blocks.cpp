#include "zmlx/models/blocks.h"

namespace zmlx {

std::vector<Tensor> Backend::linear_multi(const Tensor& x, const std::vector<const Weight*>& w) {
  std::vector<Tensor> out;
  for (const Weight* m : w) out.push_back(linear(x, *m));
  return out;
}

Tensor GqaAttention::forward(Backend& be, const Tensor& x, KvLayer& cache, int64_t pos0) const {
  auto qkv = be.linear_multi(x, {&q_proj, &k_proj, &v_proj});
  Tensor q = be.rms_norm(qkv[0], q_norm, eps);
  Tensor k = be.rms_norm(qkv[1], k_norm, eps);
  be.rope(q, heads, head_dim, 0, head_dim, pos0, rope_theta, /*traditional=*/false);
  be.rope(k, kv_heads, head_dim, 0, head_dim, pos0, rope_theta, /*traditional=*/false);
  be.kv_write(cache, k, qkv[2], pos0);
  return be.linear(be.attention(q, cache, pos0, heads, kv_heads, head_dim, scale), o_proj);
}

Tensor SwigluMlp::forward(Backend& be, const Tensor& x) {
  Tensor gate = be.linear(x, gate_proj);
  Tensor up = be.linear(x, up_proj);
  return be.linear(be.swiglu(gate, up), down_proj);
}

Routing MoeBlock::route(Backend& be, const Tensor& x) const {
  Tensor logits = be.linear(x, router);
  if (router_kind == RouterKind::SigmoidBiasTopK)
    return be.route_sigmoid_topk(logits, expert_bias, top_k, norm_topk_prob, route_eps, routed_scaling);
  return be.route_softmax_topk(logits, top_k, norm_topk_prob);
}

Tensor MoeBlock::experts(Backend& be, const Tensor& x, const Routing& r) {
  Tensor up = be.gather_qmm(x, up_proj, r);      // [T, k, I]
  Tensor gate = be.gather_qmm(x, gate_proj, r);  // [T, k, I]
  Tensor h = be.swiglu(gate, up);
  Tensor y = be.gather_qmm(h, down_proj, r);     // [T, k, D], one down_proj per slot
  return be.moe_combine(y, r, combine);
}

Tensor MoeBlock::forward(Backend& be, const Tensor& x) {
  const Routing r = route(be, x);
  Tensor out = experts(be, x, r);
  if (shared_expert) be.add(out, shared_expert->forward(be, x));
  return out;
}

}  // namespace zmlx
