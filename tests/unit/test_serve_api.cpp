// Request parsing and validation of the node's OpenAI-compatible API.
#include <gtest/gtest.h>

#include "zmlx/serve/api.h"
#include "zmlx/serve/http.h"

using namespace zmlx::serve;

namespace {

// The ApiError a body produces (status 0 when it parses).
ApiError chat_error(const std::string& body) {
  try {
    parse_chat_request(body);
  } catch (const ApiError& e) {
    return e;
  }
  return ApiError(0, "parsed");
}

ApiError completion_error(const std::string& body) {
  try {
    parse_completion_request(body);
  } catch (const ApiError& e) {
    return e;
  }
  return ApiError(0, "parsed");
}

const char* kMsgs = R"("messages": [{"role": "user", "content": "hi"}])";

std::string with(const std::string& extra) { return std::string("{\"model\": \"m\", ") + kMsgs + extra + "}"; }

}  // namespace

TEST(ServeApi, ParsesAFullChatRequest) {
  ChatRequest r = parse_chat_request(R"({
    "model": "tiny",
    "messages": [{"role": "system", "content": "be brief"},
                 {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                 {"role": "assistant", "content": null},
                 {"role": "developer", "content": "x"}],
    "max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 40, "min_p": 0.05,
    "seed": -3, "stop": ["END", ""], "stream": true, "stream_options": {"include_usage": true},
    "chat_template_kwargs": {"enable_thinking": false}, "frequency_penalty": 0.1, "presence_penalty": -0.25,
    "n": 1})");
  EXPECT_EQ(r.model, "tiny");
  ASSERT_EQ(r.messages.size(), 4u);
  EXPECT_EQ(r.messages[1]["content"], "ab");
  EXPECT_EQ(r.messages[2]["content"], "");
  EXPECT_EQ(r.messages[3]["role"], "system");
  EXPECT_EQ(r.max_tokens.value(), 7);
  EXPECT_FLOAT_EQ(r.temperature, 0.5f);
  EXPECT_FLOAT_EQ(r.top_p, 0.9f);
  EXPECT_EQ(r.top_k, 40);
  EXPECT_FLOAT_EQ(r.min_p, 0.05f);
  EXPECT_FLOAT_EQ(r.frequency_penalty, 0.1f);
  EXPECT_FLOAT_EQ(r.presence_penalty, -0.25f);
  EXPECT_EQ(r.seed.value(), uint64_t(int64_t(-3)));
  ASSERT_EQ(r.stop.size(), 1u);  // empty stop strings are dropped
  EXPECT_EQ(r.stop[0], "END");
  EXPECT_TRUE(r.stream);
  EXPECT_TRUE(r.include_usage);
  EXPECT_EQ(r.template_kwargs["enable_thinking"], false);
}

TEST(ServeApi, DefaultsAndNulls) {
  ChatRequest r = parse_chat_request(with(R"(, "max_tokens": null, "temperature": null, "stop": "x")"));
  EXPECT_FALSE(r.max_tokens.has_value());
  EXPECT_FALSE(r.temperature_set);
  EXPECT_FALSE(r.stream);
  EXPECT_FALSE(r.seed.has_value());
  ASSERT_EQ(r.stop.size(), 1u);
  // max_tokens as an integral float is accepted.
  EXPECT_EQ(parse_chat_request(with(R"(, "max_tokens": 16.0)")).max_tokens.value(), 16);
}

TEST(ServeApi, MalformedBodies) {
  for (const char* body : {"", "{", "not json", "[1]", "\"s\"", "null", "{\"model\": \"m\",}"}) {
    ApiError e = chat_error(body);
    EXPECT_EQ(e.status, 400) << body;
    EXPECT_EQ(e.code, "invalid_json") << body;
  }
}

TEST(ServeApi, MissingAndWrongTypedFieldsNameTheParameter) {
  struct Case {
    std::string body, param;
  };
  const std::vector<Case> cases = {
      {std::string("{") + kMsgs + "}", "model"},
      {R"({"model": "m"})", "messages"},
      {R"({"model": 1, "messages": []})", "model"},
      {R"({"model": "", "messages": []})", "model"},
      {R"({"model": "m", "messages": {}})", "messages"},
      {R"({"model": "m", "messages": []})", "messages"},
      {R"({"model": "m", "messages": [1]})", "messages[0]"},
      {R"({"model": "m", "messages": [{"content": "x"}]})", "messages[0].role"},
      {R"({"model": "m", "messages": [{"role": 3, "content": "x"}]})", "messages[0].role"},
      {R"({"model": "m", "messages": [{"role": "bot", "content": "x"}]})", "messages[0].role"},
      {R"({"model": "m", "messages": [{"role": "user"}]})", "messages[0].content"},
      {R"({"model": "m", "messages": [{"role": "user", "content": {"a": 1}}]})", "messages[0].content"},
      {R"({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]})",
       "messages[0].content[0].type"},
      {with(R"(, "max_tokens": "5")"), "max_tokens"},
      {with(R"(, "max_tokens": 2.5)"), "max_tokens"},
      {with(R"(, "max_tokens": 0)"), "max_tokens"},
      {with(R"(, "max_tokens": -4)"), "max_tokens"},
      {with(R"(, "max_tokens": 1e30)"), "max_tokens"},
      {with(R"(, "max_tokens": 18446744073709551615)"), "max_tokens"},
      {with(R"(, "max_completion_tokens": true)"), "max_completion_tokens"},
      {with(R"(, "temperature": "hot")"), "temperature"},
      {with(R"(, "temperature": -1)"), "temperature"},
      {with(R"(, "temperature": 2.5)"), "temperature"},
      {with(R"(, "top_p": 0)"), "top_p"},
      {with(R"(, "top_p": 1.5)"), "top_p"},
      {with(R"(, "top_k": -2)"), "top_k"},
      {with(R"(, "min_p": 2)"), "min_p"},
      {with(R"(, "seed": "1")"), "seed"},
      {with(R"(, "stop": 3)"), "stop"},
      {with(R"(, "stop": ["a", null])"), "stop"},
      {with(R"(, "stream": 1)"), "stream"},
      {with(R"(, "stream_options": [])"), "stream_options"},
      {with(R"(, "stream_options": {"include_usage": "yes"})"), "stream_options.include_usage"},
      {with(R"(, "n": 2)"), "n"},
      {with(R"(, "chat_template_kwargs": 1)"), "chat_template_kwargs"},
  };
  for (const Case& c : cases) {
    ApiError e = chat_error(c.body);
    EXPECT_EQ(e.status, 400) << c.body;
    EXPECT_EQ(e.param, c.param) << c.body << " -> " << e.what();
    EXPECT_FALSE(std::string(e.what()).empty());
  }
}

// A range error names the bounds as a reader writes them ("between 0 and 1",
// not "0.000000 and 1.000000") and echoes the value sent.
TEST(ServeApi, RangeErrorsStateTheBoundsPlainly) {
  EXPECT_EQ(std::string(chat_error(with(R"(, "top_p": 7)")).what()), "'top_p' must be between 0 and 1, got 7");
  EXPECT_EQ(std::string(chat_error(with(R"(, "temperature": 2.5)")).what()),
            "'temperature' must be between 0 and 2, got 2.5");
  EXPECT_EQ(std::string(chat_error(with(R"(, "max_tokens": -4)")).what()),
            "'max_tokens' must be between 1 and 1048576, got -4");
}

TEST(ServeApi, ErrorBodyHasOpenAIShape) {
  ApiError e = chat_error(R"({"model": "m"})");
  auto b = e.body();
  ASSERT_TRUE(b.contains("error"));
  for (const char* k : {"message", "type", "param", "code"}) EXPECT_TRUE(b["error"].contains(k)) << k;
  EXPECT_EQ(b["error"]["type"], "invalid_request_error");
  EXPECT_EQ(b["error"]["param"], "messages");
  ApiError nf(404, "no such model", "model", "model_not_found");
  EXPECT_EQ(nf.body()["error"]["type"], "not_found_error");
  ApiError plain(400, "x");
  EXPECT_TRUE(plain.body()["error"]["param"].is_null());
  EXPECT_TRUE(plain.body()["error"]["code"].is_null());
}

TEST(ServeApi, CompletionPrompts) {
  EXPECT_EQ(parse_completion_request(R"({"model": "m", "prompt": "abc"})").prompt, "abc");
  EXPECT_EQ(parse_completion_request(R"({"model": "m", "prompt": ["abc"]})").prompt, "abc");
  auto ids = parse_completion_request(R"({"model": "m", "prompt": [1, 2, 3]})").prompt_ids;
  ASSERT_TRUE(ids.has_value());
  EXPECT_EQ(*ids, (std::vector<int32_t>{1, 2, 3}));
  EXPECT_EQ(completion_error(R"({"model": "m"})").param, "prompt");
  EXPECT_EQ(completion_error(R"({"model": "m", "prompt": ""})").param, "prompt");
  EXPECT_EQ(completion_error(R"({"model": "m", "prompt": 5})").param, "prompt");
  EXPECT_EQ(completion_error(R"({"model": "m", "prompt": ["a", "b"]})").param, "prompt");
  EXPECT_EQ(completion_error(R"({"model": "m", "prompt": [1, -1]})").param, "prompt");
  EXPECT_EQ(completion_error(R"({"model": "m", "prompt": "a", "echo": true})").param, "echo");
  EXPECT_EQ(completion_error("{]").status, 400);
}

TEST(ServeApi, DumpSurvivesInvalidUtf8) {
  nlohmann::json j = {{"t", std::string("a\xff" "b")}};
  EXPECT_NO_THROW(dump(j));
  EXPECT_NE(dump(j).find("\xEF\xBF\xBD"), std::string::npos);
}

TEST(ServeHttp, ParsesRequestHead) {
  HttpRequest r;
  EXPECT_EQ(parse_request_head("POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n"
                               "X-Multi: a\r\nx-multi: b",
                               r),
            "");
  EXPECT_EQ(r.method, "POST");
  EXPECT_EQ(r.path, "/v1/chat/completions");
  EXPECT_EQ(r.query, "x=1");
  EXPECT_EQ(r.header("content-length"), "12");
  EXPECT_EQ(r.header("x-multi"), "a, b");
}

TEST(ServeHttp, RejectsMalformedHeads) {
  for (const char* h : {"GARBAGE", "GET  HTTP/1.1", "GET nopath HTTP/1.1", "get / HTTP/1.1", "GET / HTTP/2.0",
                        "GET / HTTP/1.1\r\nNoColon", "GET / HTTP/1.1\r\n: empty", "GET / HTTP/1.1\r\nBad Name: x",
                        "GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2"}) {
    HttpRequest r;
    EXPECT_NE(parse_request_head(h, r), "") << h;
  }
}
