#include "zmlx/patch/fused_modules.h"

namespace zmlx::patch {

FusedMoe::FusedMoe(std::unique_ptr<MoeBlock> inner) : inner_(std::move(inner)) { path = inner_->path; }

Tensor FusedMoe::forward(Backend& be, const Tensor& x) {
  const MoeBlock& m = *inner_;
  if (!m.shared_expert) {
    const Routing r = m.route(be, x);
    Tensor h = be.gather_qmm_swiglu(x, m.gate_proj, m.up_proj, r);
    return be.gather_qmm_combine(h, m.down_proj, r, m.combine);
  }
  // The shared expert rides with the routed path: its gate+up with the
  // router (same input), its down projection and the add with the combine.
  // The unpatched block computes it after the routed experts; the values do
  // not depend on the order, and each op keeps its unfused bits.
  const SwigluMlp& s = *m.shared_expert;
  auto [logits, shared_h] = be.linear_and_swiglu(x, m.router, s.gate_proj, s.up_proj);
  const Routing r = m.route_logits(be, logits);
  Tensor h = be.gather_qmm_swiglu(x, m.gate_proj, m.up_proj, r);
  return be.gather_qmm_combine_shared(h, m.down_proj, r, m.combine, shared_h, s.down_proj);
}

FusedSwiglu::FusedSwiglu(std::unique_ptr<SwigluMlp> inner) : inner_(std::move(inner)) { path = inner_->path; }

Tensor FusedSwiglu::forward(Backend& be, const Tensor& x) {
  const SwigluMlp& m = *inner_;
  return be.linear(be.linear_swiglu(x, m.gate_proj, m.up_proj), m.down_proj);
}

}  // namespace zmlx::patch
