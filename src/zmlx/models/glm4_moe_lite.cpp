// GLM-4.7-Flash (model_type "glm4_moe_lite", mlx-lm glm4_moe_lite.py + mla.py): spec §2.
//
//   h = embed(ids)
//   per layer: h += o_proj(MLA(input_layernorm(h)))           (MlaAttention, blocks.h)
//              h += ffn(post_attention_layernorm(h))
//                   ffn = dense SwiGLU below first_k_dense_replace, else MoE:
//                   fp32 sigmoid router + e_score_correction_bias for selection,
//                   top-k, renormalised (+1e-20), × routed_scaling_factor, fp32
//                   combine, + the shared expert (unscaled)
//   logits = lm_head(norm(h))
//
// The KV cache holds the kv_lora_rank latent and the roped qk_rope_head_dim key
// per token. Checkpoints from the first mlx-lm glm4_moe_lite port store
// self_attn.kv_b_proj instead of embed_q / unembed_out; they are converted at
// load exactly as mlx-lm's sanitize does (split per head, re-quantised).
// The multi-token-prediction layer (model.layers.<num_hidden_layers>) of a
// transformers checkpoint is not part of an MLX checkpoint (`zmlx convert`
// drops it), so a leftover one is reported as an unused tensor.
//
// Multi-process (docs/multi-device.md): pipeline stages load only their layers
// (embedding on the first stage, norm + lm_head on the last). Tensor parallel
// splits MLA by whole heads (q_proj / q_b_proj rows, embed_q / unembed_out
// heads, o_proj columns) and keeps the shared projections replicated: q_a_proj
// and kv_a_proj_with_mqa (+ their norms) produce latents every head reads, so
// each rank computes them itself and holds the whole latent cache — cheaper
// than an all-gather per layer, and the latent cache is small by design. The
// dense MLP, the experts and the shared expert split along their intermediate
// dimension; the router is replicated so every rank picks the same experts.
#include <cmath>
#include <cstring>

#include "zmlx/core/error.h"
#include "zmlx/models/families.h"
#include "zmlx/models/loader.h"

namespace zmlx {
namespace {

struct Layer {
  Tensor input_layernorm, post_attention_layernorm;
  MlaAttention attn;
  std::unique_ptr<FeedForward> mlp;
};

// A stacked per-head Weight [H, R, C] built from fp32 values (row-major),
// quantised with `q` (bits 0: dense bf16) into host memory.
Weight stacked_weight(const std::string& name, const std::vector<float>& v, int64_t H, int64_t R, int64_t C,
                      bool quantized, quant::QuantParams q) {
  Weight w;
  w.name = name;
  w.experts = H;
  w.rows = R;
  w.cols = C;
  w.quantized = quantized;
  if (!quantized) {
    w.w = host_tensor(DType::BF16, {H, R, C});
    for (int64_t i = 0; i < H * R * C; ++i) w.w.ptr<uint16_t>()[i] = f32_to_bf16_bits(v[size_t(i)]);
    return w;
  }
  w.q = q;
  w.w = host_tensor(DType::U32, {H, R, C * q.bits / 32});
  w.scales = host_tensor(DType::BF16, {H, R, C / q.group_size});
  w.biases = host_tensor(DType::BF16, {H, R, C / q.group_size});
  for (int64_t r = 0; r < H * R; ++r)
    quant::quantize_row(v.data() + r * C, C, q, w.w.ptr<uint32_t>() + r * w.words_per_row(),
                        w.scales.ptr<uint16_t>() + r * w.groups_per_row(),
                        w.biases.ptr<uint16_t>() + r * w.groups_per_row());
  return w;
}

// mlx-lm sanitize for the legacy layout (spec §2.2 notes): Wkv = dequant(kv_b_proj)
// [H*(dn+dv), kv_lora] -> [H, dn+dv, kv_lora]; embed_q = Wkv[:, :dn, :]ᵀ
// ([H, kv_lora, dn]); unembed_out = Wkv[:, dn:, :] ([H, dv, kv_lora]); both
// re-quantised with kv_b_proj's bits / group size (values rounded to bf16 first,
// as the dequantised bf16 array is).
// kv_b is the checkpoint's host view (WeightLoader::linear_on_host). Only
// heads [first_head, first_head + a.heads) are built: a tensor-parallel rank
// holds just its own heads.
void split_kv_b_proj(const Weight& kv_b, MlaAttention& a, int64_t first_head, Backend& be,
                     const std::string& prefix) {
  const int64_t H = a.heads, dn = a.nope_dim, dv = a.v_dim, L = a.kv_lora, per = dn + dv;
  std::vector<float> row(static_cast<size_t>(L)), eq(size_t(H * L * dn)), uo(size_t(H * dv * L));
  for (int64_t h = 0; h < H; ++h)
    for (int64_t i = 0; i < per; ++i) {
      const int64_t r = (first_head + h) * per + i;
      if (kv_b.quantized) {
        quant::dequantize_row(kv_b.w.ptr<uint32_t>() + r * kv_b.words_per_row(),
                              kv_b.scales.ptr<uint16_t>() + r * kv_b.groups_per_row(),
                              kv_b.biases.ptr<uint16_t>() + r * kv_b.groups_per_row(), L, kv_b.q, row.data());
        for (auto& x : row) x = round_bf16(x);
      } else {
        for (int64_t c = 0; c < L; ++c) row[size_t(c)] = bf16_to_f32(kv_b.w.ptr<uint16_t>()[r * L + c]);
      }
      for (int64_t c = 0; c < L; ++c) {
        if (i < dn) eq[size_t((h * L + c) * dn + i)] = row[size_t(c)];
        else uo[size_t((h * dv + (i - dn)) * L + c)] = row[size_t(c)];
      }
    }
  if (kv_b.quantized)
    ZMLX_CHECK(dn % kv_b.q.group_size == 0, "{}.kv_b_proj: qk_nope_head_dim {} is not a multiple of the group size {}",
               prefix, dn, kv_b.q.group_size);
  a.embed_q = be.adopt(stacked_weight(prefix + ".embed_q", eq, H, L, dn, kv_b.quantized, kv_b.q));
  a.unembed_out = be.adopt(stacked_weight(prefix + ".unembed_out", uo, H, dv, L, kv_b.quantized, kv_b.q));
}

// e_score_correction_bias: F32 in MLX checkpoints (mlx-lm keeps it out of the
// dtype cast); a BF16 copy is widened to F32 exactly.
Tensor correction_bias(WeightLoader& wl, const std::shared_ptr<io::WeightStore>& store, Backend& be,
                       const std::string& name, int64_t E) {
  if (store->has(name) && store->get(name).dtype == DType::BF16) {
    const Tensor b16 = wl.tensor(name, DType::BF16, {E});
    Tensor f = host_tensor(DType::F32, {E});
    const Tensor h = be.to_host(b16);
    for (int64_t e = 0; e < E; ++e) f.ptr<float>()[e] = bf16_to_f32(h.ptr<uint16_t>()[e]);
    return be.from_host(f);
  }
  return wl.tensor(name, DType::F32, {E});
}

class Glm4MoeLite final : public Model {
 public:
  Glm4MoeLite(ModelConfig cfg, std::shared_ptr<io::WeightStore> store, Backend& be) {
    config_ = std::move(cfg);
    store_ = store;
    const ModelConfig& c = config_;
    D_ = c.hidden_size;
    H_ = c.num_attention_heads;
    const int64_t q_lora = c.raw.contains("q_lora_rank") && c.raw["q_lora_rank"].is_null() ? 0 : c.get_int("q_lora_rank");
    kv_lora_ = c.get_int("kv_lora_rank");
    const int64_t dn = c.get_int("qk_nope_head_dim"), dr = c.get_int("qk_rope_head_dim"), dv = c.get_int("v_head_dim");
    rope_dim_ = dr;
    c.check_range("qk_rope_head_dim", dr, 2, 4096);
    ZMLX_CHECK(dr % 2 == 0, "{}: qk_rope_head_dim {} must be even for RoPE", c.path, dr);
    c.check_range("kv_lora_rank", kv_lora_, 1, 1 << 16);
    if (c.has("rope_scaling") && !c.raw["rope_scaling"].is_null())
      fail("{}: rope_scaling {} is not supported for glm4_moe_lite (zmlx implements rope_scaling = null)", c.path,
           c.raw["rope_scaling"].dump());
    if (c.has("rope_parameters") && c.raw["rope_parameters"].is_object()) {  // transformers 5 configs
      const auto& rp = c.raw["rope_parameters"];
      const std::string type = rp.value("rope_type", std::string("default"));
      ZMLX_CHECK(type == "default", "{}: rope_parameters.rope_type '{}' is not supported for glm4_moe_lite", c.path,
                 type);
    }
    const int64_t E = c.get_int("n_routed_experts");
    const int64_t k = c.get_int("num_experts_per_tok");
    c.check_range("num_experts_per_tok", k, 1, E);
    const int64_t I = c.get_int("moe_intermediate_size");
    const int64_t n_shared = c.get_int("n_shared_experts", 0);
    // Which layers are MoE: mlx-lm's first_k_dense_replace (default 1, as
    // mlx-lm's ModelArgs) / moe_layer_freq, or transformers 5's mlp_layer_types
    // ("dense" / "sparse" per layer) when present.
    const int64_t first_dense = c.get_int("first_k_dense_replace", 1);
    const int64_t freq = std::max<int64_t>(1, c.get_int("moe_layer_freq", 1));
    std::vector<bool> sparse(size_t(c.num_hidden_layers));
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) sparse[size_t(l)] = l >= first_dense && l % freq == 0;
    if (c.has("mlp_layer_types") && !c.raw["mlp_layer_types"].is_null()) {
      const auto& lt = c.raw["mlp_layer_types"];
      ZMLX_CHECK(lt.is_array() && int64_t(lt.size()) == c.num_hidden_layers,
                 "{}: mlp_layer_types must list {} entries, found {}", c.path, c.num_hidden_layers, lt.dump());
      for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
        const auto& v = lt[size_t(l)];
        ZMLX_CHECK(v.is_string() && (v == "dense" || v == "sparse"),
                   "{}: mlp_layer_types[{}] = {} (expected \"dense\" or \"sparse\")", c.path, l, v.dump());
        const bool s = v == "sparse";
        ZMLX_CHECK(c.raw.value("first_k_dense_replace", nlohmann::json()).is_null() || s == sparse[size_t(l)],
                   "{}: mlp_layer_types[{}] = {} contradicts first_k_dense_replace / moe_layer_freq", c.path, l,
                   v.dump());
        sparse[size_t(l)] = s;
      }
    }
    const int64_t n_group = c.get_int("n_group", 1), topk_group = c.get_int("topk_group", 1);
    c.check_range("n_group", n_group, 1, E);
    c.check_range("topk_group", topk_group, 1, n_group);
    ZMLX_CHECK(E % n_group == 0, "{}: n_routed_experts {} is not a multiple of n_group {}", c.path, E, n_group);
    const std::string scoring = c.get_string("scoring_func", "sigmoid");
    ZMLX_CHECK(scoring == "sigmoid", "{}: scoring_func '{}' is not supported (mlx-lm glm4_moe_lite uses sigmoid)",
               c.path, scoring);
    const bool norm_topk = c.get_bool("norm_topk_prob", true);
    const float scaling = float(c.get_float("routed_scaling_factor", 1.0));
    const float scale = float(1.0 / std::sqrt(double(dn + dr)));

    // Multi-process (dist/placement.h): pipeline loads only this rank's
    // layers; tensor parallel loads 1/n of the heads and of every MLP/expert.
    const dist::Placement& P = c.parallel;
    const int tpi = P.tp_index(), tpn = P.tp_count();
    ZMLX_CHECK(H_ % tpn == 0, "--parallel tensor: {}: {} attention heads do not divide across {} ranks", c.path, H_,
               tpn);
    const int64_t Hl = H_ / tpn;  // this rank's heads
    const Shard head_rows{Shard::Rows, tpi, tpn}, head_cols{Shard::Cols, tpi, tpn}, head_stack{Shard::Stack, tpi, tpn};
    parallel_supported_ = true;

    WeightLoader wl(*this, store, be);
    // The embedding serves the first stage, and the last one only as a tied
    // output projection (GLM checkpoints have their own lm_head).
    const bool tied_head = c.tie_word_embeddings && !wl.has("lm_head.weight");
    if (P.first_stage() || (P.last_stage() && tied_head))
      embed_ = wl.linear("model.embed_tokens", c.vocab_size, D_, 0, 0, /*reads_one_row=*/true);
    else
      wl.skip("model.embed_tokens.");
    layers_.resize(size_t(c.num_hidden_layers));
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
      const std::string p = "model.layers." + std::to_string(l);
      const std::string a = p + ".self_attn";
      if (!P.owns_layer(l)) {
        wl.skip(p + ".");
        continue;
      }
      Layer& L = layers_[size_t(l)];
      L.input_layernorm = wl.tensor(p + ".input_layernorm.weight", DType::BF16, {D_});
      L.post_attention_layernorm = wl.tensor(p + ".post_attention_layernorm.weight", DType::BF16, {D_});
      MlaAttention& m = L.attn;
      m.heads = Hl;
      m.kv_lora = kv_lora_;
      m.nope_dim = dn;
      m.rope_dim = dr;
      m.v_dim = dv;
      m.scale = scale;
      m.rope_theta = c.rope_theta;
      m.eps = c.rms_norm_eps;  // MLX uses rms_norm_eps for q_a / kv_a norms too (HF: 1e-6)
      // q rows and o_proj columns are head-major, so a row/column shard is a
      // range of whole heads; the q latent (q_a) and the kv latent are
      // shared by all heads and stay replicated.
      if (q_lora > 0) {
        m.q_a_proj = wl.linear(a + ".q_a_proj", q_lora, D_);
        m.q_a_layernorm = wl.tensor(a + ".q_a_layernorm.weight", DType::BF16, {q_lora});
        m.q_b_proj = wl.linear(a + ".q_b_proj", H_ * (dn + dr), q_lora, 0, 0, false, head_rows);
      } else {
        m.q_proj = wl.linear(a + ".q_proj", H_ * (dn + dr), D_, 0, 0, false, head_rows);
      }
      m.kv_a_proj_with_mqa = wl.linear(a + ".kv_a_proj_with_mqa", kv_lora_ + dr, D_);
      m.kv_a_layernorm = wl.tensor(a + ".kv_a_layernorm.weight", DType::BF16, {kv_lora_});
      if (wl.has(a + ".embed_q.weight")) {
        m.embed_q = wl.linear(a + ".embed_q", kv_lora_, dn, H_, Hl, false, head_stack);
        m.unembed_out = wl.linear(a + ".unembed_out", dv, kv_lora_, H_, Hl, false, head_stack);
      } else {
        ZMLX_CHECK(wl.has(a + ".kv_b_proj.weight"), "{}: {} has neither embed_q/unembed_out nor the legacy kv_b_proj",
                   store->dir(), a);
        split_kv_b_proj(wl.linear_on_host(a + ".kv_b_proj", H_ * (dn + dv), kv_lora_), m, Hl * tpi, be, a);
      }
      m.o_proj = wl.linear(a + ".o_proj", D_, H_ * dv, 0, 0, false, head_cols);

      if (sparse[size_t(l)]) {
        auto moe = std::make_unique<MoeBlock>();
        moe->router_kind = RouterKind::SigmoidGroupedTopK;
        moe->router = wl.linear(p + ".mlp.gate", E, D_);  // bf16 in the MLX checkpoint
        moe->expert_bias = correction_bias(wl, store, be, p + ".mlp.gate.e_score_correction_bias", E);
        wl.switch_experts(*moe, p + ".mlp", E, I, D_, k, tpi, tpn);
        moe->norm_topk_prob = norm_topk && k > 1;  // mlx-lm renormalises only when top_k > 1
        moe->route_eps = 1e-20f;
        moe->routed_scaling = scaling;
        moe->n_group = n_group;
        moe->topk_group = topk_group;
        moe->combine = CombineMode::F32Products;
        if (n_shared > 0)
          moe->shared_expert = wl.swiglu_mlp(p + ".mlp.shared_experts", I * n_shared, D_, tpi, tpn);
        L.mlp = std::move(moe);
      } else {
        L.mlp = wl.swiglu_mlp(p + ".mlp", c.get_int("intermediate_size"), D_, tpi, tpn);
      }
      L.mlp->path = p + ".mlp";
      ffn_slots_.push_back(&L.mlp);
    }
    if (P.last_stage()) {
      norm_ = wl.tensor("model.norm.weight", DType::BF16, {D_});
      lm_head_ = wl.output_projection(embed_, c.vocab_size, D_, c.tie_word_embeddings);
    } else {
      wl.skip("model.norm.");
      wl.skip("lm_head.");
    }
    wl.check_all_used();
  }

  std::string family() const override { return config_.model_type; }

  std::vector<std::string> layer_kinds() const override {
    std::vector<std::string> out;
    for (auto& L : layers_) out.push_back(L.mlp ? "mla+" + L.mlp->kind() : "(another rank)");
    return out;
  }

  Cache new_cache(Backend& be) const override {
    Cache c;
    // Every tensor-parallel rank holds the whole latent cache (all its heads
    // read it); a pipeline stage only its own layers'.
    for (size_t l = 0; l < layers_.size(); ++l)
      c.kv.push_back(layers_[l].mlp ? be.new_latent_kv_layer(kv_lora_, rope_dim_, 256) : KvLayer{});
    return c;
  }

  // Tests: force one MLA form everywhere (Auto = MLX's choice by length).
  void set_mla_form(MlaAttention::Form f) {
    for (auto& L : layers_) L.attn.form = f;
  }

  Tensor forward(Backend& be, const std::vector<int32_t>& ids, Cache& cache, bool all_logits) override {
    return forward_attention_blocks(be, ids, cache, all_logits, embed_, norm_, lm_head_, layers_);
  }

 private:
  int64_t D_, H_, kv_lora_, rope_dim_;
  Weight embed_, lm_head_;
  Tensor norm_;
  std::vector<Layer> layers_;
};

}  // namespace

std::unique_ptr<Model> build_glm4_moe_lite(ModelConfig cfg, std::shared_ptr<io::WeightStore> store, Backend& be) {
  return std::make_unique<Glm4MoeLite>(std::move(cfg), std::move(store), be);
}

void set_mla_form(Model& m, MlaAttention::Form f) {
  auto* g = dynamic_cast<Glm4MoeLite*>(&m);
  ZMLX_CHECK(g, "set_mla_form: {} is not a glm4_moe_lite model", m.family());
  g->set_mla_form(f);
}

}  // namespace zmlx
