// Safetensors writer: the output file is created at its final size, mapped,
// and each tensor is produced in place by the caller's filler, so a model
// much larger than RAM streams straight to disk.
//
// Layout choices:
// - header JSON keys are sorted (nlohmann::json objects are ordered maps) and
//   the header is padded with spaces to a multiple of 8 bytes, so the data
//   section starts 8-byte aligned;
// - tensors are stored contiguously (no gaps: the reference safetensors
//   library rejects files with holes). Tensors whose byte size is a multiple
//   of 8 come first, in name order, so all of them are 8-byte aligned; the
//   rest follow grouped by element size (largest first), so every tensor is
//   at least aligned to its element size.
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

#include "zmlx/core/error.h"
#include "zmlx/core/log.h"
#include "zmlx/io/safetensors.h"

namespace zmlx::io {

namespace fs = std::filesystem;
using json = nlohmann::json;

size_t TensorSpec::nbytes() const {
  uint64_t n = dtype_size(dtype);
  for (int64_t d : shape) {
    ZMLX_CHECK(d >= 0, "tensor '{}': negative dimension {} in shape", name, d);
    ZMLX_CHECK(!__builtin_mul_overflow(n, uint64_t(d), &n), "tensor '{}': shape too large (size overflows)",
               name);
  }
  return size_t(n);
}

namespace {

struct Placed {
  const TensorSpec* spec;
  uint64_t offset, nbytes;
};

// Orders tensors as described at the top of the file and assigns offsets.
std::vector<Placed> place(const std::vector<TensorSpec>& specs, uint64_t* data_bytes) {
  std::vector<Placed> v;
  v.reserve(specs.size());
  for (auto& s : specs) v.push_back({&s, 0, s.nbytes()});
  auto rank = [](const Placed& p) { return p.nbytes % 8 == 0 ? 0 : int(16 - dtype_size(p.spec->dtype)); };
  std::sort(v.begin(), v.end(), [&](const Placed& a, const Placed& b) {
    int ra = rank(a), rb = rank(b);
    return ra != rb ? ra < rb : a.spec->name < b.spec->name;
  });
  uint64_t off = 0;
  for (auto& p : v) {
    p.offset = off;
    off += p.nbytes;
  }
  *data_bytes = off;
  return v;
}

// Closes/unmaps/unlinks a half-written output on every exit path unless released.
struct OutputFile {
  std::string path;
  int fd = -1;
  uint8_t* map = nullptr;
  size_t size = 0;
  bool keep = false;
  ~OutputFile() {
    if (map) ::munmap(map, size);
    if (fd >= 0) ::close(fd);
    if (!keep) ::unlink(path.c_str());
  }
};

}  // namespace

void write_safetensors(const std::string& path, const std::vector<TensorSpec>& specs,
                       const TensorFiller& fill, const std::map<std::string, std::string>& metadata) {
  std::set<std::string> names;
  for (auto& s : specs) {
    ZMLX_CHECK(!s.name.empty(), "writing '{}': a tensor has an empty name", path);
    ZMLX_CHECK(s.name != "__metadata__", "writing '{}': '__metadata__' cannot be a tensor name", path);
    ZMLX_CHECK(names.insert(s.name).second, "writing '{}': tensor '{}' appears twice", path, s.name);
  }
  uint64_t data_bytes = 0;
  std::vector<Placed> placed = place(specs, &data_bytes);

  json h = json::object();
  if (!metadata.empty()) {
    json m = json::object();
    for (auto& [k, v] : metadata) m[k] = v;
    h["__metadata__"] = m;
  }
  for (auto& p : placed)
    h[p.spec->name] = {{"dtype", std::string(dtype_name(p.spec->dtype))},
                       {"shape", p.spec->shape},
                       {"data_offsets", {p.offset, p.offset + p.nbytes}}};
  std::string header = h.dump();
  header.append((8 - header.size() % 8) % 8, ' ');
  const uint64_t data_start = 8 + header.size();
  const uint64_t total = data_start + data_bytes;

  OutputFile out;
  out.path = path + ".partial";
  out.fd = ::open(out.path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (out.fd < 0) {
    out.keep = true;  // nothing to clean up
    fail("writing '{}': cannot create '{}': {}", path, out.path, std::strerror(errno));
  }
  // Reserve the blocks up front: writing through a mapping into a sparse file
  // on a full disk would kill the process with SIGBUS instead of an error.
  if (::fallocate(out.fd, 0, 0, off_t(total)) != 0) {
    int e = errno;
    ZMLX_CHECK(e == EOPNOTSUPP || e == ENOSYS || e == EINVAL,
               "writing '{}': cannot reserve {} bytes: {}", path, total, std::strerror(e));
    ZMLX_CHECK(::ftruncate(out.fd, off_t(total)) == 0, "writing '{}': cannot size file to {} bytes: {}",
               path, total, std::strerror(errno));
  }
  out.size = size_t(total);
  void* m = ::mmap(nullptr, out.size, PROT_READ | PROT_WRITE, MAP_SHARED, out.fd, 0);
  ZMLX_CHECK(m != MAP_FAILED, "writing '{}': mmap of {} bytes failed: {}", path, total, std::strerror(errno));
  out.map = static_cast<uint8_t*>(m);

  const uint64_t hl = header.size();
  for (int i = 0; i < 8; ++i) out.map[i] = uint8_t(hl >> (8 * i));
  std::memcpy(out.map + 8, header.data(), header.size());

  constexpr uint64_t kFlushChunk = 64ull << 20;
  uint64_t unflushed_from = 0;
  for (auto& p : placed) {
    fill(*p.spec, out.map + data_start + p.offset);
    // Start write-back early so dirty pages don't pile up in memory.
    uint64_t end = data_start + p.offset + p.nbytes;
    if (end - unflushed_from >= kFlushChunk) {
      ::sync_file_range(out.fd, off_t(unflushed_from), off_t(end - unflushed_from), SYNC_FILE_RANGE_WRITE);
      unflushed_from = end;
    }
  }
  ZMLX_CHECK(::munmap(out.map, out.size) == 0, "writing '{}': munmap failed: {}", path, std::strerror(errno));
  out.map = nullptr;
  ZMLX_CHECK(::close(out.fd) == 0, "writing '{}': close failed: {}", path, std::strerror(errno));
  out.fd = -1;
  std::error_code ec;
  fs::rename(out.path, path, ec);
  ZMLX_CHECK(!ec, "writing '{}': cannot rename '{}' into place: {}", path, out.path, ec.message());
  out.keep = true;
}

void write_model_weights(const std::string& dir, const std::vector<TensorSpec>& specs,
                         const TensorFiller& fill, uint64_t max_shard_bytes, bool progress,
                         const std::map<std::string, std::string>& metadata) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  ZMLX_CHECK(fs::is_directory(dir, ec), "cannot create output directory '{}'", dir);
  ZMLX_CHECK(max_shard_bytes > 0, "writing '{}': max shard size must be positive", dir);

  std::vector<const TensorSpec*> sorted;
  for (auto& s : specs) sorted.push_back(&s);
  std::sort(sorted.begin(), sorted.end(), [](auto* a, auto* b) { return a->name < b->name; });

  // Greedy split in name order, like mlx-lm's make_shards (no empty shards).
  std::vector<std::vector<TensorSpec>> shards(1);
  uint64_t cur = 0, total = 0;
  for (auto* s : sorted) {
    uint64_t n = s->nbytes();
    if (cur + n > max_shard_bytes && !shards.back().empty()) {
      shards.emplace_back();
      cur = 0;
    }
    shards.back().push_back(*s);
    cur += n;
    total += n;
  }

  Progress bar("writing", progress ? total : 0);
  TensorFiller counted = [&](const TensorSpec& s, uint8_t* dst) {
    fill(s, dst);
    if (progress) bar.advance(s.nbytes());
  };
  const size_t count = shards.size();
  json weight_map = json::object();
  for (size_t i = 0; i < count; ++i) {
    std::string name = count == 1 ? std::string("model.safetensors")
                                  : fmt::format("model-{:05d}-of-{:05d}.safetensors", i + 1, count);
    write_safetensors((fs::path(dir) / name).string(), shards[i], counted, metadata);
    for (auto& s : shards[i]) weight_map[s.name] = name;
  }
  if (progress) bar.finish();

  json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
  std::string ipath = (fs::path(dir) / "model.safetensors.index.json").string();
  std::ofstream f(ipath, std::ios::binary | std::ios::trunc);
  ZMLX_CHECK(f.good(), "cannot write '{}': {}", ipath, std::strerror(errno));
  f << index.dump(4) << "\n";
  f.close();
  ZMLX_CHECK(f.good(), "cannot write '{}': {}", ipath, std::strerror(errno));
}

}  // namespace zmlx::io
