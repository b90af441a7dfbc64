// Safetensors reader/writer and WeightStore: round trips, every corruption
// class (one clear zmlx::Error naming file and field), and a randomized
// mutation fuzz that must never crash.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "zmlx/core/error.h"
#include "zmlx/io/safetensors.h"

#include "test_helpers.h"

namespace fs = std::filesystem;
using nlohmann::json;
using namespace zmlx;
using namespace zmlx::io;

namespace {

using zmlx::test::TempDir;

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), std::streamsize(bytes.size()));
}

std::string read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

// A raw safetensors file from a header string and a data section.
std::string raw_file(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = char(uint8_t(n >> (8 * i)));
  return out + header + data;
}

// Deterministic contents: byte i of tensor `name` = hash(name) + i.
uint8_t pattern_byte(const std::string& name, size_t i) {
  return uint8_t(std::hash<std::string>{}(name) + i * 131);
}
void fill_pattern(const TensorSpec& s, uint8_t* dst) {
  for (size_t i = 0; i < s.nbytes(); ++i) dst[i] = pattern_byte(s.name, i);
}
void expect_pattern(const TensorInfo& t) {
  for (size_t i = 0; i < t.nbytes; ++i) {
    ASSERT_EQ(t.data[i], pattern_byte(t.name, i)) << t.name << " byte " << i;
  }
}

// Expects a zmlx::Error whose message contains every one of `parts`.
template <typename F>
void expect_error(F&& f, std::initializer_list<std::string> parts) {
  try {
    f();
    ADD_FAILURE() << "expected zmlx::Error containing '" << *parts.begin() << "'";
  } catch (const zmlx::Error& e) {
    std::string msg = e.what();
    for (auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "message lacks '" << p << "': " << msg;
  }
}

std::vector<TensorSpec> sample_specs() {
  return {
      {"b.weight", DType::BF16, {3, 5}},          // 30 bytes: not a multiple of 8
      {"a.weight", DType::U32, {4, 7}},           // 112 bytes
      {"c.scales", DType::F16, {1}},              // 2 bytes
      {"d.f32", DType::F32, {3}},                 // 12 bytes
      {"e.bytes", DType::U8, {5}},                // 5 bytes
      {"f.int", DType::I32, {2, 2}},              // 16 bytes
      {"g.empty", DType::F32, {0, 4}},            // 0 bytes
      {"h.scalar", DType::BF16, {}},              // 2 bytes
  };
}

// A valid 2-tensor file's header and data, for the corruption tests.
json good_header() {
  return json{{"x", {{"dtype", "F32"}, {"shape", {2, 2}}, {"data_offsets", {0, 16}}}},
              {"y", {{"dtype", "BF16"}, {"shape", {4}}, {"data_offsets", {16, 24}}}}};
}

}  // namespace

TEST(Safetensors, RoundTripAllDtypesAndAlignment) {
  TempDir d;
  auto specs = sample_specs();
  std::string path = d.file("t.safetensors");
  write_safetensors(path, specs, fill_pattern, {{"format", "mlx"}});
  EXPECT_FALSE(fs::exists(path + ".partial"));

  SafetensorsFile f(path);
  ASSERT_EQ(f.tensors().size(), specs.size());
  EXPECT_EQ(f.metadata().at("format"), "mlx");
  uint64_t sum = 0;
  for (auto& s : specs) {
    const TensorInfo& t = f.tensors().at(s.name);
    EXPECT_EQ(t.dtype, s.dtype) << s.name;
    EXPECT_EQ(t.shape, s.shape) << s.name;
    EXPECT_EQ(t.nbytes, s.nbytes()) << s.name;
    EXPECT_EQ(t.file, path);
    expect_pattern(t);
    uintptr_t addr = reinterpret_cast<uintptr_t>(t.data);
    if (t.nbytes % 8 == 0) {
      EXPECT_EQ(addr % 8, 0u) << s.name << " not 8-byte aligned";
    }
    EXPECT_EQ(addr % dtype_size(t.dtype), 0u) << s.name << " not element aligned";
    sum += t.nbytes;
  }
  // Header length is a multiple of 8 and the data section has no holes.
  std::string raw = read_bytes(path);
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= uint64_t(uint8_t(raw[i])) << (8 * i);
  EXPECT_EQ(n % 8, 0u);
  EXPECT_EQ(raw.size(), 8 + n + sum);
  // Header keys appear in sorted order.
  std::string header = raw.substr(8, n);
  size_t pa = header.find("\"a.weight\""), pb = header.find("\"b.weight\""), ph = header.find("\"h.scalar\"");
  EXPECT_LT(pa, pb);
  EXPECT_LT(pb, ph);
  EXPECT_EQ(f.tensors().at("h.scalar").shape_str(), "[]");
  EXPECT_EQ(f.tensors().at("a.weight").shape_str(), "[4, 7]");
  EXPECT_EQ(f.tensors().at("h.scalar").numel(), 1);
}

TEST(Safetensors, ReadsHandWrittenFile) {
  TempDir d;
  std::string data(24, '\0');
  float xs[4] = {1.5f, -2.f, 3.25f, 0.f};
  std::memcpy(data.data(), xs, 16);
  write_bytes(d.file("h.safetensors"), raw_file(good_header().dump() + "   ", data));
  SafetensorsFile f(d.file("h.safetensors"));
  const TensorInfo& x = f.tensors().at("x");
  float back[4];
  std::memcpy(back, x.data, 16);
  EXPECT_EQ(back[2], 3.25f);
  EXPECT_EQ(f.tensors().at("y").nbytes, 8u);
  EXPECT_TRUE(f.metadata().empty());
}

TEST(Safetensors, WriterRemovesPartialFileWhenFillerThrows) {
  TempDir d;
  std::string path = d.file("bad.safetensors");
  auto specs = sample_specs();
  EXPECT_THROW(write_safetensors(path, specs,
                                 [](const TensorSpec& s, uint8_t*) {
                                   if (s.name == "d.f32") zmlx::fail("boom");
                                 }),
               zmlx::Error);
  EXPECT_FALSE(fs::exists(path));
  EXPECT_FALSE(fs::exists(path + ".partial"));
}

TEST(Safetensors, WriterRejectsDuplicateNames) {
  TempDir d;
  std::vector<TensorSpec> specs = {{"a", DType::F32, {1}}, {"a", DType::F32, {2}}};
  expect_error([&] { write_safetensors(d.file("x.safetensors"), specs, fill_pattern); }, {"'a'", "twice"});
}

// ---- corruption classes ----

struct Corrupt : ::testing::Test {
  TempDir d;
  std::string path;
  void SetUp() override { path = d.file("model-bad.safetensors"); }
  void write(const std::string& bytes) { write_bytes(path, bytes); }
  void write_header(const json& h, size_t data_bytes = 24) { write(raw_file(h.dump(), std::string(data_bytes, '\1'))); }
  void expect(std::initializer_list<std::string> parts) {
    std::vector<std::string> all(parts);
    try {
      SafetensorsFile f(path);
      ADD_FAILURE() << "expected an error containing '" << all[0] << "'";
    } catch (const zmlx::Error& e) {
      std::string msg = e.what();
      EXPECT_NE(msg.find("model-bad.safetensors"), std::string::npos) << "no file name in: " << msg;
      for (auto& p : all) EXPECT_NE(msg.find(p), std::string::npos) << "message lacks '" << p << "': " << msg;
    }
  }
};

TEST_F(Corrupt, Baseline) {
  write_header(good_header());
  EXPECT_NO_THROW(SafetensorsFile f(path));
}
TEST_F(Corrupt, MissingFile) {
  expect({"cannot open"});
}
TEST_F(Corrupt, EmptyAndTinyFile) {
  write("");
  expect({"truncated", "at least 8"});
  write("abc");
  expect({"truncated"});
}
TEST_F(Corrupt, HeaderLengthTooBig) {
  std::string f = raw_file(good_header().dump(), std::string(24, '\0'));
  f[7] = char(0x7f);  // ~ 9e18 bytes
  write(f);
  expect({"header length", "limit"});
}
TEST_F(Corrupt, HeaderLengthBeyondFile) {
  std::string h = good_header().dump();
  std::string f = raw_file(h, "");
  f.resize(8 + h.size() / 2);  // cut inside the header
  write(f);
  expect({"truncated", "header length"});
}
TEST_F(Corrupt, TruncatedData) {
  std::string f = raw_file(good_header().dump(), std::string(24, '\0'));
  f.resize(f.size() - 5);
  write(f);
  expect({"'y'", "data_offsets", "truncated"});
}
TEST_F(Corrupt, InvalidJson) {
  write(raw_file("{\"x\": {\"dtype\": \"F32\",", std::string(16, '\0')));
  expect({"not valid JSON"});
}
TEST_F(Corrupt, HeaderNotAnObject) {
  write(raw_file("[1, 2, 3]", ""));
  expect({"JSON object", "array"});
}
TEST_F(Corrupt, UnknownDtype) {
  json h = good_header();
  h["y"]["dtype"] = "F64";
  write_header(h);
  expect({"'y'", "unknown dtype 'F64'", "BF16"});
}
TEST_F(Corrupt, DtypeNotString) {
  json h = good_header();
  h["x"]["dtype"] = 7;
  write_header(h);
  expect({"'x'", "dtype"});
}
TEST_F(Corrupt, MissingFields) {
  for (const char* field : {"dtype", "shape", "data_offsets"}) {
    json h = good_header();
    h["x"].erase(field);
    write_header(h);
    expect({"'x'", std::string("missing field '") + field + "'"});
  }
}
TEST_F(Corrupt, EntryNotAnObject) {
  json h = good_header();
  h["x"] = "hello";
  write_header(h);
  expect({"'x'", "must be an object"});
}
TEST_F(Corrupt, OffsetsOutsideFile) {
  json h = good_header();
  h["y"]["data_offsets"] = {16, 1000016};
  write_header(h);
  expect({"'y'", "data_offsets", "1000016", "expected end <= 24"});
}
TEST_F(Corrupt, OffsetsReversed) {
  json h = good_header();
  h["x"]["data_offsets"] = {16, 0};
  write_header(h);
  expect({"'x'", "reversed"});
}
TEST_F(Corrupt, OffsetsBadForm) {
  json h = good_header();
  h["x"]["data_offsets"] = {0};
  write_header(h);
  expect({"'x'", "data_offsets", "[begin, end]"});
  h["x"]["data_offsets"] = {-8, 8};
  write_header(h);
  expect({"'x'", "data_offsets", "non-negative"});
  h["x"]["data_offsets"] = {0.5, 16};
  write_header(h);
  expect({"'x'", "data_offsets"});
}
TEST_F(Corrupt, OverlappingTensors) {
  json h = good_header();
  h["y"]["data_offsets"] = {8, 16};
  write_header(h);
  expect({"'x'", "'y'", "overlap"});
}
TEST_F(Corrupt, SizeMismatch) {
  json h = good_header();
  h["x"]["shape"] = {2, 3};
  write_header(h, 40);
  expect({"'x'", "size mismatch", "24 bytes", "hold 16"});
}
TEST_F(Corrupt, NegativeShape) {
  json h = good_header();
  h["x"]["shape"] = {-2, -2};
  write_header(h);
  expect({"'x'", "shape", "non-negative"});
}
TEST_F(Corrupt, ShapeNotIntegers) {
  json h = good_header();
  h["x"]["shape"] = {"2", 2};
  write_header(h);
  expect({"'x'", "shape"});
  h["x"]["shape"] = 4;
  write_header(h);
  expect({"'x'", "shape", "array"});
}
TEST_F(Corrupt, ShapeOverflow) {
  json h = good_header();
  h["x"]["shape"] = {uint64_t(1) << 32, uint64_t(1) << 32};  // product wraps to 0 in 64 bits
  write_header(h);
  expect({"'x'", "too large"});
  h["x"]["shape"] = {uint64_t(1) << 62, 8};
  write_header(h);
  expect({"'x'", "too large"});
}
TEST_F(Corrupt, ZeroDimWithHugeOthersIsEmpty) {
  json h = good_header();
  h["z"] = {{"dtype", "U32"}, {"shape", {uint64_t(1) << 40, uint64_t(1) << 40, 0}}, {"data_offsets", {24, 24}}};
  write_header(h);
  SafetensorsFile f(path);
  EXPECT_EQ(f.tensors().at("z").nbytes, 0u);
}
TEST_F(Corrupt, DuplicateKey) {
  std::string h = R"({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                      "x": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}})";
  write(raw_file(h, std::string(24, '\0')));
  expect({"'x'", "twice"});
}
TEST_F(Corrupt, BadMetadata) {
  json h = good_header();
  h["__metadata__"] = {{"format", 3}};
  write_header(h);
  expect({"__metadata__.format", "string"});
  h["__metadata__"] = "mlx";
  write_header(h);
  expect({"__metadata__", "object"});
}

// ---- mini-fuzz: random corruption must load or throw zmlx::Error, never crash ----

TEST(SafetensorsFuzz, RandomMutationsNeverCrash) {
  TempDir d;
  std::string good_path = d.file("good.safetensors");
  write_safetensors(good_path, sample_specs(), fill_pattern, {{"format", "mlx"}});
  const std::string good = read_bytes(good_path);
  uint64_t hlen = 0;
  for (int i = 0; i < 8; ++i) hlen |= uint64_t(uint8_t(good[i])) << (8 * i);

  std::mt19937_64 rng(12345);
  const std::string path = d.file("fuzz.safetensors");
  int loaded = 0, rejected = 0;
  const char interesting[] = "{}[],:\"0123456789-e.ABFU ";
  for (int iter = 0; iter < 3000; ++iter) {
    std::string f = good;
    int mode = int(rng() % 4);
    if (mode == 0 || mode == 3) {  // flip bytes in the length field or header
      int flips = 1 + int(rng() % 4);
      for (int k = 0; k < flips; ++k) {
        size_t pos = rng() % (8 + hlen);
        if (rng() % 2) f[pos] = char(rng());
        else f[pos] = interesting[rng() % (sizeof(interesting) - 1)];
      }
    }
    if (mode == 1 || mode == 3) f.resize(rng() % (f.size() + 1));  // truncate anywhere
    if (mode == 2) {                                               // perturb a digit run
      size_t pos = 8 + rng() % hlen;
      if (std::isdigit(uint8_t(f[pos]))) f[pos] = char('0' + rng() % 10);
      else f.insert(pos, 1, char('0' + rng() % 10));
      if (f.size() > good.size()) f.resize(good.size());
    }
    // Remove first: truncating a file that holds data makes ext4 flush it on close (slow).
    fs::remove(path);
    write_bytes(path, f);
    try {
      SafetensorsFile sf(path);
      // A file that loads must have every tensor inside the mapping.
      uint64_t acc = 0;
      for (auto& [n, t] : sf.tensors()) {
        EXPECT_LE(t.nbytes, sf.file_size());
        for (size_t i = 0; i < t.nbytes; ++i) acc += t.data[i];
      }
      (void)acc;
      ++loaded;
    } catch (const zmlx::Error& e) {
      ++rejected;
      EXPECT_NE(std::string(e.what()).find("fuzz.safetensors"), std::string::npos) << e.what();
    } catch (const std::exception& e) {
      ADD_FAILURE() << "iteration " << iter << ": non-zmlx exception: " << e.what();
    }
  }
  EXPECT_GT(rejected, 1000);  // the fuzz really corrupts
  EXPECT_GT(loaded, 0);       // and some mutations are harmless (e.g. inside names)
}

// ---- WeightStore and sharded writing ----

TEST(WeightStore, ShardedWriteAndOpen) {
  TempDir d;
  std::vector<TensorSpec> specs;
  for (int i = 0; i < 10; ++i) specs.push_back({fmt::format("layer.{}.w", i), DType::BF16, {16, 16}});  // 512 B each
  write_model_weights(d.path.string(), specs, fill_pattern, /*max_shard_bytes=*/1200);
  // 512 + 512 fit in 1200, a third does not: 2 tensors per shard, 5 shards.
  EXPECT_TRUE(fs::exists(d.file("model-00001-of-00005.safetensors")));
  EXPECT_TRUE(fs::exists(d.file("model-00005-of-00005.safetensors")));
  EXPECT_FALSE(fs::exists(d.file("model.safetensors")));
  json idx = json::parse(read_bytes(d.file("model.safetensors.index.json")));
  EXPECT_EQ(idx["metadata"]["total_size"].get<uint64_t>(), 10u * 512);
  std::vector<std::string> keys;
  for (auto it = idx["weight_map"].begin(); it != idx["weight_map"].end(); ++it) keys.push_back(it.key());
  EXPECT_TRUE(std::is_sorted(keys.begin(), keys.end()));
  EXPECT_EQ(idx["weight_map"]["layer.0.w"], "model-00001-of-00005.safetensors");
  EXPECT_EQ(idx["weight_map"]["layer.9.w"], "model-00005-of-00005.safetensors");

  WeightStore ws = WeightStore::open_dir(d.path.string());
  EXPECT_EQ(ws.names().size(), 10u);
  EXPECT_EQ(ws.total_bytes(), 5120u);
  for (auto& n : ws.names()) expect_pattern(ws.get(n));
  EXPECT_NO_THROW(ws.get("layer.3.w", DType::BF16, {16, 16}));
  expect_error([&] { ws.get("layer.3.w", DType::F32, {16, 16}); },
               {"'layer.3.w'", "expected F32 [16, 16]", "found BF16 [16, 16]", "safetensors"});
  expect_error([&] { ws.get("layer.3.w", DType::BF16, {16, 15}); }, {"expected BF16 [16, 15]"});
  expect_error([&] { ws.get("nope"); }, {"'nope'", "not found"});
  EXPECT_FALSE(ws.has("nope"));
  EXPECT_TRUE(ws.has("layer.0.w"));
  ws.prefetch(false);

  // Metadata defaults to {"format": "mlx"}.
  SafetensorsFile one(d.file("model-00002-of-00005.safetensors"));
  EXPECT_EQ(one.metadata().at("format"), "mlx");
}

TEST(WeightStore, SingleFileWhenItFits) {
  TempDir d;
  write_model_weights(d.path.string(), sample_specs(), fill_pattern, 5ull << 30);
  EXPECT_TRUE(fs::exists(d.file("model.safetensors")));
  json idx = json::parse(read_bytes(d.file("model.safetensors.index.json")));
  EXPECT_EQ(idx["weight_map"]["a.weight"], "model.safetensors");
  WeightStore ws = WeightStore::open_dir(d.path.string());
  EXPECT_EQ(ws.names().size(), sample_specs().size());
  // Without the index, model.safetensors alone is found.
  fs::remove(d.file("model.safetensors.index.json"));
  EXPECT_EQ(WeightStore::open_dir(d.path.string()).names().size(), sample_specs().size());
}

TEST(WeightStore, TensorBiggerThanShardLimitGetsItsOwnShard) {
  TempDir d;
  std::vector<TensorSpec> specs = {{"a", DType::F32, {100}}, {"b", DType::F32, {1}}, {"c", DType::F32, {1}}};
  write_model_weights(d.path.string(), specs, fill_pattern, 100);
  EXPECT_TRUE(fs::exists(d.file("model-00001-of-00002.safetensors")));
  WeightStore ws = WeightStore::open_dir(d.path.string());
  EXPECT_EQ(ws.get("a").file, d.file("model-00001-of-00002.safetensors"));
  EXPECT_EQ(ws.get("c").file, d.file("model-00002-of-00002.safetensors"));
}

struct ShardedCorrupt : ::testing::Test {
  TempDir d;
  void SetUp() override {
    std::vector<TensorSpec> specs;
    for (int i = 0; i < 4; ++i) specs.push_back({fmt::format("t{}", i), DType::F32, {8}});
    write_model_weights(d.path.string(), specs, fill_pattern, 64);  // 2 tensors per shard
  }
  json index() { return json::parse(read_bytes(d.file("model.safetensors.index.json"))); }
  void set_index(const json& j) { write_bytes(d.file("model.safetensors.index.json"), j.dump()); }
  void expect(std::initializer_list<std::string> parts) {
    expect_error([&] { WeightStore::open_dir(d.path.string()); }, parts);
  }
};

TEST_F(ShardedCorrupt, Baseline) { EXPECT_EQ(WeightStore::open_dir(d.path.string()).names().size(), 4u); }
TEST_F(ShardedCorrupt, MissingShard) {
  fs::remove(d.file("model-00002-of-00002.safetensors"));
  expect({"model.safetensors.index.json", "model-00002-of-00002.safetensors", "missing"});
}
TEST_F(ShardedCorrupt, IndexNamesTensorNotInShard) {
  json j = index();
  j["weight_map"]["ghost"] = "model-00001-of-00002.safetensors";
  set_index(j);
  expect({"'ghost'", "model-00001-of-00002.safetensors", "does not contain"});
}
TEST_F(ShardedCorrupt, IndexPointsToWrongShard) {
  json j = index();
  j["weight_map"]["t0"] = "model-00002-of-00002.safetensors";
  set_index(j);
  expect({"'t0'", "model-00002-of-00002.safetensors"});
}
TEST_F(ShardedCorrupt, ShardHoldsUnlistedTensor) {
  json j = index();
  j["weight_map"].erase("t1");
  set_index(j);
  expect({"'t1'", "does not list"});
}
TEST_F(ShardedCorrupt, IndexInvalidJson) {
  write_bytes(d.file("model.safetensors.index.json"), "{\"weight_map\": {");
  expect({"model.safetensors.index.json", "not valid JSON"});
}
TEST_F(ShardedCorrupt, IndexWithoutWeightMap) {
  set_index(json{{"metadata", {{"total_size", 1}}}});
  expect({"model.safetensors.index.json", "weight_map"});
  set_index(json{{"weight_map", {{"t0", 5}}}});
  expect({"model.safetensors.index.json", "weight_map['t0']"});
  set_index(json{{"weight_map", {{"t0", "../evil.safetensors"}}}});
  expect({"'../evil.safetensors'"});
}
TEST_F(ShardedCorrupt, CorruptShardIsNamed) {
  std::string p = d.file("model-00001-of-00002.safetensors");
  std::string b = read_bytes(p);
  b.resize(b.size() - 4);
  write_bytes(p, b);
  expect({"model-00001-of-00002.safetensors", "'t1'", "data_offsets"});
}

TEST(WeightStore, PlainFilesDuplicateTensorRejected) {
  TempDir d;
  std::vector<TensorSpec> a = {{"w", DType::F32, {2}}, {"x", DType::F32, {2}}};
  std::vector<TensorSpec> b = {{"w", DType::F32, {2}}, {"y", DType::F32, {2}}};
  write_safetensors(d.file("part-a.safetensors"), a, fill_pattern);
  write_safetensors(d.file("part-b.safetensors"), b, fill_pattern);
  expect_error([&] { WeightStore::open_dir(d.path.string()); },
               {"'w'", "twice", "part-a.safetensors", "part-b.safetensors"});
  fs::remove(d.file("part-b.safetensors"));
  write_safetensors(d.file("part-b.safetensors"), {{"y", DType::F32, {2}}}, fill_pattern);
  WeightStore ws = WeightStore::open_dir(d.path.string());
  EXPECT_EQ(ws.names(), (std::vector<std::string>{"w", "x", "y"}));
}

TEST(WeightStore, EmptyOrMissingDirectory) {
  TempDir d;
  expect_error([&] { WeightStore::open_dir(d.path.string()); }, {d.path.string(), "no weights", "*.safetensors"});
  expect_error([&] { WeightStore::open_dir(d.file("nope")); }, {"nope", "does not exist"});
}
