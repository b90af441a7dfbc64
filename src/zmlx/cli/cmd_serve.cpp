// zmlx serve [MODEL ...]: the node — an OpenAI-compatible API and the chat
// dashboard, on loopback by default.
#include <omp.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <filesystem>

#include "zmlx/cli/command.h"
#include "zmlx/cli/common.h"
#include "zmlx/core/error.h"
#include "zmlx/dist/comm.h"
#include "zmlx/gen/generator.h"
#include "zmlx/serve/node.h"

#ifndef ZMLX_WEB_DIR
#define ZMLX_WEB_DIR ""
#endif

namespace zmlx::cli {
namespace {

namespace fs = std::filesystem;

struct ServeArgs {
  ModelArgs model;
  std::vector<std::string> models;
  std::string host = "127.0.0.1", models_dir, web_dir;
  int port = 52416;
  size_t max_body_mb = 8;
};

serve::HttpServer* g_server = nullptr;

void on_signal(int) {
  if (g_server) g_server->stop();
}

std::string find_web_dir(const std::string& flag) {
  if (!flag.empty()) {
    ZMLX_CHECK(fs::is_regular_file(fs::path(flag) / "index.html"), "--web-dir {}: no index.html there", flag);
    return flag;
  }
  std::vector<fs::path> tries;
  std::error_code ec;
  fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    tries.push_back(exe.parent_path() / "web");
    tries.push_back(exe.parent_path().parent_path() / "web");
    tries.push_back(exe.parent_path().parent_path() / "share" / "zmlx" / "web");
  }
  if (std::string(ZMLX_WEB_DIR).size()) tries.push_back(ZMLX_WEB_DIR);
  for (auto& t : tries)
    if (fs::is_regular_file(t / "index.html", ec)) return t.string();
  return "";
}

int run(const ServeArgs& a) {
  std::signal(SIGPIPE, SIG_IGN);
  serve::NodeOptions o;
  o.host = a.host;
  o.port = a.port;
  o.models_dir = a.models_dir;
  if (!o.models_dir.empty())
    ZMLX_CHECK(fs::is_directory(o.models_dir), "--models-dir {}: not a directory", o.models_dir);
  o.web_dir = find_web_dir(a.web_dir);
  o.load.patch = patch_options(a.model);
  o.load.backend = a.model.backend;
  o.limits.max_body_bytes = a.max_body_mb * 1024 * 1024;
  if (a.model.threads > 0) omp_set_num_threads(a.model.threads);

  // Multi-process: rank 0 runs the node; the other ranks load the same model
  // (their layers or shards) and follow rank 0's requests until it ends.
  o.load.parallel = make_placement(a.model);
  if (o.load.parallel.active()) {
    ZMLX_CHECK(a.models.size() == 1, "serve --parallel {}: give exactly one model on the command line (found {})",
               a.model.parallel, a.models.size());
    if (o.load.parallel.rank != 0) {
      ModelArgs ma = a.model;
      ma.model = a.models[0];
      LoadedModel m = load(ma, false);
      std::fprintf(stderr, "[zmlx] rank %d following rank 0's requests (%s)\n", o.load.parallel.rank,
                   m.model->placement().describe().c_str());
      while (follow_request(*m.model, *m.backend)) {
      }
      return 0;
    }
  }

  // Bind first: a busy port is reported before any (slow) model load.
  serve::HttpServer server(o.limits);
  server.listen(o.host, o.port);
  o.port = server.port();
  auto node = std::make_unique<serve::Node>(o);
  for (auto& m : a.models) {
    auto [inst, created] = node->instances().load(m);
    std::fprintf(stderr, "[zmlx] loaded %s as '%s' (%s, %s, patch: %s)\n", inst->dir().c_str(), inst->model_id().c_str(),
                 inst->model().family().c_str(), inst->backend_name().c_str(),
                 inst->patch_report().enabled ? inst->patch_report().counts_str().c_str() : "off");
  }
  if (o.web_dir.empty())
    std::fprintf(stderr, "[zmlx] warning: no web/ directory found (pass --web-dir); the dashboard is not served\n");
  std::string shown = o.host.find(':') != std::string::npos ? "[" + o.host + "]" : o.host;
  std::printf("[zmlx] node listening on http://%s:%d  (dashboard: /, API: /v1)\n", shown.c_str(), o.port);
  std::fflush(stdout);
  g_server = &server;
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  server.run([&](const serve::HttpRequest& req, serve::HttpConnection& conn) { node->handle(req, conn); });
  std::fprintf(stderr, "[zmlx] shutting down\n");
  if (o.load.parallel.active()) {  // release the followers, then end the MPI job cleanly
    auto insts = node->instances().list();
    if (!insts.empty() && !insts[0]->busy()) {
      try {
        end_followers(insts[0]->model());
        std::fflush(stdout);
        std::fflush(stderr);
        dist::finalize(true);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "[zmlx] %s\n", e.what());
      }
    }
  }
  std::fflush(stdout);
  std::fflush(stderr);
  // Connection threads are detached and may still hold the node: leave without unwinding them.
  _exit(0);
}

ZMLX_COMMAND("serve", "Serve models over an OpenAI-compatible API with a chat dashboard", [](CLI::App& app) {
  auto a = std::make_shared<ServeArgs>();
  add_model_args(app, a->model);
  app.remove_option(app.get_option("model"));  // serve takes zero or more models
  app.add_option("models", a->models, "model directories or HF repo ids to load at start");
  app.add_option("--api-port,--port", a->port, "TCP port of the API and dashboard (0: any free port)")
      ->check(CLI::Range(0, 65535));
  app.add_option("--host", a->host, "address to bind (default loopback; 0.0.0.0 exposes the node)");
  app.add_option("--models-dir", a->models_dir, "directory of model folders offered by the dashboard's picker");
  app.add_option("--web-dir", a->web_dir, "dashboard files (default: the web/ directory next to the build)");
  app.add_option("--max-body-mb", a->max_body_mb, "largest accepted request body in MiB")->check(CLI::Range(1, 1024));
  return [a] { return run(*a); };
});

}  // namespace
}  // namespace zmlx::cli
