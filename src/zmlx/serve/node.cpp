#include "zmlx/dist/comm.h"
#include "zmlx/serve/node.h"

#include <chrono>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "zmlx/core/error.h"
#include "zmlx/io/model_path.h"
#include "zmlx/serve/api.h"
#include "zmlx/serve/sse.h"
#include "zmlx/text/chat_template.h"
#include "zmlx/text/prompt_prefix.h"

namespace zmlx::serve {

namespace fs = std::filesystem;
using json = nlohmann::json;
using ojson = nlohmann::ordered_json;
using Clock = std::chrono::steady_clock;

namespace {

void send_json(HttpConnection& c, int status, const json& j) { c.send(status, "application/json", dump(j)); }

void send_error(HttpConnection& c, const ApiError& e) {
  if (c.responded()) return;
  send_json(c, e.status, e.body());
}

int64_t unix_now() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::string random_id(const std::string& prefix) {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  char buf[32];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(rng()));
  return prefix + buf;
}

uint64_t random_seed() {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  return rng();
}

std::string url_decode(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '%' && i + 2 < s.size() && std::isxdigit((unsigned char)s[i + 1]) && std::isxdigit((unsigned char)s[i + 2])) {
      out += char(std::stoi(s.substr(i + 1, 2), nullptr, 16));
      i += 2;
    } else {
      out += s[i];
    }
  }
  return out;
}

std::shared_ptr<Instance> require_model(InstanceManager& m, const std::string& model) {
  auto inst = m.find(model);
  if (inst) return inst;
  std::string loaded;
  for (auto& i : m.list()) loaded += (loaded.empty() ? "" : ", ") + i->model_id();
  throw ApiError(404,
                 "The model '" + model + "' does not exist or is not loaded (loaded: " +
                     (loaded.empty() ? "none" : loaded) + "). Load it with POST /instance {\"model\": \"...\"}.",
                 "model", "model_not_found");
}

GenerateOptions make_options(const SamplingParams& p, Instance& inst, size_t prompt_tokens) {
  GenerateOptions o;
  int64_t ctx = inst.context_length();
  if (ctx > 0 && int64_t(prompt_tokens) >= ctx)
    bad_request("the prompt has " + std::to_string(prompt_tokens) + " tokens; this model's context is " +
                    std::to_string(ctx) + " tokens",
                "messages", "context_length_exceeded");
  int64_t room = ctx > 0 ? ctx - int64_t(prompt_tokens) : kMaxTokensCeiling;
  if (p.max_tokens) {
    if (*p.max_tokens > room)
      bad_request("max_tokens is " + std::to_string(*p.max_tokens) + " but only " + std::to_string(room) +
                      " tokens fit in this model's context of " + std::to_string(ctx) + " after the " +
                      std::to_string(prompt_tokens) + "-token prompt",
                  "max_tokens", "context_length_exceeded");
    o.max_tokens = int(*p.max_tokens);
  } else {
    o.max_tokens = int(std::min<int64_t>(room, 4096));
  }
  o.sampling.temperature = p.temperature;
  o.sampling.top_p = p.top_p;
  o.sampling.top_k = p.top_k;
  o.sampling.min_p = p.min_p;
  o.sampling.repetition_penalty = p.repetition_penalty;
  o.sampling.frequency_penalty = p.frequency_penalty;
  o.sampling.presence_penalty = p.presence_penalty;
  o.sampling.seed = p.seed ? *p.seed : random_seed();
  o.stop_strings = p.stop;
  for (int32_t id : inst.model().config().eos_token_ids) o.eos_ids.push_back(id);
  return o;
}

json usage_json(const GenerateResult& r) {
  return {{"prompt_tokens", r.prompt_ids.size()},
          {"completion_tokens", r.token_ids.size()},
          {"total_tokens", r.prompt_ids.size() + r.token_ids.size()}};
}

json timings_json(const GenerateResult& r, double ttft) {
  return {{"ttft_s", ttft}, {"prefill_tps", r.prefill_tps()}, {"decode_tps", r.decode_tps()},
          {"prefill_s", r.prefill_seconds}, {"decode_s", r.decode_seconds}};
}

// Waits for a job while watching the client; returns false when the client left.
bool wait_done(GenJob& job, HttpConnection& conn) {
  while (!job.done()) {
    job.wait_text(std::chrono::milliseconds(100));
    if (conn.peer_closed()) {
      job.cancel();
      return false;
    }
  }
  return true;
}

// Streams a job as SSE. `chunk(delta_text, finish_reason)` builds one event
// object. Returns when the job ends or the client leaves (then cancels it).
void stream_job(GenJob& job, HttpConnection& conn, bool include_usage, bool chat,
                const std::function<json(const json& delta_or_text, const json& finish)>& chunk) {
  conn.close_after = true;  // a stream ends the connection (simpler for every client)
  if (!conn.begin_chunked(200, "text/event-stream; charset=utf-8")) {
    job.cancel();
    return;
  }
  auto write = [&](const std::string& s) {
    if (!conn.write_chunk(s)) {
      job.cancel();
      return false;
    }
    return true;
  };
  json opening = chat ? chunk(json{{"role", "assistant"}, {"content", ""}}, nullptr) : json();
  if (chat && include_usage) opening["usage"] = nullptr;
  if (chat && !write(sse_event(dump(opening)))) return;
  auto last_write = Clock::now();
  for (;;) {
    std::string text = job.wait_text(std::chrono::milliseconds(100));
    if (!text.empty()) {
      json c = chat ? chunk(json{{"content", text}}, nullptr) : chunk(text, nullptr);
      if (include_usage) c["usage"] = nullptr;
      if (!write(sse_event(dump(c)))) return;
      last_write = Clock::now();
    } else if (conn.peer_closed()) {
      job.cancel();
      return;
    } else if (Clock::now() - last_write > std::chrono::seconds(2)) {
      if (!write(sse_comment("waiting"))) return;  // queued: keep the stream (and its proxy) alive
      last_write = Clock::now();
    }
    if (job.done()) break;
  }
  std::string err = job.error();
  GenerateResult r = job.result();
  if (!err.empty()) {
    ApiError e(503, "generation failed: " + err, "", "generation_error", "server_error");
    write(sse_event(dump(e.body())));
    write(sse_done());
    conn.end_chunked();
    return;
  }
  std::string finish = r.finish_reason == "length" ? "length" : "stop";
  json fin = chat ? chunk(json::object(), finish) : chunk("", finish);
  if (include_usage) fin["usage"] = nullptr;
  if (!write(sse_event(dump(fin)))) return;
  if (include_usage) {
    json u = chat ? chunk(json::object(), nullptr) : chunk("", nullptr);
    u["choices"] = json::array();
    u["usage"] = usage_json(r);
    u["zmlx"] = timings_json(r, job.ttft_seconds());
    if (!write(sse_event(dump(u)))) return;
  }
  write(sse_done());
  conn.end_chunked();
}

const char* content_type_for(const std::string& ext) {
  if (ext == ".html") return "text/html; charset=utf-8";
  if (ext == ".js") return "text/javascript; charset=utf-8";
  if (ext == ".css") return "text/css; charset=utf-8";
  if (ext == ".svg") return "image/svg+xml";
  if (ext == ".png") return "image/png";
  if (ext == ".ico") return "image/x-icon";
  if (ext == ".json") return "application/json";
  return "application/octet-stream";
}

}  // namespace

Node::Node(NodeOptions opt) : opt_(std::move(opt)), instances_(opt_.load) {}

void Node::handle(const HttpRequest& req, HttpConnection& conn) {
  try {
    const std::string& p = req.path;
    const std::string& m = req.method;
    auto method_not_allowed = [&](const char* allowed) {
      throw ApiError(405, "method " + m + " is not allowed on " + p + " (use " + allowed + ")", "", "method_not_allowed");
    };
    if (p == "/health") {
      if (m != "GET" && m != "HEAD") method_not_allowed("GET");
      send_json(conn, 200, json{{"status", "ok"}, {"instances", instances_.list().size()}});
    } else if (p == "/v1/models") {
      if (m != "GET") method_not_allowed("GET");
      json data = json::array();
      for (auto& i : instances_.list())
        data.push_back({{"id", i->model_id()}, {"object", "model"}, {"created", i->info()["created"]}, {"owned_by", "zmlx"}});
      send_json(conn, 200, json{{"object", "list"}, {"data", data}});
    } else if (p.rfind("/v1/models/", 0) == 0) {
      if (m != "GET") method_not_allowed("GET");
      auto inst = require_model(instances_, url_decode(p.substr(11)));
      send_json(conn, 200, json{{"id", inst->model_id()}, {"object", "model"}, {"created", inst->info()["created"]}, {"owned_by", "zmlx"}});
    } else if (p == "/v1/chat/completions") {
      if (m != "POST") method_not_allowed("POST");
      chat_completions(req, conn);
    } else if (p == "/v1/completions") {
      if (m != "POST") method_not_allowed("POST");
      completions(req, conn);
    } else if (p == "/state") {
      if (m != "GET") method_not_allowed("GET");
      send_json(conn, 200, state());
    } else if (p == "/models") {
      if (m != "GET") method_not_allowed("GET");
      send_json(conn, 200, available_models());
    } else if (p == "/instance") {
      if (m != "POST") method_not_allowed("POST");
      json body = parse_json_object(req.body);
      auto it = body.find("model");
      if (it == body.end() || it->is_null()) bad_request("'model' is required (a model directory or HF repo id)", "model", "missing_required_parameter");
      if (!it->is_string() || it->get<std::string>().empty()) bad_request("'model' must be a non-empty string", "model", "invalid_type");
      std::shared_ptr<Instance> inst;
      bool created;
      try {
        std::tie(inst, created) = instances_.load(it->get<std::string>());
      } catch (const Error& e) {
        throw ApiError(404, std::string("cannot load '") + it->get<std::string>() + "': " + e.what(), "model", "model_load_failed");
      }
      json info = inst->info();
      info["already_loaded"] = !created;
      send_json(conn, created ? 201 : 200, info);
    } else if (p.rfind("/instance/", 0) == 0) {
      if (m != "DELETE" && m != "GET") method_not_allowed("GET or DELETE");
      std::string key = url_decode(p.substr(10));
      if (m == "GET") {
        auto inst = instances_.find(key);
        if (!inst) throw ApiError(404, "no instance '" + key + "'", "id", "instance_not_found");
        send_json(conn, 200, inst->info());
      } else {
        if (!instances_.unload(key)) throw ApiError(404, "no instance '" + key + "'", "id", "instance_not_found");
        send_json(conn, 200, json{{"id", key}, {"deleted", true}});
      }
    } else if (p.rfind("/v1/", 0) == 0 || p == "/v1") {
      throw ApiError(404, "unknown route " + m + " " + p, "", "unknown_route");
    } else if (m == "GET" || m == "HEAD") {
      serve_static(req, conn);
    } else {
      throw ApiError(404, "unknown route " + m + " " + p, "", "unknown_route");
    }
  } catch (const ApiError& e) {
    send_error(conn, e);
  } catch (const Error& e) {
    send_error(conn, ApiError(400, e.what(), "", "invalid_request"));
  } catch (const std::exception& e) {
    send_error(conn, ApiError(500, std::string("internal error: ") + e.what(), "", "internal_error", "server_error"));
  }
}

void Node::chat_completions(const HttpRequest& req, HttpConnection& conn) {
  ChatRequest r = parse_chat_request(req.body);
  auto inst = require_model(instances_, r.model);
  const text::Tokenizer* tok = inst->tokenizer();
  std::string prompt_text;
  try {
    prompt_text = text::apply_chat_template(*tok, r.messages, true, r.template_kwargs);
  } catch (const Error& e) {
    bad_request(std::string("the chat template could not render these messages: ") + e.what(), "messages",
                "template_error");
  }
  std::vector<int32_t> ids = tok->encode(prompt_text);
  GenerateOptions opt = make_options(r, *inst, ids.size());
  auto job = inst->submit(std::move(ids), opt);
  const std::string id = random_id("chatcmpl-");
  const int64_t created = unix_now();
  const std::string model = inst->model_id();
  if (r.stream) {
    stream_job(*job, conn, r.include_usage, true, [&](const json& delta, const json& finish) {
      return json{{"id", id},
                  {"object", "chat.completion.chunk"},
                  {"created", created},
                  {"model", model},
                  {"system_fingerprint", "zmlx"},
                  {"choices", json::array({{{"index", 0}, {"delta", delta}, {"logprobs", nullptr}, {"finish_reason", finish}}})}};
    });
    return;
  }
  if (!wait_done(*job, conn)) return;
  if (!job->error().empty()) throw ApiError(503, "generation failed: " + job->error(), "", "generation_error", "server_error");
  GenerateResult g = job->result();
  json resp = {{"id", id},
               {"object", "chat.completion"},
               {"created", created},
               {"model", model},
               {"system_fingerprint", "zmlx"},
               {"choices", json::array({{{"index", 0},
                                         {"message", {{"role", "assistant"}, {"content", g.text}}},
                                         {"logprobs", nullptr},
                                         {"finish_reason", g.finish_reason == "length" ? "length" : "stop"}}})},
               {"usage", usage_json(g)},
               {"zmlx", timings_json(g, job->ttft_seconds())}};
  send_json(conn, 200, resp);
}

void Node::completions(const HttpRequest& req, HttpConnection& conn) {
  CompletionRequest r = parse_completion_request(req.body);
  auto inst = require_model(instances_, r.model);
  std::vector<int32_t> ids =
      r.prompt_ids ? *r.prompt_ids
                   : inst->tokenizer()->encode(text::with_raw_prompt_prefix(inst->model().config().model_type, r.prompt));
  int64_t vocab = inst->model().config().vocab_size;
  for (int32_t t : ids)
    if (vocab > 0 && t >= vocab) bad_request("token id " + std::to_string(t) + " is outside the vocabulary", "prompt");
  GenerateOptions opt = make_options(r, *inst, ids.size());
  auto job = inst->submit(std::move(ids), opt);
  const std::string id = random_id("cmpl-");
  const int64_t created = unix_now();
  const std::string model = inst->model_id();
  if (r.stream) {
    stream_job(*job, conn, r.include_usage, false, [&](const json& text, const json& finish) {
      return json{{"id", id},
                  {"object", "text_completion"},
                  {"created", created},
                  {"model", model},
                  {"system_fingerprint", "zmlx"},
                  {"choices", json::array({{{"index", 0}, {"text", text}, {"logprobs", nullptr}, {"finish_reason", finish}}})}};
    });
    return;
  }
  if (!wait_done(*job, conn)) return;
  if (!job->error().empty()) throw ApiError(503, "generation failed: " + job->error(), "", "generation_error", "server_error");
  GenerateResult g = job->result();
  send_json(conn, 200,
            json{{"id", id},
                 {"object", "text_completion"},
                 {"created", created},
                 {"model", model},
                 {"system_fingerprint", "zmlx"},
                 {"choices", json::array({{{"index", 0},
                                           {"text", g.text},
                                           {"logprobs", nullptr},
                                           {"finish_reason", g.finish_reason == "length" ? "length" : "stop"}}})},
                 {"usage", usage_json(g)},
                 {"zmlx", timings_json(g, job->ttft_seconds())}});
}

json Node::state() const {
  json insts = json::array();
  for (auto& i : instances_.list()) insts.push_back(i->info());
  // Multi-process node: every rank, its host and device, and its layers or shard.
  json par = {{"mode", dist::mode_name(opt_.load.parallel.mode)}, {"ranks", json::array()}};
  const auto list = instances_.list();
  if (opt_.load.parallel.active() && !list.empty()) {
    const dist::Placement& P = list[0]->model().placement();
    par["transport"] = P.comm->kind();
    par["timeout_s"] = P.comm->timeout_seconds();
    for (int r = 0; r < P.size; ++r) {
      const std::string device = size_t(r) < P.devices.size() ? P.devices[size_t(r)] : list[0]->backend_name();
      json e = {{"rank", r}, {"host", P.comm->hosts().at(size_t(r))}, {"device", device},
                {"role", r == 0 ? "api" : "follower"}};
      if (P.pipeline())
        e["layers"] = {P.stages.at(size_t(r)).first, P.stages.at(size_t(r)).second - 1};
      else
        e["shard"] = fmt::format("{}/{}", r + 1, P.size);
      par["ranks"].push_back(e);
    }
  }
  return {{"node", {{"host", opt_.host}, {"port", opt_.port}, {"version", "0.1.0"}}},
          {"memory", {{"process_rss_bytes", current_rss_bytes()}, {"process_peak_rss_bytes", peak_rss_bytes_now()}}},
          {"patch_enabled", opt_.load.patch.enabled},
          {"parallel", par},
          {"instances", insts}};
}

json Node::available_models() const {
  json local = json::array();
  if (!opt_.models_dir.empty()) {
    std::error_code ec;
    for (auto& e : fs::directory_iterator(opt_.models_dir, ec)) {
      if (e.is_directory(ec) && fs::exists(e.path() / "config.json", ec))
        local.push_back({{"id", e.path().filename().string()}, {"path", e.path().string()}});
    }
    std::sort(local.begin(), local.end(), [](const json& a, const json& b) { return a["id"] < b["id"]; });
  }
  json hf = json::array();
  try {
    for (auto& c : io::list_cached_models()) hf.push_back({{"id", c.repo_id}, {"path", c.path}});
  } catch (const std::exception&) {
  }
  json loaded = json::array();
  for (auto& i : instances_.list()) loaded.push_back({{"id", i->model_id()}, {"path", i->dir()}, {"instance", i->id()}});
  return {{"models_dir", opt_.models_dir}, {"local", local}, {"hf_cache", hf}, {"loaded", loaded}};
}

void Node::serve_static(const HttpRequest& req, HttpConnection& conn) {
  std::string rel = url_decode(req.path);
  if (rel == "/" || rel.empty()) rel = "/index.html";
  bool ok = rel.find("..") == std::string::npos && rel.find('\0') == std::string::npos && rel.find("//") == std::string::npos;
  for (char c : rel) ok &= std::isalnum((unsigned char)c) || c == '/' || c == '.' || c == '-' || c == '_';
  fs::path file = fs::path(opt_.web_dir) / rel.substr(1);
  std::error_code ec;
  if (!ok || opt_.web_dir.empty() || !fs::is_regular_file(file, ec))
    throw ApiError(404, "unknown route " + req.method + " " + req.path, "", "unknown_route");
  std::ifstream in(file, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  conn.send(200, content_type_for(file.extension().string()), req.method == "HEAD" ? std::string() : ss.str(),
            {{"Cache-Control", "no-cache"}});
}

}  // namespace zmlx::serve
