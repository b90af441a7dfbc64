#include "zmlx/models/loader.h"

#include <unistd.h>

#include "zmlx/core/error.h"

namespace zmlx {

WeightLoader::WeightLoader(Model& model, std::shared_ptr<io::WeightStore> store, Backend& be)
    : model_(model), store_(std::move(store)), be_(be) {
  if (isatty(2)) progress_ = std::make_unique<Progress>("[zmlx] loading", store_->total_bytes());
}

Tensor WeightLoader::view(const io::TensorInfo& info) {
  Tensor t;
  t.dtype = info.dtype;
  t.shape = info.shape;
  t.device = Device::CPU;
  t.storage = std::shared_ptr<void>(store_, nullptr);  // keeps the mapping alive
  t.data = const_cast<uint8_t*>(info.data);
  used_.insert(info.name);
  return t;
}

Tensor WeightLoader::tensor(const std::string& name, DType dtype, const std::vector<int64_t>& shape) {
  return be_.adopt(view(store_->get(name, dtype, shape)));
}

static std::vector<int64_t> with_experts(int64_t experts, std::vector<int64_t> s) {
  if (experts > 0) s.insert(s.begin(), experts);
  return s;
}

Weight WeightLoader::linear(const std::string& path, int64_t rows, int64_t cols, int64_t experts,
                            int64_t active_experts, bool reads_one_row) {
  const ModelConfig& cfg = model_.config();
  Weight w;
  w.name = path;
  w.experts = experts;
  w.rows = rows;
  w.cols = cols;
  w.lookup_only = reads_one_row;
  const io::TensorInfo& wi = store_->get(path + ".weight");
  if (store_->has(path + ".scales")) {
    const io::TensorInfo& si = store_->get(path + ".scales");
    ZMLX_CHECK(wi.dtype == DType::U32, "{}: {}.weight is {} but a quantized weight must be U32 ({})", wi.file,
               path, dtype_name(wi.dtype), path);
    const size_t nd = experts > 0 ? 3 : 2;
    ZMLX_CHECK(wi.shape.size() == nd && si.shape.size() == nd,
               "{}: {} expected {}-D weight/scales, found weight {} scales {}", wi.file, path, nd,
               wi.shape_str(), si.shape_str());
    const int64_t words = wi.shape.back(), groups = si.shape.back();
    ZMLX_CHECK(words > 0 && groups > 0 && (32 * words) % cols == 0 &&
                   cols % groups == 0,
               "{}: {}: weight {} / scales {} do not fit a logical [{}, {}] matrix", wi.file, path,
               wi.shape_str(), si.shape_str(), rows, cols);
    quant::QuantParams q{int(32 * words / cols), int(cols / groups)};
    ZMLX_CHECK(quant::supported(q),
               "{}: {}: tensor shapes imply bits={} group_size={}, which is unsupported (weight {}, scales {})",
               wi.file, path, q.bits, q.group_size, wi.shape_str(), si.shape_str());
    if (auto want = cfg.quant.for_module(path)) {
      ZMLX_CHECK(want->bits == q.bits && want->group_size == q.group_size,
                 "{}: {}: config.json quantization says bits={} group_size={}, but the tensors have "
                 "bits={} group_size={} (weight {}, scales {})",
                 wi.file, path, want->bits, want->group_size, q.bits, q.group_size, wi.shape_str(),
                 si.shape_str());
    } else {
      ZMLX_CHECK(cfg.quant.present, "{}: {} is quantized but config.json has no 'quantization' block",
                 cfg.path, path);
    }
    w.quantized = true;
    w.q = q;
    w.w = view(store_->get(path + ".weight", DType::U32, with_experts(experts, {rows, words})));
    const io::TensorInfo& sc = store_->get(path + ".scales");
    ZMLX_CHECK(sc.dtype == DType::BF16, "{}: {}.scales is {}; zmlx supports BF16 scales and biases", sc.file,
               path, dtype_name(sc.dtype));
    w.scales = view(store_->get(path + ".scales", DType::BF16, with_experts(experts, {rows, groups})));
    w.biases = view(store_->get(path + ".biases", DType::BF16, with_experts(experts, {rows, groups})));
  } else {
    w.quantized = false;
    w.w = view(store_->get(path + ".weight", DType::BF16, with_experts(experts, {rows, cols})));
  }

  WeightSummary s;
  s.path = path;
  s.shape = with_experts(experts, {rows, cols});
  s.quantized = w.quantized;
  s.bits = w.quantized ? w.q.bits : 16;
  s.group_size = w.quantized ? w.q.group_size : 0;
  const uint64_t per = w.bytes_per_matrix();
  s.bytes = per * uint64_t(experts > 0 ? experts : 1);
  s.params = rows * cols * (experts > 0 ? experts : 1);
  if (reads_one_row) {  // an embedding reads one row per token
    s.bytes_per_token = per / uint64_t(rows);
    s.active_params = cols;
  } else {
    const int64_t act = experts > 0 ? active_experts : 1;
    s.bytes_per_token = per * uint64_t(act);
    s.active_params = rows * cols * act;
  }
  model_.summaries_.push_back(s);
  Weight adopted = be_.adopt(w);
  if (progress_) progress_->advance(s.bytes);
  return adopted;
}

std::vector<std::string> WeightLoader::unused() const {
  std::vector<std::string> out;
  for (auto& n : store_->names())
    if (!used_.count(n)) out.push_back(n);
  return out;
}

std::unique_ptr<SwigluMlp> WeightLoader::swiglu_mlp(const std::string& prefix, int64_t inter, int64_t dim) {
  auto m = std::make_unique<SwigluMlp>();
  m->gate_proj = linear(prefix + ".gate_proj", inter, dim);
  m->up_proj = linear(prefix + ".up_proj", inter, dim);
  m->down_proj = linear(prefix + ".down_proj", dim, inter);
  return m;
}

void WeightLoader::switch_experts(MoeBlock& moe, const std::string& prefix, int64_t experts, int64_t inter,
                                  int64_t dim, int64_t k) {
  moe.gate_proj = linear(prefix + ".switch_mlp.gate_proj", inter, dim, experts, k);
  moe.up_proj = linear(prefix + ".switch_mlp.up_proj", inter, dim, experts, k);
  moe.down_proj = linear(prefix + ".switch_mlp.down_proj", dim, inter, experts, k);
  moe.top_k = k;
}

GqaAttention WeightLoader::gqa_attention(const std::string& prefix, const char* o_name, const char* q_norm_name,
                                         const char* k_norm_name, int64_t heads, int64_t kv_heads,
                                         int64_t head_dim, int64_t dim) {
  GqaAttention a;
  a.q_proj = linear(prefix + ".q_proj", heads * head_dim, dim);
  a.k_proj = linear(prefix + ".k_proj", kv_heads * head_dim, dim);
  a.v_proj = linear(prefix + ".v_proj", kv_heads * head_dim, dim);
  a.o_proj = linear(prefix + "." + o_name, dim, heads * head_dim);
  a.q_norm = tensor(prefix + "." + q_norm_name + ".weight", DType::BF16, {head_dim});
  a.k_norm = tensor(prefix + "." + k_norm_name + ".weight", DType::BF16, {head_dim});
  a.heads = heads;
  a.kv_heads = kv_heads;
  a.head_dim = head_dim;
  return a;
}

Weight WeightLoader::output_projection(const Weight& embed, int64_t vocab, int64_t dim, bool may_tie) {
  if (!may_tie || has("lm_head.weight")) return linear("lm_head", vocab, dim);
  Weight head = embed;  // tied: the embedding table is also the output projection
  head.lookup_only = false;
  return be_.adopt(head);
}

void WeightLoader::check_all_used() const {
  const auto left = unused();
  ZMLX_CHECK(left.empty(), "{}: {} tensor(s) in the checkpoint belong to no {} module, e.g. '{}'", store_->dir(),
             left.size(), model_.config().model_type, left.front());
}

}  // namespace zmlx
