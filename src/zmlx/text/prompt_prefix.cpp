#include "zmlx/text/prompt_prefix.h"

namespace zmlx::text {

std::string raw_prompt_prefix(const std::string& model_type) {
  if (model_type == "glm4_moe_lite" || model_type == "glm4_moe") return "[gMASK]<sop>";
  return "";
}

std::string with_raw_prompt_prefix(const std::string& model_type, const std::string& prompt) {
  const std::string p = raw_prompt_prefix(model_type);
  if (p.empty() || prompt.rfind(p, 0) == 0) return prompt;
  return p + prompt;
}

}  // namespace zmlx::text
