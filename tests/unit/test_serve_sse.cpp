// SSE framing of the node's streams.
#include <gtest/gtest.h>

#include "zmlx/serve/sse.h"

using namespace zmlx::serve;

TEST(ServeSse, OneLinePayload) {
  EXPECT_EQ(sse_event(R"({"a":1})"), "data: {\"a\":1}\n\n");
  EXPECT_EQ(sse_event(""), "data: \n\n");
}

TEST(ServeSse, LineBreaksBecomeSeveralDataLines) {
  EXPECT_EQ(sse_event("a\nb"), "data: a\ndata: b\n\n");
  EXPECT_EQ(sse_event("a\r\nb\rc"), "data: a\ndata: b\ndata: c\n\n");
  EXPECT_EQ(sse_event("a\n"), "data: a\ndata: \n\n");
}

TEST(ServeSse, EventNeverContainsABlankLineBeforeItsEnd) {
  std::string e = sse_event("x\n\ny\r\n\r\nz");
  EXPECT_EQ(e.find("\n\n"), e.size() - 2);
}

TEST(ServeSse, DoneAndComments) {
  EXPECT_EQ(sse_done(), "data: [DONE]\n\n");
  EXPECT_EQ(sse_comment("waiting"), ": waiting\n\n");
  EXPECT_EQ(sse_comment("a\nb"), ": a b\n\n");
}
