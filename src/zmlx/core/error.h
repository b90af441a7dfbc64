// zmlx::Error — the one exception type the engine throws for bad input or
// broken invariants. Messages say what, where (file / tensor / field), and
// expected vs found, so a user can act on them without a debugger.
#pragma once
#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace zmlx {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

template <typename... Args>
[[noreturn]] inline void fail(fmt::format_string<Args...> f, Args&&... args) {
  throw Error(fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace zmlx

// Checks a condition on user-controlled input; on failure throws zmlx::Error
// with the formatted message.
#define ZMLX_CHECK(cond, ...)          \
  do {                                 \
    if (!(cond)) ::zmlx::fail(__VA_ARGS__); \
  } while (0)
