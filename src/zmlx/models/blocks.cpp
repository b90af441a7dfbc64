#include "zmlx/models/blocks.h"

#include <tuple>

#include "zmlx/core/error.h"
#include "zmlx/gen/sampler.h"

namespace zmlx {

// The GLM ops a backend may not have (yet): a clear error, never a crash.
Tensor Backend::attention_pe(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t,
                             int64_t, int64_t, float, int64_t) {
  fail("attention_pe (multi-latent attention) is not implemented on the {} backend", name());
}
Tensor Backend::multi_linear(const Tensor&, const Weight& w, bool) {
  fail("{}: multi_linear (per-head matmuls) is not implemented on the {} backend", w.name, name());
}
Tensor Backend::slice_cols(const Tensor&, int64_t, int64_t, int64_t) {
  fail("slice_cols is not implemented on the {} backend", name());
}
KvLayer Backend::new_latent_kv_layer(int64_t, int64_t, int64_t) {
  fail("new_latent_kv_layer (multi-latent attention cache) is not implemented on the {} backend", name());
}
Routing Backend::route_sigmoid_grouped_topk(const Tensor&, const Tensor&, int64_t, int64_t, int64_t, bool, float,
                                            float) {
  fail("route_sigmoid_grouped_topk (GLM router) is not implemented on the {} backend", name());
}

std::vector<Tensor> Backend::linear_multi(const Tensor& x, const std::vector<const Weight*>& w) {
  std::vector<Tensor> out;
  for (const Weight* m : w) out.push_back(linear(x, *m));
  return out;
}

// Gate+up first, so the router's linear stays the op just before the
// routing, as in the unfused block (the CUDA backend stages the experts'
// input early on that pattern).
std::pair<Tensor, Tensor> Backend::linear_and_swiglu(const Tensor& x, const Weight& w, const Weight& gate,
                                                     const Weight& up) {
  Tensor h = linear_swiglu(x, gate, up);
  return {linear(x, w), std::move(h)};
}

std::pair<Tensor, Tensor> Backend::linear_mla_rope_split_cache(const Tensor& x, const Weight& q_b, const Tensor& ckv,
                                                                const Tensor& kv_norm, float eps, int64_t heads,
                                                                int64_t nope_dim, int64_t rope_dim, int64_t pos0,
                                                                float base, KvLayer& cache) {
  return mla_rope_split_cache(linear(x, q_b), ckv, kv_norm, eps, heads, nope_dim, rope_dim, pos0, base, cache);
}

Tensor Backend::linear_short_conv(const Tensor& x, const Weight& in_proj, Tensor& state, const Tensor& w) {
  return short_conv(linear(x, in_proj), state, w);
}

std::pair<Routing, Tensor> Backend::linear_route_grouped_and_swiglu(const Tensor& x, const Weight& w,
                                                                    const GroupedRouter& r, const Weight& gate,
                                                                    const Weight& up) {
  ZMLX_CHECK(r.bias != nullptr, "linear_route_grouped_and_swiglu: the grouped router needs its expert bias");
  auto [logits, h] = linear_and_swiglu(x, w, gate, up);
  return {route_sigmoid_grouped_topk(logits, *r.bias, r.k, r.n_group, r.topk_group, r.normalize, r.eps, r.scaling),
          std::move(h)};
}

Routing Backend::route_topk(const Tensor& logits, const TopKRouter& r) {
  if (!r.sigmoid) return route_softmax_topk(logits, r.k, r.normalize);
  ZMLX_CHECK(r.bias != nullptr, "route_topk: the sigmoid router needs its expert bias");
  return route_sigmoid_topk(logits, *r.bias, r.k, r.normalize, r.eps, r.scaling);
}

Routing Backend::linear_route(const Tensor& x, const Weight& w, const TopKRouter& r) {
  return route_topk(linear(x, w), r);
}

Tensor Backend::gather_qmm_combine_shared(const Tensor& h, const Weight& down, const Routing& r, CombineMode mode,
                                          const Tensor& shared_h, const Weight& shared_down) {
  Tensor out = gather_qmm_combine(h, down, r, mode);
  add(out, linear(shared_h, shared_down));
  return out;
}

Routing Backend::new_routing(const Tensor& logits, int64_t k, DType score_dtype, const Tensor* bias, int64_t n_group,
                             int64_t topk_group) {
  const int64_t T = logits.rows(), E = logits.cols();
  ZMLX_CHECK(logits.dtype == DType::BF16, "router: logits must be bf16, got {}", dtype_name(logits.dtype));
  ZMLX_CHECK(k >= 1 && k <= E, "router: top-{} of {} experts", k, E);
  if (bias)
    ZMLX_CHECK(bias->dtype == DType::F32 && bias->numel() == E,
               "router: the expert (correction) bias must be F32 [{}], got {} with {} values", E,
               dtype_name(bias->dtype), bias->numel());
  ZMLX_CHECK(n_group >= 1 && E % n_group == 0 && topk_group >= 1 && topk_group <= n_group &&
                 (n_group == 1 || E / n_group >= 2),
             "router: n_group {} / topk_group {} do not fit {} experts", n_group, topk_group, E);
  Routing r;
  r.k = k;
  r.experts = alloc(DType::I32, {T, k});
  r.scores = alloc(score_dtype, {T, k});
  return r;
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

void Backend::decode_step_chained(uint64_t key, int32_t token, int64_t pos,
                                  const std::function<Tensor(int32_t)>& step) {
  if (token < 0) token = chained_token(pos - 1);
  const Tensor logits = decode_step(key, token, pos, [&] { return step(token); });
  chained_results_[pos & 3] = {pos, argmax_row(logits, 0)};
}

int32_t Backend::chained_token(int64_t pos) {
  const ChainedResult& r = chained_results_[pos & 3];
  ZMLX_CHECK(pos >= 0 && r.pos == pos, "chained_token({}): no chained step ran at that position (or it is older "
             "than the last four)", pos);
  return r.token;
}

int32_t Backend::sample_row(const Tensor& logits, int64_t row, const sampling::Params& p,
                            std::span<const int32_t> window, std::span<const int32_t> output, uint64_t draw) {
  Tensor h = to_host(logits);
  const int64_t V = h.cols();
  ZMLX_CHECK(h.dtype == DType::BF16 && row >= 0 && row < h.rows(), "sample_row: row {} of {} bf16 logits rows", row,
             h.rows());
  const uint16_t* src = h.ptr<uint16_t>() + row * V;
  std::vector<float> l(static_cast<size_t>(V));
  for (int64_t i = 0; i < V; ++i) l[size_t(i)] = bf16_to_f32(src[i]);
  return sample_logits(l, p, window, output, draw);
}

void Backend::set_chain_sampler(const sampling::Params* p, std::span<const int32_t> window,
                                std::span<const int32_t> output, uint64_t draw) {
  ZMLX_CHECK(p == nullptr || samples_chained(*p), "backend {}: chained decoding samples by argmax only", name());
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

std::pair<Tensor, Tensor> Backend::mla_rope_split_cache(const Tensor& q, const Tensor& ckv, const Tensor& kv_norm,
                                                        float eps, int64_t heads, int64_t nope_dim, int64_t rope_dim,
                                                        int64_t pos0, float base, KvLayer& cache) {
  const int64_t qd = nope_dim + rope_dim, kv_lora = ckv.cols() - rope_dim;
  // Split first, then rope the copy (q stays as it was): the same pairs at the
  // same positions as roping the last rope_dim columns of every head in place.
  Tensor q_nope = slice_cols(q, qd, 0, nope_dim);
  Tensor q_pe = slice_cols(q, qd, nope_dim, rope_dim);
  rope(q_pe, heads, rope_dim, 0, rope_dim, pos0, base, /*traditional=*/true);
  Tensor latent = rms_norm(slice_cols(ckv, kv_lora + rope_dim, 0, kv_lora), kv_norm, eps);
  Tensor k_pe = slice_cols(ckv, kv_lora + rope_dim, kv_lora, rope_dim);
  rope(k_pe, 1, rope_dim, 0, rope_dim, pos0, base, /*traditional=*/true);
  kv_write(cache, latent, k_pe, pos0);
  return {std::move(q_nope), std::move(q_pe)};
}

Tensor Backend::norm_rope_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& qn,
                                    const Tensor& kn, float eps, int64_t heads, int64_t kv_heads, int64_t hd,
                                    int64_t pos0, float base, bool traditional, KvLayer& cache, float scale) {
  Tensor qo = qk_norm_rope_cache(q, k, v, qn, kn, eps, heads, kv_heads, hd, pos0, base, traditional, cache);
  return attention(qo, cache, pos0, heads, kv_heads, hd, scale);
}

Tensor GqaAttention::forward(Backend& be, const Tensor& x, KvLayer& cache, int64_t pos0) const {
  auto qkv = be.linear_multi(x, {&q_proj, &k_proj, &v_proj});
  Tensor a = be.norm_rope_attention(qkv[0], qkv[1], qkv[2], q_norm, k_norm, eps, heads, kv_heads, head_dim, pos0,
                                    rope_theta, /*traditional=*/false, cache, scale);
  return be.linear(a, o_proj);
}

Tensor MlaAttention::forward(Backend& be, const Tensor& x, KvLayer& cache, int64_t pos0) const {
  const int64_t T = x.rows();
  // q [T, H*(dn+dr)]: RoPE on the last dr of every head, split; ckv [T,
  // kv_lora + dr] = [latent | k_pe]: normalised / roped into the cache.
  Tensor q_nope, q_pe;
  if (q_a_proj.empty()) {
    auto r = be.linear_multi(x, {&q_proj, &kv_a_proj_with_mqa});
    std::tie(q_nope, q_pe) = be.mla_rope_split_cache(r[0], r[1], kv_a_layernorm, eps, heads, nope_dim, rope_dim, pos0,
                                                     rope_theta, cache);
  } else {
    auto r = be.linear_multi(x, {&q_a_proj, &kv_a_proj_with_mqa});
    std::tie(q_nope, q_pe) = be.linear_mla_rope_split_cache(be.rms_norm(r[0], q_a_layernorm, eps), q_b_proj, r[1],
                                                            kv_a_layernorm, eps, heads, nope_dim, rope_dim, pos0,
                                                            rope_theta, cache);
  }
  const int64_t S = pos0 + T;
  Tensor lat_all = first_rows(cache.k, S), pe_all = first_rows(cache.v, S);
  const bool absorbed = form == Form::Absorbed || (form == Form::Auto && T == 1);
  Tensor o;
  if (absorbed) {
    Tensor q_lat = be.multi_linear(q_nope, embed_q, /*transpose=*/true);  // [T, H*kv_lora]
    Tensor o_lat = be.attention_pe(q_lat, lat_all, lat_all, q_pe, pe_all, pos0, heads, 1, scale, cache.capacity);
    o = be.multi_linear(o_lat, unembed_out, /*transpose=*/true);          // [T, H*dv]
  } else {
    Tensor k_nope = be.multi_linear(lat_all, embed_q, /*transpose=*/false);  // [S, H*dn]
    Tensor v = be.multi_linear(lat_all, unembed_out, /*transpose=*/true);    // [S, H*dv]
    o = be.attention_pe(q_nope, k_nope, v, q_pe, pe_all, pos0, heads, heads, scale, cache.capacity);
  }
  return be.linear(o, o_proj);
}

Tensor SwigluMlp::forward(Backend& be, const Tensor& x) {
  Tensor gate = be.linear(x, gate_proj);
  Tensor up = be.linear(x, up_proj);
  return be.linear(be.swiglu(gate, up), down_proj);
}

Routing MoeBlock::route(Backend& be, const Tensor& x) const { return route_logits(be, be.linear(x, router)); }

GroupedRouter MoeBlock::grouped_router() const {
  GroupedRouter g;
  g.bias = &expert_bias;
  g.k = top_k, g.n_group = n_group, g.topk_group = topk_group;
  g.normalize = norm_topk_prob, g.eps = route_eps, g.scaling = routed_scaling;
  return g;
}

TopKRouter MoeBlock::topk_router() const {
  ZMLX_CHECK(router_kind != RouterKind::SigmoidGroupedTopK, "{}: the grouped router is not a plain top-k router",
             router.name);
  TopKRouter t;
  t.sigmoid = router_kind == RouterKind::SigmoidBiasTopK;
  t.bias = t.sigmoid ? &expert_bias : nullptr;
  t.k = top_k, t.normalize = norm_topk_prob, t.eps = route_eps, t.scaling = routed_scaling;
  return t;
}

Routing MoeBlock::route_logits(Backend& be, const Tensor& logits) const {
  if (router_kind == RouterKind::SigmoidGroupedTopK) {
    const GroupedRouter g = grouped_router();  // the fused block's launch takes the same
    return be.route_sigmoid_grouped_topk(logits, *g.bias, g.k, g.n_group, g.topk_group, g.normalize, g.eps, g.scaling);
  }
  return be.route_topk(logits, topk_router());
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
