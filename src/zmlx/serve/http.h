// A small HTTP/1.1 server on POSIX sockets: one thread per connection,
// keep-alive, hard limits on header and body size, read timeouts, and a way
// for a handler to notice that its client went away (so a generation can be
// cancelled). Requests with a body must carry Content-Length (no chunked
// uploads); responses are either sized or chunked (for SSE streams).
#pragma once
#include <atomic>
#include <cstddef>
#include <functional>
#include <map>
#include <mutex>
#include <string>

namespace zmlx::serve {

struct HttpLimits {
  size_t max_header_bytes = 32 * 1024;
  size_t max_body_bytes = 8 * 1024 * 1024;
  int read_timeout_ms = 30000;   // while a request is partly received
  int idle_timeout_ms = 60000;   // keep-alive wait for the next request
  int max_connections = 512;
};

struct HttpRequest {
  std::string method, target, path, query, version;
  std::map<std::string, std::string> headers;  // names lower-cased
  std::string body;
  std::string header(const std::string& lower_name) const {
    auto it = headers.find(lower_name);
    return it == headers.end() ? std::string() : it->second;
  }
};

const char* status_text(int status);

// The write side of one connection, handed to the request handler.
class HttpConnection {
 public:
  explicit HttpConnection(int fd) : fd_(fd) {}
  // A complete response with Content-Length.
  bool send(int status, const std::string& content_type, const std::string& body,
            const std::map<std::string, std::string>& extra_headers = {});
  // A chunked response (SSE): begin, any number of chunks, end.
  bool begin_chunked(int status, const std::string& content_type);
  bool write_chunk(const std::string& data);
  bool end_chunked();
  // True once the peer has closed (or reset) its side. Cheap: poll() with no wait.
  bool peer_closed();
  bool responded() const { return responded_; }
  bool failed() const { return failed_; }
  // The handler may ask to close the connection after its response.
  bool close_after = false;

 private:
  bool write_all(const char* p, size_t n);
  int fd_;
  bool responded_ = false, failed_ = false;
};

using HttpHandler = std::function<void(const HttpRequest&, HttpConnection&)>;

class HttpServer {
 public:
  explicit HttpServer(HttpLimits limits = {}) : limits_(limits) {}
  ~HttpServer();
  // Binds and listens; throws zmlx::Error (whose message names the port) on failure.
  void listen(const std::string& host, int port);
  int port() const { return port_; }
  // Accepts until stop(); each connection gets its own detached thread.
  void run(HttpHandler handler);
  void stop();

 private:
  void serve_connection(int fd);
  HttpLimits limits_;
  HttpHandler handler_;
  int listen_fd_ = -1, port_ = 0;
  std::atomic<bool> stopping_{false};
  std::atomic<int> active_{0};
};

// Parses the request line and headers (the text before the blank line).
// Returns an empty string on success, else the reason it is malformed.
std::string parse_request_head(const std::string& head, HttpRequest& req);

}  // namespace zmlx::serve
