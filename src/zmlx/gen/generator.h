// The generation loop: prefill the prompt (in chunks), then decode one token
// per step until max_tokens, an EOS id or a stop string. Text is streamed
// through a UTF-8-safe decoder, holding back any tail that could still
// become a stop string.
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "zmlx/gen/sampler.h"
#include "zmlx/models/model.h"
#include "zmlx/text/tokenizer.h"

namespace zmlx {

struct GenerateOptions {
  int max_tokens = 128;
  SamplerOptions sampling;
  std::vector<std::string> stop_strings;
  std::vector<int32_t> eos_ids;   // generation stops when one is sampled (not emitted)
  // Prompt tokens per forward pass; 0: the backend's choice
  // (Backend::prefill_chunk(): 512 on the CPU, up to 8,192 on a GPU).
  int prefill_chunk = 0;
  // Called with the logits of every sampled position (validate compares them).
  std::function<void(const std::vector<float>&)> on_logits;
};

struct GenerateResult {
  std::vector<int32_t> prompt_ids, token_ids;
  std::string text;
  std::string finish_reason;  // "stop" (EOS or stop string), "length", "cancelled"
  double prefill_seconds = 0, decode_seconds = 0;
  double prefill_tps() const { return prefill_seconds > 0 ? prompt_ids.size() / prefill_seconds : 0; }
  // Decode rate counts the steps after the first token (which prefill produced).
  double decode_tps() const {
    return decode_seconds > 0 && token_ids.size() > 1 ? (token_ids.size() - 1) / decode_seconds : 0;
  }
};

// on_text receives each newly released piece of text; returning false
// cancels generation.
using TextCallback = std::function<bool(const std::string&)>;

GenerateResult generate(Model& model, Backend& be, const text::Tokenizer* tok,
                        const std::vector<int32_t>& prompt_ids, const GenerateOptions& opt,
                        const TextCallback& on_text = nullptr);

// The prompt tokens a prefill pass takes: `requested`, or the backend's
// choice when it is 0 or less (Backend::prefill_chunk), at most what one of
// the backend's calls takes for this model (Backend::max_prefill_pass: on a
// GPU 8,191 tokens at 8 experts a token).
int prefill_pass(const Model& model, Backend& be, int requested);

// Multi-process runs (model.placement().active()): generate() is collective.
// Rank 0's prompt and options are broadcast and every rank runs the same
// forward passes; the logits rank samples and broadcasts each token; rank 0
// (the only one with a tokenizer's stream decoder and on_text) broadcasts
// whether a stop string or a cancel ended the run. A follower that has no
// request of its own (the node's other ranks) calls follow_request() in a
// loop; it returns false once rank 0 called end_followers().
bool follow_request(Model& model, Backend& be);
void end_followers(Model& model);

// Logits as fp32 on the host.
std::vector<float> logits_to_host(Backend& be, const Tensor& logits, int64_t row);

}  // namespace zmlx
