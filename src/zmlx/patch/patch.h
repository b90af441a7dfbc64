// The patch layer (the seed's `zmlx.patch()`): after a model loads, detect its
// family, decide which fusion patterns are safe, and swap matching modules for
// fused-kernel equivalents. Fused modules reproduce the unfused rounding
// points and reduction order, so patched logits are bit-identical.
//
// Control, as in the seed: EXO_ZMLX=1 enables (unset/0: nothing is patched),
// EXO_ZMLX_VERBOSE=1 logs every module, EXO_ZMLX_PATTERNS=a,b overrides the
// family defaults, EXO_ZMLX_EXCLUDE=a excludes. CLI flags mirror them.
#pragma once
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "zmlx/models/model.h"

namespace zmlx::patch {

struct PatchOptions {
  bool enabled = false;
  bool verbose = false;
  std::optional<std::vector<std::string>> patterns;  // explicit selection (bypasses family defaults)
  std::vector<std::string> exclude;
  std::string parallelism = "none";                  // none | pipeline | tensor
  bool distributed = false;
  std::string placement;  // multi-process: this rank's share ("rank 1/2 layers 24-47"), logged
  bool quiet = false;  // no log lines (validate re-patches between runs)

  // Reads EXO_ZMLX, EXO_ZMLX_VERBOSE, EXO_ZMLX_PATTERNS, EXO_ZMLX_EXCLUDE.
  static PatchOptions from_env();
};

struct SkippedModule {
  std::string path, pattern, reason;
};

struct PatchReport {
  bool enabled = false;
  std::string family;
  std::vector<std::string> selected;               // patterns that were tried
  std::vector<std::pair<std::string, std::string>> excluded;  // pattern, reason
  std::vector<std::pair<std::string, int>> counts;  // pattern -> modules, in first-patched order
  std::vector<SkippedModule> skipped;
  std::vector<std::pair<std::string, std::string>> patched;  // path, pattern
  double seconds = 0;

  int total() const;
  // "{'swiglu_mlp': 1, 'moe_mlp': 46}" — the seed's dict formatting.
  std::string counts_str() const;
  std::string json() const;
};

// The known pattern names, in application order.
std::vector<std::string> known_patterns();
// Throws zmlx::Error listing the known names when one is unknown.
void check_pattern_names(const std::vector<std::string>& names);
// Splits "a,b , c" -> {"a","b","c"}; "" / "none" / "off" -> {}.
std::vector<std::string> parse_pattern_list(const std::string& s);

// The per-family default table (one place): which patterns a family gets and
// why the others are excluded.
struct FamilyPolicy {
  std::vector<std::string> defaults;
  std::map<std::string, std::string> exclusions;  // pattern -> reason
};
FamilyPolicy family_policy(const std::string& family);

// Applies the patches (logs the seed's lines on stderr) and returns the report.
PatchReport patch(Model& model, const PatchOptions& options);
// Restores every patched module to its unfused original.
int unpatch(Model& model);

}  // namespace zmlx::patch
