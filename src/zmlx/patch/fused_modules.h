// The fused replacements the patterns install. Each wraps the module it
// replaces (same weights, no copies) so unpatch() can restore it.
#pragma once
#include <memory>

#include "zmlx/models/blocks.h"

namespace zmlx::patch {

// Wraps an original module; the patch layer restores `inner` on unpatch.
class PatchedModule : public FeedForward {
 public:
  virtual std::unique_ptr<FeedForward> release_original() = 0;
  virtual std::string pattern() const = 0;
};

// moe_mlp: router -> gather_qmm_swiglu (gate+up+SwiGLU for every selected
// expert in one pass) -> gather_qmm_combine (down projection + weighted
// combine in one pass) + the shared expert through linear_swiglu.
class FusedMoe final : public PatchedModule {
 public:
  explicit FusedMoe(std::unique_ptr<MoeBlock> inner);
  Tensor forward(Backend& be, const Tensor& x) override;
  std::string kind() const override { return "fused:moe_mlp"; }
  std::string pattern() const override { return "moe_mlp"; }
  std::unique_ptr<FeedForward> release_original() override { return std::move(inner_); }

 private:
  std::unique_ptr<MoeBlock> inner_;
};

// swiglu_mlp: gate and up in one pass + SwiGLU, then the down projection.
class FusedSwiglu final : public PatchedModule {
 public:
  explicit FusedSwiglu(std::unique_ptr<SwigluMlp> inner);
  Tensor forward(Backend& be, const Tensor& x) override;
  std::string kind() const override { return "fused:swiglu_mlp"; }
  std::string pattern() const override { return "swiglu_mlp"; }
  std::unique_ptr<FeedForward> release_original() override { return std::move(inner_); }

 private:
  std::unique_ptr<SwigluMlp> inner_;
};

}  // namespace zmlx::patch
