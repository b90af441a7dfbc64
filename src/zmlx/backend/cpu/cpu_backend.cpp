// The CPU backend: reference numerics and a fast path (OpenMP threads over
// output rows, SIMD mat-vec kernels from qgemv.h).
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <limits>

#include "zmlx/backend/cpu/elementwise.h"
#include "zmlx/backend/cpu/qgemv.h"
#include "zmlx/backend/cpu/repack.h"
#include "zmlx/core/error.h"
#include "zmlx/ops/backend.h"

namespace zmlx {
namespace {

using cpu::MatrixView;
using cpu::PreparedRows;

constexpr int64_t kRowBlock = 16;  // output rows per work item (weights stay in L1)

void check_bf16_2d(const Tensor& t, const char* what) {
  ZMLX_CHECK(t.dtype == DType::BF16, "{}: expected a bf16 tensor, got {}", what, dtype_name(t.dtype));
}

// Groups the (token, slot) pairs of a routing by expert, in token-major order
// inside each expert. Both the fused and unfused MoE paths use this order.
struct ExpertGroups {
  std::vector<int32_t> experts;                // experts with at least one pair
  std::vector<std::vector<int64_t>> pairs;     // per listed expert: t * k + j
};

ExpertGroups group_by_expert(const Routing& r, int64_t T, int64_t n_experts) {
  const int32_t* ex = r.experts.ptr<int32_t>();
  std::vector<std::vector<int64_t>> by(static_cast<size_t>(n_experts));
  for (int64_t p = 0; p < T * r.k; ++p) {
    ZMLX_CHECK(ex[p] >= 0 && ex[p] < n_experts, "router selected expert {} of {}", ex[p], n_experts);
    by[size_t(ex[p])].push_back(p);
  }
  ExpertGroups g;
  for (int64_t e = 0; e < n_experts; ++e)
    if (!by[size_t(e)].empty()) {
      g.experts.push_back(int32_t(e));
      g.pairs.push_back(std::move(by[size_t(e)]));
    }
  return g;
}

// For every expert group, computes fp32 rows W_e · x_pair for all its pairs:
// result[group][pair_index * N + n]. `x_row(pair)` gives the bf16 input row.
template <typename XRow>
std::vector<std::vector<float>> expert_matmuls(const Weight& w, const ExpertGroups& g, int64_t K,
                                               XRow x_row) {
  const int64_t N = w.rows;
  const size_t G = g.experts.size();
  std::vector<PreparedRows> prepared(G);
  std::vector<std::vector<float>> out(G);
  // Gather + prepare per expert group, in parallel when there are many (prefill).
#pragma omp parallel if (G > 8)
  {
    std::vector<uint16_t> gathered;
#pragma omp for schedule(dynamic, 1)
    for (size_t i = 0; i < G; ++i) {
      const auto& pairs = g.pairs[i];
      gathered.resize(pairs.size() * size_t(K));
      for (size_t p = 0; p < pairs.size(); ++p)
        std::memcpy(&gathered[p * K], x_row(pairs[p]), size_t(K) * 2);
      prepared[i].prepare(gathered.data(), int64_t(pairs.size()), K, K,
                          cpu::layouts_needed(cpu::matrix_view(w, g.experts[i])));
      out[i].resize(pairs.size() * size_t(N));
    }
  }
  const int64_t blocks = (N + kRowBlock - 1) / kRowBlock;
  const int64_t items = int64_t(G) * blocks;
#pragma omp parallel for schedule(static)
  for (int64_t it = 0; it < items; ++it) {
    const size_t gi = size_t(it / blocks);
    const int64_t r0 = (it % blocks) * kRowBlock, r1 = std::min(N, r0 + kRowBlock);
    const MatrixView m = cpu::matrix_view(w, g.experts[gi]);
    cpu::gemv_rows(m, r0, r1, prepared[gi], 0, prepared[gi].T(), out[gi].data() + r0, N);
  }
  return out;
}

// ZMLX_PROFILE=1: wall time per backend op, printed at exit (for tuning).
struct OpProfile {
  std::map<std::string, std::pair<double, long>> t;
  bool on = std::getenv("ZMLX_PROFILE") != nullptr;
  ~OpProfile() {
    if (!on) return;
    double total = 0;
    for (auto& [k, v] : t) total += v.first;
    for (auto& [k, v] : t)
      fmt::print(stderr, "[zmlx profile] {:<20} {:9.3f} s {:6.1f}%  {} calls\n", k, v.first, 100 * v.first / total, v.second);
  }
};
OpProfile& profile() {
  static OpProfile p;
  return p;
}
struct OpTimer {
  const char* name;
  std::chrono::steady_clock::time_point t0;
  explicit OpTimer(const char* n) : name(n), t0(profile().on ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{}) {}
  ~OpTimer() {
    if (!profile().on) return;
    auto& e = profile().t[name];
    e.first += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    e.second++;
  }
};

bool repack_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("ZMLX_CPU_REPACK");
    return cpu::active_isa() == cpu::Isa::Avx512 && !(e && std::string(e) == "0");
  }();
  return on;
}

class CpuBackend final : public Backend {
 public:
  std::string name() const override { return fmt::format("cpu ({}, {} threads)", cpu::isa_name(cpu::active_isa()), omp_get_max_threads()); }
  Device device() const override { return Device::CPU; }

  // 4-bit matrices get the row-interleaved copy the AVX-512 kernel prefers
  // (ZMLX_CPU_REPACK=0 keeps only the checkpoint layout, e.g. to save memory).
  Weight adopt(const Weight& w) override {
    if (!repack_enabled() || !cpu::can_repack(w)) return w;
    Weight r = w;
    cpu::repack_rows16(r);
    return r;
  }

  Tensor alloc(DType dtype, std::vector<int64_t> shape) override { return host_tensor(dtype, std::move(shape)); }
  Tensor from_host(const Tensor& h) override { return h; }
  Tensor to_host(const Tensor& t) override { return t; }

  Tensor embed(const Weight& table, const std::vector<int32_t>& ids) override {
    OpTimer timer_("embed");
    const int64_t T = int64_t(ids.size()), D = table.cols;
    Tensor out = alloc(DType::BF16, {T, D});
    uint16_t* o = out.ptr<uint16_t>();
    std::vector<float> row(static_cast<size_t>(D));
    for (int64_t t = 0; t < T; ++t) {
      const int32_t id = ids[size_t(t)];
      ZMLX_CHECK(id >= 0 && id < table.rows, "token id {} is outside the vocabulary [0, {})", id, table.rows);
      if (table.quantized) {
        const MatrixView m = cpu::matrix_view(table);
        quant::dequantize_row(m.w + id * table.words_per_row(), m.scales + id * table.groups_per_row(),
                              m.biases + id * table.groups_per_row(), D, table.q, row.data());
        for (int64_t d = 0; d < D; ++d) o[t * D + d] = f32_to_bf16_bits(row[size_t(d)]);
      } else {
        std::memcpy(o + t * D, table.w.ptr<uint16_t>() + int64_t(id) * D, size_t(D) * 2);
      }
    }
    return out;
  }

  Tensor linear(const Tensor& x, const Weight& w) override {
    OpTimer timer_("linear");
    return std::move(linear_many(x, {&w})[0]);
  }

  std::vector<Tensor> linear_multi(const Tensor& x, const std::vector<const Weight*>& w) override {
    OpTimer timer_("linear");
    return linear_many(x, w);
  }

  // One parallel pass over the row blocks of every matrix in `ws` (x prepared
  // once); each thread rounds its own rows to bf16.
  std::vector<Tensor> linear_many(const Tensor& x, const std::vector<const Weight*>& ws) {
    check_bf16_2d(x, ws[0]->name.c_str());
    const int64_t T = x.rows(), K = x.cols();
    unsigned layouts = 0;
    std::vector<MatrixView> views;
    std::vector<int64_t> first_block{0};
    std::vector<Tensor> out;
    std::vector<std::vector<float>> acc(ws.size());
    for (const Weight* w : ws) {
      ZMLX_CHECK(K == w->cols, "{}: input has {} features, weight expects {}", w->name, K, w->cols);
      views.push_back(cpu::matrix_view(*w));
      layouts |= cpu::layouts_needed(views.back());
      first_block.push_back(first_block.back() + (w->rows + kRowBlock - 1) / kRowBlock);
      out.push_back(alloc(DType::BF16, {T, w->rows}));
      acc[out.size() - 1].resize(static_cast<size_t>(T * w->rows));
    }
    PreparedRows px;
    px.prepare(x.ptr<uint16_t>(), T, K, K, layouts);
    const int64_t blocks = first_block.back();
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      size_t i = 0;
      while (b >= first_block[i + 1]) ++i;
      const int64_t N = ws[i]->rows;
      const int64_t r0 = (b - first_block[i]) * kRowBlock, r1 = std::min(N, r0 + kRowBlock);
      float* a = acc[i].data();
      cpu::gemv_rows(views[i], r0, r1, px, 0, T, a + r0, N);
      uint16_t* o = out[i].ptr<uint16_t>();
      for (int64_t t = 0; t < T; ++t)
        for (int64_t r = r0; r < r1; ++r) o[t * N + r] = f32_to_bf16_bits(a[size_t(t * N + r)]);
    }
    return out;
  }

  Tensor rms_norm(const Tensor& x, const Tensor& w, float eps) override {
    OpTimer timer_("rms_norm");
    check_bf16_2d(x, "rms_norm input");
    const int64_t D = w.numel();
    ZMLX_CHECK(x.numel() % D == 0, "rms_norm: {} elements do not split into rows of {}", x.numel(), D);
    const int64_t R = x.numel() / D;
    Tensor out = alloc(DType::BF16, x.shape);
    const uint16_t* xi = x.ptr<uint16_t>();
    const uint16_t* wi = w.ptr<uint16_t>();
    uint16_t* o = out.ptr<uint16_t>();
#pragma omp parallel for schedule(static) if (R >= 64)
    for (int64_t r = 0; r < R; ++r) {
      float ss = 0.f;
      for (int64_t d = 0; d < D; ++d) {
        const float v = bf16_to_f32(xi[r * D + d]);
        ss += v * v;
      }
      const float inv = 1.0f / std::sqrt(ss / float(D) + eps);
      for (int64_t d = 0; d < D; ++d) {
        const float n = round_bf16(bf16_to_f32(xi[r * D + d]) * inv);
        o[r * D + d] = f32_to_bf16_bits(bf16_to_f32(wi[d]) * n);
      }
    }
    return out;
  }

  void rope(Tensor& x, int64_t heads, int64_t head_dim, int64_t rot_offset, int64_t rot_dims,
            int64_t pos0, float base, bool traditional) override {
    OpTimer timer_("rope");
    const int64_t T = x.rows(), half = rot_dims / 2;
    ZMLX_CHECK(x.cols() == heads * head_dim, "rope: row has {} values, expected {}x{}", x.cols(), heads,
               head_dim);
    std::vector<float> inv_freq(static_cast<size_t>(half));
    const float lb = std::log2(base);
    for (int64_t i = 0; i < half; ++i) inv_freq[size_t(i)] = std::exp2(-(float(i) / float(half)) * lb);
    uint16_t* p = x.ptr<uint16_t>();
    for (int64_t t = 0; t < T; ++t) {
      const float pos = float(pos0 + t);
      for (int64_t i = 0; i < half; ++i) {
        const float theta = pos * inv_freq[size_t(i)];
        const float c = std::cos(theta), s = std::sin(theta);
        for (int64_t h = 0; h < heads; ++h) {
          uint16_t* v = p + t * heads * head_dim + h * head_dim + rot_offset;
          const int64_t a = traditional ? 2 * i : i, b = traditional ? 2 * i + 1 : i + half;
          const float x0 = bf16_to_f32(v[a]), x1 = bf16_to_f32(v[b]);
          v[a] = f32_to_bf16_bits(x0 * c - x1 * s);
          v[b] = f32_to_bf16_bits(x0 * s + x1 * c);
        }
      }
    }
  }

  void add(Tensor& h, const Tensor& x) override {
    OpTimer timer_("add");
    ZMLX_CHECK(h.numel() == x.numel(), "add: {} vs {} elements", h.numel(), x.numel());
    uint16_t* a = h.ptr<uint16_t>();
    const uint16_t* b = x.ptr<uint16_t>();
    for (int64_t i = 0; i < h.numel(); ++i) a[i] = f32_to_bf16_bits(bf16_to_f32(a[i]) + bf16_to_f32(b[i]));
  }

  Tensor swiglu(const Tensor& gate, const Tensor& up) override {
    OpTimer timer_("swiglu");
    ZMLX_CHECK(gate.numel() == up.numel(), "swiglu: gate {} vs up {} elements", gate.numel(), up.numel());
    Tensor out = alloc(DType::BF16, gate.shape);
    const uint16_t* g = gate.ptr<uint16_t>();
    const uint16_t* u = up.ptr<uint16_t>();
    uint16_t* o = out.ptr<uint16_t>();
    for (int64_t i = 0; i < gate.numel(); ++i) o[i] = cpu::swiglu_bf16(g[i], u[i]);
    return out;
  }

  KvLayer new_kv_layer(int64_t kv_heads, int64_t head_dim, int64_t capacity) override {
    return kv_layer(kv_heads, head_dim, head_dim, capacity);
  }

  KvLayer new_latent_kv_layer(int64_t k_dim, int64_t v_dim, int64_t capacity) override {
    return kv_layer(1, k_dim, v_dim, capacity);
  }

  KvLayer kv_layer(int64_t heads, int64_t k_dim, int64_t v_dim, int64_t capacity) {
    KvLayer c;
    c.capacity = capacity;
    c.k = alloc(DType::BF16, {heads, capacity, k_dim});
    c.v = alloc(DType::BF16, {heads, capacity, v_dim});
    return c;
  }

  void kv_write(KvLayer& c, const Tensor& k, const Tensor& v, int64_t pos0) override {
    OpTimer timer_("kv_write");
    const int64_t H = c.k.dim(0), hd = c.k.dim(2), hv = c.v.dim(2), T = k.rows();
    ZMLX_CHECK(k.cols() == H * hd && v.cols() == H * hv && v.rows() == T,
               "kv_write: k [{}, {}] / v [{}, {}] do not fit a cache of {} heads x ({}, {})", k.rows(), k.cols(),
               v.rows(), v.cols(), H, hd, hv);
    if (pos0 + T > c.capacity) {  // grow geometrically, keeping what is cached
      int64_t cap = std::max<int64_t>(c.capacity * 2, pos0 + T + 256);
      KvLayer n = kv_layer(H, hd, hv, cap);
      for (int64_t h = 0; h < H; ++h) {
        std::memcpy(n.k.ptr<uint16_t>() + h * cap * hd, c.k.ptr<uint16_t>() + h * c.capacity * hd, size_t(pos0 * hd) * 2);
        std::memcpy(n.v.ptr<uint16_t>() + h * cap * hv, c.v.ptr<uint16_t>() + h * c.capacity * hv, size_t(pos0 * hv) * 2);
      }
      c = std::move(n);
    }
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h) {
        std::memcpy(c.k.ptr<uint16_t>() + (h * c.capacity + pos0 + t) * hd, k.ptr<uint16_t>() + (t * H + h) * hd, size_t(hd) * 2);
        std::memcpy(c.v.ptr<uint16_t>() + (h * c.capacity + pos0 + t) * hv, v.ptr<uint16_t>() + (t * H + h) * hv, size_t(hv) * 2);
      }
  }

  Tensor attention(const Tensor& q, const KvLayer& c, int64_t pos0, int64_t heads, int64_t kv_heads,
                   int64_t hd, float scale) override {
    OpTimer timer_("attention");
    const int64_t T = q.rows(), S = pos0 + T, group = heads / kv_heads;
    Tensor out = alloc(DType::BF16, {T, heads * hd});
    const uint16_t* qp = q.ptr<uint16_t>();
    uint16_t* o = out.ptr<uint16_t>();
#pragma omp parallel
    {
      std::vector<float> sc(static_cast<size_t>(S)), acc(static_cast<size_t>(hd));
#pragma omp for schedule(dynamic, 1) collapse(2)
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t t = 0; t < T; ++t) {
          const int64_t kvh = h / group, visible = pos0 + t + 1;  // causal
          const uint16_t* K = c.k.ptr<uint16_t>() + kvh * c.capacity * hd;
          const uint16_t* V = c.v.ptr<uint16_t>() + kvh * c.capacity * hd;
          // scores = scale · (q · k): bf16 products are exact, fp32 accumulation.
          const uint16_t* qh = qp + (t * heads + h) * hd;
          float mx = -std::numeric_limits<float>::infinity();
          for (int64_t j = 0; j < visible; ++j) {
            const float s = scale * cpu::dot_bf16(qh, K + j * hd, hd);
            sc[size_t(j)] = s;
            mx = std::max(mx, s);
          }
          float sum = 0.f;
          for (int64_t j = 0; j < visible; ++j) sum += (sc[size_t(j)] = std::exp(sc[size_t(j)] - mx));
          std::fill(acc.begin(), acc.end(), 0.f);
          for (int64_t j = 0; j < visible; ++j) cpu::axpy_bf16(sc[size_t(j)], V + j * hd, acc.data(), hd);
          const float inv = 1.0f / sum;
          for (int64_t d = 0; d < hd; ++d) o[(t * heads + h) * hd + d] = f32_to_bf16_bits(acc[size_t(d)] * inv);
        }
    }
    return out;
  }

  Tensor attention_pe(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& q_pe, const Tensor& k_pe,
                      int64_t pos0, int64_t heads, int64_t kv_heads, float scale, int64_t /*capacity*/) override {
    OpTimer timer_("attention_pe");
    for (const Tensor* t : {&q, &k, &v, &q_pe, &k_pe}) check_bf16_2d(*t, "attention_pe input");
    const int64_t T = q.rows(), S = pos0 + T;
    ZMLX_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0 && q.cols() % heads == 0 &&
                   q_pe.cols() % heads == 0 && v.cols() % kv_heads == 0 && q_pe.rows() == T,
               "attention_pe: {} heads / {} kv heads do not fit q [{}, {}], v [{}, {}], q_pe [{}, {}]", heads,
               kv_heads, q.rows(), q.cols(), v.rows(), v.cols(), q_pe.rows(), q_pe.cols());
    const int64_t dk = q.cols() / heads, dv = v.cols() / kv_heads, dr = q_pe.cols() / heads, group = heads / kv_heads;
    ZMLX_CHECK(k.cols() == kv_heads * dk && k_pe.cols() == dr && k.rows() >= S && v.rows() >= S && k_pe.rows() >= S,
               "attention_pe: k [{}, {}] / v [{}, {}] / k_pe [{}, {}] do not cover {} positions of {}x{} / {}",
               k.rows(), k.cols(), v.rows(), v.cols(), k_pe.rows(), k_pe.cols(), S, kv_heads, dk, dr);
    Tensor out = alloc(DType::BF16, {T, heads * dv});
    const uint16_t *qp = q.ptr<uint16_t>(), *kp = k.ptr<uint16_t>(), *vp = v.ptr<uint16_t>(),
                   *qr = q_pe.ptr<uint16_t>(), *kr = k_pe.ptr<uint16_t>();
    uint16_t* o = out.ptr<uint16_t>();
#pragma omp parallel
    {
      std::vector<float> sc(static_cast<size_t>(S)), acc(static_cast<size_t>(dv));
      std::vector<uint16_t> qs(static_cast<size_t>(dr));
#pragma omp for schedule(dynamic, 1) collapse(2)
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t t = 0; t < T; ++t) {
          const int64_t kvh = h / group, visible = pos0 + t + 1;  // causal
          const uint16_t* qh = qp + (t * heads + h) * dk;
          for (int64_t d = 0; d < dr; ++d) qs[size_t(d)] = f32_to_bf16_bits(scale * bf16_to_f32(qr[(t * heads + h) * dr + d]));
          float mx = -std::numeric_limits<float>::infinity();
          for (int64_t j = 0; j < visible; ++j) {
            const float pe = round_bf16(cpu::dot_bf16(qs.data(), kr + j * dr, dr));
            const float s = scale * cpu::dot_bf16(qh, kp + j * kv_heads * dk + kvh * dk, dk) + pe;
            sc[size_t(j)] = s;
            mx = std::max(mx, s);
          }
          float sum = 0.f;
          for (int64_t j = 0; j < visible; ++j) sum += (sc[size_t(j)] = std::exp(sc[size_t(j)] - mx));
          std::fill(acc.begin(), acc.end(), 0.f);
          for (int64_t j = 0; j < visible; ++j) cpu::axpy_bf16(sc[size_t(j)], vp + j * kv_heads * dv + kvh * dv, acc.data(), dv);
          const float inv = 1.0f / sum;
          for (int64_t d = 0; d < dv; ++d) o[(t * heads + h) * dv + d] = f32_to_bf16_bits(acc[size_t(d)] * inv);
        }
    }
    return out;
  }

  Tensor multi_linear(const Tensor& x, const Weight& w, bool transpose) override {
    OpTimer timer_("multi_linear");
    check_bf16_2d(x, w.name.c_str());
    const int64_t H = w.experts, T = x.rows(), Kin = transpose ? w.cols : w.rows, N = transpose ? w.rows : w.cols;
    ZMLX_CHECK(H > 0, "{}: multi_linear needs stacked per-head matrices", w.name);
    const bool shared = x.cols() == Kin;
    ZMLX_CHECK(shared || x.cols() == H * Kin, "{}: input rows have {} values, expected {} or {}x{}", w.name, x.cols(),
               Kin, H, Kin);
    const int64_t ldx = x.cols(), xoff = shared ? 0 : Kin;
    Tensor out = alloc(DType::BF16, {T, H * N});
    uint16_t* o = out.ptr<uint16_t>();
    const uint16_t* xp = x.ptr<uint16_t>();
    if (transpose) {  // the mat-vec kernels of linear(), one matrix per head
#pragma omp parallel
      {
        PreparedRows px;
        std::vector<float> acc(static_cast<size_t>(T * kRowBlock));
#pragma omp for schedule(dynamic, 1)
        for (int64_t h = 0; h < H; ++h) {
          const MatrixView m = cpu::matrix_view(w, h);
          px.prepare(xp + h * xoff, T, Kin, ldx, cpu::layouts_needed(m));
          for (int64_t r0 = 0; r0 < N; r0 += kRowBlock) {
            const int64_t r1 = std::min(N, r0 + kRowBlock), nr = r1 - r0;
            cpu::gemv_rows(m, r0, r1, px, 0, T, acc.data(), nr);
            for (int64_t t = 0; t < T; ++t)
              for (int64_t r = 0; r < nr; ++r) o[t * H * N + h * N + r0 + r] = f32_to_bf16_bits(acc[size_t(t * nr + r)]);
          }
        }
      }
      return out;
    }
    // x @ W[h]: dequantise W[h] (R x C) to fp32 once, then accumulate rows in order.
#pragma omp parallel
    {
      std::vector<float> wf(static_cast<size_t>(Kin * N)), acc(static_cast<size_t>(N));
#pragma omp for schedule(dynamic, 1)
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t r = 0; r < Kin; ++r) {
          float* dst = wf.data() + r * N;
          if (w.quantized) {
            const int64_t row = h * Kin + r;
            quant::dequantize_row(w.w.ptr<uint32_t>() + row * w.words_per_row(),
                                  w.scales.ptr<uint16_t>() + row * w.groups_per_row(),
                                  w.biases.ptr<uint16_t>() + row * w.groups_per_row(), N, w.q, dst);
          } else {
            const uint16_t* src = w.w.ptr<uint16_t>() + (h * Kin + r) * N;
            for (int64_t c = 0; c < N; ++c) dst[c] = bf16_to_f32(src[c]);
          }
        }
        for (int64_t t = 0; t < T; ++t) {
          std::fill(acc.begin(), acc.end(), 0.f);
          const uint16_t* xr = xp + t * ldx + h * xoff;
          for (int64_t r = 0; r < Kin; ++r) {
            const float a = bf16_to_f32(xr[r]);
            const float* wr = wf.data() + r * N;
            for (int64_t c = 0; c < N; ++c) acc[size_t(c)] += a * wr[c];
          }
          for (int64_t c = 0; c < N; ++c) o[t * H * N + h * N + c] = f32_to_bf16_bits(acc[size_t(c)]);
        }
      }
    }
    return out;
  }

  Tensor slice_cols(const Tensor& x, int64_t group, int64_t offset, int64_t width) override {
    OpTimer timer_("slice_cols");
    ZMLX_CHECK(group > 0 && x.cols() % group == 0 && offset >= 0 && width > 0 && offset + width <= group,
               "slice_cols: columns [{}, {}) of groups of {} in rows of {}", offset, offset + width, group, x.cols());
    const int64_t T = x.rows(), n = x.cols() / group;
    const size_t es = dtype_size(x.dtype);
    Tensor out = alloc(x.dtype, {T, n * width});
    const uint8_t* src = static_cast<const uint8_t*>(x.data);
    uint8_t* dst = static_cast<uint8_t*>(out.data);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t g = 0; g < n; ++g)
        std::memcpy(dst + size_t((t * n + g) * width) * es, src + size_t(t * x.cols() + g * group + offset) * es,
                    size_t(width) * es);
    return out;
  }

  Routing route_softmax_topk(const Tensor& logits, int64_t k, bool normalize) override {
    OpTimer timer_("route_softmax_topk");
    const int64_t T = logits.rows(), E = logits.cols();
    Routing r = new_routing(logits, k, DType::BF16);
    const uint16_t* l = logits.ptr<uint16_t>();
    std::vector<float> p(static_cast<size_t>(E));
    std::vector<int32_t> order(static_cast<size_t>(E));
    for (int64_t t = 0; t < T; ++t) {
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t e = 0; e < E; ++e) mx = std::max(mx, bf16_to_f32(l[t * E + e]));
      float sum = 0.f;
      for (int64_t e = 0; e < E; ++e) sum += (p[size_t(e)] = std::exp(bf16_to_f32(l[t * E + e]) - mx));
      for (int64_t e = 0; e < E; ++e) p[size_t(e)] = round_bf16(p[size_t(e)] / sum);  // stored bf16
      for (int64_t e = 0; e < E; ++e) order[size_t(e)] = int32_t(e);
      std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) {
        return p[size_t(a)] > p[size_t(b)] || (p[size_t(a)] == p[size_t(b)] && a < b);
      });
      float total = 0.f;
      for (int64_t j = 0; j < k; ++j) total += p[size_t(order[size_t(j)])];
      const float denom = round_bf16(total);
      for (int64_t j = 0; j < k; ++j) {
        const int32_t e = order[size_t(j)];
        r.experts.ptr<int32_t>()[t * k + j] = e;
        r.scores.ptr<uint16_t>()[t * k + j] =
            f32_to_bf16_bits(normalize ? p[size_t(e)] / denom : p[size_t(e)]);
      }
    }
    return r;
  }

  Routing route_sigmoid_topk(const Tensor& logits, const Tensor& bias, int64_t k, bool normalize, float eps,
                             float scaling) override {
    OpTimer timer_("route_sigmoid_topk");
    const int64_t T = logits.rows(), E = logits.cols();
    Routing r = new_routing(logits, k, DType::BF16, &bias);
    const uint16_t* l = logits.ptr<uint16_t>();
    const float* b = bias.ptr<float>();
    std::vector<float> sw(static_cast<size_t>(E)), sel(static_cast<size_t>(E));
    std::vector<int32_t> order(static_cast<size_t>(E));
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t e = 0; e < E; ++e) {
        const float z = bf16_to_f32(l[t * E + e]);
        sw[size_t(e)] = round_bf16(1.0f / (1.0f + std::exp(-z)));
        sel[size_t(e)] = sw[size_t(e)] + b[e];
        order[size_t(e)] = int32_t(e);
      }
      std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t x, int32_t y) {
        return sel[size_t(x)] > sel[size_t(y)] || (sel[size_t(x)] == sel[size_t(y)] && x < y);
      });
      float total = 0.f;
      for (int64_t j = 0; j < k; ++j) total += sw[size_t(order[size_t(j)])];
      const float denom = round_bf16(round_bf16(total) + eps);
      for (int64_t j = 0; j < k; ++j) {
        const int32_t e = order[size_t(j)];
        float w = sw[size_t(e)];
        if (normalize) w = round_bf16(w / denom);
        r.experts.ptr<int32_t>()[t * k + j] = e;
        r.scores.ptr<uint16_t>()[t * k + j] = f32_to_bf16_bits(w * scaling);
      }
    }
    return r;
  }

  Routing route_sigmoid_grouped_topk(const Tensor& logits, const Tensor& bias, int64_t k, int64_t n_group,
                                     int64_t topk_group, bool normalize, float eps, float scaling) override {
    OpTimer timer_("route_sigmoid_grouped_topk");
    const int64_t T = logits.rows(), E = logits.cols();
    Routing r = new_routing(logits, k, DType::F32, &bias, n_group, topk_group);
    const uint16_t* l = logits.ptr<uint16_t>();
    const float* b = bias.ptr<float>();
    const int64_t per = E / n_group;
    std::vector<float> s(static_cast<size_t>(E)), sel(static_cast<size_t>(E)), gscore(static_cast<size_t>(n_group));
    std::vector<int32_t> order(static_cast<size_t>(E)), gorder(static_cast<size_t>(n_group));
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t e = 0; e < E; ++e) {
        s[size_t(e)] = 1.0f / (1.0f + std::exp(-bf16_to_f32(l[t * E + e])));
        sel[size_t(e)] = s[size_t(e)] + b[e];
        order[size_t(e)] = int32_t(e);
      }
      if (n_group > 1 && topk_group < n_group) {
        for (int64_t g = 0; g < n_group; ++g) {  // group score: sum of its two best
          float b1 = -std::numeric_limits<float>::infinity(), b2 = b1;
          for (int64_t e = g * per; e < (g + 1) * per; ++e) {
            const float v = sel[size_t(e)];
            if (v > b1) { b2 = b1; b1 = v; } else if (v > b2) { b2 = v; }
          }
          gscore[size_t(g)] = b1 + b2;
          gorder[size_t(g)] = int32_t(g);
        }
        std::stable_sort(gorder.begin(), gorder.end(),
                         [&](int32_t x, int32_t y) { return gscore[size_t(x)] > gscore[size_t(y)]; });
        for (int64_t i = topk_group; i < n_group; ++i)
          for (int64_t e = gorder[size_t(i)] * per; e < (gorder[size_t(i)] + 1) * per; ++e) sel[size_t(e)] = 0.f;
      }
      std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t x, int32_t y) {
        return sel[size_t(x)] > sel[size_t(y)] || (sel[size_t(x)] == sel[size_t(y)] && x < y);
      });
      float total = 0.f;
      for (int64_t j = 0; j < k; ++j) total += s[size_t(order[size_t(j)])];
      for (int64_t j = 0; j < k; ++j) {
        const int32_t e = order[size_t(j)];
        float w = s[size_t(e)];
        if (normalize) w = w / (total + eps);
        r.experts.ptr<int32_t>()[t * k + j] = e;
        r.scores.ptr<float>()[t * k + j] = w * scaling;
      }
    }
    return r;
  }

  Tensor short_conv(const Tensor& bcx, Tensor& state, const Tensor& w) override {
    OpTimer timer_("short_conv");
    check_bf16_2d(bcx, "short_conv input");
    ZMLX_CHECK(bcx.cols() % 3 == 0, "short_conv: input rows have {} values, expected 3 x channels", bcx.cols());
    const int64_t T = bcx.rows(), C = bcx.cols() / 3;
    ZMLX_CHECK(w.dtype == DType::BF16 && w.shape.size() >= 2 && w.dim(0) == C && w.numel() == C * w.dim(1),
               "short_conv: weight with {} values does not fit {} channels", w.numel(), C);
    const int64_t L = w.dim(1), S = L - 1;
    ZMLX_CHECK(state.dtype == DType::BF16 && state.numel() == S * C,
               "short_conv: state has {} values, expected {}x{}", state.numel(), S, C);
    const uint16_t* in = bcx.ptr<uint16_t>();
    // seq = [state; Bx], Bx = bf16(B * x).
    std::vector<uint16_t> seq(static_cast<size_t>((S + T) * C));
    std::memcpy(seq.data(), state.ptr<uint16_t>(), size_t(S * C) * 2);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < C; ++c)
        seq[size_t((S + t) * C + c)] =
            f32_to_bf16_bits(bf16_to_f32(in[t * 3 * C + c]) * bf16_to_f32(in[t * 3 * C + 2 * C + c]));
    Tensor out = alloc(DType::BF16, {T, C});
    uint16_t* o = out.ptr<uint16_t>();
    const uint16_t* wp = w.ptr<uint16_t>();
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < C; ++c) {
        float acc = 0.f;
        for (int64_t k = 0; k < L; ++k) acc += bf16_to_f32(seq[size_t((t + k) * C + c)]) * bf16_to_f32(wp[c * L + k]);
        const float conv = round_bf16(acc);
        o[t * C + c] = f32_to_bf16_bits(bf16_to_f32(in[t * 3 * C + C + c]) * conv);
      }
    std::memcpy(state.ptr<uint16_t>(), seq.data() + size_t(T * C), size_t(S * C) * 2);
    return out;
  }

  // ---------------------------------------------------------------- experts

  Tensor gather_qmm(const Tensor& x, const Weight& w, const Routing& r) override {
    OpTimer timer_("gather_qmm");
    const int64_t T = r.experts.rows(), k = r.k, K = x.cols(), N = w.rows;
    ZMLX_CHECK(K == w.cols, "{}: input has {} features, experts expect {}", w.name, K, w.cols);
    const bool per_slot = x.rows() == T * k;
    ZMLX_CHECK(per_slot || x.rows() == T, "{}: {} input rows for {} tokens x {} slots", w.name, x.rows(), T, k);
    const ExpertGroups g = group_by_expert(r, T, w.experts);
    const uint16_t* xp = x.ptr<uint16_t>();
    auto y = expert_matmuls(w, g, K, [&](int64_t pair) { return xp + (per_slot ? pair : pair / k) * K; });
    Tensor out = alloc(DType::BF16, {T, k, N});
    uint16_t* o = out.ptr<uint16_t>();
    for (size_t gi = 0; gi < g.experts.size(); ++gi)
      for (size_t p = 0; p < g.pairs[gi].size(); ++p)
        for (int64_t n = 0; n < N; ++n) o[g.pairs[gi][p] * N + n] = f32_to_bf16_bits(y[gi][p * N + n]);
    return out;
  }

  Tensor moe_combine(const Tensor& y, const Routing& r, CombineMode mode) override {
    OpTimer timer_("moe_combine");
    check_combine_scores(r, mode, "moe_combine");
    const int64_t T = r.experts.rows(), k = r.k, D = y.cols();
    Tensor out = alloc(DType::BF16, {T, D});
    const uint16_t* yp = y.ptr<uint16_t>();
    for (int64_t t = 0; t < T; ++t)
      for (int64_t d = 0; d < D; ++d) {
        float acc = 0.f;
        for (int64_t j = 0; j < k; ++j) acc += combine_term(yp[(t * k + j) * D + d], r, t * k + j, mode);
        out.ptr<uint16_t>()[t * D + d] = f32_to_bf16_bits(acc);
      }
    return out;
  }

  Tensor gather_qmm_swiglu(const Tensor& x, const Weight& gate, const Weight& up, const Routing& r) override {
    OpTimer timer_("gather_qmm_swiglu");
    const int64_t T = r.experts.rows(), k = r.k, K = x.cols(), I = gate.rows;
    ZMLX_CHECK(x.rows() == T && K == gate.cols && K == up.cols && up.rows == I,
               "{}: gather_qmm_swiglu shape mismatch", gate.name);
    const ExpertGroups g = group_by_expert(r, T, gate.experts);
    const size_t G = g.experts.size();
    // x is prepared once per expert group and shared by the gate and up rows.
    std::vector<PreparedRows> prepared(G);
    const uint16_t* xp = x.ptr<uint16_t>();
#pragma omp parallel if (G > 8)
    {
      std::vector<uint16_t> gathered;
#pragma omp for schedule(dynamic, 1)
      for (size_t i = 0; i < G; ++i) {
        gathered.resize(g.pairs[i].size() * size_t(K));
        for (size_t p = 0; p < g.pairs[i].size(); ++p)
          std::memcpy(&gathered[p * K], xp + (g.pairs[i][p] / k) * K, size_t(K) * 2);
        prepared[i].prepare(gathered.data(), int64_t(g.pairs[i].size()), K, K,
                            cpu::layouts_needed(cpu::matrix_view(gate, g.experts[i])) |
                                cpu::layouts_needed(cpu::matrix_view(up, g.experts[i])));
      }
    }
    Tensor out = alloc(DType::BF16, {T, k, I});
    uint16_t* o = out.ptr<uint16_t>();
    // Work items of kSwigluRows rows: long sequential reads of gate, then up.
    constexpr int64_t kSwigluRows = 128;
    const int64_t blocks = (I + kSwigluRows - 1) / kSwigluRows;
    const int64_t items = int64_t(G) * blocks;
#pragma omp parallel
    {
      std::vector<float> ga, ua;
#pragma omp for schedule(static)
      for (int64_t it = 0; it < items; ++it) {
        const size_t gi = size_t(it / blocks);
        const int64_t r0 = (it % blocks) * kSwigluRows, r1 = std::min(I, r0 + kSwigluRows), nr = r1 - r0;
        const int64_t P = prepared[gi].T();
        ga.resize(size_t(P * nr));
        ua.resize(size_t(P * nr));
        cpu::gemv_rows(cpu::matrix_view(gate, g.experts[gi]), r0, r1, prepared[gi], 0, P, ga.data(), nr);
        cpu::gemv_rows(cpu::matrix_view(up, g.experts[gi]), r0, r1, prepared[gi], 0, P, ua.data(), nr);
        for (int64_t p = 0; p < P; ++p)
          for (int64_t i = 0; i < nr; ++i)
            o[g.pairs[gi][size_t(p)] * I + r0 + i] =
                cpu::swiglu_bf16(f32_to_bf16_bits(ga[size_t(p * nr + i)]), f32_to_bf16_bits(ua[size_t(p * nr + i)]));
      }
    }
    return out;
  }

  Tensor gather_qmm_combine(const Tensor& h, const Weight& down, const Routing& r, CombineMode mode) override {
    OpTimer timer_("gather_qmm_combine");
    check_combine_scores(r, mode, "gather_qmm_combine");
    const int64_t T = r.experts.rows(), k = r.k, I = h.cols(), D = down.rows;
    ZMLX_CHECK(h.rows() == T * k && I == down.cols, "{}: gather_qmm_combine shape mismatch", down.name);
    Tensor out = alloc(DType::BF16, {T, D});
    uint16_t* o = out.ptr<uint16_t>();
    const uint16_t* hp = h.ptr<uint16_t>();
    if (T == 1) {
      // Decode: each work item owns a block of output rows and walks the k
      // selected experts in slot order, combining in registers.
      std::vector<PreparedRows> prepared(static_cast<size_t>(k));
      for (int64_t j = 0; j < k; ++j)
        prepared[size_t(j)].prepare(hp + j * I, 1, I, I,
                                    cpu::layouts_needed(cpu::matrix_view(down, r.experts.ptr<int32_t>()[j])));
      // Each thread owns one contiguous range of output rows and streams that
      // range of every selected expert in slot order, so DRAM reads stay long
      // and sequential; the combine happens in registers/L1 as rows finish.
      const int32_t* ex = r.experts.ptr<int32_t>();
      const int64_t nth = omp_get_max_threads();
      const int64_t span = ((D + nth - 1) / nth + kRowBlock - 1) / kRowBlock * kRowBlock;
#pragma omp parallel for schedule(static, 1)
      for (int64_t part = 0; part < nth; ++part) {
        const int64_t p0 = part * span, p1 = std::min(D, p0 + span);
        if (p0 >= p1) continue;
        std::vector<float> y(static_cast<size_t>(p1 - p0)), acc(static_cast<size_t>(p1 - p0), 0.f);
        for (int64_t j = 0; j < k; ++j) {
          const MatrixView m = cpu::matrix_view(down, ex[j]);
          for (int64_t r0 = p0; r0 < p1; r0 += kRowBlock)
            cpu::gemv_rows(m, r0, std::min(p1, r0 + kRowBlock), prepared[size_t(j)], 0, 1, y.data() + (r0 - p0), 0);
          for (int64_t d = 0; d < p1 - p0; ++d) acc[size_t(d)] += combine_term(f32_to_bf16_bits(y[size_t(d)]), r, j, mode);
        }
        for (int64_t d = 0; d < p1 - p0; ++d) o[p0 + d] = f32_to_bf16_bits(acc[size_t(d)]);
      }
      return out;
    }
    // Prefill: expert-grouped matmuls (weights reused across tokens), then the
    // combine in slot order — the same per-element arithmetic as above.
    const ExpertGroups g = group_by_expert(r, T, down.experts);
    auto y = expert_matmuls(down, g, I, [&](int64_t pair) { return hp + pair * I; });
    std::vector<float> acc(static_cast<size_t>(T * D), 0.f);
    std::vector<const float*> row_of(static_cast<size_t>(T * k));
    for (size_t gi = 0; gi < g.experts.size(); ++gi)
      for (size_t p = 0; p < g.pairs[gi].size(); ++p) row_of[size_t(g.pairs[gi][p])] = &y[gi][p * D];
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < k; ++j)
        for (int64_t d = 0; d < D; ++d)
          acc[size_t(t * D + d)] += combine_term(f32_to_bf16_bits(row_of[size_t(t * k + j)][d]), r, t * k + j, mode);
    for (int64_t i = 0; i < T * D; ++i) o[i] = f32_to_bf16_bits(acc[size_t(i)]);
    return out;
  }

  Tensor linear_swiglu(const Tensor& x, const Weight& gate, const Weight& up) override {
    OpTimer timer_("linear_swiglu");
    const int64_t T = x.rows(), K = x.cols(), I = gate.rows;
    ZMLX_CHECK(K == gate.cols && K == up.cols && up.rows == I, "{}: linear_swiglu shape mismatch", gate.name);
    PreparedRows px;
    px.prepare(x.ptr<uint16_t>(), T, K, K,
               cpu::layouts_needed(cpu::matrix_view(gate)) | cpu::layouts_needed(cpu::matrix_view(up)));
    Tensor out = alloc(DType::BF16, {T, I});
    uint16_t* o = out.ptr<uint16_t>();
    const MatrixView mg = cpu::matrix_view(gate), mu = cpu::matrix_view(up);
    const int64_t blocks = (I + kRowBlock - 1) / kRowBlock;
#pragma omp parallel
    {
      std::vector<float> ga(static_cast<size_t>(T * kRowBlock)), ua(static_cast<size_t>(T * kRowBlock));
#pragma omp for schedule(static)
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t r0 = b * kRowBlock, r1 = std::min(I, r0 + kRowBlock), nr = r1 - r0;
        cpu::gemv_rows(mg, r0, r1, px, 0, T, ga.data(), nr);
        cpu::gemv_rows(mu, r0, r1, px, 0, T, ua.data(), nr);
        for (int64_t t = 0; t < T; ++t)
          for (int64_t i = 0; i < nr; ++i)
            o[t * I + r0 + i] = cpu::swiglu_bf16(f32_to_bf16_bits(ga[size_t(t * nr + i)]), f32_to_bf16_bits(ua[size_t(t * nr + i)]));
      }
    }
    return out;
  }

 private:
  // One term of the MoE combine, rounded as the family's mode says.
  static float combine_term(uint16_t y, const Routing& r, int64_t pair, CombineMode mode) {
    if (mode == CombineMode::Bf16Products)
      return round_bf16(bf16_to_f32(y) * bf16_to_f32(r.scores.ptr<uint16_t>()[pair]));
    const float s = r.scores.dtype == DType::F32 ? r.scores.ptr<float>()[pair]
                                                 : bf16_to_f32(r.scores.ptr<uint16_t>()[pair]);
    return bf16_to_f32(y) * s;
  }
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend() { return std::make_unique<CpuBackend>(); }

}  // namespace zmlx
