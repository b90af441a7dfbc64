// Generic machinery of `zmlx convert` (see convert.h) and the family table.
#include "zmlx/convert/convert.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <set>
#include <sstream>

#include "zmlx/core/dtype.h"
#include "zmlx/core/error.h"
#include "zmlx/core/log.h"
#include "zmlx/io/model_path.h"

namespace zmlx::convert {

namespace fs = std::filesystem;
using json = nlohmann::json;

// ---------------------------------------------------------------- family table

const std::vector<Family>& families() {
  static const std::vector<Family> table = {
      {"qwen3_moe", "Qwen3MoeForCausalLM", &plan_qwen3_moe},
      {"qwen3", "Qwen3ForCausalLM", &plan_qwen3},
      {"glm4_moe_lite", "Glm4MoeLiteForCausalLM", &plan_glm4_moe_lite},
      {"lfm2_moe", "Lfm2MoeForCausalLM", &plan_lfm2_moe, /*router_bits=*/8},
  };
  return table;
}

const Family* find_family(std::string_view model_type) {
  for (auto& f : families())
    if (f.model_type == model_type) return &f;
  return nullptr;
}

// ---------------------------------------------------------------- plan helpers

int64_t config_int(const json& config, const char* key, int64_t fallback) {
  auto it = config.find(key);
  if (it == config.end() || it->is_null()) return fallback;
  ZMLX_CHECK(it->is_number_integer(), "config.json: field '{}' must be an integer, found {}", key,
             it->dump());
  return it->get<int64_t>();
}

bool config_bool(const json& config, const char* key, bool fallback) {
  auto it = config.find(key);
  if (it == config.end() || it->is_null()) return fallback;
  ZMLX_CHECK(it->is_boolean(), "config.json: field '{}' must be true or false, found {}", key, it->dump());
  return it->get<bool>();
}

bool split_layer_key(std::string_view name, std::string_view prefix, int64_t* layer, std::string* rest) {
  if (name.substr(0, prefix.size()) != prefix) return false;
  size_t i = prefix.size(), j = i;
  int64_t v = 0;
  while (j < name.size() && name[j] >= '0' && name[j] <= '9' && j - i < 9) v = v * 10 + (name[j++] - '0');
  if (j == i || j >= name.size() || name[j] != '.') return false;
  *layer = v;
  *rest = std::string(name.substr(j + 1));
  return true;
}

std::string shape_str(const std::vector<int64_t>& shape) {
  io::TensorInfo t;
  t.shape = shape;
  return t.shape_str();
}

bool collect_expert_tensor(const std::string& name, int64_t layer, const std::string& rest, const ExpertLayout& L,
                           ExpertTensors& experts) {
  const std::string pre = L.module + ".experts.";
  if (!rest.starts_with(pre)) return false;
  const std::string tail = rest.substr(pre.size());
  if (tail == "gate_up_proj" || tail == "down_proj") {
    experts.fused[layer][tail] = name;
    return true;
  }
  int64_t e = 0;
  std::string proj;
  if (!split_layer_key(rest, pre, &e, &proj) || !proj.ends_with(".weight")) return false;
  proj.resize(proj.size() - 7);
  if (auto it = L.aliases.find(proj); it != L.aliases.end()) proj = it->second;
  if (proj != "gate_proj" && proj != "up_proj" && proj != "down_proj") return false;
  ZMLX_CHECK(e < L.experts, "[convert {}] tensor '{}' is expert {}, but config.json has {} experts", L.family, name, e,
             L.experts);
  auto& slot = experts.per_expert[layer][proj];
  ZMLX_CHECK(!slot.count(e), "[convert {}] layer {} expert {} has {} twice ('{}' and '{}')", L.family, layer, e, proj,
             slot[e], name);
  slot[e] = name;
  return true;
}

void plan_switch_experts(const io::WeightStore& ws, const ExpertTensors& experts, const ExpertLayout& L, Plan& p) {
  const std::string tag = "[convert " + L.family + "]";
  const int64_t E = L.experts;
  auto switch_name = [&](int64_t layer, const char* proj) {
    return fmt::format("model.layers.{}.{}.switch_mlp.{}.weight", layer, L.module, proj);
  };
  auto dim = [](int64_t v) { return v < 0 ? std::string("?") : std::to_string(v); };
  for (const auto& [layer, projs] : experts.per_expert) {
    ZMLX_CHECK(!experts.fused.count(layer), "{} layer {} has both per-expert and fused expert tensors", tag, layer);
    for (const char* proj : {"gate_proj", "up_proj", "down_proj"}) {
      auto pit = projs.find(proj);
      for (int64_t e = 0; e < E; ++e)
        ZMLX_CHECK(pit != projs.end() && pit->second.count(e),
                   "{} missing tensor 'model.layers.{}.{}.experts.{}.{}.weight' (layer {} needs all {} experts)", tag,
                   layer, L.module, e, proj, layer, E);
      const auto& by_expert = pit->second;
      const bool down = std::string_view(proj) == "down_proj";
      const int64_t rows = down ? L.hidden : L.intermediate, cols = down ? L.intermediate : L.hidden;
      const io::TensorInfo& t0 = ws.get(by_expert.at(0));
      ZMLX_CHECK(t0.shape.size() == 2 && (rows < 0 || t0.shape[0] == rows) && (cols < 0 || t0.shape[1] == cols),
                 "{} '{}': expected [{}, {}] (from config.json), found {}", tag, t0.name, dim(rows), dim(cols),
                 t0.shape_str());
      OutputTensor o{switch_name(layer, proj), {E, t0.shape[0], t0.shape[1]}, {}, Role::Linear};
      for (int64_t e = 0; e < E; ++e) {
        const io::TensorInfo& t = ws.get(by_expert.at(e));
        ZMLX_CHECK(t.shape == t0.shape, "{} '{}' has shape {}, expert 0 has {}", tag, t.name, t.shape_str(),
                   t0.shape_str());
        o.pieces.push_back({t.name});
      }
      p.tensors.push_back(std::move(o));
    }
  }
  for (const auto& [layer, parts] : experts.fused) {
    auto gi = parts.find("gate_up_proj"), di = parts.find("down_proj");
    ZMLX_CHECK(gi != parts.end() && di != parts.end(),
               "{} layer {} has only one of the fused experts.gate_up_proj / experts.down_proj", tag, layer);
    const io::TensorInfo& gu = ws.get(gi->second);
    const io::TensorInfo& dn = ws.get(di->second);
    ZMLX_CHECK(gu.shape.size() == 3 && gu.shape[0] == E && gu.shape[1] % 2 == 0 &&
                   (L.intermediate < 0 || gu.shape[1] == 2 * L.intermediate) && (L.hidden < 0 || gu.shape[2] == L.hidden),
               "{} '{}': expected [experts, 2 x moe_intermediate_size, hidden_size] = [{}, {}, {}], found {}", tag,
               gu.name, E, L.intermediate < 0 ? "?" : std::to_string(2 * L.intermediate), dim(L.hidden),
               gu.shape_str());
    const int64_t I = gu.shape[1] / 2, D = gu.shape[2];
    ZMLX_CHECK(dn.shape == std::vector<int64_t>({E, D, I}), "{} '{}': expected [{}, {}, {}], found {}", tag, dn.name,
               E, D, I, dn.shape_str());
    OutputTensor gate{switch_name(layer, "gate_proj"), {E, I, D}, {}, Role::Linear};
    OutputTensor up{switch_name(layer, "up_proj"), {E, I, D}, {}, Role::Linear};
    for (int64_t e = 0; e < E; ++e) {
      gate.pieces.push_back({gu.name, e * 2 * I * D, I * D});
      up.pieces.push_back({gu.name, e * 2 * I * D + I * D, I * D});
    }
    p.tensors.push_back(std::move(gate));
    p.tensors.push_back(std::move(up));
    p.tensors.push_back({switch_name(layer, "down_proj"), dn.shape, {{dn.name}}, Role::Linear});
  }
}

void check_routers_match_experts(const std::set<int64_t>& routers, const ExpertTensors& experts,
                                 const ExpertLayout& layout, const std::string& router) {
  const std::string& family = layout.family;
  for (int64_t layer : routers)
    ZMLX_CHECK(experts.per_expert.count(layer) || experts.fused.count(layer),
               "[convert {}] layer {} has a router ({}) but no expert tensors", family, layer, router);
  auto check = [&](int64_t layer) {
    ZMLX_CHECK(routers.count(layer), "[convert {}] layer {} has experts but no router ('model.layers.{}.{}')", family,
               layer, layer, router);
  };
  for (const auto& [layer, _] : experts.per_expert) check(layer);
  for (const auto& [layer, _] : experts.fused) check(layer);
}

// ---------------------------------------------------------------- reading sources

namespace {

int64_t numel_of(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}


struct ResolvedPiece {
  const io::TensorInfo* t;
  int64_t src_offset, count, out_begin;
  int64_t trows = 0, tcols = 0;  // transposed block [trows, tcols] when trows > 0

  // Source element index of the piece's k-th output element.
  int64_t src(int64_t k) const { return trows ? src_offset + (k % trows) * tcols + k / trows : src_offset + k; }
};

// One output tensor with its pieces resolved against the source store.
struct Job {
  const OutputTensor* out;
  std::vector<ResolvedPiece> pieces;
  int64_t numel = 0;
  bool quantized = false;
  quant::QuantParams q;
};

// Element i of a source tensor as fp32, after rounding to bf16 (the cast
// mlx-lm applies before quantizing).
inline float load_as_bf16_value(const io::TensorInfo& t, int64_t i) {
  switch (t.dtype) {
    case DType::F32: {
      float f;
      std::memcpy(&f, t.data + 4 * i, 4);
      return round_bf16(f);
    }
    case DType::BF16: {
      uint16_t b;
      std::memcpy(&b, t.data + 2 * i, 2);
      return bf16_to_f32(b);
    }
    case DType::F16: {
      uint16_t h;
      std::memcpy(&h, t.data + 2 * i, 2);
      return round_bf16(f16_to_f32(h));
    }
    default:
      return 0.0f;  // excluded by validation
  }
}

inline uint16_t load_as_bf16_bits(const io::TensorInfo& t, int64_t i) {
  if (t.dtype == DType::BF16) {
    uint16_t b;
    std::memcpy(&b, t.data + 2 * i, 2);
    return b;
  }
  if (t.dtype == DType::F32) {
    float f;
    std::memcpy(&f, t.data + 4 * i, 4);
    return f32_to_bf16_bits(f);
  }
  uint16_t h;
  std::memcpy(&h, t.data + 2 * i, 2);
  return f32_to_bf16_bits(f16_to_f32(h));
}

inline float load_f32(const io::TensorInfo& t, int64_t i) {
  if (t.dtype == DType::F32) {
    float f;
    std::memcpy(&f, t.data + 4 * i, 4);
    return f;
  }
  uint16_t h;
  std::memcpy(&h, t.data + 2 * i, 2);
  return t.dtype == DType::BF16 ? bf16_to_f32(h) : f16_to_f32(h);
}

// Visits output elements [begin, begin + n) piece by piece:
// fn(piece, first element within the piece, position in dst, count).
template <typename F>
void for_range(const Job& job, int64_t begin, int64_t n, F&& fn) {
  auto it = std::upper_bound(job.pieces.begin(), job.pieces.end(), begin,
                             [](int64_t v, const ResolvedPiece& p) { return v < p.out_begin; });
  --it;
  int64_t pos = begin, end = begin + n;
  while (pos < end) {
    const ResolvedPiece& p = *it;
    int64_t within = pos - p.out_begin;
    int64_t take = std::min(end - pos, p.count - within);
    fn(p, within, pos - begin, take);
    pos += take;
    ++it;
  }
}

void read_values(const Job& job, int64_t begin, int64_t n, float* dst) {
  for_range(job, begin, n, [&](const ResolvedPiece& p, int64_t within, int64_t out, int64_t cnt) {
    for (int64_t k = 0; k < cnt; ++k) dst[out + k] = load_as_bf16_value(*p.t, p.src(within + k));
  });
}

void read_bf16_bits(const Job& job, int64_t begin, int64_t n, uint16_t* dst) {
  for_range(job, begin, n, [&](const ResolvedPiece& p, int64_t within, int64_t out, int64_t cnt) {
    for (int64_t k = 0; k < cnt; ++k) dst[out + k] = load_as_bf16_bits(*p.t, p.src(within + k));
  });
}

void read_f32(const Job& job, int64_t begin, int64_t n, float* dst) {
  for_range(job, begin, n, [&](const ResolvedPiece& p, int64_t within, int64_t out, int64_t cnt) {
    for (int64_t k = 0; k < cnt; ++k) dst[out + k] = load_f32(*p.t, p.src(within + k));
  });
}

// ---------------------------------------------------------------- validation

std::vector<Job> resolve(const Plan& plan, const io::WeightStore& ws, const std::string& family) {
  std::vector<Job> jobs;
  std::set<std::string> used, names;
  for (const OutputTensor& o : plan.tensors) {
    ZMLX_CHECK(names.insert(o.name).second, "[convert {}] output tensor '{}' is produced twice", family, o.name);
    for (int64_t d : o.shape) ZMLX_CHECK(d >= 0, "[convert {}] output '{}' has a negative dimension", family, o.name);
    Job j;
    j.out = &o;
    int64_t at = 0;
    for (const Piece& p : o.pieces) {
      const io::TensorInfo& t = ws.get(p.source);
      ZMLX_CHECK(t.dtype == DType::F32 || t.dtype == DType::BF16 || t.dtype == DType::F16,
                 "[convert {}] source tensor '{}' in '{}' has dtype {}; expected F32, BF16 or F16 (is the "
                 "checkpoint already quantized?)", family, p.source, t.file, dtype_name(t.dtype));
      const int64_t n = t.numel();
      const int64_t count = p.count < 0 ? n - p.offset : p.count;
      ZMLX_CHECK(p.offset >= 0 && count >= 0 && p.offset + count <= n,
                 "[convert {}] output '{}' reads elements [{}, {}) of '{}' {} which has only {}", family, o.name,
                 p.offset, p.offset + count, p.source, t.shape_str(), n);
      ResolvedPiece rp{&t, p.offset, count, at};
      if (p.transpose_rows > 0) {
        ZMLX_CHECK(count % p.transpose_rows == 0, "[convert {}] output '{}': transposed piece of '{}' has {} "
                   "elements, not a multiple of {} rows", family, o.name, p.source, count, p.transpose_rows);
        rp.trows = p.transpose_rows;
        rp.tcols = count / p.transpose_rows;
      }
      if (count > 0) j.pieces.push_back(rp);
      at += count;
      used.insert(p.source);
    }
    j.numel = at;
    ZMLX_CHECK(at == numel_of(o.shape), "[convert {}] output '{}' {} needs {} elements, its sources give {}",
               family, o.name, shape_str(o.shape), numel_of(o.shape), at);
    ZMLX_CHECK(o.keep_dtype == DType::BF16 || (o.keep_dtype == DType::F32 && o.role == Role::Keep),
               "[convert {}] output '{}': keep_dtype must be BF16, or F32 for a Keep tensor", family, o.name);
    if (o.role != Role::Keep) {
      ZMLX_CHECK(o.shape.size() >= 2 && o.name.size() > 7 && o.name.substr(o.name.size() - 7) == ".weight",
                 "[convert {}] quantizable output '{}' must be a '.weight' of rank >= 2, found {}", family,
                 o.name, shape_str(o.shape));
    }
    jobs.push_back(std::move(j));
  }
  std::vector<std::string> unused;
  for (const std::string& n : ws.names())
    if (!used.count(n) && !plan.ignored.count(n)) unused.push_back(n);
  if (!unused.empty()) {
    std::string list;
    for (size_t i = 0; i < unused.size() && i < 10; ++i) list += "\n  " + unused[i];
    if (unused.size() > 10) list += fmt::format("\n  ... and {} more", unused.size() - 10);
    fail("[convert {}] {} source tensor(s) in {} are not part of the {} layout (unknown key names; a newer "
         "checkpoint format?):{}", family, unused.size(), ws.dir(), family, list);
  }
  return jobs;
}

// ---------------------------------------------------------------- writing

// Produces the output files' tensors. Quantized modules yield three tensors
// (.weight U32, .scales BF16, .biases BF16) computed together once and handed
// out as the writer asks for each.
class Producer {
 public:
  Producer(std::vector<Job>& jobs) : jobs_(jobs) {}

  void add_specs(std::vector<io::TensorSpec>* specs) {
    for (size_t i = 0; i < jobs_.size(); ++i) {
      const Job& j = jobs_[i];
      const OutputTensor& o = *j.out;
      if (!j.quantized) {
        specs->push_back({o.name, o.keep_dtype, o.shape});
        by_name_[o.name] = {i, Part::Plain};
        continue;
      }
      const std::string module = o.name.substr(0, o.name.size() - 7);
      std::vector<int64_t> ws = o.shape, ss = o.shape;
      const int64_t cols = o.shape.back();
      ws.back() = quant::packed_words(cols, j.q.bits);
      ss.back() = cols / j.q.group_size;
      specs->push_back({module + ".weight", DType::U32, ws});
      specs->push_back({module + ".scales", DType::BF16, ss});
      specs->push_back({module + ".biases", DType::BF16, ss});
      by_name_[module + ".weight"] = {i, Part::Weight};
      by_name_[module + ".scales"] = {i, Part::Scales};
      by_name_[module + ".biases"] = {i, Part::Biases};
    }
  }

  void fill(const io::TensorSpec& spec, uint8_t* dst) {
    auto it = by_name_.find(spec.name);
    ZMLX_CHECK(it != by_name_.end(), "[convert] internal: no producer for '{}'", spec.name);
    const Job& j = jobs_[it->second.job];
    if (it->second.part == Part::Plain) return j.out->keep_dtype == DType::F32 ? fill_f32(j, dst) : fill_bf16(j, dst);
    Quantized& qd = quantized(it->second.job);
    switch (it->second.part) {
      case Part::Weight: std::memcpy(dst, qd.w.data(), qd.w.size() * 4); break;
      case Part::Scales: std::memcpy(dst, qd.s.data(), qd.s.size() * 2); break;
      case Part::Biases: std::memcpy(dst, qd.b.data(), qd.b.size() * 2); break;
      default: break;
    }
    if (--qd.remaining == 0) cache_.erase(it->second.job);
  }

 private:
  enum class Part { Plain, Weight, Scales, Biases };
  struct Ref {
    size_t job;
    Part part;
  };
  struct Quantized {
    std::vector<uint32_t> w;
    std::vector<uint16_t> s, b;
    int remaining = 3;
  };

  static void fill_bf16(const Job& j, uint8_t* dst) {
    constexpr int64_t kChunk = 1 << 16;
    const int64_t chunks = (j.numel + kChunk - 1) / kChunk;
#pragma omp parallel
    {
      std::vector<uint16_t> buf(kChunk);
#pragma omp for schedule(dynamic, 4)
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t begin = c * kChunk, n = std::min(kChunk, j.numel - begin);
        read_bf16_bits(j, begin, n, buf.data());
        std::memcpy(dst + 2 * begin, buf.data(), size_t(n) * 2);
      }
    }
  }

  static void fill_f32(const Job& j, uint8_t* dst) {
    constexpr int64_t kChunk = 1 << 16;
    std::vector<float> buf(kChunk);
    for (int64_t begin = 0; begin < j.numel; begin += kChunk) {
      const int64_t n = std::min(kChunk, j.numel - begin);
      read_f32(j, begin, n, buf.data());
      std::memcpy(dst + 4 * begin, buf.data(), size_t(n) * 4);
    }
  }

  Quantized& quantized(size_t job) {
    auto it = cache_.find(job);
    if (it != cache_.end()) return it->second;
    const Job& j = jobs_[job];
    Quantized qd;
    const int64_t cols = j.out->shape.back();
    const int64_t rows = cols ? j.numel / cols : 0;
    const int64_t wpr = quant::packed_words(cols, j.q.bits), gpr = cols / j.q.group_size;
    qd.w.resize(size_t(rows * wpr));
    qd.s.resize(size_t(rows * gpr));
    qd.b.resize(size_t(rows * gpr));
#pragma omp parallel
    {
      std::vector<float> row(static_cast<size_t>(cols));
#pragma omp for schedule(dynamic, 16)
      for (int64_t r = 0; r < rows; ++r) {
        read_values(j, r * cols, cols, row.data());
        quant::quantize_row(row.data(), cols, j.q, &qd.w[size_t(r * wpr)], &qd.s[size_t(r * gpr)],
                            &qd.b[size_t(r * gpr)]);
      }
    }
    return cache_.emplace(job, std::move(qd)).first->second;
  }

  std::vector<Job>& jobs_;
  std::map<std::string, Ref> by_name_;
  std::map<size_t, Quantized> cache_;
};

json read_config(const std::string& dir) {
  const std::string path = (fs::path(dir) / "config.json").string();
  std::ifstream f(path, std::ios::binary);
  ZMLX_CHECK(f.good(), "cannot read '{}'", path);
  std::stringstream ss;
  ss << f.rdbuf();
  json c;
  try {
    c = json::parse(ss.str());
  } catch (const json::exception& e) {
    fail("'{}' is not valid JSON: {}", path, e.what());
  }
  ZMLX_CHECK(c.is_object(), "'{}': expected a JSON object", path);
  return c;
}

std::string supported_families() {
  std::string s;
  for (auto& f : families()) s += (s.empty() ? "" : ", ") + std::string(f.model_type);
  return s;
}

}  // namespace

// ---------------------------------------------------------------- convert()

ConvertResult convert(const ConvertOptions& opt) { return convert_as(opt, Family{}); }

ConvertResult convert_as(const ConvertOptions& opt, const Family& given) {
  ConvertResult res;
  if (opt.quantize) {
    ZMLX_CHECK(quant::supported(opt.q), "[convert] unsupported quantization: bits {} group_size {} (expected "
               "bits 2, 4 or 8 and group_size 32, 64 or 128)", opt.q.bits, opt.q.group_size);
    ZMLX_CHECK(opt.router_bits == 0 || opt.router_bits == 2 || opt.router_bits == 4 || opt.router_bits == 8,
               "[convert] unsupported router bits {} (expected 2, 4 or 8)", opt.router_bits);
  } else {
    ZMLX_CHECK(opt.router_bits == 0, "[convert] --quant-router-bits needs quantization (not --dtype bf16)");
  }
  res.source_dir = io::resolve_model_path(opt.source);
  const json config = read_config(res.source_dir);

  auto mt = config.find("model_type");
  ZMLX_CHECK(mt != config.end() && mt->is_string(), "'{}/config.json' has no \"model_type\" string",
             res.source_dir);
  const Family* fam = given.plan ? &given : find_family(mt->get<std::string>());
  ZMLX_CHECK(fam, "[convert] model_type '{}' is not supported (supported: {})", mt->get<std::string>(),
             supported_families());
  res.family = std::string(fam->model_type);
  for (const char* k : {"quantization", "quantization_config"}) {
    auto q = config.find(k);
    ZMLX_CHECK(q == config.end() || q->is_null(), "[convert] '{}/config.json' already has \"{}\" ({}): zmlx "
               "convert needs an unquantized F32/BF16/F16 checkpoint", res.source_dir, k, q->dump().substr(0, 80));
  }

  // Output directory: absent or empty, and not the source.
  std::error_code ec;
  if (fs::exists(opt.output, ec)) {
    ZMLX_CHECK(fs::is_directory(opt.output, ec) && fs::is_empty(opt.output, ec),
               "[convert] output '{}' already exists and is not an empty directory; remove it or pick another "
               "path", opt.output);
    ZMLX_CHECK(!fs::equivalent(opt.output, res.source_dir, ec), "[convert] output is the source directory");
  }

  io::WeightStore ws = io::WeightStore::open_dir(res.source_dir);
  res.tensors_in = ws.names().size();
  const Plan plan = fam->plan({ws, config});
  std::vector<Job> jobs = resolve(plan, ws, res.family);

  // Quantization choices, as mlx-lm's quantize_model: a quantizable module
  // whose last dimension divides the group size; the router override is
  // {"group_size": 64, "bits": N} like mlx-lm's quant_predicate for MoE models.
  const int router_bits = opt.router_bits ? opt.router_bits : fam->router_bits;
  json quantization = nullptr;
  if (opt.quantize) {
    quantization = {{"group_size", opt.q.group_size}, {"bits", opt.q.bits}, {"mode", "affine"}};
    for (Job& j : jobs) {
      if (j.out->role == Role::Keep) continue;
      quant::QuantParams q = opt.q;
      const std::string module = j.out->name.substr(0, j.out->name.size() - 7);
      if (j.out->role == Role::Router && router_bits) q = {router_bits, 64};
      const int64_t cols = j.out->shape.back();
      if (cols == 0 || cols % opt.q.group_size != 0 || cols % q.group_size != 0) {
        res.unquantized_linears.push_back(j.out->name);
        continue;
      }
      j.quantized = true;
      j.q = q;
      ++res.quantized_modules;
      if (j.out->role == Role::Router && router_bits)
        quantization[module] = {{"group_size", q.group_size}, {"bits", q.bits}};
    }
  }

  Producer producer(jobs);
  std::vector<io::TensorSpec> specs;
  producer.add_specs(&specs);
  res.tensors_out = specs.size();
  for (auto& s : specs) res.bytes_out += s.nbytes();
  for (auto& j : jobs) res.bf16_tensors += !j.quantized && j.out->keep_dtype == DType::BF16;
  log_info("[convert] {} ({}): {} source tensors -> {} tensors, {}", res.family, fam->architecture,
           res.tensors_in, res.tensors_out,
           opt.quantize ? fmt::format("{}-bit affine, group size {}{}", opt.q.bits, opt.q.group_size,
                                      router_bits ? fmt::format(", router {}-bit", router_bits) : "")
                        : std::string("bf16"));
  for (auto& n : res.unquantized_linears)
    log_info("[convert] keeping '{}' in bf16: last dimension not divisible by group size {}", n, opt.q.group_size);

  io::write_model_weights(opt.output, specs,
                          [&](const io::TensorSpec& s, uint8_t* dst) { producer.fill(s, dst); },
                          opt.max_shard_bytes, opt.progress);

  // config.json: the source config, bf16, plus the quantization block (keys sorted like mlx-lm).
  json out_config = config;
  out_config.erase("_name_or_path");
  for (const char* k : {"torch_dtype", "dtype"})
    if (out_config.contains(k)) out_config[k] = "bfloat16";
  if (opt.quantize) {
    out_config["quantization"] = quantization;
    out_config["quantization_config"] = quantization;
  }
  {
    const std::string path = (fs::path(opt.output) / "config.json").string();
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f << out_config.dump(4) << "\n";
    f.close();
    ZMLX_CHECK(f.good(), "[convert] cannot write '{}'", path);
  }
  for (const char* name : {"generation_config.json", "tokenizer.json", "tokenizer_config.json",
                           "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
                           "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model"}) {
    fs::path from = fs::path(res.source_dir) / name;
    if (!fs::is_regular_file(from, ec)) continue;
    fs::copy_file(from, fs::path(opt.output) / name, fs::copy_options::overwrite_existing, ec);
    ZMLX_CHECK(!ec, "[convert] cannot copy '{}' to '{}': {}", from.string(), opt.output, ec.message());
    res.copied_files.push_back(name);
  }
  return res;
}

}  // namespace zmlx::convert
