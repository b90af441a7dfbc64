// Backend: the op interface the models are written against. The CPU backend
// (backend/cpu) is the reference and runs everywhere; the CUDA backend
// (backend/cuda) is the fast path. Models never touch raw memory: they call
// these ops on Tensors the backend owns.
//
// Numerics (spec/architectures.md §0.2–0.4): activations bf16; dot products
// accumulate in fp32; results are rounded to bf16 exactly where MLX rounds.
#pragma once
#include <functional>
#include <limits>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "zmlx/gen/sampling_math.h"
#include "zmlx/ops/tensor.h"
#include "zmlx/ops/weight.h"

namespace zmlx {
namespace dist {
struct Placement;
}

// Per-layer attention cache: K as [kv_heads, capacity, head_dim] and V as
// [kv_heads, capacity, v_head_dim] bf16 (v_head_dim = head_dim except for the
// one-head multi-latent caches of new_latent_kv_layer, whose k / v rows are
// also token-major [capacity, dim] matrices; see first_rows() in tensor.h).
struct KvLayer {
  Tensor k, v;
  int64_t capacity = 0;
};

// The result of routing T tokens to k experts each.
struct Routing {
  Tensor experts;  // I32 [T, k]
  Tensor scores;   // BF16 or F32 [T, k] (the combine weights)
  int64_t k = 0;
};

// route_sigmoid_grouped_topk's parameters after the logits.
struct GroupedRouter {
  const Tensor* bias = nullptr;  // F32 [E]
  int64_t k = 0, n_group = 1, topk_group = 1;
  bool normalize = true;
  float eps = 1e-6f, scaling = 1.0f;
};

// route_softmax_topk's (sigmoid false) or route_sigmoid_topk's parameters
// after the logits.
struct TopKRouter {
  bool sigmoid = false;
  const Tensor* bias = nullptr;  // sigmoid: F32 [E]
  int64_t k = 0;
  bool normalize = true;
  float eps = 1e-6f, scaling = 1.0f;  // sigmoid only
};

// How y = Σ_j score_j · y_j is rounded (it differs per family, spec §0.3).
enum class CombineMode {
  Bf16Products,  // Qwen3 / LFM2: bf16 products, summed in fp32, rounded to bf16
  F32Products,   // GLM: fp32 products and sum, rounded once
};

// Bf16Products multiplies y by the bf16 score, so it needs a router whose
// scores are bf16 (every backend reads them so); fp32 scores go with
// F32Products. The combine ops call this first, so a family pairing them
// wrongly gets this error instead of scores misread.
void check_combine_scores(const Routing& r, CombineMode mode, const char* op);

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  virtual Device device() const = 0;

  // Makes a checkpoint tensor/weight usable by this backend (CPU: no-op view
  // of the mmap; CUDA: uploads once).
  virtual Weight adopt(const Weight& w) { return w; }
  virtual Tensor adopt(const Tensor& t) { return t; }

  virtual Tensor alloc(DType dtype, std::vector<int64_t> shape) = 0;
  virtual Tensor from_host(const Tensor& host) = 0;
  virtual Tensor to_host(const Tensor& t) = 0;

  // Embedding rows (dequantized when quantized) -> [T, D] bf16.
  virtual Tensor embed(const Weight& table, const std::vector<int32_t>& ids) = 0;
  // x [T, K] @ W[N, K]ᵀ -> [T, N] bf16.
  virtual Tensor linear(const Tensor& x, const Weight& w) = 0;
  // Several matrices applied to the same input in one pass (e.g. q/k/v);
  // each result is exactly linear(x, *w[i]).
  virtual std::vector<Tensor> linear_multi(const Tensor& x, const std::vector<const Weight*>& w);
  // RMSNorm over consecutive runs of w.numel() elements:
  // y = w * bf16(x * rsqrt(mean(x²) + eps)).
  virtual Tensor rms_norm(const Tensor& x, const Tensor& w, float eps) = 0;
  // RoPE in place on x [T, heads * head_dim], rotating dims
  // [rot_offset, rot_offset + rot_dims) of every head at positions pos0 + t.
  virtual void rope(Tensor& x, int64_t heads, int64_t head_dim, int64_t rot_offset,
                    int64_t rot_dims, int64_t pos0, float base, bool traditional) = 0;
  virtual void add(Tensor& h, const Tensor& x) = 0;  // h = bf16(h + x)
  // The residual step of every block: add(h, x), then rms_norm(h, w, eps).
  // Same results as those two ops; one pass on backends that fuse it.
  virtual Tensor add_rms_norm(Tensor& h, const Tensor& x, const Tensor& w, float eps);
  // silu(gate) * up with MLX's bf16 rounding after sigmoid, product and result.
  virtual Tensor swiglu(const Tensor& gate, const Tensor& up) = 0;

  // Attention with a KV cache.
  virtual KvLayer new_kv_layer(int64_t kv_heads, int64_t head_dim, int64_t capacity) = 0;
  // Writes k [T, kv_heads * head_dim], v [T, kv_heads * v_head_dim] at
  // positions pos0.. (grows capacity, keeping rows [0, pos0)). v_head_dim is
  // c.v.dim(2): head_dim for new_kv_layer caches, v_dim for latent ones.
  virtual void kv_write(KvLayer& c, const Tensor& k, const Tensor& v, int64_t pos0) = 0;
  // Attention input preparation: per-head RMSNorm of q [T, heads·hd] and
  // k [T, kv_heads·hd] (weights qn, kn [hd]), RoPE over whole heads at
  // positions pos0.., then k and v written to the cache. Returns q. Same
  // results as rms_norm, rope and kv_write in that order.
  virtual Tensor qk_norm_rope_cache(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& qn,
                                    const Tensor& kn, float eps, int64_t heads, int64_t kv_heads, int64_t hd,
                                    int64_t pos0, float base, bool traditional, KvLayer& cache);
  // qk_norm_rope_cache then attention, the middle of a GQA attention block:
  // a backend may fuse them (the CUDA backend does for one-token steps).
  // Same results as the two calls.
  virtual Tensor norm_rope_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& qn,
                                     const Tensor& kn, float eps, int64_t heads, int64_t kv_heads, int64_t hd,
                                     int64_t pos0, float base, bool traditional, KvLayer& cache, float scale);
  // Causal GQA attention of q [T, heads * head_dim] at positions pos0.. over
  // cache positions [0, pos0 + T): softmax in fp32, output bf16.
  virtual Tensor attention(const Tensor& q, const KvLayer& c, int64_t pos0, int64_t heads,
                           int64_t kv_heads, int64_t head_dim, float scale) = 0;

  // ---- GLM-4.7-Flash ops (multi-latent attention, grouped sigmoid router).
  // The base versions throw "not implemented on this backend"; the CPU
  // backend implements them (a backend that runs glm4_moe_lite overrides all
  // five: attention_pe, multi_linear, slice_cols, new_latent_kv_layer,
  // route_sigmoid_grouped_topk).
  // Multi-latent attention core (GLM-4.7-Flash, spec §2.2): causal attention
  // with an additive rotary score term, for both MLA forms.
  //   q [T, heads*dk]; k [S, kv_heads*dk]; v [S, kv_heads*dv] (token-major,
  //   only rows [0, pos0+T) are read, S may be larger); q_pe [T, heads*dr];
  //   k_pe [S, dr] shared by every head. Query head h uses kv head
  //   h / (heads / kv_heads); dk = q.cols()/heads, dv = v.cols()/kv_heads,
  //   dr = q_pe.cols()/heads.
  //   pe[h,t,j]  = bf16( Σ_d bf16(scale·q_pe[t,h,d]) · k_pe[j,d] )  (fp32 sum; MLX
  //                materialises this bf16 score bias and passes it as the mask)
  //   s[h,t,j]   = scale · (q[t,h] · k[j,kvh]) + pe[h,t,j]  (fp32), j <= pos0 + t
  //   out[t,h]   = bf16( Σ_j softmax_j(s) · v[j,kvh] )  (softmax and sum in fp32)
  // -> [T, heads*dv]. Absorbed (decode) form: k = v = latent cache, kv_heads 1;
  // expanded (prefill) form: k = per-head k_nope, v = per-head values.
  // capacity: the rows the cache behind k / v can hold (0: not given). k
  // holds only the rows in use, so a backend that splits a one-token step's
  // keys by the cache's size (the same within a recorded step) needs it.
  virtual Tensor attention_pe(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& q_pe,
                              const Tensor& k_pe, int64_t pos0, int64_t heads, int64_t kv_heads, float scale,
                              int64_t capacity = 0);
  // MLA input preparation, between the projections and attention_pe:
  // traditional RoPE on the last rope_dim columns of every head of
  // q [T, heads*(nope_dim+rope_dim)], split into q_nope [T, heads*nope_dim] and
  // q_pe [T, heads*rope_dim]; then ckv [T, kv_lora+rope_dim] = [latent | k_pe]:
  // the latent RMS-normalised with kv_norm, k_pe roped (traditional), both
  // written to the latent cache at positions pos0... Returns {q_nope, q_pe}.
  // q is not modified. Same results as rope, slice_cols, rms_norm, rope and
  // kv_write in that order.
  virtual std::pair<Tensor, Tensor> mla_rope_split_cache(const Tensor& q, const Tensor& ckv, const Tensor& kv_norm,
                                                         float eps, int64_t heads, int64_t nope_dim, int64_t rope_dim,
                                                         int64_t pos0, float base, KvLayer& cache);
  // mla_rope_split_cache(linear(x, q_b), ckv, ...): the q_b projection and
  // the preparation, with those ops' bits; a backend may launch it as one.
  virtual std::pair<Tensor, Tensor> linear_mla_rope_split_cache(const Tensor& x, const Weight& q_b, const Tensor& ckv,
                                                                const Tensor& kv_norm, float eps, int64_t heads,
                                                                int64_t nope_dim, int64_t rope_dim, int64_t pos0,
                                                                float base, KvLayer& cache);
  // Per-head matmuls over stacked matrices W logical [H, R, C] (MLX
  // MultiLinear: GLM's embed_q / unembed_out). x is [T, H*Kin] (head h reads
  // columns [h*Kin, (h+1)*Kin)) or [T, Kin] (one input shared by every head).
  //   transpose = true:  out[t,h] = x[t,h] @ W[h]ᵀ   (Kin = C, N = R)
  //   transpose = false: out[t,h] = x[t,h] @ W[h]    (Kin = R, N = C; fp32 sum
  //                      over r in index order)
  // Weights dequantised as fp32 scale·q + bias, fp32 accumulation, one bf16
  // rounding -> [T, H*N].
  virtual Tensor multi_linear(const Tensor& x, const Weight& w, bool transpose);
  // Columns [offset, offset+width) of every consecutive group of `group`
  // columns: x [T, n*group] -> [T, n*width] (splits a fused projection, e.g.
  // MLA's per-head [nope | rope] query or the [latent | k_pe] kv projection).
  virtual Tensor slice_cols(const Tensor& x, int64_t group, int64_t offset, int64_t width);
  // A one-head cache for multi-latent attention: K rows k_dim wide (the
  // latent), V rows v_dim wide (the roped shared key); k / v are
  // [1, capacity, k_dim / v_dim], so first_rows() reads them token-major.
  virtual KvLayer new_latent_kv_layer(int64_t k_dim, int64_t v_dim, int64_t capacity);

  // Router: softmax (fp32, stored bf16) over logits [T, E], top-k, optional
  // renormalisation (bf16), as Qwen3-MoE does.
  virtual Routing route_softmax_topk(const Tensor& logits, int64_t k, bool normalize) = 0;
  // Router, LFM2 / spec §3.2: sw = bf16(sigmoid(z)); the top-k of fp32(sw) +
  // bias (F32 [E], selection only; ties to the lower id) in descending order;
  // w = sw[inds]; when normalize, w = bf16(w / bf16(bf16(Σw) + eps)); then
  // w = bf16(w · scaling). Scores are bf16.
  virtual Routing route_sigmoid_topk(const Tensor& logits, const Tensor& bias, int64_t k, bool normalize,
                                     float eps, float scaling) = 0;

  // Router, GLM-4.7-Flash / mlx-lm glm4_moe_lite (spec §2.2): s = sigmoid(fp32(z))
  // kept in fp32; sel = s + bias (F32 [E], selection only). When n_group > 1
  // the E experts form n_group consecutive groups scored by the sum of their
  // two best sel values, and sel of every expert outside the best topk_group
  // groups is set to 0 (as MLX does). inds = top-k of sel (descending, ties
  // to the lower id); w = s[inds]; when normalize w = w / (Σw + eps); then
  // w = w · scaling. Scores are F32 [T, k] (combine with F32Products).
  virtual Routing route_sigmoid_grouped_topk(const Tensor& logits, const Tensor& bias, int64_t k, int64_t n_group,
                                             int64_t topk_group, bool normalize, float eps, float scaling);

  // LFM2 ShortConv core (spec §3.2) on bcx = in_proj(x) [T, 3C] = [B | C | x]:
  // Bx = bf16(B·x); seq = concat(state, Bx) with state [L-1, C] the previous
  // L-1 Bx rows (zeros at the start); conv[t, c] = bf16(Σ_k seq[t+k, c]·w[c, k])
  // (depthwise cross-correlation, fp32 sum in k order, w [C, L] or [C, L, 1]);
  // returns bf16(C · conv) [T, C] and updates state in place to the last L-1
  // rows of seq.
  virtual Tensor short_conv(const Tensor& bcx, Tensor& state, const Tensor& w) = 0;
  // short_conv(linear(x, in_proj), state, w): LFM2's conv block up to its
  // out_proj, with those ops' bits; a backend may launch it as one.
  virtual Tensor linear_short_conv(const Tensor& x, const Weight& in_proj, Tensor& state, const Tensor& w);

  // Unfused expert matmuls: out[t, j] = x[t] (or x[t, j] when x has T·k
  // rows) @ W[experts[t, j]]ᵀ -> [T, k, N] bf16.
  virtual Tensor gather_qmm(const Tensor& x, const Weight& w, const Routing& r) = 0;
  // out[t] = Σ_j scores[t, j] · y[t, j]  ->  [T, D] bf16.
  virtual Tensor moe_combine(const Tensor& y, const Routing& r, CombineMode mode) = 0;

  // Fused forms (the patch layer's kernels). Same rounding points and
  // reduction order as the unfused ops above, so results are bit-identical.
  // gate/up matmuls + SwiGLU for every selected expert in one pass -> [T, k, I].
  virtual Tensor gather_qmm_swiglu(const Tensor& x, const Weight& gate, const Weight& up,
                                   const Routing& r) = 0;
  // down projection of h [T, k, I] + weighted combine in one pass -> [T, D].
  virtual Tensor gather_qmm_combine(const Tensor& h, const Weight& down, const Routing& r,
                                    CombineMode mode) = 0;
  // Dense SwiGLU MLP gate+up in one pass: swiglu(x@Wgᵀ, x@Wuᵀ) -> [T, I].
  virtual Tensor linear_swiglu(const Tensor& x, const Weight& gate, const Weight& up) = 0;
  // A MoE block with a shared expert (GLM), whose fused form folds the
  // shared expert into the routed kernels. {linear(x, w), linear_swiglu(x,
  // gate, up)}: the router's logits and the shared expert's gate+up from one
  // input, each with its own op's bits; a backend may launch them as one.
  virtual std::pair<Tensor, Tensor> linear_and_swiglu(const Tensor& x, const Weight& w, const Weight& gate,
                                                      const Weight& up);
  // linear_and_swiglu, then route_sigmoid_grouped_topk of the logits with
  // `router`'s parameters: {routing, shared gate+up}, with those ops' bits; a
  // backend may pick the experts inside the same launch (GLM's MoE block).
  virtual std::pair<Routing, Tensor> linear_route_grouped_and_swiglu(const Tensor& x, const Weight& w,
                                                                     const GroupedRouter& router, const Weight& gate,
                                                                     const Weight& up);
  // linear(x, w), then route_softmax_topk or route_sigmoid_topk of the
  // logits with `router`'s parameters, with those ops' bits; a backend may
  // pick the experts inside the router's launch (Qwen3's and LFM2's fused
  // MoE blocks).
  virtual Routing linear_route(const Tensor& x, const Weight& w, const TopKRouter& router);
  // route_softmax_topk or route_sigmoid_topk of the logits, as `router` says.
  Routing route_topk(const Tensor& logits, const TopKRouter& router);
  // gather_qmm_combine(h, down, r, mode), then add(out, linear(shared_h,
  // shared_down)): the routed experts' output plus the shared expert's, with
  // those ops' bits; a backend may launch it as one.
  virtual Tensor gather_qmm_combine_shared(const Tensor& h, const Weight& down, const Routing& r, CombineMode mode,
                                           const Tensor& shared_h, const Weight& shared_down);

  // For a device transport (NCCL) that must order its transfers with this
  // backend's kernels: the stream every op runs on (a cudaStream_t) and the
  // GPU's index. nullptr / -1 on host backends.
  virtual void* native_stream() const { return nullptr; }
  virtual int device_index() const { return -1; }

  // Prompt tokens per prefill forward pass when the caller leaves it open
  // (GenerateOptions::prefill_chunk = 0). Longer passes feed the GPU's
  // GEMMs and flash attention more rows at once (the CUDA backend picks up
  // to 8,192 by its free memory); the CPU keeps 512.
  virtual int prefill_chunk() const { return 512; }
  // The most prompt tokens one forward pass may hand this backend, for a
  // model routing each token to `experts_per_token` experts (0: dense).
  // Host backends have no per-call limit.
  virtual int max_prefill_pass(int64_t experts_per_token) const {
    (void)experts_per_token;
    return std::numeric_limits<int>::max();
  }

  // Peak bytes this backend has held in device memory (weights + pool);
  // 0 for host backends, whose memory shows in the process RSS.
  virtual uint64_t peak_device_bytes() const { return 0; }

  // argmax of one row of bf16 logits [R, V], ties to the lower id (as the
  // greedy sampler); the default reads the row back to the host.
  virtual int32_t argmax_row(const Tensor& logits, int64_t row);

  // One decode step: `step` runs the model on {token} at position `pos` and
  // returns its logits. A backend may record the step once (CUDA graph) and
  // replay the recording for later steps with the same `key` — the caller's
  // promise that the model, its modules and the cache buffers are unchanged
  // (see gen/decode_step.h); key 0 means "run eagerly, do not record". The
  // logits of a replay stay valid until the next step. Default: run eagerly.
  virtual Tensor decode_step(uint64_t key, int32_t token, int64_t pos, const std::function<Tensor()>& step) {
    (void)key, (void)token, (void)pos;
    return step();
  }

  // Chained greedy decoding, so the device never waits for the host between
  // steps: enqueues the step at position `pos` (as decode_step, key 0 too)
  // followed by its argmax. Its input token is `token`, or,
  // when `token` < 0, the token the previous chained step (at pos - 1) chose
  // on the device. `step(t)` runs the model on {t}; a recording backend
  // reads the token from the device instead, and may pass any valid id. May
  // return before the step has run; chained_token(pos) waits for it and
  // returns the token it chose. Default: synchronous, via decode_step and
  // argmax_row.
  virtual void decode_step_chained(uint64_t key, int32_t token, int64_t pos,
                                   const std::function<Tensor(int32_t)>& step);
  virtual int32_t chained_token(int64_t pos);

  // Sampling (the algorithm of gen/sampler.h, arithmetic in
  // gen/sampling_math.h). sample_row: one token from row `row` of bf16
  // logits [R, V], draw `draw` of p.seed, `window` the ids the repetition
  // penalty sees, `output` the tokens generated so far (the frequency and
  // presence penalties count them). The default reads the row back to the
  // host; a GPU backend samples on the device and one id crosses.
  virtual int32_t sample_row(const Tensor& logits, int64_t row, const sampling::Params& p,
                             std::span<const int32_t> window, std::span<const int32_t> output, uint64_t draw);
  // Whether chained steps can sample by `p` on the device (set_chain_sampler).
  virtual bool samples_chained(const sampling::Params& p) const { return false; }
  // The chained steps that follow sample by *p (null: argmax, as before)
  // from draw `draw` on, the penalties seeing `window` and `output` and
  // then each picked token (the window its last p.window_cap). Only where
  // samples_chained(*p).
  virtual void set_chain_sampler(const sampling::Params* p, std::span<const int32_t> window,
                                 std::span<const int32_t> output, uint64_t draw);

 protected:
  // The default chained steps' results by position (pos & 3), so a caller
  // may run two steps ahead of the tokens it has read (see
  // decode_step_chained).
  struct ChainedResult {
    int64_t pos = -1;
    int32_t token = -1;
  };
  ChainedResult chained_results_[4];

  // For router implementations: checks the call (k of E experts; an F32 [E]
  // bias when given; n_group / topk_group dividing E) and allocates the
  // result, ids I32 [T, k] and scores [T, k] of `score_dtype`.
  Routing new_routing(const Tensor& logits, int64_t k, DType score_dtype, const Tensor* bias = nullptr,
                      int64_t n_group = 1, int64_t topk_group = 1);
};

std::unique_ptr<Backend> make_cpu_backend();
#ifdef ZMLX_HAVE_CUDA
std::unique_ptr<Backend> make_cuda_backend(int device = 0);
bool cuda_device_present();
int cuda_device_count();  // visible GPUs (0 when the driver is missing)
#endif
// "cpu", "cuda" or "auto" (CUDA when this build has it and a GPU is present).
// An unavailable choice is an error that says why.
std::unique_ptr<Backend> make_backend(const std::string& name);
// The backend of one rank of `place` (make_backend when it is not active).
// CPU ranks exchange host buffers over MPI. CUDA ranks run on GPU
// local rank % device count, and place.comm becomes a NCCL communicator for
// their activations (control messages stay on MPI). "auto" picks CUDA only
// when every rank can (a GPU visible, NCCL in the build). Fills place.devices.
// Collective under --parallel: every rank calls it.
std::unique_ptr<Backend> make_backend_for_ranks(const std::string& name, dist::Placement& place);

}  // namespace zmlx
