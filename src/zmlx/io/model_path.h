// Resolves a model argument: a directory, or a Hugging Face repo id such as
// "mlx-community/Qwen3-30B-A3B-4bit" looked up offline in the HF cache layout
// ($HF_HOME/hub or ~/.cache/huggingface/hub, models--ORG--NAME/snapshots/REV/,
// preferring the revision named in refs/main). Never touches the network.
#pragma once
#include <string>
#include <vector>

namespace zmlx::io {

// Returns the directory holding config.json. Throws zmlx::Error listing every
// place it looked when nothing is found.
std::string resolve_model_path(const std::string& arg);

// Like resolve_model_path, but a directory holding only tokenizer files
// (tokenizer.json, no config.json) is accepted as is: for the text commands.
std::string resolve_tokenizer_path(const std::string& arg);

// The hub directory searched for repo ids, with huggingface_hub's precedence:
// $HF_HUB_CACHE, $HF_HOME/hub, $XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub.
std::string hf_hub_dir();

// Every model directory in the HF cache (repo id, snapshot path), for listings.
struct CachedModel {
  std::string repo_id, path;
};
std::vector<CachedModel> list_cached_models();

}  // namespace zmlx::io
