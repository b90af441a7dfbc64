#include "zmlx/models/blocks.h"

namespace zmlx {

std::vector<Tensor> Backend::linear_multi(const Tensor& x, const std::vector<const Weight*>& w) {
  std::vector<Tensor> out;
  for (const Weight* m : w) out.push_back(linear(x, *m));
  return out;
}

int32_t Backend::argmax_row(const Tensor& logits, int64_t row) {
  Tensor h = to_host(logits);
  const int64_t V = h.cols();
  const uint16_t* p = h.ptr<uint16_t>() + row * V;
  int32_t best = 0;
  for (int64_t i = 1; i < V; ++i)
    if (bf16_to_f32(p[i]) > bf16_to_f32(p[best])) best = int32_t(i);
  return best;
}

Tensor Backend::add_rms_norm(Tensor& h, const Tensor& x, const Tensor& w, float eps) {
  add(h, x);
  return rms_norm(h, w, eps);
}

Tensor Backend::qk_norm_rope_cache(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& qn,
                                   const Tensor& kn, float eps, int64_t heads, int64_t kv_heads, int64_t hd,
                                   int64_t pos0, float base, bool traditional, KvLayer& cache) {
  Tensor qo = rms_norm(q, qn, eps);
  Tensor ko = rms_norm(k, kn, eps);
  rope(qo, heads, hd, 0, hd, pos0, base, traditional);
  rope(ko, kv_heads, hd, 0, hd, pos0, base, traditional);
  kv_write(cache, ko, v, pos0);
  return qo;
}

Tensor GqaAttention::forward(Backend& be, const Tensor& x, KvLayer& cache, int64_t pos0) const {
  auto qkv = be.linear_multi(x, {&q_proj, &k_proj, &v_proj});
  Tensor q = be.qk_norm_rope_cache(qkv[0], qkv[1], qkv[2], q_norm, k_norm, eps, heads, kv_heads, head_dim, pos0,
                                   rope_theta, /*traditional=*/false, cache);
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
