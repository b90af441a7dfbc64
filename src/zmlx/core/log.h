// Minimal logging to stderr. The engine prints few lines; the patch layer's
// lines ("[zmlx] Patched ...") have a fixed shape and use log_zmlx().
#pragma once
#include <fmt/format.h>

#include <cstdio>

namespace zmlx {

enum class LogLevel { Quiet = 0, Info = 1, Debug = 2 };
LogLevel log_level();
void set_log_level(LogLevel l);

template <typename... Args>
void log_info(fmt::format_string<Args...> f, Args&&... args) {
  if (log_level() >= LogLevel::Info)
    fmt::print(stderr, "{}\n", fmt::format(f, std::forward<Args>(args)...));
}
template <typename... Args>
void log_debug(fmt::format_string<Args...> f, Args&&... args) {
  if (log_level() >= LogLevel::Debug)
    fmt::print(stderr, "{}\n", fmt::format(f, std::forward<Args>(args)...));
}

// A progress bar on stderr, drawn only when stderr is a terminal.
class Progress {
 public:
  Progress(std::string label, uint64_t total);
  ~Progress();
  void advance(uint64_t n);
  void finish();
 private:
  std::string label_;
  uint64_t total_, done_ = 0;
  int last_pct_ = -1;
  bool tty_, finished_ = false;
};

}  // namespace zmlx
