// Each subcommand lives in its own cli/cmd_<name>.cpp and registers itself
// with ZMLX_COMMAND. main.cpp builds the CLI11 app from the registry, so
// adding a command never touches another file.
#pragma once
#include <CLI/CLI.hpp>

#include <functional>
#include <string>
#include <vector>

namespace zmlx::cli {

// setup() adds options to `sub` and returns the function run when the
// subcommand is chosen; the function returns the process exit code.
using CommandSetup = std::function<std::function<int()>(CLI::App& sub)>;

struct CommandInfo {
  std::string name, help;
  CommandSetup setup;
};

std::vector<CommandInfo>& command_registry();

struct CommandRegistrar {
  CommandRegistrar(std::string name, std::string help, CommandSetup setup) {
    command_registry().push_back({std::move(name), std::move(help), std::move(setup)});
  }
};

}  // namespace zmlx::cli

#define ZMLX_CONCAT2(a, b) a##b
#define ZMLX_CONCAT(a, b) ZMLX_CONCAT2(a, b)
#define ZMLX_COMMAND(name, help, ...) \
  static ::zmlx::cli::CommandRegistrar ZMLX_CONCAT(zmlx_cmd_, __LINE__)(name, help, __VA_ARGS__)
