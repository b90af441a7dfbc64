#include "zmlx/gen/sampler.h"

#include <algorithm>
#include <cmath>
#include <iterator>
#include <numeric>

#include "zmlx/core/error.h"

namespace zmlx {

using namespace sampling;

int32_t argmax(const float* l, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i)
    if (l[i] > l[best]) best = i;
  return int32_t(best);
}

void check_sampler_options(const SamplerOptions& o) {
  ZMLX_CHECK(o.temperature >= 0.f && std::isfinite(o.temperature), "temperature must be >= 0, got {}", o.temperature);
  ZMLX_CHECK(o.top_p > 0.f && o.top_p <= 1.f, "top_p must be in (0, 1], got {}", o.top_p);
  ZMLX_CHECK(o.min_p >= 0.f && o.min_p < 1.f, "min_p must be in [0, 1), got {}", o.min_p);
  ZMLX_CHECK(o.top_k >= 0, "top_k must be >= 0, got {}", o.top_k);
  ZMLX_CHECK(o.repetition_penalty > 0.f && std::isfinite(o.repetition_penalty),
             "repetition penalty must be > 0, got {}", o.repetition_penalty);
  ZMLX_CHECK(o.repetition_context >= 0, "repetition context must be >= 0, got {}", o.repetition_context);
  ZMLX_CHECK(std::isfinite(o.frequency_penalty), "frequency penalty must be finite, got {}", o.frequency_penalty);
  ZMLX_CHECK(std::isfinite(o.presence_penalty), "presence penalty must be finite, got {}", o.presence_penalty);
}

Params sampling_params(const SamplerOptions& o) {
  Params p;
  p.inv_temp = o.temperature > 0.f ? 1.f / o.temperature : 0.f;
  p.top_p = o.top_p;
  p.use_min_p = o.min_p > 0.f;
  p.ln_min_p = o.min_p > 0.f ? std::log(o.min_p) : 0.f;
  p.penalty = o.repetition_penalty;
  p.top_k = o.top_k;
  p.window_cap = o.repetition_penalty != 1.f ? o.repetition_context : 0;
  p.frequency = o.frequency_penalty;
  p.presence = o.presence_penalty;
  p.seed = o.seed;
  return p;
}

std::vector<int32_t> repetition_window(const SamplerOptions& o, std::span<const int32_t> history) {
  if (o.repetition_penalty == 1.f) return {};
  const size_t n = std::min(history.size(), size_t(o.repetition_context));
  return {history.end() - std::ptrdiff_t(n), history.end()};
}

namespace {

// The logits with the penalties applied (the repetition penalty once to
// each distinct id of the window, then the output counts'), as order keys.
std::vector<uint32_t> penalized_keys(std::span<const float> logits, const Params& p, std::span<const int32_t> window,
                                     std::span<const int32_t> output) {
  const int64_t V = int64_t(logits.size());
  ZMLX_CHECK(V >= 1 && V <= kMaxVocab, "sampling: {} logits (expected 1 to {})", V, kMaxVocab);
  std::vector<uint32_t> key(static_cast<size_t>(V));
  for (int64_t i = 0; i < V; ++i) key[size_t(i)] = order_key(logits[size_t(i)]);
  if (!p.penalized()) return key;
  // Both id lists sorted, so each penalized id is looked up by bisection.
  std::vector<int32_t> seen, out;
  if (p.penalty != 1.f) seen.assign(window.begin(), window.end());
  if (p.counts_output()) out.assign(output.begin(), output.end());
  std::sort(seen.begin(), seen.end());
  std::sort(out.begin(), out.end());
  std::vector<int32_t> ids;
  std::set_union(seen.begin(), seen.end(), out.begin(), out.end(), std::back_inserter(ids));
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  for (int32_t id : ids) {
    if (id < 0 || id >= V) continue;
    float l = logits[size_t(id)];
    if (std::binary_search(seen.begin(), seen.end(), id)) l = penalize(l, p.penalty);
    if (p.counts_output()) {
      const auto r = std::equal_range(out.begin(), out.end(), id);
      l = penalize_count(l, int32_t(r.second - r.first), p.frequency, p.presence);
    }
    key[size_t(id)] = order_key(l);
  }
  return key;
}

// Steps 4-8 of the algorithm over any view of the ordered candidates:
//   prefix_mass(m)     the weight of the first m;
//   first_reaching(t)  the smallest m whose prefix weight is >= t;
//   count_z(t)         how many have z >= t (a prefix: z falls along the order);
//   pick(r)            the id of the first at which the running weight exceeds r;
//   first()            the id of the first.
template <class View>
int32_t finish(const View& v, int64_t V, const Params& p, uint64_t draw) {
  const int64_t keep = p.top_k > 0 && p.top_k < V ? p.top_k : V;
  const uint64_t S = v.prefix_mass(keep);
  int64_t n = keep;
  if (p.use_min_p) n = std::min(n, v.count_z(p.ln_min_p));
  if (p.top_p < 1.f) n = std::min(n, v.first_reaching(top_p_target(p.top_p, S)));
  n = std::max<int64_t>(n, 1);
  const uint64_t M = v.prefix_mass(n);
  if (M == 0) return v.first();  // nothing has weight (T tiny, or +-inf logits)
  return v.pick(scale_to(random_bits(p.seed, draw), M));
}

// Every candidate sorted: the definition.
struct SortedView {
  std::vector<int32_t> ord;    // ids in order
  std::vector<uint64_t> cum;   // cum[m] = weight of the first m
  std::vector<float> z;        // z in order
  uint64_t prefix_mass(int64_t m) const { return cum[size_t(m)]; }
  int64_t first_reaching(uint64_t t) const {
    return std::lower_bound(cum.begin(), cum.end(), t) - cum.begin();
  }
  int64_t count_z(float t) const {
    int64_t c = 0;
    while (c < int64_t(z.size()) && z[size_t(c)] >= t) ++c;
    return c;
  }
  int32_t pick(uint64_t r) const { return ord[size_t(std::upper_bound(cum.begin(), cum.end(), r) - cum.begin() - 1)]; }
  int32_t first() const { return ord[0]; }
};

// The fast view: candidates binned by the top 16 bits of their key (bins in
// key order, so a bin's candidates are contiguous in the order); only a
// bin where a cut or the pick falls is gathered and sorted.
struct BinnedView {
  const std::vector<uint32_t>& key;
  std::vector<uint32_t>& count;  // by bin
  std::vector<uint64_t>& mass;   // by bin
  int32_t top;                   // the first candidate
  float inv_temp;
  std::vector<uint64_t> w = {};     // weight by id
  std::vector<uint32_t> bins = {};  // the occupied bins, highest first

  static constexpr int kBins = 1 << 16;
  static uint32_t bin(uint32_t k) { return k >> 16; }

  // The bin's candidates in order.
  std::vector<int32_t> members(uint32_t b) const {
    std::vector<int32_t> m;
    m.reserve(count[b]);
    for (size_t i = 0; i < key.size(); ++i)
      if (bin(key[i]) == b) m.push_back(int32_t(i));
    std::stable_sort(m.begin(), m.end(), [&](int32_t x, int32_t y) { return key[size_t(x)] > key[size_t(y)]; });
    return m;
  }
  uint64_t prefix_mass(int64_t m) const {
    int64_t pos = 0;
    uint64_t acc = 0;
    for (uint32_t b : bins) {
      if (pos >= m) break;
      if (pos + count[size_t(b)] <= m) {
        pos += count[size_t(b)], acc += mass[size_t(b)];
        continue;
      }
      const std::vector<int32_t> mem = members(b);
      for (int64_t j = 0; pos + j < m; ++j) acc += w[size_t(mem[size_t(j)])];
      return acc;
    }
    return acc;
  }
  int64_t first_reaching(uint64_t t) const {
    if (t == 0) return 0;
    int64_t pos = 0;
    uint64_t acc = 0;
    for (uint32_t b : bins) {
      if (acc + mass[size_t(b)] < t) {
        pos += count[size_t(b)], acc += mass[size_t(b)];
        continue;
      }
      const std::vector<int32_t> mem = members(b);
      for (size_t j = 0; j < mem.size(); ++j)
        if ((acc += w[size_t(mem[j])]) >= t) return pos + int64_t(j) + 1;
    }
    return int64_t(key.size());  // unreachable: t <= the total weight
  }
  int64_t count_z(float t) const {
    const float mx = key_logit(key[size_t(top)]);
    int64_t c = 0;
    for (uint32_t k : key) c += scaled_z(key_logit(k), mx, inv_temp) >= t;
    return c;
  }
  int32_t pick(uint64_t r) const {
    uint64_t acc = 0;
    for (uint32_t b : bins) {
      if (acc + mass[size_t(b)] <= r) {
        acc += mass[size_t(b)];
        continue;
      }
      for (int32_t id : members(b))
        if ((acc += w[size_t(id)]) > r) return id;
    }
    return top;  // unreachable: r < the prefix weight
  }
  int32_t first() const { return top; }
};

int32_t first_in_order(const std::vector<uint32_t>& key) {
  int32_t best = 0;
  for (size_t i = 1; i < key.size(); ++i)
    if (key[i] > key[size_t(best)]) best = int32_t(i);
  return best;
}

}  // namespace

int32_t sample_logits_reference(std::span<const float> logits, const SamplerOptions& o,
                                std::span<const int32_t> window, std::span<const int32_t> output, uint64_t draw) {
  return sample_logits_reference(logits, sampling_params(o), window, output, draw);
}

int32_t sample_logits_reference(std::span<const float> logits, const Params& p, std::span<const int32_t> window,
                                std::span<const int32_t> output, uint64_t draw) {
  const std::vector<uint32_t> key = penalized_keys(logits, p, window, output);
  const int64_t V = int64_t(key.size());
  SortedView v;
  v.ord.resize(size_t(V));
  std::iota(v.ord.begin(), v.ord.end(), 0);
  std::stable_sort(v.ord.begin(), v.ord.end(), [&](int32_t a, int32_t b) { return key[size_t(a)] > key[size_t(b)]; });
  if (p.inv_temp == 0.f) return v.ord[0];
  const float mx = key_logit(key[size_t(v.ord[0])]);
  v.cum.assign(size_t(V) + 1, 0);
  v.z.resize(size_t(V));
  for (int64_t i = 0; i < V; ++i) {
    v.z[size_t(i)] = scaled_z(key_logit(key[size_t(v.ord[size_t(i)])]), mx, p.inv_temp);
    v.cum[size_t(i) + 1] = v.cum[size_t(i)] + exp_weight(v.z[size_t(i)]);
  }
  return finish(v, V, p, draw);
}

int32_t sample_logits(std::span<const float> logits, const SamplerOptions& o, std::span<const int32_t> window,
                      std::span<const int32_t> output, uint64_t draw) {
  return sample_logits(logits, sampling_params(o), window, output, draw);
}

int32_t sample_logits(std::span<const float> logits, const Params& p, std::span<const int32_t> window,
                      std::span<const int32_t> output, uint64_t draw) {
  const std::vector<uint32_t> key = penalized_keys(logits, p, window, output);
  const int64_t V = int64_t(key.size());
  const int32_t top = first_in_order(key);
  if (p.inv_temp == 0.f) return top;
  // The bins live on between calls (zeroed again below, bin by bin), so a
  // small vocabulary does not pay for clearing 65,536 of them.
  thread_local std::vector<uint32_t> count(BinnedView::kBins);
  thread_local std::vector<uint64_t> mass(BinnedView::kBins);
  struct Clear {
    const std::vector<uint32_t>& key;
    ~Clear() {
      for (uint32_t k : key) count[BinnedView::bin(k)] = 0, mass[BinnedView::bin(k)] = 0;
    }
  } clear{key};
  BinnedView v{.key = key, .count = count, .mass = mass, .top = top, .inv_temp = p.inv_temp};
  v.w.resize(size_t(V));
  const float mx = key_logit(key[size_t(top)]);
  // Logits that came from bf16 fill a bin with one value: its weight is
  // computed once (the bin's first key and weight are kept beside it).
  thread_local std::vector<uint32_t> first_key(BinnedView::kBins);
  thread_local std::vector<uint64_t> first_w(BinnedView::kBins);
  for (int64_t i = 0; i < V; ++i) {
    const uint32_t k = key[size_t(i)], b = BinnedView::bin(k);
    uint64_t wi;
    if (v.count[b] != 0 && first_key[b] == k) {
      wi = first_w[b];
    } else {
      wi = exp_weight(scaled_z(key_logit(k), mx, p.inv_temp));
      if (v.count[b] == 0) first_key[b] = k, first_w[b] = wi;
    }
    v.w[size_t(i)] = wi;
    v.count[b] += 1;
    v.mass[b] += wi;
  }
  if (V < 4096) {  // the occupied bins: from the keys when they are few, else from the counts
    for (uint32_t k : key) v.bins.push_back(BinnedView::bin(k));
    std::sort(v.bins.begin(), v.bins.end(), std::greater<>());
    v.bins.erase(std::unique(v.bins.begin(), v.bins.end()), v.bins.end());
  } else {
    for (int b = BinnedView::kBins - 1; b >= 0; --b)
      if (count[size_t(b)] != 0) v.bins.push_back(uint32_t(b));
  }
  return finish(v, V, p, draw);
}

Sampler::Sampler(const SamplerOptions& o) : o_(o) { check_sampler_options(o); }

int32_t Sampler::sample(const std::vector<float>& logits, std::span<const int32_t> history,
                        std::span<const int32_t> output) {
  const std::vector<int32_t> window = repetition_window(o_, history);
  return sample_logits(logits, o_, window, output, next_draw());
}

}  // namespace zmlx
