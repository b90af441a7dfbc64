// Shared pieces of the subcommands that load a model.
#pragma once
#include <CLI/CLI.hpp>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "zmlx/models/model.h"
#include "zmlx/text/tokenizer.h"

namespace zmlx::cli {

struct ModelArgs {
  std::string model;
  std::string backend = "auto";
  int threads = 0;
};

void add_model_args(CLI::App& app, ModelArgs& a);

struct LoadedModel {
  std::string dir;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Model> model;
  std::optional<text::Tokenizer> tokenizer;  // absent when the dir has no tokenizer.json
  double load_seconds = 0;
};

LoadedModel load(const ModelArgs& a, bool need_tokenizer);

std::vector<int32_t> parse_id_list(const std::string& s);  // "1,2,3"
uint64_t peak_rss_bytes();
std::string human_bytes(double b);

}  // namespace zmlx::cli
