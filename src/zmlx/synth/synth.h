// `zmlx synth`: writes a random-weight model in exactly the mlx-community
// layout (config.json with the quantization block, generation_config.json,
// sharded safetensors + index, tokenizer files). Deterministic: the same
// options give byte-identical files.
//
// The weights are random but shaped so the model behaves: the residual
// stream is dominated by the current token's embedding, and lm_head row v is
// a scaled copy of embedding row π(v) (π a fixed permutation) plus noise, so
// logits are peaked and greedy decoding is stable, while every layer still
// contributes to the logits (a wrong kernel changes them).
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace zmlx::synth {

struct SynthOptions {
  std::string arch = "qwen3_moe";
  std::string preset = "tiny";  // "tiny" or "full" (the real shapes)
  std::string out;
  uint64_t seed = 0;
  int bits = 4;                 // 0: unquantized bf16
  int group_size = 64;
  int router_bits = 0;          // 0: same as bits; else a per-module override
  std::vector<std::pair<std::string, std::string>> sets;  // config overrides KEY=VALUE (JSON values)
  std::string tokenizer_dir;    // copy tokenizer files from here instead of writing synthetic ones
  bool progress = false;
};

// Returns the model directory written.
std::string synth_model(const SynthOptions& o);
std::vector<std::string> synth_archs();

}  // namespace zmlx::synth
