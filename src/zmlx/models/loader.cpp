#include "zmlx/models/loader.h"

#include <unistd.h>

#include <cstring>

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

// Copies rows [lo, hi) (axis 0) or columns [lo, hi) (axis 1, in elements)
// of every matrix of a [E?, R, C] tensor into host memory.
static Tensor slice_matrices(const Tensor& t, int axis, int64_t lo, int64_t hi) {
  const size_t nd = t.shape.size();
  const int64_t E = nd == 3 ? t.shape[0] : 1, R = t.shape[nd - 2], C = t.shape[nd - 1];
  std::vector<int64_t> shape = t.shape;
  shape[nd - 2 + size_t(axis)] = hi - lo;
  Tensor out = host_tensor(t.dtype, shape);
  const size_t es = dtype_size(t.dtype);
  const uint8_t* src = static_cast<const uint8_t*>(t.data);
  uint8_t* dst = static_cast<uint8_t*>(out.data);
  for (int64_t e = 0; e < E; ++e) {
    const uint8_t* m = src + size_t(e * R * C) * es;
    if (axis == 0) {
      const size_t n = size_t((hi - lo) * C) * es;
      std::memcpy(dst, m + size_t(lo * C) * es, n);
      dst += n;
    } else {
      for (int64_t r = 0; r < R; ++r) {
        const size_t n = size_t(hi - lo) * es;
        std::memcpy(dst, m + size_t(r * C + lo) * es, n);
        dst += n;
      }
    }
  }
  return out;
}

// Matrices [lo, hi) of a stacked [E, R, C] tensor: one contiguous block.
static Tensor slice_stack(const Tensor& t, int64_t lo, int64_t hi) {
  std::vector<int64_t> shape = t.shape;
  const size_t per = t.nbytes() / size_t(shape[0]);
  shape[0] = hi - lo;
  Tensor out = host_tensor(t.dtype, shape);
  std::memcpy(out.data, static_cast<const uint8_t*>(t.data) + size_t(lo) * per, size_t(hi - lo) * per);
  return out;
}

static void shard_weight(Weight& w, const Shard& s) {
  const int n = s.count, i = s.index;
  if (s.axis == Shard::Stack) {
    ZMLX_CHECK(w.experts > 0 && w.experts % n == 0,
               "--parallel tensor: {} stacks {} matrices, which do not split into {} shards", w.name, w.experts, n);
    const int64_t per = w.experts / n, lo = per * i, hi = lo + per;
    w.w = slice_stack(w.w, lo, hi);
    if (w.quantized) {
      w.scales = slice_stack(w.scales, lo, hi);
      w.biases = slice_stack(w.biases, lo, hi);
    }
    w.experts = per;
  } else if (s.axis == Shard::Rows) {
    ZMLX_CHECK(w.rows % n == 0, "--parallel tensor: {} has {} output rows, which do not split into {} shards",
               w.name, w.rows, n);
    const int64_t per = w.rows / n, lo = per * i, hi = lo + per;
    w.w = slice_matrices(w.w, 0, lo, hi);
    if (w.quantized) {
      w.scales = slice_matrices(w.scales, 0, lo, hi);
      w.biases = slice_matrices(w.biases, 0, lo, hi);
    }
    w.rows = per;
  } else {
    ZMLX_CHECK(w.cols % n == 0, "--parallel tensor: {} has {} input columns, which do not split into {} shards",
               w.name, w.cols, n);
    const int64_t per = w.cols / n, lo = per * i, hi = lo + per;
    if (w.quantized) {
      ZMLX_CHECK(per % w.q.group_size == 0 && (per * w.q.bits) % 32 == 0,
                 "--parallel tensor: {} splits its {} input columns into shards of {}, which is not a multiple of "
                 "the quantization group size {} (shards must start on group boundaries)",
                 w.name, w.cols, per, w.q.group_size);
      const int64_t wpc = w.q.bits;  // words per 32 columns
      w.w = slice_matrices(w.w, 1, lo * wpc / 32, hi * wpc / 32);
      w.scales = slice_matrices(w.scales, 1, lo / w.q.group_size, hi / w.q.group_size);
      w.biases = slice_matrices(w.biases, 1, lo / w.q.group_size, hi / w.q.group_size);
    } else {
      w.w = slice_matrices(w.w, 1, lo, hi);
    }
    w.cols = per;
  }
}

void WeightLoader::skip(const std::string& prefix) {
  for (auto& n : store_->names())
    if (n.compare(0, prefix.size(), prefix) == 0) used_.insert(n);
}

Weight WeightLoader::linear(const std::string& path, int64_t rows, int64_t cols, int64_t experts,
                            int64_t active_experts, bool reads_one_row, Shard shard) {
  return load_linear(path, rows, cols, experts, active_experts, reads_one_row, shard, /*adopt=*/true);
}

Weight WeightLoader::linear_on_host(const std::string& path, int64_t rows, int64_t cols) {
  return load_linear(path, rows, cols, 0, 0, false, {}, /*adopt=*/false);
}

Weight WeightLoader::load_linear(const std::string& path, int64_t rows, int64_t cols, int64_t experts,
                                 int64_t active_experts, bool reads_one_row, Shard shard, bool adopt) {
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
  if (shard.axis != Shard::None && shard.count > 1) {
    shard_weight(w, shard);
    rows = w.rows;
    cols = w.cols;
    experts = w.experts;
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
  if (progress_) progress_->advance(s.bytes);
  return adopt ? be_.adopt(w) : w;
}

std::vector<std::string> WeightLoader::unused() const {
  std::vector<std::string> out;
  for (auto& n : store_->names())
    if (!used_.count(n)) out.push_back(n);
  return out;
}

std::unique_ptr<SwigluMlp> WeightLoader::swiglu_mlp(const std::string& prefix, int64_t inter, int64_t dim,
                                                    int tp_index, int tp_count) {
  ZMLX_CHECK(inter % tp_count == 0, "--parallel tensor: {}: intermediate size {} does not divide across {} ranks",
             prefix, inter, tp_count);
  auto m = std::make_unique<SwigluMlp>();
  m->gate_proj = linear(prefix + ".gate_proj", inter, dim, 0, 0, false, {Shard::Rows, tp_index, tp_count});
  m->up_proj = linear(prefix + ".up_proj", inter, dim, 0, 0, false, {Shard::Rows, tp_index, tp_count});
  m->down_proj = linear(prefix + ".down_proj", dim, inter, 0, 0, false, {Shard::Cols, tp_index, tp_count});
  return m;
}

void WeightLoader::switch_experts(MoeBlock& moe, const std::string& prefix, int64_t experts, int64_t inter,
                                  int64_t dim, int64_t k, int tp_index, int tp_count) {
  ZMLX_CHECK(inter % tp_count == 0,
             "--parallel tensor: {}: moe_intermediate_size {} does not divide across {} ranks", prefix, inter,
             tp_count);
  moe.gate_proj = linear(prefix + ".switch_mlp.gate_proj", inter, dim, experts, k, false,
                         {Shard::Rows, tp_index, tp_count});
  moe.up_proj = linear(prefix + ".switch_mlp.up_proj", inter, dim, experts, k, false,
                       {Shard::Rows, tp_index, tp_count});
  moe.down_proj = linear(prefix + ".switch_mlp.down_proj", dim, inter, experts, k, false,
                         {Shard::Cols, tp_index, tp_count});
  moe.top_k = k;
}

GqaAttention WeightLoader::gqa_attention(const std::string& prefix, const char* o_name, const char* q_norm_name,
                                         const char* k_norm_name, int64_t heads, int64_t kv_heads,
                                         int64_t head_dim, int64_t dim, int tp_index, int tp_count) {
  // Tensor parallel: whole heads per rank (q/k/v rows by head, o_proj columns).
  ZMLX_CHECK(heads % tp_count == 0 && kv_heads % tp_count == 0,
             "--parallel tensor: {}: {} attention heads and {} key/value heads do not both divide across {} ranks",
             prefix, heads, kv_heads, tp_count);
  const Shard rows{Shard::Rows, tp_index, tp_count}, cols{Shard::Cols, tp_index, tp_count};
  GqaAttention a;
  a.q_proj = linear(prefix + ".q_proj", heads * head_dim, dim, 0, 0, false, rows);
  a.k_proj = linear(prefix + ".k_proj", kv_heads * head_dim, dim, 0, 0, false, rows);
  a.v_proj = linear(prefix + ".v_proj", kv_heads * head_dim, dim, 0, 0, false, rows);
  a.o_proj = linear(prefix + "." + o_name, dim, heads * head_dim, 0, 0, false, cols);
  a.q_norm = tensor(prefix + "." + q_norm_name + ".weight", DType::BF16, {head_dim});
  a.k_norm = tensor(prefix + "." + k_norm_name + ".weight", DType::BF16, {head_dim});
  a.heads = heads / tp_count;
  a.kv_heads = kv_heads / tp_count;
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
