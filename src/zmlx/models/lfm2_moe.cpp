// LFM2-MoE (model_type "lfm2_moe", e.g. LFM2-8B-A1B): spec §3.
//
//   h = embed(ids)
//   per layer: h += attention or short conv (operator_norm(h))
//              h += feed_forward(ffn_norm(h))   (dense SwiGLU below num_dense_layers, else MoE)
//   logits = embedding_norm(h) @ embedᵀ           (tied: no lm_head tensor)
//
// Attention layers: GQA with q/k RMSNorm before non-traditional RoPE.
// Conv layers (ShortConv): in_proj -> [B | C | x], Bx = B·x, a depthwise causal
// conv of width L = conv_L_cache over the last L-1 Bx rows kept in the Cache,
// C·conv -> out_proj. MoE router: sigmoid + expert_bias for selection,
// renormalised (+1e-6), × routed_scaling_factor (Backend::route_sigmoid_topk).
#include <algorithm>
#include <cmath>
#include <cstring>

#include "zmlx/core/error.h"
#include "zmlx/models/families.h"
#include "zmlx/models/loader.h"

namespace zmlx {
namespace {

struct Layer {
  bool attention = false;
  Tensor operator_norm, ffn_norm;
  GqaAttention attn;
  // short conv
  Weight in_proj, conv_out_proj;
  Tensor conv_w;  // [D, L, 1]
  std::unique_ptr<FeedForward> mlp;
};

class Lfm2Moe final : public Model {
 public:
  Lfm2Moe(ModelConfig cfg, std::shared_ptr<io::WeightStore> store, Backend& be) {
    config_ = std::move(cfg);
    store_ = store;
    const ModelConfig& c = config_;
    D_ = c.hidden_size;
    H_ = c.num_attention_heads;
    Hkv_ = c.num_key_value_heads;
    hd_ = c.head_dim;
    c.check_gqa_heads();
    Lc_ = c.get_int("conv_L_cache", 3);
    c.check_range("conv_L_cache", Lc_, 2, 64);
    ZMLX_CHECK(!c.get_bool("conv_bias", false), "{}: conv_bias = true is not supported", c.path);
    const int64_t E = c.get_int("num_experts");
    const int64_t k = c.get_int("num_experts_per_tok");
    c.check_range("num_experts_per_tok", k, 1, E);
    const int64_t I = c.get_int("moe_intermediate_size");
    const int64_t n_dense = c.get_int("num_dense_layers", 0);
    const bool norm_topk = c.get_bool("norm_topk_prob", true);
    const bool use_bias = c.get_bool("use_expert_bias", true);
    const float scaling = float(c.get_float("routed_scaling_factor", 1.0));
    scale_ = float(std::pow(double(hd_), -0.5));

    // Which layers are attention: layer_types ("full_attention" / "conv"), else full_attn_idxs.
    const int64_t NL = c.num_hidden_layers;
    std::vector<bool> is_attn(size_t(NL), false);
    if (c.has("layer_types")) {
      const auto& lt = c.raw["layer_types"];
      ZMLX_CHECK(lt.is_array() && int64_t(lt.size()) == NL, "{}: layer_types must be a list of {} strings, found {}",
                 c.path, NL, lt.dump());
      for (int64_t l = 0; l < NL; ++l) {
        ZMLX_CHECK(lt[size_t(l)].is_string(), "{}: layer_types[{}] must be a string, found {}", c.path, l,
                   lt[size_t(l)].dump());
        const std::string t = lt[size_t(l)].get<std::string>();
        ZMLX_CHECK(t == "full_attention" || t == "conv", "{}: layer_types[{}] = '{}' (expected full_attention or conv)",
                   c.path, l, t);
        is_attn[size_t(l)] = t == "full_attention";
      }
    } else {
      ZMLX_CHECK(c.has("full_attn_idxs"), "{}: needs layer_types or full_attn_idxs", c.path);
      for (int64_t i : c.get_int_list("full_attn_idxs")) {
        c.check_range("full_attn_idxs", i, 0, NL - 1);
        is_attn[size_t(i)] = true;
      }
    }

    // Multi-process: pipeline loads only this rank's layers; tensor parallel
    // splits attention heads, dense MLPs and experts, while the short-conv
    // layers (in_proj/conv/out_proj, small) are replicated on every rank.
    const dist::Placement& P = c.parallel;
    const int tpi = P.tp_index(), tpn = P.tp_count();
    parallel_supported_ = true;

    WeightLoader wl(*this, store, be);
    embed_ = wl.linear("model.embed_tokens", c.vocab_size, D_, 0, 0, /*reads_one_row=*/true);
    layers_.resize(size_t(NL));
    for (int64_t l = 0; l < NL; ++l) {
      const std::string p = "model.layers." + std::to_string(l);
      if (!P.owns_layer(l)) {
        wl.skip(p + ".");
        continue;
      }
      Layer& L = layers_[size_t(l)];
      L.attention = is_attn[size_t(l)];
      L.operator_norm = wl.tensor(p + ".operator_norm.weight", DType::BF16, {D_});
      L.ffn_norm = wl.tensor(p + ".ffn_norm.weight", DType::BF16, {D_});
      if (L.attention) {
        L.attn = wl.gqa_attention(p + ".self_attn", "out_proj", "q_layernorm", "k_layernorm", H_, Hkv_, hd_, D_, tpi,
                                  tpn);
        L.attn.scale = scale_;
        L.attn.rope_theta = c.rope_theta;
        L.attn.eps = c.rms_norm_eps;
      } else {
        L.in_proj = wl.linear(p + ".conv.in_proj", 3 * D_, D_);
        L.conv_out_proj = wl.linear(p + ".conv.out_proj", D_, D_);
        L.conv_w = wl.tensor(p + ".conv.conv.weight", DType::BF16, {D_, Lc_, 1});
      }
      if (l >= n_dense) {
        auto moe = std::make_unique<MoeBlock>();
        moe->router_kind = RouterKind::SigmoidBiasTopK;
        moe->router = wl.linear(p + ".feed_forward.gate", E, D_);
        if (use_bias) {
          moe->expert_bias = wl.tensor(p + ".feed_forward.expert_bias", DType::F32, {E});
        } else {  // no bias: selection on the sigmoid alone
          Tensor z = host_tensor(DType::F32, {E});
          std::fill(z.ptr<float>(), z.ptr<float>() + E, 0.f);
          moe->expert_bias = be.from_host(z);
        }
        wl.switch_experts(*moe, p + ".feed_forward", E, I, D_, k, tpi, tpn);
        moe->norm_topk_prob = norm_topk;
        moe->route_eps = 1e-6f;
        moe->routed_scaling = scaling;
        moe->combine = CombineMode::Bf16Products;
        L.mlp = std::move(moe);
      } else {
        L.mlp = wl.swiglu_mlp(p + ".feed_forward", c.get_int("intermediate_size"), D_, tpi, tpn);
      }
      L.mlp->path = p + ".feed_forward";
      ffn_slots_.push_back(&L.mlp);
    }
    norm_ = wl.tensor("model.embedding_norm.weight", DType::BF16, {D_});
    if (P.last_stage()) lm_head_ = wl.output_projection(embed_, c.vocab_size, D_, /*may_tie=*/true);  // mlx-lm always ties
    else wl.skip("lm_head.");
    wl.check_all_used();
  }

  std::string family() const override { return config_.model_type; }

  std::vector<std::string> layer_kinds() const override {
    std::vector<std::string> out;
    for (auto& L : layers_)
      out.push_back(L.mlp ? std::string(L.attention ? "attention+" : "conv+") + L.mlp->kind() : "(another rank)");
    return out;
  }

  Cache new_cache(Backend& be) const override {
    Cache c;
    c.kv.resize(layers_.size());
    c.conv.resize(layers_.size());
    for (size_t l = 0; l < layers_.size(); ++l) {
      if (!layers_[l].mlp) continue;  // another pipeline stage's layer
      if (layers_[l].attention) {
        c.kv[l] = be.new_kv_layer(layers_[l].attn.kv_heads, hd_, 256);
      } else {
        Tensor z = host_tensor(DType::BF16, {Lc_ - 1, D_});
        std::memset(z.data, 0, z.nbytes());
        c.conv[l] = be.from_host(z);
      }
    }
    return c;
  }

  Tensor forward(Backend& be, const std::vector<int32_t>& ids, Cache& cache, bool all_logits) override {
    ZMLX_CHECK(cache.conv.size() == layers_.size(), "forward: the cache was not made by this model");
    const float eps = config_.rms_norm_eps;
    const int64_t pos0 = cache.pos;
    return forward_layers(be, ids, cache, all_logits, embed_, norm_, lm_head_, layers_.size(),
                          [&](size_t l, Tensor& h, Tensor& f) {
                            Layer& L = layers_[l];
                            // Tensor parallel: f (and attention's a) are summed over the ranks'
                            // shards together with the residual add and the next norm.
                            Tensor x = tp_reduce_add_rms_norm(be, h, f, L.operator_norm, eps);
                            Tensor xf;
                            if (L.attention) {
                              Tensor a = L.attn.forward(be, x, cache.kv[l], pos0);
                              xf = tp_reduce_add_rms_norm(be, h, a, L.ffn_norm, eps);
                            } else {  // replicated under tensor parallel: every rank computes the whole conv
                              Tensor y = be.linear_short_conv(x, L.in_proj, cache.conv[l], L.conv_w);
                              xf = be.add_rms_norm(h, be.linear(y, L.conv_out_proj), L.ffn_norm, eps);
                            }
                            f = L.mlp->forward(be, xf);
                          });
  }

 private:
  int64_t D_, H_, Hkv_, hd_, Lc_;
  float scale_;
  Weight embed_, lm_head_;
  Tensor norm_;
  std::vector<Layer> layers_;
};

}  // namespace

std::unique_ptr<Model> build_lfm2_moe(ModelConfig cfg, std::shared_ptr<io::WeightStore> store, Backend& be) {
  return std::make_unique<Lfm2Moe>(std::move(cfg), std::move(store), be);
}

}  // namespace zmlx
