// Offline model resolution: plain directories and the Hugging Face cache layout.
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "test_helpers.h"
#include "zmlx/core/error.h"
#include "zmlx/io/model_path.h"

namespace fs = std::filesystem;
using namespace zmlx::io;

namespace {

// Sets HF_HOME to a fresh temp dir (clearing the variables that outrank it)
// and restores the environment afterwards.
// (Members are destroyed in reverse: the environment comes back, then the
// directory goes.)
struct HfHome {
  zmlx::test::TempDir dir{"hf"};
  const fs::path& root = dir.path;
  zmlx::test::ScopedEnv hub_cache{"HF_HUB_CACHE", nullptr}, xdg_cache{"XDG_CACHE_HOME", nullptr},
      hf_home{"HF_HOME", root.c_str()};
  fs::path repo(const std::string& org, const std::string& name) const {
    return root / "hub" / ("models--" + org + "--" + name);
  }
  // Creates snapshots/<rev>/ (with config.json when asked); returns it.
  fs::path snapshot(const fs::path& repo, const std::string& rev, bool config = true) const {
    fs::path s = repo / "snapshots" / rev;
    fs::create_directories(s);
    if (config) std::ofstream(s / "config.json") << "{}";
    return s;
  }
  void set_ref(const fs::path& repo, const std::string& rev) const {
    fs::create_directories(repo / "refs");
    std::ofstream(repo / "refs" / "main") << rev << "\n";
  }
};

std::string error_of(const std::string& arg) {
  try {
    resolve_model_path(arg);
  } catch (const zmlx::Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(ModelPath, HubDirPrecedence) {
  HfHome h;
  EXPECT_EQ(hf_hub_dir(), (h.root / "hub").string());
  h.hub_cache.set("/x/hubcache");
  EXPECT_EQ(hf_hub_dir(), "/x/hubcache");
  h.hub_cache.set(nullptr);
  h.hf_home.set(nullptr);
  h.xdg_cache.set("/x/xdg");
  EXPECT_EQ(hf_hub_dir(), "/x/xdg/huggingface/hub");
}

TEST(ModelPath, PlainDirectory) {
  HfHome h;
  fs::path dir = h.root / "local-model";
  fs::create_directories(dir);
  std::string err = error_of(dir.string());
  EXPECT_NE(err.find((dir / "config.json").string()), std::string::npos) << err;
  std::ofstream(dir / "config.json") << "{}";
  EXPECT_EQ(resolve_model_path(dir.string()), dir.string());
}

TEST(ModelPath, RefsMainWinsOverNewerSnapshot) {
  HfHome h;
  fs::path repo = h.repo("mlx-community", "Tiny-4bit");
  fs::path a = h.snapshot(repo, "aaaa1111");
  fs::path b = h.snapshot(repo, "bbbb2222");
  fs::last_write_time(a, fs::file_time_type::clock::now() - std::chrono::hours(2));
  h.set_ref(repo, "aaaa1111");
  EXPECT_EQ(resolve_model_path("mlx-community/Tiny-4bit"), a.string());
  // Without refs/main the newest snapshot with a config.json wins.
  fs::remove(repo / "refs" / "main");
  EXPECT_EQ(resolve_model_path("mlx-community/Tiny-4bit"), b.string());
  fs::last_write_time(b, fs::file_time_type::clock::now() - std::chrono::hours(5));
  EXPECT_EQ(resolve_model_path("mlx-community/Tiny-4bit"), a.string());
}

TEST(ModelPath, RefPointingAtIncompleteSnapshotFallsBack) {
  HfHome h;
  fs::path repo = h.repo("org", "m");
  h.snapshot(repo, "partial", /*config=*/false);
  fs::path good = h.snapshot(repo, "complete");
  h.set_ref(repo, "partial");
  EXPECT_EQ(resolve_model_path("org/m"), good.string());
}

TEST(ModelPath, CacheRepoDirectoryGivenDirectly) {
  HfHome h;
  fs::path repo = h.repo("org", "direct");
  fs::path s = h.snapshot(repo, "r1");
  h.set_ref(repo, "r1");
  EXPECT_EQ(resolve_model_path(repo.string()), s.string());
}

TEST(ModelPath, MissingModelListsEveryPlace) {
  HfHome h;
  std::string err = error_of("mlx-community/Nope-4bit");
  EXPECT_NE(err.find("'mlx-community/Nope-4bit' not found"), std::string::npos) << err;
  EXPECT_NE(err.find("mlx-community/Nope-4bit (not a directory)"), std::string::npos) << err;
  EXPECT_NE(err.find((h.repo("mlx-community", "Nope-4bit")).string()), std::string::npos) << err;

  // A repo with snapshots but no config anywhere: every snapshot is listed.
  fs::path repo = h.repo("org", "empty");
  h.snapshot(repo, "s1", false);
  h.snapshot(repo, "s2", false);
  h.set_ref(repo, "s1");
  err = error_of("org/empty");
  EXPECT_NE(err.find((repo / "snapshots" / "s1" / "config.json").string() + " (refs/main)"), std::string::npos)
      << err;
  EXPECT_NE(err.find((repo / "snapshots" / "s2" / "config.json").string()), std::string::npos) << err;
  EXPECT_NE(error_of("").find("empty"), std::string::npos);
}

TEST(ModelPath, ListCachedModels) {
  HfHome h;
  EXPECT_TRUE(list_cached_models().empty());
  fs::path r1 = h.repo("mlx-community", "B-4bit");
  fs::path s1 = h.snapshot(r1, "x");
  h.set_ref(r1, "x");
  fs::path r2 = h.repo("Qwen", "A");
  fs::path s2 = h.snapshot(r2, "y");
  h.snapshot(h.repo("org", "broken"), "z", false);     // no config: not listed
  fs::create_directories(h.root / "hub" / "datasets--o--d");  // not a model
  auto models = list_cached_models();
  ASSERT_EQ(models.size(), 2u);
  EXPECT_EQ(models[0].repo_id, "Qwen/A");
  EXPECT_EQ(models[0].path, s2.string());
  EXPECT_EQ(models[1].repo_id, "mlx-community/B-4bit");
  EXPECT_EQ(models[1].path, s1.string());
}
