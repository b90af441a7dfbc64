#include "zmlx/serve/http.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>

#include "zmlx/core/error.h"

namespace zmlx::serve {

const char* status_text(int s) {
  switch (s) {
    case 200: return "OK";
    case 204: return "No Content";
    case 400: return "Bad Request";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 411: return "Length Required";
    case 413: return "Payload Too Large";
    case 415: return "Unsupported Media Type";
    case 422: return "Unprocessable Entity";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 503: return "Service Unavailable";
    default: return "Unknown";
  }
}

static std::string lower(std::string s) {
  for (char& c : s) c = char(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

static std::string trim(const std::string& s) {
  size_t a = s.find_first_not_of(" \t"), b = s.find_last_not_of(" \t");
  return a == std::string::npos ? std::string() : s.substr(a, b - a + 1);
}

std::string parse_request_head(const std::string& head, HttpRequest& req) {
  size_t eol = head.find("\r\n");
  std::string line = head.substr(0, eol);
  size_t s1 = line.find(' ');
  size_t s2 = s1 == std::string::npos ? s1 : line.find(' ', s1 + 1);
  if (s1 == std::string::npos || s2 == std::string::npos) return "malformed request line";
  req.method = line.substr(0, s1);
  req.target = line.substr(s1 + 1, s2 - s1 - 1);
  req.version = line.substr(s2 + 1);
  if (req.method.empty() || req.target.empty() || req.target[0] != '/') return "malformed request line";
  if (req.version != "HTTP/1.1" && req.version != "HTTP/1.0") return "unsupported HTTP version";
  for (char c : req.method)
    if (c < 'A' || c > 'Z') return "malformed method";
  size_t q = req.target.find('?');
  req.path = req.target.substr(0, q);
  req.query = q == std::string::npos ? "" : req.target.substr(q + 1);
  size_t pos = eol == std::string::npos ? head.size() : eol + 2;
  while (pos < head.size()) {
    size_t e = head.find("\r\n", pos);
    if (e == std::string::npos) e = head.size();
    std::string h = head.substr(pos, e - pos);
    pos = e + 2;
    if (h.empty()) continue;
    size_t colon = h.find(':');
    if (colon == std::string::npos || colon == 0) return "malformed header line";
    std::string name = lower(h.substr(0, colon));
    if (name.find_first_of(" \t") != std::string::npos) return "malformed header name";
    std::string value = trim(h.substr(colon + 1));
    auto [it, inserted] = req.headers.emplace(name, value);
    if (!inserted) {
      if (name == "content-length" && it->second != value) return "conflicting Content-Length headers";
      it->second += ", " + value;
    }
  }
  return "";
}

// ---- connection (write side) ----

bool HttpConnection::write_all(const char* p, size_t n) {
  if (failed_) return false;
  while (n > 0) {
    ssize_t w = ::send(fd_, p, n, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {  // send timeout hit: a stuck client
        failed_ = true;
        return false;
      }
      failed_ = true;
      return false;
    }
    p += w;
    n -= size_t(w);
  }
  return true;
}

bool HttpConnection::send(int status, const std::string& content_type, const std::string& body,
                          const std::map<std::string, std::string>& extra) {
  responded_ = true;
  std::string h = "HTTP/1.1 " + std::to_string(status) + " " + status_text(status) + "\r\n";
  h += "Content-Type: " + content_type + "\r\nContent-Length: " + std::to_string(body.size()) + "\r\n";
  for (auto& [k, v] : extra) h += k + ": " + v + "\r\n";
  if (close_after) h += "Connection: close\r\n";
  h += "\r\n";
  return write_all(h.data(), h.size()) && write_all(body.data(), body.size());
}

bool HttpConnection::begin_chunked(int status, const std::string& content_type) {
  responded_ = true;
  std::string h = "HTTP/1.1 " + std::to_string(status) + " " + status_text(status) + "\r\n";
  h += "Content-Type: " + content_type + "\r\nTransfer-Encoding: chunked\r\nCache-Control: no-cache\r\n";
  h += "X-Accel-Buffering: no\r\n";
  if (close_after) h += "Connection: close\r\n";
  h += "\r\n";
  return write_all(h.data(), h.size());
}

bool HttpConnection::write_chunk(const std::string& data) {
  if (data.empty()) return !failed_;
  char size[32];
  int n = std::snprintf(size, sizeof size, "%zx\r\n", data.size());
  std::string c(size, size_t(n));
  c += data;
  c += "\r\n";
  return write_all(c.data(), c.size());
}

bool HttpConnection::end_chunked() { return write_all("0\r\n\r\n", 5); }

bool HttpConnection::peer_closed() {
  if (failed_) return true;
  pollfd p{fd_, POLLIN | POLLRDHUP, 0};
  int r = ::poll(&p, 1, 0);
  if (r <= 0) return false;
  if (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) return true;
  if (p.revents & POLLIN) {
    // Data or EOF: peek to tell them apart (a pipelined request is not a close).
    char c;
    ssize_t k = ::recv(fd_, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    return k == 0 || (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
  }
  return false;
}

// ---- server ----

HttpServer::~HttpServer() { stop(); }

void HttpServer::listen(const std::string& host, int port) {
  addrinfo hints{}, *res = nullptr;
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  std::string ps = std::to_string(port);
  int rc = ::getaddrinfo(host.c_str(), ps.c_str(), &hints, &res);
  ZMLX_CHECK(rc == 0 && res, "--host {}: cannot resolve ({})", host, gai_strerror(rc));
  int fd = -1, err = 0;
  for (addrinfo* a = res; a; a = a->ai_next) {
    fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) { err = errno; continue; }
    int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (::bind(fd, a->ai_addr, a->ai_addrlen) == 0 && ::listen(fd, 128) == 0) break;
    err = errno;
    ::close(fd);
    fd = -1;
  }
  ::freeaddrinfo(res);
  if (fd < 0) {
    if (err == EADDRINUSE)
      fail("port {} is already in use on {}; choose another with --api-port", port, host);
    fail("cannot listen on {}:{}: {} (choose another with --host / --api-port)", host, port, std::strerror(err));
  }
  sockaddr_storage ss{};
  socklen_t sl = sizeof ss;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &sl);
  port_ = ss.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port)
                                   : ntohs(reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
  listen_fd_ = fd;
}

void HttpServer::stop() {
  if (stopping_.exchange(true)) return;
  if (listen_fd_ >= 0) ::shutdown(listen_fd_, SHUT_RDWR);
}

void HttpServer::run(HttpHandler handler) {
  handler_ = std::move(handler);
  while (!stopping_) {
    pollfd p{listen_fd_, POLLIN, 0};
    int r = ::poll(&p, 1, 500);
    if (r <= 0) continue;
    int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EMFILE || errno == ENFILE) std::this_thread::sleep_for(std::chrono::milliseconds(50));
      continue;
    }
    if (active_.load() >= limits_.max_connections) {
      HttpConnection c(fd);
      c.close_after = true;
      c.send(503, "application/json",
             R"({"error":{"message":"too many connections","type":"server_error","param":null,"code":"overloaded"}})");
      ::close(fd);
      continue;
    }
    ++active_;
    std::thread([this, fd] {
      try {
        serve_connection(fd);
      } catch (...) {
      }
      ::close(fd);
      --active_;
    }).detach();
  }
  if (listen_fd_ >= 0) ::close(listen_fd_);
  listen_fd_ = -1;
}

namespace {
// Reads into buf until `done(buf)` or limits; returns 0 ok, -1 closed, -2 timeout.
int read_more(int fd, std::string& buf, int timeout_ms) {
  pollfd p{fd, POLLIN, 0};
  int r;
  do r = ::poll(&p, 1, timeout_ms);
  while (r < 0 && errno == EINTR);
  if (r == 0) return -2;
  if (r < 0) return -1;
  char tmp[16384];
  ssize_t n;
  do n = ::recv(fd, tmp, sizeof tmp, 0);
  while (n < 0 && errno == EINTR);
  if (n <= 0) return -1;
  buf.append(tmp, size_t(n));
  return 0;
}

std::string error_body(const std::string& msg, const std::string& code) {
  std::string m;
  for (char c : msg) {
    if (c == '"' || c == '\\') m += '\\';
    m += c;
  }
  return R"({"error":{"message":")" + m + R"(","type":"invalid_request_error","param":null,"code":")" + code +
         "\"}}";
}
}  // namespace

void HttpServer::serve_connection(int fd) {
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  timeval tv{30, 0};  // a client that stops reading cannot pin a thread forever
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  std::string buf;
  bool first = true;
  while (!stopping_) {
    // Head.
    size_t head_end;
    auto start = std::chrono::steady_clock::now();
    while ((head_end = buf.find("\r\n\r\n")) == std::string::npos) {
      if (buf.size() > limits_.max_header_bytes) {
        HttpConnection c(fd);
        c.close_after = true;
        c.send(431, "application/json", error_body("request headers too large", "headers_too_large"));
        return;
      }
      int timeout = buf.empty() ? (first ? limits_.read_timeout_ms : limits_.idle_timeout_ms) : limits_.read_timeout_ms;
      int elapsed = int(std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - start).count());
      int r = read_more(fd, buf, std::max(1, timeout - (buf.empty() ? 0 : elapsed)));
      if (r == -1) return;
      if (r == -2) {
        if (!buf.empty()) {
          HttpConnection c(fd);
          c.close_after = true;
          c.send(408, "application/json", error_body("timed out reading the request", "timeout"));
        }
        return;
      }
    }
    first = false;
    if (head_end > limits_.max_header_bytes) {
      HttpConnection c(fd);
      c.close_after = true;
      c.send(431, "application/json", error_body("request headers too large", "headers_too_large"));
      return;
    }
    HttpRequest req;
    std::string why = parse_request_head(buf.substr(0, head_end), req);
    buf.erase(0, head_end + 4);
    HttpConnection conn(fd);
    if (!why.empty()) {
      conn.close_after = true;
      conn.send(400, "application/json", error_body(why, "bad_request"));
      return;
    }
    // Body.
    if (!req.header("transfer-encoding").empty()) {
      conn.close_after = true;
      conn.send(411, "application/json", error_body("chunked request bodies are not supported; send Content-Length", "length_required"));
      return;
    }
    size_t len = 0;
    std::string cl = req.header("content-length");
    if (!cl.empty()) {
      if (cl.size() > 18 || cl.find_first_not_of("0123456789") != std::string::npos) {
        conn.close_after = true;
        conn.send(400, "application/json", error_body("bad Content-Length", "bad_request"));
        return;
      }
      len = std::stoull(cl);
    }
    if (len > limits_.max_body_bytes) {
      conn.close_after = true;
      conn.send(413, "application/json",
                error_body("request body of " + std::to_string(len) + " bytes exceeds the limit of " +
                               std::to_string(limits_.max_body_bytes) + " bytes",
                           "body_too_large"));
      return;
    }
    start = std::chrono::steady_clock::now();
    while (buf.size() < len) {
      int elapsed = int(std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - start).count());
      int r = read_more(fd, buf, std::max(1, limits_.read_timeout_ms - elapsed));
      if (r == -1) return;
      if (r == -2) {
        conn.close_after = true;
        conn.send(408, "application/json", error_body("timed out reading the request body", "timeout"));
        return;
      }
    }
    req.body = buf.substr(0, len);
    buf.erase(0, len);
    std::string connection = lower(req.header("connection"));
    if (connection.find("close") != std::string::npos ||
        (req.version == "HTTP/1.0" && connection.find("keep-alive") == std::string::npos))
      conn.close_after = true;
    handler_(req, conn);
    if (!conn.responded()) {
      conn.close_after = true;
      conn.send(500, "application/json", R"({"error":{"message":"no response","type":"server_error","param":null,"code":null}})");
    }
    if (conn.close_after || conn.failed()) return;
  }
}

}  // namespace zmlx::serve
