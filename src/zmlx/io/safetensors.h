// Safetensors files, read through mmap with strict header validation, and
// written the same way (mmap the output, fill tensors in place) so that a
// 17 GB model can be produced without holding it in memory.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "zmlx/core/dtype.h"

namespace zmlx::io {

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // points into the file's mapping
  size_t nbytes = 0;
  std::string file;  // path of the file that holds it (for error messages)

  int64_t numel() const;
  std::string shape_str() const;  // "[128, 768, 256]"
};

// One mmapped .safetensors file. Construction validates the whole header:
// header length sane (2 <= n <= file size - 8, <= 100 MB), valid JSON object,
// known dtypes, data_offsets inside the data section, no two tensors
// overlapping, byte size == numel * dtype size. Any violation throws
// zmlx::Error naming the file, the tensor and expected vs found.
// Gaps between tensors are accepted (other writers pad); TensorInfo::data is
// only guaranteed byte-aligned for such files (files written by
// write_safetensors align every tensor to its element size).
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  size_t file_size() const { return size_; }

 private:
  std::string path_;
  void* map_ = nullptr;
  size_t size_ = 0;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// All tensors of a model directory: `model.safetensors`, or the shards named
// by `model.safetensors.index.json` (each shard must exist and hold exactly
// the tensors the index assigns to it), or else every `*.safetensors` file.
class WeightStore {
 public:
  static WeightStore open_dir(const std::string& dir);

  bool has(const std::string& name) const;
  // Throws zmlx::Error "tensor 'X' not found in <dir>" when absent.
  const TensorInfo& get(const std::string& name) const;
  // get() plus a dtype and shape check; the error names the tensor and file.
  const TensorInfo& get(const std::string& name, DType dtype,
                        const std::vector<int64_t>& shape) const;
  std::vector<std::string> names() const;  // sorted
  uint64_t total_bytes() const;
  const std::string& dir() const { return dir_; }
  // Touches every page once (for an honest "loaded" time and progress bar).
  void prefetch(bool progress) const;

 private:
  std::string dir_;
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorInfo*> index_;
};

// ---- writing ----
struct TensorSpec {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  size_t nbytes() const;
};

// Fills `dst` (exactly spec.nbytes() bytes) with the tensor's contents.
using TensorFiller = std::function<void(const TensorSpec& spec, uint8_t* dst)>;

// Writes one safetensors file: tensors sorted by name, 8-byte aligned data
// offsets, metadata (e.g. {"format": "mlx"}) in "__metadata__".
void write_safetensors(const std::string& path, const std::vector<TensorSpec>& specs,
                       const TensorFiller& fill,
                       const std::map<std::string, std::string>& metadata = {});

// Writes a model's weights the way mlx-lm does: sorted by name, split into
// shards of at most `max_shard_bytes` (model-0000i-of-0000N.safetensors plus
// model.safetensors.index.json with "metadata": {"total_size": ...} and a
// sorted "weight_map"), or a single model.safetensors when everything fits
// (the index is written in both cases, as mlx-lm does). `progress` draws a
// bar on a terminal. Existing files of the same names are replaced; each file
// is written as NAME.partial and renamed when complete.
void write_model_weights(const std::string& dir, const std::vector<TensorSpec>& specs,
                         const TensorFiller& fill, uint64_t max_shard_bytes,
                         bool progress = false,
                         const std::map<std::string, std::string>& metadata = {{"format", "mlx"}});

}  // namespace zmlx::io
