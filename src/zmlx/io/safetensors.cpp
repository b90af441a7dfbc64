// Safetensors reader (mmap + strict header validation) and WeightStore.
// The writer lives in safetensors_write.cpp.
//
// File format: u64 little-endian N, then N bytes of JSON (an object mapping
// tensor name -> {"dtype", "shape", "data_offsets": [begin, end]}, plus an
// optional "__metadata__" string->string object), then the data section.
// Offsets are relative to the start of the data section.
#include "zmlx/io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "zmlx/core/error.h"
#include "zmlx/core/log.h"

namespace zmlx::io {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr uint64_t kMaxHeaderBytes = 100ull << 20;  // same limit as the safetensors library

// A JSON value as a short string for messages (never huge).
std::string brief(const json& v) {
  std::string s = v.dump(-1, ' ', false, json::error_handler_t::replace);
  if (s.size() > 60) s = s.substr(0, 57) + "...";
  return s;
}

// Non-negative JSON integer -> uint64; false for anything else
// (negative, fractional, string, out of range, ...).
bool as_u64(const json& v, uint64_t* out) {
  if (v.is_number_unsigned()) {
    *out = v.get<uint64_t>();
    return true;
  }
  if (v.is_number_integer()) {
    int64_t i = v.get<int64_t>();
    if (i < 0) return false;
    *out = uint64_t(i);
    return true;
  }
  return false;
}

std::string names_of_dtypes() { return "U32, BF16, F16, F32, I32, U8"; }

}  // namespace

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string TensorInfo::shape_str() const {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  const std::string& P = path_;
  int fd = ::open(P.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail("safetensors file '{}': cannot open: {}", P, std::strerror(errno));
  struct stat st{};
  if (::fstat(fd, &st) != 0) {
    int e = errno;
    ::close(fd);
    fail("safetensors file '{}': cannot stat: {}", P, std::strerror(e));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    fail("safetensors file '{}': not a regular file", P);
  }
  size_ = size_t(st.st_size);
  if (size_ < 8) {
    ::close(fd);
    fail("safetensors file '{}': truncated: file has {} bytes, expected at least 8 (the header length)",
         P, size_);
  }
  map_ = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
  int map_errno = errno;
  ::close(fd);
  if (map_ == MAP_FAILED) {
    map_ = nullptr;
    fail("safetensors file '{}': mmap of {} bytes failed: {}", P, size_, std::strerror(map_errno));
  }
  // From here on the destructor will not run if we throw: unmap by hand.
  try {
    const uint8_t* base = static_cast<const uint8_t*>(map_);
    uint64_t n = 0;
    for (int i = 0; i < 8; ++i) n |= uint64_t(base[i]) << (8 * i);
    ZMLX_CHECK(n >= 2, "safetensors file '{}': header length {} is too small (expected at least 2 "
               "bytes of JSON)", P, n);
    ZMLX_CHECK(n <= kMaxHeaderBytes, "safetensors file '{}': header length {} exceeds the {} byte limit "
               "(corrupt or not a safetensors file)", P, n, kMaxHeaderBytes);
    ZMLX_CHECK(n <= size_ - 8, "safetensors file '{}': truncated: header length {} but only {} bytes "
               "follow the length field", P, n, size_ - 8);
    const char* hb = reinterpret_cast<const char*>(base + 8);
    const uint64_t data_start = 8 + n;
    const uint64_t data_size = size_ - data_start;

    // Parse, rejecting duplicate top-level keys (nlohmann would keep the last one silently).
    std::set<std::string> seen;
    std::string dup;
    json::parser_callback_t cb = [&](int depth, json::parse_event_t ev, json& parsed) {
      if (depth == 1 && ev == json::parse_event_t::key && parsed.is_string()) {
        if (!seen.insert(parsed.get<std::string>()).second && dup.empty()) dup = parsed.get<std::string>();
      }
      return true;
    };
    json h;
    try {
      h = json::parse(hb, hb + n, cb, /*allow_exceptions=*/true);
    } catch (const json::exception& e) {
      fail("safetensors file '{}': header is not valid JSON: {}", P, e.what());
    }
    ZMLX_CHECK(dup.empty(), "safetensors file '{}': header names '{}' twice", P, dup);
    ZMLX_CHECK(h.is_object(), "safetensors file '{}': header must be a JSON object, found {}", P,
               h.type_name());

    struct Range {
      uint64_t begin, end;
      const std::string* name;
    };
    std::vector<Range> ranges;
    for (auto it = h.begin(); it != h.end(); ++it) {
      const std::string& name = it.key();
      const json& v = it.value();
      if (name == "__metadata__") {
        ZMLX_CHECK(v.is_object(), "safetensors file '{}': field '__metadata__' must be an object, found {}",
                   P, v.type_name());
        for (auto m = v.begin(); m != v.end(); ++m) {
          ZMLX_CHECK(m.value().is_string(), "safetensors file '{}': field '__metadata__.{}' must be a "
                     "string, found {}", P, m.key(), m.value().type_name());
          metadata_[m.key()] = m.value().get<std::string>();
        }
        continue;
      }
      ZMLX_CHECK(v.is_object(), "safetensors file '{}': tensor '{}': entry must be an object, found {}", P,
                 name, brief(v));
      TensorInfo t;
      t.name = name;
      t.file = P;
      // dtype
      auto d = v.find("dtype");
      ZMLX_CHECK(d != v.end(), "safetensors file '{}': tensor '{}': missing field 'dtype'", P, name);
      ZMLX_CHECK(d->is_string(), "safetensors file '{}': tensor '{}': field 'dtype' must be a string, found {}",
                 P, name, brief(*d));
      ZMLX_CHECK(parse_dtype(d->get<std::string>(), &t.dtype),
                 "safetensors file '{}': tensor '{}': unknown dtype '{}' (expected one of {})", P, name,
                 d->get<std::string>(), names_of_dtypes());
      // shape
      auto s = v.find("shape");
      ZMLX_CHECK(s != v.end(), "safetensors file '{}': tensor '{}': missing field 'shape'", P, name);
      ZMLX_CHECK(s->is_array(), "safetensors file '{}': tensor '{}': field 'shape' must be an array, found {}",
                 P, name, brief(*s));
      uint64_t numel = 1;
      bool overflow = false, zero_dim = false;
      for (size_t i = 0; i < s->size(); ++i) {
        uint64_t dim = 0;
        ZMLX_CHECK(as_u64((*s)[i], &dim) && dim <= uint64_t(std::numeric_limits<int64_t>::max()),
                   "safetensors file '{}': tensor '{}': field 'shape' entry {} must be a non-negative "
                   "integer, found {}", P, name, i, brief((*s)[i]));
        t.shape.push_back(int64_t(dim));
        zero_dim = zero_dim || dim == 0;
        if (__builtin_mul_overflow(numel, dim, &numel)) overflow = true;
      }
      uint64_t expect_bytes = 0;
      if (__builtin_mul_overflow(numel, uint64_t(dtype_size(t.dtype)), &expect_bytes)) overflow = true;
      ZMLX_CHECK(!overflow || zero_dim,
                 "safetensors file '{}': tensor '{}': shape {} is too large (element count overflows)", P,
                 name, t.shape_str());
      if (zero_dim) numel = expect_bytes = 0;
      // data_offsets
      auto o = v.find("data_offsets");
      ZMLX_CHECK(o != v.end(), "safetensors file '{}': tensor '{}': missing field 'data_offsets'", P, name);
      ZMLX_CHECK(o->is_array() && o->size() == 2,
                 "safetensors file '{}': tensor '{}': field 'data_offsets' must be [begin, end], found {}", P,
                 name, brief(*o));
      uint64_t b = 0, e = 0;
      ZMLX_CHECK(as_u64((*o)[0], &b) && as_u64((*o)[1], &e),
                 "safetensors file '{}': tensor '{}': field 'data_offsets' must hold non-negative integers, "
                 "found {}", P, name, brief(*o));
      ZMLX_CHECK(b <= e, "safetensors file '{}': tensor '{}': data_offsets [{}, {}] are reversed (expected "
                 "begin <= end)", P, name, b, e);
      ZMLX_CHECK(e <= data_size, "safetensors file '{}': tensor '{}': data_offsets [{}, {}] end beyond the "
                 "data section (expected end <= {}; file truncated or corrupt)", P, name, b, e, data_size);
      ZMLX_CHECK(e - b == expect_bytes, "safetensors file '{}': tensor '{}': size mismatch: {} {} needs {} "
                 "bytes, data_offsets [{}, {}] hold {}", P, name, dtype_name(t.dtype), t.shape_str(),
                 expect_bytes, b, e, e - b);
      t.nbytes = size_t(e - b);
      t.data = base + data_start + b;
      auto [pos, inserted] = tensors_.emplace(name, std::move(t));
      (void)inserted;
      ranges.push_back({b, e, &pos->first});
    }
    // No two non-empty tensors may share bytes.
    std::sort(ranges.begin(), ranges.end(),
              [](const Range& a, const Range& b) { return a.begin != b.begin ? a.begin < b.begin : a.end < b.end; });
    const Range* prev = nullptr;
    for (const Range& r : ranges) {
      if (r.begin == r.end) continue;
      if (prev) {
        ZMLX_CHECK(r.begin >= prev->end, "safetensors file '{}': tensors '{}' [{}, {}] and '{}' [{}, {}] "
                   "overlap (expected disjoint data_offsets)", P, *prev->name, prev->begin, prev->end,
                   *r.name, r.begin, r.end);
      }
      prev = &r;
    }
  } catch (...) {
    ::munmap(map_, size_);
    map_ = nullptr;
    throw;
  }
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) ::munmap(map_, size_);
}

// ---------------------------------------------------------------- WeightStore

namespace {

json read_json_file(const std::string& path, const char* what) {
  std::ifstream f(path, std::ios::binary);
  ZMLX_CHECK(f.good(), "{} '{}': cannot open: {}", what, path, std::strerror(errno));
  std::stringstream ss;
  ss << f.rdbuf();
  try {
    return json::parse(ss.str());
  } catch (const json::exception& e) {
    fail("{} '{}': not valid JSON: {}", what, path, e.what());
  }
}

}  // namespace

WeightStore WeightStore::open_dir(const std::string& dir) {
  WeightStore ws;
  ws.dir_ = dir;
  std::error_code ec;
  ZMLX_CHECK(fs::is_directory(dir, ec), "model directory '{}' does not exist or is not a directory", dir);

  auto add_file = [&](const std::string& path) -> std::shared_ptr<SafetensorsFile> {
    auto f = std::make_shared<SafetensorsFile>(path);
    ws.files_.push_back(f);
    return f;
  };
  auto add_tensor = [&](const TensorInfo& t) {
    auto [it, inserted] = ws.index_.emplace(t.name, &t);
    ZMLX_CHECK(inserted, "tensor '{}' is stored twice: in '{}' and in '{}'", t.name, it->second->file, t.file);
  };

  const std::string index_path = (fs::path(dir) / "model.safetensors.index.json").string();
  const std::string single_path = (fs::path(dir) / "model.safetensors").string();
  if (fs::exists(index_path, ec)) {
    json idx = read_json_file(index_path, "safetensors index");
    ZMLX_CHECK(idx.is_object(), "safetensors index '{}': expected a JSON object, found {}", index_path,
               idx.type_name());
    auto wm = idx.find("weight_map");
    ZMLX_CHECK(wm != idx.end(), "safetensors index '{}': missing field 'weight_map'", index_path);
    ZMLX_CHECK(wm->is_object(), "safetensors index '{}': field 'weight_map' must be an object, found {}",
               index_path, wm->type_name());
    std::map<std::string, std::vector<std::string>> by_shard;  // shard -> tensor names
    for (auto it = wm->begin(); it != wm->end(); ++it) {
      ZMLX_CHECK(it.value().is_string(), "safetensors index '{}': weight_map['{}'] must be a file name, "
                 "found {}", index_path, it.key(), brief(it.value()));
      std::string shard = it.value().get<std::string>();
      fs::path sp(shard);
      bool safe = !shard.empty() && sp.is_relative();
      for (auto& part : sp) safe = safe && part != "..";
      ZMLX_CHECK(safe, "safetensors index '{}': weight_map['{}'] names shard '{}', expected a file name "
                 "inside the model directory", index_path, it.key(), shard);
      by_shard[shard].push_back(it.key());
    }
    ZMLX_CHECK(!by_shard.empty(), "safetensors index '{}': field 'weight_map' is empty", index_path);
    for (auto& [shard, names] : by_shard) {
      std::string sp = (fs::path(dir) / shard).string();
      ZMLX_CHECK(fs::is_regular_file(sp, ec), "safetensors index '{}': shard '{}' (holding e.g. tensor '{}') "
                 "is missing: expected file '{}'", index_path, shard, names.front(), sp);
      auto f = add_file(sp);
      for (const std::string& n : names) {
        auto t = f->tensors().find(n);
        ZMLX_CHECK(t != f->tensors().end(), "safetensors index '{}': tensor '{}' should be in shard '{}', "
                   "but '{}' does not contain it", index_path, n, shard, sp);
      }
      for (auto& [n, t] : f->tensors()) {
        auto w = wm->find(n);
        ZMLX_CHECK(w != wm->end(), "safetensors index '{}': shard '{}' holds tensor '{}' that the "
                   "weight_map does not list", index_path, sp, n);
        ZMLX_CHECK(w->get<std::string>() == shard, "safetensors index '{}': tensor '{}' is listed in shard "
                   "'{}' but is also stored in '{}'", index_path, n, w->get<std::string>(), sp);
        add_tensor(t);
      }
    }
  } else if (fs::is_regular_file(single_path, ec)) {
    auto f = add_file(single_path);
    for (auto& [n, t] : f->tensors()) add_tensor(t);
  } else {
    std::vector<std::string> paths;
    for (auto& e : fs::directory_iterator(dir, ec))
      if (e.path().extension() == ".safetensors" && e.is_regular_file(ec)) paths.push_back(e.path().string());
    std::sort(paths.begin(), paths.end());
    ZMLX_CHECK(!paths.empty(), "model directory '{}' holds no weights: looked for "
               "model.safetensors.index.json, model.safetensors and *.safetensors", dir);
    for (auto& p : paths) {
      auto f = add_file(p);
      for (auto& [n, t] : f->tensors()) add_tensor(t);
    }
  }
  return ws;
}

bool WeightStore::has(const std::string& name) const { return index_.count(name) != 0; }

const TensorInfo& WeightStore::get(const std::string& name) const {
  auto it = index_.find(name);
  ZMLX_CHECK(it != index_.end(), "tensor '{}' not found in {}", name, dir_);
  return *it->second;
}

const TensorInfo& WeightStore::get(const std::string& name, DType dtype,
                                   const std::vector<int64_t>& shape) const {
  const TensorInfo& t = get(name);
  if (t.dtype != dtype || t.shape != shape) {
    TensorInfo want;
    want.shape = shape;
    fail("tensor '{}' in '{}': expected {} {}, found {} {}", name, t.file, dtype_name(dtype),
         want.shape_str(), dtype_name(t.dtype), t.shape_str());
  }
  return t;
}

std::vector<std::string> WeightStore::names() const {
  std::vector<std::string> out;
  out.reserve(index_.size());
  for (auto& [n, t] : index_) out.push_back(n);
  return out;
}

uint64_t WeightStore::total_bytes() const {
  uint64_t s = 0;
  for (auto& [n, t] : index_) s += t->nbytes;
  return s;
}

void WeightStore::prefetch(bool progress) const {
  const size_t page = size_t(::sysconf(_SC_PAGESIZE));
  Progress bar("loading", progress ? total_bytes() : 0);
  volatile uint8_t sink = 0;
  for (auto& f : files_) {
    for (auto& [n, t] : f->tensors()) {
      if (t.nbytes == 0) continue;
      uintptr_t p0 = reinterpret_cast<uintptr_t>(t.data);
      ::madvise(reinterpret_cast<void*>(p0 & ~uintptr_t(page - 1)), t.nbytes + (p0 & (page - 1)),
                MADV_WILLNEED);
      uint8_t acc = 0;
      for (size_t off = 0; off < t.nbytes; off += page) acc ^= t.data[off];
      acc ^= t.data[t.nbytes - 1];
      sink = sink ^ acc;
      if (progress) bar.advance(t.nbytes);
    }
  }
  (void)sink;
  if (progress) bar.finish();
}

}  // namespace zmlx::io
