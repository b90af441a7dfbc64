// Synthetic tokenizers: load back, specials at the right ids, round trip,
// templates with each family's essentials.
#include <gtest/gtest.h>

#include <filesystem>
#include <unistd.h>

#include "zmlx/core/error.h"
#include "zmlx/text/chat_template.h"
#include "zmlx/text/tokenizer.h"

#include "test_helpers.h"

using zmlx::text::Tokenizer;

namespace {

using zmlx::test::TempDir;

nlohmann::json convo() {
  return nlohmann::json::array({{{"role", "system"}, {"content", "Be brief."}},
                                {{"role", "user"}, {"content", "What is the weather?"}}});
}

}  // namespace

TEST(TextSynthetic, Qwen3RealIdsAndRoundTrip) {
  TempDir d("qwen");
  zmlx::text::write_synthetic_tokenizer(d.path.string(), "qwen3_moe", 151936);
  auto t = Tokenizer::from_dir(d.path.string());
  EXPECT_EQ(t.vocab_size(), 151936u);
  EXPECT_EQ(t.token_id("<|endoftext|>"), 151643);
  EXPECT_EQ(t.token_id("<|im_start|>"), 151644);
  EXPECT_EQ(t.token_id("<|im_end|>"), 151645);
  EXPECT_EQ(t.token_id("<think>"), 151667);
  EXPECT_EQ(t.token_id("</think>"), 151668);
  EXPECT_EQ(t.eos_token(), "<|im_end|>");
  // Common words are single tokens.
  EXPECT_EQ(t.encode(" the").size(), 1u);
  EXPECT_EQ(t.encode(" the assistant").size(), 2u);
  std::string s = "Hello wörld 😀 <|im_start|>user\n42<|im_end|>";
  auto ids = t.encode(s);
  EXPECT_EQ(t.decode(ids), s);
  EXPECT_NE(std::find(ids.begin(), ids.end(), 151644), ids.end());
  std::string p = zmlx::text::apply_chat_template(t, convo(), true, {{"enable_thinking", false}});
  EXPECT_EQ(p,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is the weather?<|im_end|>\n"
            "<|im_start|>assistant\n<think>\n\n</think>\n\n");
}

TEST(TextSynthetic, TinyVocabPutsSpecialsAtTheTop) {
  TempDir d("tiny");
  zmlx::text::write_synthetic_tokenizer(d.path.string(), "qwen3", 4096);
  auto t = Tokenizer::from_dir(d.path.string());
  EXPECT_EQ(t.vocab_size(), 4096u);
  auto end = t.token_id("<|im_end|>");
  ASSERT_TRUE(end.has_value());
  EXPECT_LT(*end, 4096);
  EXPECT_EQ(t.token_id("</think>"), 4095);
  EXPECT_EQ(t.decode(t.encode("abc <|im_end|> xyz")), "abc <|im_end|> xyz");
}

TEST(TextSynthetic, GlmAndLfmTemplates) {
  TempDir g("glm");
  zmlx::text::write_synthetic_tokenizer(g.path.string(), "glm4_moe_lite", 154880);
  auto tg = Tokenizer::from_dir(g.path.string());
  EXPECT_EQ(tg.token_id("[gMASK]"), 154822);
  EXPECT_EQ(tg.token_id("<sop>"), 154824);
  EXPECT_EQ(tg.token_id("<|user|>"), 154827);
  EXPECT_EQ(zmlx::text::apply_chat_template(tg, convo(), true),
            "[gMASK]<sop><|system|>Be brief.<|user|>What is the weather?<|assistant|><think>");
  auto ids = tg.encode("[gMASK]<sop><|user|>hi");
  ASSERT_GE(ids.size(), 3u);
  EXPECT_EQ(ids[0], 154822);

  TempDir l("lfm");
  zmlx::text::write_synthetic_tokenizer(l.path.string(), "lfm2_moe", 65536);
  auto tl = Tokenizer::from_dir(l.path.string());
  EXPECT_EQ(tl.token_id("<|pad|>"), 0);
  EXPECT_EQ(tl.token_id("<|startoftext|>"), 1);
  EXPECT_EQ(tl.token_id("<|im_end|>"), 7);
  EXPECT_EQ(tl.bos_token(), "<|startoftext|>");
  EXPECT_EQ(zmlx::text::apply_chat_template(tl, convo(), true),
            "<|startoftext|><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is the "
            "weather?<|im_end|>\n<|im_start|>assistant\n");
  EXPECT_THROW(zmlx::text::write_synthetic_tokenizer(l.path.string(), "nope", 1000), zmlx::Error);
}
