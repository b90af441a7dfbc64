// The node: routes of the OpenAI-compatible API, the state/instance
// endpoints and the static dashboard, on top of HttpServer and
// InstanceManager.
#pragma once
#include <memory>
#include <string>

#include "zmlx/serve/http.h"
#include "zmlx/serve/instance.h"

namespace zmlx::serve {

struct NodeOptions {
  std::string host = "127.0.0.1";
  int port = 52416;
  std::string models_dir;  // listed by GET /models for the dashboard's picker
  std::string web_dir;     // static files served at /
  LoadOptions load;
  HttpLimits limits;
};

class Node {
 public:
  explicit Node(NodeOptions opt);
  InstanceManager& instances() { return instances_; }
  // Routes one request; never throws.
  void handle(const HttpRequest& req, HttpConnection& conn);

 private:
  void chat_completions(const HttpRequest& req, HttpConnection& conn);
  void completions(const HttpRequest& req, HttpConnection& conn);
  void serve_static(const HttpRequest& req, HttpConnection& conn);
  nlohmann::json state() const;
  nlohmann::json available_models() const;
  NodeOptions opt_;
  InstanceManager instances_;
};

}  // namespace zmlx::serve
