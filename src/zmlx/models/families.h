// The model families zmlx knows, one builder per file; registry.cpp maps
// config.json's model_type to these.
#pragma once
#include <memory>

#include "zmlx/models/model.h"

namespace zmlx {

std::unique_ptr<Model> build_qwen3(ModelConfig cfg, std::shared_ptr<io::WeightStore> store, Backend& be);
std::unique_ptr<Model> build_lfm2_moe(ModelConfig cfg, std::shared_ptr<io::WeightStore> store, Backend& be);
std::unique_ptr<Model> build_glm4_moe_lite(ModelConfig cfg, std::shared_ptr<io::WeightStore> store, Backend& be);
// glm4_moe_lite only: force the absorbed or expanded MLA form in every layer
// (tests compare the two; Auto is MLX's choice by sequence length).
void set_mla_form(Model& m, MlaAttention::Form f);
std::unique_ptr<Model> build_qwen3_moe(ModelConfig cfg, std::shared_ptr<io::WeightStore> store, Backend& be);

}  // namespace zmlx
