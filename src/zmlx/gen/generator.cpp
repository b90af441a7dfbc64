#include "zmlx/gen/generator.h"

#include <algorithm>
#include <chrono>
#include <cstring>

#include "zmlx/core/error.h"
#include "zmlx/dist/comm.h"
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

namespace {

// A request as one int32 message: prompt, limits, EOS ids, sampler options.
std::vector<int32_t> encode_request(const std::vector<int32_t>& prompt, const GenerateOptions& o) {
  std::vector<int32_t> m;
  auto f = [&](float v) {
    int32_t b;
    std::memcpy(&b, &v, 4);
    m.push_back(b);
  };
  m.push_back(int32_t(prompt.size()));
  m.insert(m.end(), prompt.begin(), prompt.end());
  m.push_back(o.max_tokens);
  m.push_back(o.prefill_chunk);
  m.push_back(int32_t(o.eos_ids.size()));
  m.insert(m.end(), o.eos_ids.begin(), o.eos_ids.end());
  const SamplerOptions& s = o.sampling;
  f(s.temperature);
  m.push_back(s.top_k);
  f(s.top_p);
  f(s.min_p);
  f(s.repetition_penalty);
  m.push_back(s.repetition_context);
  f(s.frequency_penalty);
  f(s.presence_penalty);
  m.push_back(int32_t(uint32_t(s.seed)));
  m.push_back(int32_t(uint32_t(s.seed >> 32)));
  return m;
}

void decode_request(const std::vector<int32_t>& m, std::vector<int32_t>& prompt, GenerateOptions& o) {
  size_t i = 0;
  auto next = [&]() {
    ZMLX_CHECK(i < m.size(), "distributed request: truncated message ({} words)", m.size());
    return m[i++];
  };
  auto f = [&]() {
    int32_t b = next();
    float v;
    std::memcpy(&v, &b, 4);
    return v;
  };
  prompt.resize(size_t(next()));
  for (auto& t : prompt) t = next();
  o.max_tokens = next();
  o.prefill_chunk = next();
  o.eos_ids.resize(size_t(next()));
  for (auto& t : o.eos_ids) t = next();
  SamplerOptions& s = o.sampling;
  s.temperature = f();
  s.top_k = next();
  s.top_p = f();
  s.min_p = f();
  s.repetition_penalty = f();
  s.repetition_context = next();
  s.frequency_penalty = f();
  s.presence_penalty = f();
  const uint32_t lo = uint32_t(next()), hi = uint32_t(next());
  s.seed = uint64_t(lo) | (uint64_t(hi) << 32);
}

GenerateResult run_generation(Model& model, Backend& be, const text::Tokenizer* tok,
                              const std::vector<int32_t>& prompt_ids, const GenerateOptions& opt,
                              const TextCallback& on_text);

}  // namespace

int prefill_pass(const Model& model, Backend& be, int requested) {
  const int limit = std::max(1, be.max_prefill_pass(model.config().get_int("num_experts_per_tok", 0)));
  return std::clamp(requested > 0 ? requested : be.prefill_chunk(), 1, limit);
}

GenerateResult generate(Model& model, Backend& be, const text::Tokenizer* tok,
                        const std::vector<int32_t>& prompt_ids, const GenerateOptions& opt,
                        const TextCallback& on_text) {
  const dist::Placement& P = model.placement();
  if (!P.active()) return run_generation(model, be, tok, prompt_ids, opt, on_text);
  ZMLX_CHECK(!prompt_ids.empty(), "the prompt is empty (no tokens to condition on)");
  // Rank 0's request is the one every rank runs, its pass length included
  // (chosen by rank 0's backend when left open, so that every rank runs the
  // same passes).
  std::vector<int32_t> msg;
  if (P.rank == 0) {
    GenerateOptions resolved = opt;
    resolved.prefill_chunk = prefill_pass(model, be, resolved.prefill_chunk);
    msg = encode_request(prompt_ids, resolved);
  }
  P.comm->broadcast_i32(msg, 0);
  std::vector<int32_t> prompt;
  GenerateOptions o = opt;
  decode_request(msg, prompt, o);
  if (P.rank != 0) return run_generation(model, be, nullptr, prompt, o, nullptr);
  return run_generation(model, be, tok, prompt, o, on_text);
}

bool follow_request(Model& model, Backend& be) {
  const dist::Placement& P = model.placement();
  ZMLX_CHECK(P.active() && P.rank != 0, "follow_request: only ranks other than 0 of a parallel run follow");
  std::vector<int32_t> msg;
  P.comm->broadcast_i32(msg, 0, /*wait_forever=*/true);  // idle until the next request
  if (msg.empty()) return false;
  std::vector<int32_t> prompt;
  GenerateOptions o;
  decode_request(msg, prompt, o);
  run_generation(model, be, nullptr, prompt, o, nullptr);
  return true;
}

void end_followers(Model& model) {
  const dist::Placement& P = model.placement();
  if (!P.active() || P.rank != 0) return;
  std::vector<int32_t> empty;
  P.comm->broadcast_i32(empty, 0);
}

namespace {

// One decode step of any run. Single process: decode_forward (a backend may
// replay a recording of the step). A parallel run whose transport takes
// device buffers (NCCL between GPU ranks) records its steps too, all-reduces
// and pipeline transfers included, and hands each launched step to the
// transport's deadline. With a host transport the step runs eagerly: its
// transfers pass through host code, which a replay would skip.
Tensor run_decode_step(Model& model, Backend& be, int32_t token, Cache& cache, int step) {
  const dist::Placement& P = model.placement();
  if (!P.active()) return decode_forward(model, be, token, cache);
  if (!P.comm->accepts(be.device())) return model.forward(be, {token}, cache);
  Tensor logits = decode_forward(model, be, token, cache);
  P.comm->watch_device_work(fmt::format("decode step {}", step));
  return logits;
}

GenerateResult run_generation(Model& model, Backend& be, const text::Tokenizer* tok,
                              const std::vector<int32_t>& prompt_ids, const GenerateOptions& opt,
                              const TextCallback& on_text) {
  const dist::Placement& P = model.placement();
  ZMLX_CHECK(!prompt_ids.empty(), "the prompt is empty (no tokens to condition on)");
  ZMLX_CHECK(opt.max_tokens >= 0, "max_tokens must be >= 0, got {}", opt.max_tokens);
  for (auto& s : opt.stop_strings) ZMLX_CHECK(!s.empty(), "stop strings must not be empty");
  GenerateResult res;
  res.prompt_ids = prompt_ids;
  res.finish_reason = "length";
  if (opt.max_tokens == 0) return res;

  Sampler sampler(opt.sampling);
  const sampling::Params params = sampling_params(opt.sampling);
  Cache cache = model.new_cache(be);
  std::vector<int32_t> history = prompt_ids;

  // Prefill.
  auto t0 = Clock::now();
  Tensor logits;
  const size_t chunk = size_t(prefill_pass(model, be, opt.prefill_chunk));
  for (size_t i = 0; i < prompt_ids.size(); i += chunk) {
    std::vector<int32_t> part(prompt_ids.begin() + i, prompt_ids.begin() + std::min(prompt_ids.size(), i + chunk));
    logits = model.forward(be, part, cache);
  }
  // The logits rank samples; in a parallel run it broadcasts the token.
  auto sample = [&](const Tensor& l) {
    int32_t t = 0;
    if (!P.active() || P.rank == P.logits_rank()) {
      if (opt.on_logits) {  // the caller sees every row: sample on the host
        std::vector<float> host = logits_to_host(be, l, 0);
        opt.on_logits(host);
        t = sampler.sample(host, history, res.token_ids);
      } else if (sampler.greedy()) {
        t = be.argmax_row(l, 0);  // the backend reduces, one id crosses to the host
      } else {
        t = be.sample_row(l, 0, params, repetition_window(sampler.options(), history), res.token_ids,
                          sampler.next_draw());
      }
    }
    if (P.active()) P.comm->broadcast(&t, sizeof t, P.logits_rank());
    return t;
  };
  int32_t next = sample(logits);
  res.prefill_seconds = std::chrono::duration<double>(Clock::now() - t0).count();

  std::optional<text::StreamDecoder> dec;
  if (tok) dec.emplace(*tok);
  std::string pending;  // decoded but not yet released (may start a stop string)
  auto t1 = Clock::now();
  bool cancelled = false, stop_string_hit = false;
  // Decoding chains its steps on the device: step S_j consumes token t_j and
  // chooses t_{j+1} on the device, and S_{j+1} is enqueued before the host
  // reads t_{j+1}, so the device always has the next step queued while the
  // host detokenizes and checks stop strings. Steps enqueued past a stop are
  // waited for and dropped. Greedy steps chain everywhere (the default
  // backend runs them one by one). Tensor-parallel GPU ranks chain greedy
  // steps too: the all-reduces leave every rank with the same bits, so each
  // rank's argmax picks the same token, and rank 0's token (broadcast as the
  // host reads it) checks that they did. Sampled steps chain in one process
  // on a backend that samples on the device, from the stream's next draw.
  const bool greedy = !opt.on_logits && sampler.greedy();
  const bool sampled_chain = !opt.on_logits && !sampler.greedy() && !P.active() && be.samples_chained(params);
  const bool chained =
      (greedy && (!P.active() || (P.tensor() && P.comm->accepts(be.device())))) || sampled_chain;
  struct ChainSampler {  // set for this generation only, also when it throws
    Backend& be;
    bool on;
    ~ChainSampler() {
      if (!on) return;
      try {
        be.set_chain_sampler(nullptr, {}, {}, 0);
      } catch (...) {
      }
    }
  } chain_sampler{be, sampled_chain};
  if (sampled_chain) {  // S_0 consumes `next`: the penalties see it, after the prompt
    std::vector<int32_t> seen = history;
    seen.push_back(next);
    const int32_t output[1] = {next};
    be.set_chain_sampler(&params, repetition_window(sampler.options(), seen), output, sampler.draws());
  }
  const int64_t chain_pos0 = cache.pos;  // S_j runs at chain_pos0 + j
  int enqueued = 0;                      // S_0 .. S_{enqueued-1} are on the device
  for (int step = 0;; ++step) {
    const bool eos = std::find(opt.eos_ids.begin(), opt.eos_ids.end(), next) != opt.eos_ids.end();
    const int j = int(res.token_ids.size());
    // S_i is needed only if t_{i+1} may be emitted: i + 1 < max_tokens.
    // Nothing past an EOS is needed.
    for (const int want = std::min(j + 2, opt.max_tokens - 1); chained && !eos && enqueued < want; ++enqueued) {
      decode_forward_chained(model, be, enqueued == 0 ? next : -1, cache);
      if (P.active()) P.comm->watch_device_work(fmt::format("decode step {}", enqueued));
    }
    if (eos) {
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
      }
    }
    if (P.active()) {  // rank 0 decides stop strings and cancels for everyone
      uint8_t flag = stop_string_hit ? 1 : cancelled ? 2 : 0;
      P.comm->broadcast(&flag, 1, 0);
      if (P.rank != 0 && flag == 1) {
        res.finish_reason = "stop";
        break;
      }
      if (P.rank != 0 && flag == 2) cancelled = true;
    }
    if (stop_string_hit) break;
    if (cancelled) {
      res.finish_reason = "cancelled";
      break;
    }
    if (int(res.token_ids.size()) >= opt.max_tokens) break;
    if (P.active()) dist::maybe_inject_fault(P.rank, step);
    if (chained) {
      next = be.chained_token(chain_pos0 + j);
      // The device fed it on without a host check (NaN logits give no valid id).
      ZMLX_CHECK(next >= 0 && next < model.config().vocab_size, "decode step {}: the chosen token {} is outside the "
                 "vocabulary [0, {}) (non-finite logits?)", j, next, model.config().vocab_size);
      if (P.active()) {
        int32_t lead = next;
        P.comm->broadcast(&lead, sizeof lead, 0);
        ZMLX_CHECK(lead == next, "decode step {}: tensor-parallel ranks disagree on the greedy token (rank 0 chose {}, "
                   "rank {} chose {}): their logits differ", j, lead, P.rank, next);
      }
      continue;
    }
    logits = run_decode_step(model, be, next, cache, step);
    next = sample(logits);
  }
  // Let dropped steps finish inside the timing.
  if (chained && enqueued > int(res.token_ids.size())) be.chained_token(chain_pos0 + enqueued - 1);
  if (dec && !stop_string_hit && !cancelled) {
    std::string tail = pending + dec->flush();
    res.text += tail;
    if (on_text && !tail.empty()) on_text(tail);
  }
  res.decode_seconds = std::chrono::duration<double>(Clock::now() - t1).count();
  return res;
}

}  // namespace

}  // namespace zmlx
