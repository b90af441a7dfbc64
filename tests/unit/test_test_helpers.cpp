// The shared test helpers that other tests rely on to leave no trace.
#include <gtest/gtest.h>

#include <cstdlib>
#include <stdexcept>
#include <string>

#include "test_helpers.h"

namespace {

const char* kVar = "ZMLX_TEST_SCOPED_ENV";

std::string value() {
  const char* v = std::getenv(kVar);
  return v ? v : "<unset>";
}

// ScopedEnv restores what it found: unset, or a value set before it; also
// when the scope is left by an exception, and after set() changed it.
TEST(TestHelpers, ScopedEnvRestoresThePreviousState) {
  ::unsetenv(kVar);
  {
    zmlx::test::ScopedEnv e(kVar, "1");
    EXPECT_EQ(value(), "1");
    e.set("2");
    EXPECT_EQ(value(), "2");
    e.set(nullptr);
    EXPECT_EQ(value(), "<unset>");
    e.set("3");
  }
  EXPECT_EQ(value(), "<unset>");
  ::setenv(kVar, "before", 1);
  try {
    zmlx::test::ScopedEnv e(kVar, nullptr);
    EXPECT_EQ(value(), "<unset>");
    throw std::runtime_error("leaving early");
  } catch (const std::runtime_error&) {
  }
  EXPECT_EQ(value(), "before");
  ::unsetenv(kVar);
}

}  // namespace
