// zmlx generate MODEL --prompt TEXT ...: stream a completion.
#include <nlohmann/json.hpp>

#include <cstdio>
#include <iostream>

#include "zmlx/cli/command.h"
#include "zmlx/cli/common.h"
#include "zmlx/core/error.h"
#include "zmlx/dist/comm.h"
#include "zmlx/gen/generator.h"
#include "zmlx/text/chat_template.h"
#include "zmlx/text/prompt_prefix.h"

namespace zmlx::cli {
namespace {

struct GenerateArgs {
  ModelArgs model;
  std::string prompt, system, ids;
  int max_tokens = 128;
  int prefill_chunk = 0;  // 0: the backend's choice
  bool chat = false, json = false, no_thinking = false;
  float temp = 0.f, top_p = 1.f, min_p = 0.f, repeat_penalty = 1.f, frequency_penalty = 0.f, presence_penalty = 0.f;
  int top_k = 0;
  uint64_t seed = 0;
  std::vector<std::string> stop;
  std::string dump_logits;
};

int run(const GenerateArgs& a) {
  LoadedModel m = load(a.model, a.ids.empty());
  std::vector<int32_t> prompt;
  if (!a.ids.empty()) {
    prompt = parse_id_list(a.ids);
  } else if (a.chat) {
    nlohmann::json msgs = nlohmann::json::array();
    if (!a.system.empty()) msgs.push_back({{"role", "system"}, {"content", a.system}});
    msgs.push_back({{"role", "user"}, {"content", a.prompt}});
    nlohmann::json extra = nlohmann::json::object();
    if (a.no_thinking) extra["enable_thinking"] = false;
    prompt = m.tokenizer->encode(text::apply_chat_template(*m.tokenizer, msgs, true, extra));
  } else {
    prompt = m.tokenizer->encode(text::with_raw_prompt_prefix(m.model->config().model_type, a.prompt));
  }
  GenerateOptions opt;
  opt.max_tokens = a.max_tokens;
  opt.prefill_chunk = a.prefill_chunk;
  opt.sampling.temperature = a.temp;
  opt.sampling.top_k = a.top_k;
  opt.sampling.top_p = a.top_p;
  opt.sampling.min_p = a.min_p;
  opt.sampling.repetition_penalty = a.repeat_penalty;
  opt.sampling.frequency_penalty = a.frequency_penalty;
  opt.sampling.presence_penalty = a.presence_penalty;
  opt.sampling.seed = a.seed;
  opt.stop_strings = a.stop;
  for (int32_t id : m.model->config().eos_token_ids) opt.eos_ids.push_back(id);

  // --dump-logits: the fp32 logits of every sampled step, raw little-endian
  // [steps, V] (written by the rank that holds the logits).
  std::vector<float> dumped;
  if (!a.dump_logits.empty())
    opt.on_logits = [&](const std::vector<float>& l) { dumped.insert(dumped.end(), l.begin(), l.end()); };
  const bool stream = !a.json && m.leader();
  GenerateResult r = generate(*m.model, *m.backend, m.tokenizer ? &*m.tokenizer : nullptr, prompt, opt,
                              [&](const std::string& piece) {
                                if (stream) {
                                  std::fwrite(piece.data(), 1, piece.size(), stdout);
                                  std::fflush(stdout);
                                }
                                return true;
                              });
  const dist::Placement& P = m.model->placement();
  if (!a.dump_logits.empty() && (!P.active() || P.rank == P.logits_rank())) {
    FILE* f = std::fopen(a.dump_logits.c_str(), "wb");
    ZMLX_CHECK(f && std::fwrite(dumped.data(), 4, dumped.size(), f) == dumped.size(), "cannot write {}",
               a.dump_logits);
    std::fclose(f);
  }
  if (!m.leader()) return 0;
  if (stream) std::printf("\n");
  std::fprintf(stderr, "[zmlx] prompt %zu tokens, %.2f tok/s | generated %zu tokens, %.2f tok/s | %s\n",
               r.prompt_ids.size(), r.prefill_tps(), r.token_ids.size(), r.decode_tps(), m.backend->name().c_str());
  if (a.json) {
    nlohmann::json j = {{"model", m.dir},
                        {"family", m.model->family()},
                        {"backend", m.backend->name()},
                        {"prompt_ids", r.prompt_ids},
                        {"token_ids", r.token_ids},
                        {"text", r.text},
                        {"finish_reason", r.finish_reason},
                        {"prompt_tokens", r.prompt_ids.size()},
                        {"generated_tokens", r.token_ids.size()},
                        {"prefill_tps", r.prefill_tps()},
                        {"decode_tps", r.decode_tps()},
                        {"load_seconds", m.load_seconds}};
    std::printf("%s\n", j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  }
  return 0;
}

ZMLX_COMMAND("generate", "Generate text from a prompt", [](CLI::App& app) {
  auto a = std::make_shared<GenerateArgs>();
  add_model_args(app, a->model);
  app.add_option("--prompt,-p", a->prompt, "prompt text");
  app.add_option("--ids", a->ids, "prompt as comma-separated token ids (instead of --prompt)");
  app.add_option("--max-tokens,-n", a->max_tokens, "maximum tokens to generate")->check(CLI::Range(0, 1 << 20));
  app.add_option("--prefill-chunk", a->prefill_chunk, "prompt tokens per forward pass (0: the backend's choice: up to 8192 on a GPU, 512 on the CPU; on a GPU at most 65535 / experts a token)")->check(CLI::Range(0, 65535));
  app.add_flag("--chat", a->chat, "wrap the prompt in the model's chat template");
  app.add_option("--system", a->system, "system prompt (with --chat)");
  app.add_flag("--no-thinking", a->no_thinking, "set enable_thinking=false in the chat template");
  app.add_option("--temp", a->temp, "sampling temperature (0 = greedy)");
  app.add_option("--top-k", a->top_k, "top-k filtering (0 = off)");
  app.add_option("--top-p", a->top_p, "nucleus filtering (1 = off)");
  app.add_option("--min-p", a->min_p, "min-p filtering (0 = off)");
  app.add_option("--repeat-penalty", a->repeat_penalty, "repetition penalty (1 = off)");
  app.add_option("--frequency-penalty", a->frequency_penalty, "OpenAI frequency penalty over the output (0 = off)");
  app.add_option("--presence-penalty", a->presence_penalty, "OpenAI presence penalty over the output (0 = off)");
  app.add_option("--seed", a->seed, "random seed");
  app.add_option("--stop", a->stop, "stop string (repeatable)");
  app.add_flag("--json", a->json, "print one JSON object with token ids, text and speeds");
  app.add_option("--dump-logits", a->dump_logits, "write every sampled step's logits as raw float32 [steps, V]")
      ->group("");  // debugging / tests
  return [a] {
    ZMLX_CHECK(!a->prompt.empty() || !a->ids.empty(), "generate: give --prompt TEXT or --ids 1,2,3");
    return run(*a);
  };
});

}  // namespace
}  // namespace zmlx::cli
