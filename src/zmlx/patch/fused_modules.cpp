#include "zmlx/patch/fused_modules.h"

namespace zmlx::patch {

FusedMoe::FusedMoe(std::unique_ptr<MoeBlock> inner) : inner_(std::move(inner)) { path = inner_->path; }

Tensor FusedMoe::forward(Backend& be, const Tensor& x) {
  const MoeBlock& m = *inner_;
  const Routing r = m.route(be, x);
  Tensor h = be.gather_qmm_swiglu(x, m.gate_proj, m.up_proj, r);
  Tensor out = be.gather_qmm_combine(h, m.down_proj, r, m.combine);
  if (m.shared_expert) {
    const SwigluMlp& s = *m.shared_expert;
    be.add(out, be.linear(be.linear_swiglu(x, s.gate_proj, s.up_proj), s.down_proj));
  }
  return out;
}

FusedSwiglu::FusedSwiglu(std::unique_ptr<SwigluMlp> inner) : inner_(std::move(inner)) { path = inner_->path; }

Tensor FusedSwiglu::forward(Backend& be, const Tensor& x) {
  const SwigluMlp& m = *inner_;
  return be.linear(be.linear_swiglu(x, m.gate_proj, m.up_proj), m.down_proj);
}

}  // namespace zmlx::patch
