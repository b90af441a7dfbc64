// zmlx tokenize MODEL (--text T | --file F | --jsonl F) [--json]
// Prints the token ids and pieces of a text with the model's tokenizer.
// --jsonl reads one JSON string per line and prints one JSON object per line
// ({"ids": [...], "decoded": "..."}) — the batch mode the conformance tests use.
// --write-synthetic FAMILY:VOCAB writes a synthetic tokenizer into the MODEL
// directory instead (a testing aid: tests/text checks it loads in HF tokenizers).
#include <fstream>
#include <iostream>
#include <sstream>

#include "zmlx/cli/command.h"
#include "zmlx/core/error.h"
#include "zmlx/io/model_path.h"
#include "zmlx/text/chat_template.h"
#include "zmlx/text/tokenizer.h"

namespace {

struct TokenizeOptions {
  std::string model, text, file, jsonl, synthetic;
  bool json = false;
};

std::string read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  ZMLX_CHECK(f.good(), "cannot open {}", path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

int run_tokenize(const TokenizeOptions& o, bool have_text) {
  using nlohmann::json;
  if (!o.synthetic.empty()) {
    size_t colon = o.synthetic.rfind(':');
    ZMLX_CHECK(colon != std::string::npos, "--write-synthetic {:?}: expected FAMILY:VOCAB_SIZE", o.synthetic);
    int64_t vocab = 0;
    try {
      vocab = std::stoll(o.synthetic.substr(colon + 1));
    } catch (const std::exception&) {
      zmlx::fail("--write-synthetic {:?}: VOCAB_SIZE is not a number", o.synthetic);
    }
    zmlx::text::write_synthetic_tokenizer(o.model, o.synthetic.substr(0, colon), vocab);
    return 0;
  }
  int sources = int(have_text) + int(!o.file.empty()) + int(!o.jsonl.empty());
  ZMLX_CHECK(sources == 1, "tokenize: give exactly one of --text, --file, --jsonl");
  auto tok = zmlx::text::Tokenizer::from_dir(zmlx::io::resolve_tokenizer_path(o.model));
  if (!o.jsonl.empty()) {
    std::ifstream in(o.jsonl, std::ios::binary);
    ZMLX_CHECK(in.good(), "cannot open {}", o.jsonl);
    std::string line;
    size_t lineno = 0;
    while (std::getline(in, line)) {
      ++lineno;
      if (line.empty()) continue;
      json s;
      try {
        s = json::parse(line);
      } catch (const json::exception& e) {
        zmlx::fail("{}:{}: not a JSON string: {}", o.jsonl, lineno, e.what());
      }
      ZMLX_CHECK(s.is_string(), "{}:{}: expected a JSON string", o.jsonl, lineno);
      auto ids = tok.encode(s.get<std::string>());
      json r = {{"ids", ids}, {"decoded", tok.decode(ids)}};
      std::cout << r.dump(-1, ' ', false, json::error_handler_t::replace) << '\n';
    }
    return 0;
  }
  std::string text = have_text ? o.text : read_all(o.file);
  auto ids = tok.encode(text);
  if (o.json) {
    json pieces = json::array();
    for (auto id : ids) pieces.push_back(tok.piece(id));
    json r = {{"ids", ids}, {"pieces", pieces}};
    std::cout << r.dump(-1, ' ', false, json::error_handler_t::replace) << '\n';
  } else {
    for (auto id : ids) std::cout << id << '\t' << tok.piece(id) << '\n';
    std::cout << ids.size() << " tokens\n";
  }
  return 0;
}

}  // namespace

ZMLX_COMMAND("tokenize", "Tokenize text with a model's tokenizer (ids and pieces)", [](CLI::App& sub) {
  auto o = std::make_shared<TokenizeOptions>();
  sub.add_option("model", o->model, "model directory or Hugging Face repo id")->required();
  auto* text = sub.add_option("--text", o->text, "the text to tokenize");
  sub.add_option("--file", o->file, "read the text from a file");
  sub.add_option("--jsonl", o->jsonl, "batch: one JSON string per line; prints {ids, decoded} per line");
  sub.add_option("--write-synthetic", o->synthetic,
                 "write a synthetic tokenizer FAMILY:VOCAB_SIZE into the MODEL directory and exit");
  sub.add_flag("--json", o->json, "print {\"ids\": [...], \"pieces\": [...]}");
  return std::function<int()>([o, text] { return run_tokenize(*o, text->count() > 0); });
});
