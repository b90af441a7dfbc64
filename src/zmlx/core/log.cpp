#include "zmlx/core/log.h"

#include <unistd.h>

#include <atomic>

namespace zmlx {

static std::atomic<int> g_level{int(LogLevel::Info)};
LogLevel log_level() { return LogLevel(g_level.load()); }
void set_log_level(LogLevel l) { g_level = int(l); }

Progress::Progress(std::string label, uint64_t total)
    : label_(std::move(label)), total_(total ? total : 1), tty_(isatty(2)) {}
Progress::~Progress() { finish(); }

void Progress::advance(uint64_t n) {
  done_ += n;
  if (!tty_) return;
  int pct = int(done_ * 100 / total_);
  if (pct == last_pct_) return;
  last_pct_ = pct;
  int bar = pct * 30 / 100;
  fmt::print(stderr, "\r{} [{:=<{}}{: <{}}] {:3d}%", label_, "", bar, "", 30 - bar, pct);
  std::fflush(stderr);
}

void Progress::finish() {
  if (finished_) return;
  finished_ = true;
  if (tty_ && last_pct_ >= 0) fmt::print(stderr, "\r{} [{:=<30}] 100%\n", label_, "");
}

}  // namespace zmlx
