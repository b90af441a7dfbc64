// The literal text a family puts in front of every prompt, chat or not.
// GLM-4.x (glm4_moe_lite) prompts always start with "[gMASK]<sop>" (spec
// §2.4): the chat template writes it itself, and a raw completion prompt gets
// it here, as the GLM tokenizer's own post-processing does in transformers /
// mlx-lm. Other families add nothing (their BOS, if any, comes from the
// template).
#pragma once
#include <string>

namespace zmlx::text {

// "[gMASK]<sop>" for glm4_moe_lite (and the GLM-4 MoE family), else "".
std::string raw_prompt_prefix(const std::string& model_type);
// `prompt` with the family's prefix in front, unless it already starts with it.
std::string with_raw_prompt_prefix(const std::string& model_type, const std::string& prompt);

}  // namespace zmlx::text
