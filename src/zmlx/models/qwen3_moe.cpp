// Qwen3-MoE (model_type "qwen3_moe", e.g. Qwen3-30B-A3B): spec §1, and the
// dense Qwen3 family (model_type "qwen3", e.g. Qwen3-0.6B/8B), which is the
// same network with a SwiGLU MLP in every layer.
//
//   h = embed(ids)
//   per layer: h += o_proj(attn(rope(q_norm(q)), rope(k_norm(k)), v))
//              h += moe(post_attention_layernorm(h))      (dense MLP on mlp_only_layers)
//   logits = lm_head(norm(h))
#include <cmath>

#include "zmlx/core/error.h"
#include "zmlx/models/families.h"
#include "zmlx/models/loader.h"

namespace zmlx {
namespace {

struct Layer {
  Tensor input_layernorm, post_attention_layernorm;
  GqaAttention attn;
  std::unique_ptr<FeedForward> mlp;
};

class Qwen3Moe final : public Model {
 public:
  Qwen3Moe(ModelConfig cfg, std::shared_ptr<io::WeightStore> store, Backend& be) {
    config_ = std::move(cfg);
    store_ = store;
    const ModelConfig& c = config_;
    D_ = c.hidden_size;
    H_ = c.num_attention_heads;
    Hkv_ = c.num_key_value_heads;
    hd_ = c.head_dim;
    c.check_gqa_heads();
    const bool dense = c.model_type == "qwen3";
    // transformers 5.x writes num_local_experts; older configs num_experts.
    const int64_t E = dense ? 0 : c.has("num_experts") ? c.get_int("num_experts") : c.get_int("num_local_experts");
    const int64_t k = dense ? 0 : c.get_int("num_experts_per_tok");
    const int64_t I = dense ? 0 : c.get_int("moe_intermediate_size");
    if (!dense) c.check_range("num_experts_per_tok", k, 1, E);
    const int64_t sparse_step = c.get_int("decoder_sparse_step", 1);
    const auto mlp_only = c.get_int_list("mlp_only_layers");
    const bool norm_topk = c.get_bool("norm_topk_prob", true);
    scale_ = float(std::pow(double(hd_), -0.5));

    // Multi-process (dist/placement.h): pipeline loads only this rank's
    // layers; tensor parallel loads 1/n of every head group and MLP/expert.
    const dist::Placement& P = c.parallel;
    const int tpi = P.tp_index(), tpn = P.tp_count();
    parallel_supported_ = true;

    WeightLoader wl(*this, store, be);
    embed_ = wl.linear("model.embed_tokens", c.vocab_size, D_, 0, 0, /*reads_one_row=*/true);
    layers_.resize(size_t(c.num_hidden_layers));
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
      const std::string p = "model.layers." + std::to_string(l);
      if (!P.owns_layer(l)) {
        wl.skip(p + ".");
        continue;
      }
      Layer& L = layers_[size_t(l)];
      L.input_layernorm = wl.tensor(p + ".input_layernorm.weight", DType::BF16, {D_});
      L.post_attention_layernorm = wl.tensor(p + ".post_attention_layernorm.weight", DType::BF16, {D_});
      L.attn = wl.gqa_attention(p + ".self_attn", "o_proj", "q_norm", "k_norm", H_, Hkv_, hd_, D_, tpi, tpn);
      L.attn.scale = scale_;
      L.attn.rope_theta = c.rope_theta;
      L.attn.eps = c.rms_norm_eps;
      const bool is_moe = std::find(mlp_only.begin(), mlp_only.end(), l) == mlp_only.end() && E > 0 &&
                          (l + 1) % sparse_step == 0;
      if (is_moe) {
        auto moe = std::make_unique<MoeBlock>();
        moe->router = wl.linear(p + ".mlp.gate", E, D_);
        wl.switch_experts(*moe, p + ".mlp", E, I, D_, k, tpi, tpn);
        moe->norm_topk_prob = norm_topk;
        moe->combine = CombineMode::Bf16Products;
        L.mlp = std::move(moe);
      } else {
        L.mlp = wl.swiglu_mlp(p + ".mlp", c.get_int("intermediate_size"), D_, tpi, tpn);
      }
      L.mlp->path = p + ".mlp";
      ffn_slots_.push_back(&L.mlp);
    }
    norm_ = wl.tensor("model.norm.weight", DType::BF16, {D_});
    if (P.last_stage()) lm_head_ = wl.output_projection(embed_, c.vocab_size, D_, c.tie_word_embeddings);
    else wl.skip("lm_head.");
    wl.check_all_used();
  }

  std::string family() const override { return config_.model_type; }

  std::vector<std::string> layer_kinds() const override {
    std::vector<std::string> out;
    for (auto& L : layers_) out.push_back(L.mlp ? "attention+" + L.mlp->kind() : "(another rank)");
    return out;
  }

  Cache new_cache(Backend& be) const override {
    Cache c;
    for (size_t l = 0; l < layers_.size(); ++l)
      c.kv.push_back(layers_[l].mlp ? be.new_kv_layer(layers_[l].attn.kv_heads, hd_, 256) : KvLayer{});
    return c;
  }

  Tensor forward(Backend& be, const std::vector<int32_t>& ids, Cache& cache, bool all_logits) override {
    return forward_attention_blocks(be, ids, cache, all_logits, embed_, norm_, lm_head_, layers_);
  }

 private:
  int64_t D_, H_, Hkv_, hd_;
  float scale_;
  Weight embed_, lm_head_;
  Tensor norm_;
  std::vector<Layer> layers_;
};

}  // namespace

std::unique_ptr<Model> build_qwen3(ModelConfig cfg, std::shared_ptr<io::WeightStore> store, Backend& be) {
  return std::make_unique<Qwen3Moe>(std::move(cfg), std::move(store), be);
}

std::unique_ptr<Model> build_qwen3_moe(ModelConfig cfg, std::shared_ptr<io::WeightStore> store, Backend& be) {
  return std::make_unique<Qwen3Moe>(std::move(cfg), std::move(store), be);
}

}  // namespace zmlx
