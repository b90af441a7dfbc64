#include "zmlx/patch/fused_modules.h"

#include <tuple>

namespace zmlx::patch {

FusedMoe::FusedMoe(std::unique_ptr<MoeBlock> inner) : inner_(std::move(inner)) { path = inner_->path; }

Tensor FusedMoe::forward(Backend& be, const Tensor& x) {
  const MoeBlock& m = *inner_;
  if (!m.shared_expert) {
    // The router's linear and its top-k: one launch where the backend can.
    const Routing r = m.router_kind == RouterKind::SigmoidGroupedTopK ? m.route(be, x)
                                                                      : be.linear_route(x, m.router, m.topk_router());
    Tensor h = be.gather_qmm_swiglu(x, m.gate_proj, m.up_proj, r);
    return be.gather_qmm_combine(h, m.down_proj, r, m.combine);
  }
  // The shared expert rides with the routed path: its gate+up with the
  // router (same input), its down projection and the add with the combine.
  // The unpatched block computes it after the routed experts; the values do
  // not depend on the order, and each op keeps its unfused bits.
  // GLM's grouped router may also pick the experts in that launch.
  const SwigluMlp& s = *m.shared_expert;
  Routing r;
  Tensor shared_h;
  if (m.router_kind == RouterKind::SigmoidGroupedTopK) {
    std::tie(r, shared_h) = be.linear_route_grouped_and_swiglu(x, m.router, m.grouped_router(), s.gate_proj, s.up_proj);
  } else {
    auto [logits, h_shared] = be.linear_and_swiglu(x, m.router, s.gate_proj, s.up_proj);
    r = m.route_logits(be, logits);
    shared_h = std::move(h_shared);
  }
  Tensor h = be.gather_qmm_swiglu(x, m.gate_proj, m.up_proj, r);
  return be.gather_qmm_combine_shared(h, m.down_proj, r, m.combine, shared_h, s.down_proj);
}

FusedSwiglu::FusedSwiglu(std::unique_ptr<SwigluMlp> inner) : inner_(std::move(inner)) { path = inner_->path; }

Tensor FusedSwiglu::forward(Backend& be, const Tensor& x) {
  const SwigluMlp& m = *inner_;
  return be.linear(be.linear_swiglu(x, m.gate_proj, m.up_proj), m.down_proj);
}

}  // namespace zmlx::patch
