// zmlx template MODEL --messages FILE.json [--no-generation-prompt]
//                     [--set key=value ...] [--tools FILE.json]
// Prints exactly the prompt the model's chat template renders (no newline added).
#include <fstream>
#include <iostream>
#include <sstream>

#include "zmlx/cli/command.h"
#include "zmlx/core/error.h"
#include "zmlx/io/model_path.h"
#include "zmlx/text/chat_template.h"
#include "zmlx/text/tokenizer.h"

namespace {

using ojson = nlohmann::ordered_json;

struct TemplateOptions {
  std::string model, messages, tools;
  bool no_generation_prompt = false;
  std::vector<std::string> sets;
};

ojson read_json_file(const std::string& path, const char* what) {
  std::ifstream f(path, std::ios::binary);
  ZMLX_CHECK(f.good(), "cannot open {} file {}", what, path);
  std::stringstream ss;
  ss << f.rdbuf();
  try {
    return ojson::parse(ss.str());
  } catch (const ojson::exception& e) {
    zmlx::fail("{} file {}: invalid JSON: {}", what, path, e.what());
  }
}

int run_template(const TemplateOptions& o) {
  auto tok = zmlx::text::Tokenizer::from_dir(zmlx::io::resolve_tokenizer_path(o.model));
  ojson messages = read_json_file(o.messages, "--messages");
  ZMLX_CHECK(messages.is_array(), "--messages file {}: expected a JSON array of messages", o.messages);
  ojson extra = ojson::object();
  if (!o.tools.empty()) {
    extra["tools"] = read_json_file(o.tools, "--tools");
    ZMLX_CHECK(extra["tools"].is_array(), "--tools file {}: expected a JSON array", o.tools);
  }
  for (const auto& kv : o.sets) {
    size_t eq = kv.find('=');
    ZMLX_CHECK(eq != std::string::npos && eq > 0, "--set {:?}: expected key=value", kv);
    std::string key = kv.substr(0, eq), value = kv.substr(eq + 1);
    // JSON when it parses (false, 1, "x", [..]), else the raw string.
    ojson v = ojson::parse(value, nullptr, /*allow_exceptions=*/false);
    extra[key] = v.is_discarded() ? ojson(value) : v;
  }
  std::string prompt = zmlx::text::apply_chat_template(tok, messages, !o.no_generation_prompt, extra);
  std::cout.write(prompt.data(), static_cast<std::streamsize>(prompt.size()));
  std::cout.flush();
  return 0;
}

}  // namespace

ZMLX_COMMAND("template", "Render a conversation with the model's chat template", [](CLI::App& sub) {
  auto o = std::make_shared<TemplateOptions>();
  sub.add_option("model", o->model, "model directory or Hugging Face repo id")->required();
  sub.add_option("--messages", o->messages, "JSON file: an array of {role, content, ...}")->required();
  sub.add_flag("--no-generation-prompt", o->no_generation_prompt, "do not append the assistant prompt");
  sub.add_option("--set", o->sets, "template variable key=value (value parsed as JSON when valid)");
  sub.add_option("--tools", o->tools, "JSON file: an array of tool definitions");
  return std::function<int()>([o] { return run_template(*o); });
});
