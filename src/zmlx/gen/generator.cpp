#include "zmlx/gen/generator.h"

#include <algorithm>
#include <chrono>

#include "zmlx/core/error.h"
#include "zmlx/gen/decode_step.h"

namespace zmlx {

using Clock = std::chrono::steady_clock;

std::vector<float> logits_to_host(Backend& be, const Tensor& logits, int64_t row) {
  Tensor h = be.to_host(logits);
  const int64_t V = h.cols();
  std::vector<float> out(static_cast<size_t>(V));
  const uint16_t* p = h.ptr<uint16_t>() + row * V;
  for (int64_t i = 0; i < V; ++i) out[size_t(i)] = bf16_to_f32(p[i]);
  return out;
}

// Length of the longest suffix of `text` that is a proper prefix of a stop string.
static size_t held_back(const std::string& text, const std::vector<std::string>& stops) {
  size_t best = 0;
  for (auto& s : stops)
    for (size_t n = std::min(text.size(), s.size() - 1); n > best; --n)
      if (text.compare(text.size() - n, n, s, 0, n) == 0) {
        best = n;
        break;
      }
  return best;
}

GenerateResult generate(Model& model, Backend& be, const text::Tokenizer* tok,
                        const std::vector<int32_t>& prompt_ids, const GenerateOptions& opt,
                        const TextCallback& on_text) {
  ZMLX_CHECK(!prompt_ids.empty(), "the prompt is empty (no tokens to condition on)");
  ZMLX_CHECK(opt.max_tokens >= 0, "max_tokens must be >= 0, got {}", opt.max_tokens);
  for (auto& s : opt.stop_strings) ZMLX_CHECK(!s.empty(), "stop strings must not be empty");
  GenerateResult res;
  res.prompt_ids = prompt_ids;
  res.finish_reason = "length";
  if (opt.max_tokens == 0) return res;

  Sampler sampler(opt.sampling);
  Cache cache = model.new_cache(be);
  std::vector<int32_t> history = prompt_ids;

  // Prefill.
  auto t0 = Clock::now();
  Tensor logits;
  const size_t chunk = size_t(std::max(1, opt.prefill_chunk));
  for (size_t i = 0; i < prompt_ids.size(); i += chunk) {
    std::vector<int32_t> part(prompt_ids.begin() + i, prompt_ids.begin() + std::min(prompt_ids.size(), i + chunk));
    logits = model.forward(be, part, cache);
  }
  auto sample = [&](const Tensor& l) {
    std::vector<float> host = logits_to_host(be, l, 0);
    if (opt.on_logits) opt.on_logits(host);
    return sampler.sample(std::move(host), history);
  };
  int32_t next = sample(logits);
  res.prefill_seconds = std::chrono::duration<double>(Clock::now() - t0).count();

  std::optional<text::StreamDecoder> dec;
  if (tok) dec.emplace(*tok);
  std::string pending;  // decoded but not yet released (may start a stop string)
  auto t1 = Clock::now();
  bool cancelled = false, stop_string_hit = false;
  for (int step = 0;; ++step) {
    if (std::find(opt.eos_ids.begin(), opt.eos_ids.end(), next) != opt.eos_ids.end()) {
      res.finish_reason = "stop";
      break;
    }
    res.token_ids.push_back(next);
    history.push_back(next);
    if (dec) {
      pending += dec->push(next);
      bool stopped = false;
      for (auto& s : opt.stop_strings) {
        size_t at = pending.find(s);
        if (at != std::string::npos) {
          pending.resize(at);
          stopped = true;
        }
      }
      size_t keep = stopped ? 0 : held_back(pending, opt.stop_strings);
      std::string out = pending.substr(0, pending.size() - keep);
      pending.erase(0, out.size());
      res.text += out;
      if (on_text && !out.empty() && !on_text(out)) cancelled = true;
      if (stopped) {
        stop_string_hit = true;
        res.finish_reason = "stop";
        break;
      }
    }
    if (cancelled) {
      res.finish_reason = "cancelled";
      break;
    }
    if (int(res.token_ids.size()) >= opt.max_tokens) break;
    logits = decode_forward(model, be, next, cache);
    next = sample(logits);
  }
  if (dec && !stop_string_hit && !cancelled) {
    std::string tail = pending + dec->flush();
    res.text += tail;
    if (on_text && !tail.empty()) on_text(tail);
  }
  res.decode_seconds = std::chrono::duration<double>(Clock::now() - t1).count();
  return res;
}

}  // namespace zmlx
