// write_synthetic_tokenizer: a small, valid byte-level BPE for synthetic
// models, with the family's special tokens and a chat template that has the
// family's essentials.
//
// Id layout: the family's special tokens sit at their real ids when
// vocab_size is larger than the highest real id; otherwise (tiny presets)
// they take the top ids of the range, in the same order. The other ids, from
// 0 up, hold the 256 byte tokens, then the learned merges, then reserved
// fillers "<|reserved_N|>" (plain vocabulary entries that encoding never
// produces) so every id below vocab_size names a token.
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <unordered_set>

#include "zmlx/core/error.h"
#include "zmlx/text/chat_template.h"
#include "zmlx/text/regex.h"
#include "zmlx/text/unicode.h"

namespace zmlx::text {

namespace {

using ojson = nlohmann::ordered_json;

struct Special {
  std::string content;
  int64_t id;
  bool special;
};

struct Family {
  std::vector<Special> specials;
  std::string split_regex;
  bool nfc = false;
  std::string bos, eos, pad;  // empty: none
  std::string chat_template;
};

constexpr const char* kQwenRegex =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|"
    "\\s+(?!\\S)|\\s+";
constexpr const char* kGlmRegex =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

// Templates written for zmlx from the essentials in spec/architectures.md.
constexpr const char* kQwenTemplate = R"TPL({%- if tools %}
{{- '<|im_start|>system\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}{%- endif %}
{{- '# Tools\n\nFunction signatures inside <tools></tools>:\n<tools>' }}
{%- for tool in tools %}{{- '\n' ~ (tool | tojson) }}{%- endfor %}
{{- '\n</tools>\n\nCall a function with <tool_call>{"name": ..., "arguments": ...}</tool_call>.<|im_end|>\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
{%- elif message.role == 'assistant' %}
{%- set content = message.content if message.content is string else '' %}
{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1].lstrip('\n') %}{%- endif %}
{{- '<|im_start|>assistant\n' + content }}
{%- for call in message.tool_calls or [] %}
{%- set fn = call.function if call.function is defined else call %}
{{- '\n<tool_call>\n{"name": "' + fn.name + '", "arguments": ' + (fn.arguments if fn.arguments is string else fn.arguments | tojson) + '}\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}
{%- endif %})TPL";

constexpr const char* kGlmTemplate = R"TPL([gMASK]<sop>
{%- if tools %}<|system|>Available tools:{% for tool in tools %}
{{ tool | tojson }}{% endfor %}{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}<|system|>{{ message.content }}
{%- elif message.role == 'user' %}<|user|>{{ message.content }}
{%- elif message.role == 'assistant' %}
{%- set content = message.content if message.content is string else '' %}
{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1].strip() %}{%- endif %}<|assistant|></think>{{ content }}
{%- for call in message.tool_calls or [] %}{% set fn = call.function if call.function is defined else call %}<tool_call>{{ fn.name }}
{%- for k, v in (fn.arguments.items() if fn.arguments is mapping else []) %}<arg_key>{{ k }}</arg_key><arg_value>{{ v if v is string else v | tojson }}</arg_value>{% endfor %}</tool_call>
{%- endfor %}
{%- elif message.role == 'tool' %}<|observation|><tool_response>{{ message.content }}</tool_response>
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|assistant|>{{ '</think>' if (enable_thinking is defined and not enable_thinking) else '<think>' }}{% endif %})TPL";

constexpr const char* kLfmTemplate = R"TPL({{- bos_token }}
{%- for message in messages %}
{{- '<|im_start|>' + message.role + '\n' }}
{%- if message.content is string %}{{- message.content }}{%- else %}{{- message.content | tojson }}{%- endif %}
{{- '<|im_end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %})TPL";

Family family_spec(const std::string& family) {
  Family f;
  if (family == "qwen3" || family == "qwen3_moe") {
    f.specials = {{"<|endoftext|>", 151643, true},     {"<|im_start|>", 151644, true},
                  {"<|im_end|>", 151645, true},        {"<|object_ref_start|>", 151646, true},
                  {"<|object_ref_end|>", 151647, true}, {"<|box_start|>", 151648, true},
                  {"<|box_end|>", 151649, true},       {"<|quad_start|>", 151650, true},
                  {"<|quad_end|>", 151651, true},      {"<|vision_start|>", 151652, true},
                  {"<|vision_end|>", 151653, true},    {"<|vision_pad|>", 151654, true},
                  {"<|image_pad|>", 151655, true},     {"<|video_pad|>", 151656, true},
                  {"<tool_call>", 151657, false},      {"</tool_call>", 151658, false},
                  {"<|fim_prefix|>", 151659, false},   {"<|fim_middle|>", 151660, false},
                  {"<|fim_suffix|>", 151661, false},   {"<|fim_pad|>", 151662, false},
                  {"<|repo_name|>", 151663, false},    {"<|file_sep|>", 151664, false},
                  {"<tool_response>", 151665, false},  {"</tool_response>", 151666, false},
                  {"<think>", 151667, false},          {"</think>", 151668, false}};
    f.split_regex = kQwenRegex;
    f.nfc = true;
    f.eos = "<|im_end|>";
    f.pad = "<|endoftext|>";
    f.chat_template = kQwenTemplate;
  } else if (family == "glm4_moe_lite") {
    f.specials = {{"<|endoftext|>", 154820, true},   {"[gMASK]", 154822, true},      {"<sop>", 154824, true},
                  {"<|system|>", 154826, true},      {"<|user|>", 154827, true},     {"<|assistant|>", 154828, true},
                  {"<|observation|>", 154829, true}, {"<think>", 154841, false},     {"</think>", 154842, false},
                  {"<tool_call>", 154843, false},    {"</tool_call>", 154844, false}, {"<arg_key>", 154847, false},
                  {"</arg_key>", 154848, false},     {"<arg_value>", 154849, false}, {"</arg_value>", 154850, false}};
    f.split_regex = kGlmRegex;
    f.eos = "<|endoftext|>";
    f.pad = "<|endoftext|>";
    f.chat_template = kGlmTemplate;
  } else if (family == "lfm2_moe" || family == "lfm2") {
    f.specials = {{"<|pad|>", 0, true},
                  {"<|startoftext|>", 1, true},
                  {"<|endoftext|>", 2, true},
                  {"<|im_start|>", 6, true},
                  {"<|im_end|>", 7, true}};
    f.split_regex = kGlmRegex;
    f.bos = "<|startoftext|>";
    f.eos = "<|im_end|>";
    f.pad = "<|pad|>";
    f.chat_template = kLfmTemplate;
  } else {
    fail("write_synthetic_tokenizer: unknown family {:?} (qwen3, qwen3_moe, glm4_moe_lite, lfm2_moe)", family);
  }
  return f;
}

// Built-in English sample the merges are learned from (written for zmlx).
constexpr const char* kSample =
    "The model reads the text and writes the answer. The user asks a question, and the assistant "
    "thinks about the question before it answers. This is a small test of the tokenizer: it should "
    "turn common words into single tokens, and it should handle numbers like 2024 and 42 as well. "
    "What is the weather in Paris today? It is sunny and warm, with a light wind from the west. "
    "Please write a short story about a cat that lives in a house with a garden. The cat likes to "
    "sleep in the sun and to watch the birds. When it is hungry, it walks to the kitchen and waits. "
    "You are a helpful assistant. Answer the question in one sentence. I think that we should go "
    "there, but they would not agree with us. Here is the code that you asked for, with a function "
    "that returns the sum of two numbers. The system is running on the server, and the results are "
    "good. Thank you for your help! Hello, how are you? I am fine, thanks. Can you help me with "
    "this problem? Yes, of course. Let me explain the steps one by one, and then we can test it. "
    "The first step is to read the file. The second step is to parse the data. The third step is to "
    "print the result. Good morning! Good night! Have a nice day. See you later.";

std::vector<std::string> byte_chars() {
  std::vector<std::string> m(256);
  int shifted = 0;
  for (int b = 0; b < 256; ++b) {
    bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    utf8_append(m[b], printable ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + shifted++));
  }
  return m;
}

// Deterministic BPE training: most frequent adjacent pair, ties broken by the
// pair's strings.
std::vector<std::pair<std::string, std::string>> learn_merges(const std::string& regex, size_t count) {
  const auto bc = byte_chars();
  Regex re(regex);
  std::map<std::vector<std::string>, int64_t> words;
  for (auto [b, e] : re.find_all(kSample)) {
    std::vector<std::string> syms;
    for (size_t i = b; i < e; ++i) syms.push_back(bc[static_cast<unsigned char>(kSample[i])]);
    words[syms]++;
  }
  std::vector<std::pair<std::string, std::string>> merges;
  while (merges.size() < count) {
    std::map<std::pair<std::string, std::string>, int64_t> pairs;
    for (const auto& [w, n] : words)
      for (size_t i = 0; i + 1 < w.size(); ++i) pairs[{w[i], w[i + 1]}] += n;
    if (pairs.empty()) break;
    auto best = pairs.begin();
    for (auto it = pairs.begin(); it != pairs.end(); ++it)
      if (it->second > best->second) best = it;
    if (best->second < 2) break;
    auto pr = best->first;
    merges.push_back(pr);
    std::map<std::vector<std::string>, int64_t> next;
    for (const auto& [w, n] : words) {
      std::vector<std::string> out;
      for (size_t i = 0; i < w.size(); ++i) {
        if (i + 1 < w.size() && w[i] == pr.first && w[i + 1] == pr.second) {
          out.push_back(pr.first + pr.second);
          ++i;
        } else {
          out.push_back(w[i]);
        }
      }
      next[out] += n;
    }
    words = std::move(next);
  }
  return merges;
}

void write_json(const std::filesystem::path& p, const ojson& j) {
  std::ofstream f(p, std::ios::binary);
  ZMLX_CHECK(f.good(), "cannot write {}", p.string());
  f << j.dump(2, ' ', false);
  ZMLX_CHECK(f.good(), "error writing {}", p.string());
}

}  // namespace

void write_synthetic_tokenizer(const std::string& dir, const std::string& family, int64_t vocab_size) {
  Family f = family_spec(family);
  const int64_t nspecial = static_cast<int64_t>(f.specials.size());
  ZMLX_CHECK(vocab_size >= 256 + nspecial + 1, "write_synthetic_tokenizer: vocab_size {} too small (need > {})",
             vocab_size, 256 + nspecial);
  int64_t max_real = 0;
  for (const auto& s : f.specials) max_real = std::max(max_real, s.id);
  if (max_real >= vocab_size) {  // tiny preset: specials at the top of the range, same order
    std::sort(f.specials.begin(), f.specials.end(), [](auto& a, auto& b) { return a.id < b.id; });
    for (int64_t k = 0; k < nspecial; ++k) f.specials[k].id = vocab_size - nspecial + k;
  }
  const int64_t top = vocab_size;  // ids 0..vocab_size-1 are all assigned
  std::vector<uint8_t> taken(static_cast<size_t>(top), 0);
  for (const auto& s : f.specials) taken[s.id] = 1;
  std::vector<int64_t> free_ids;
  for (int64_t i = 0; i < top; ++i)
    if (!taken[i]) free_ids.push_back(i);
  ZMLX_CHECK(free_ids.size() >= 256, "write_synthetic_tokenizer: no room for the 256 byte tokens");

  size_t merge_budget = std::min<size_t>(400, free_ids.size() - 256);
  auto merges = learn_merges(f.split_regex, merge_budget);

  // The vocab has up to ~155k entries: build it as a plain list (ordered_json
  // lookups are linear) and check duplicates with a hash set.
  std::vector<std::pair<std::string, int64_t>> entries;
  std::unordered_set<std::string> seen;
  size_t next = 0;
  auto add = [&](const std::string& piece) {
    if (seen.insert(piece).second) entries.emplace_back(piece, free_ids[next++]);
  };
  for (const auto& c : byte_chars()) add(c);
  ojson merge_list = ojson::array();
  for (const auto& [a, b] : merges) {
    merge_list.push_back(a + " " + b);
    add(a + b);
  }
  for (int64_t r = 0; next < free_ids.size(); ++r) add("<|reserved_" + std::to_string(r) + "|>");
  ojson::object_t vocab_map;
  auto& vocab_items = static_cast<std::vector<std::pair<const std::string, ojson>>&>(vocab_map);
  vocab_items.reserve(entries.size());
  for (auto& [piece, id] : entries) vocab_items.emplace_back(piece, ojson(id));
  ojson vocab(std::move(vocab_map));

  ojson added = ojson::array();
  std::vector<Special> sorted = f.specials;
  std::sort(sorted.begin(), sorted.end(), [](auto& a, auto& b) { return a.id < b.id; });
  for (const auto& s : sorted)
    added.push_back({{"id", s.id},         {"content", s.content}, {"single_word", false}, {"lstrip", false},
                     {"rstrip", false},    {"normalized", false},  {"special", s.special}});

  ojson byte_level = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", false}, {"use_regex", false}};
  ojson split = {{"type", "Split"}, {"pattern", {{"Regex", f.split_regex}}}, {"behavior", "Isolated"},
                 {"invert", false}};
  ojson pre = ojson::object();
  pre["type"] = "Sequence";
  pre["pretokenizers"] = ojson::array({split, byte_level});
  ojson model = ojson::object();
  model["type"] = "BPE";
  model["dropout"] = nullptr;
  model["unk_token"] = nullptr;
  model["continuing_subword_prefix"] = "";
  model["end_of_word_suffix"] = "";
  model["fuse_unk"] = false;
  model["byte_fallback"] = false;
  model["ignore_merges"] = false;
  model["vocab"] = std::move(vocab);
  model["merges"] = std::move(merge_list);
  ojson tj = ojson::object();
  tj["version"] = "1.0";
  tj["truncation"] = nullptr;
  tj["padding"] = nullptr;
  tj["added_tokens"] = added;
  tj["normalizer"] = f.nfc ? ojson{{"type", "NFC"}} : ojson(nullptr);
  tj["pre_tokenizer"] = pre;
  tj["post_processor"] = byte_level;
  tj["decoder"] = byte_level;
  tj["model"] = std::move(model);

  auto tok_or_null = [](const std::string& s) { return s.empty() ? ojson(nullptr) : ojson(s); };
  ojson added_decoder = ojson::object();
  for (const auto& s : sorted)
    added_decoder[std::to_string(s.id)] = {{"content", s.content}, {"lstrip", false}, {"normalized", false},
                                           {"rstrip", false},      {"single_word", false}, {"special", s.special}};
  ojson cfg = {{"add_bos_token", false},
               {"add_prefix_space", false},
               {"added_tokens_decoder", added_decoder},
               {"bos_token", tok_or_null(f.bos)},
               {"eos_token", tok_or_null(f.eos)},
               {"pad_token", tok_or_null(f.pad)},
               {"unk_token", nullptr},
               {"clean_up_tokenization_spaces", false},
               {"model_max_length", 131072},
               {"tokenizer_class", "PreTrainedTokenizerFast"},
               {"chat_template", f.chat_template}};
  ojson stm = ojson::object();
  if (!f.bos.empty()) stm["bos_token"] = f.bos;
  if (!f.eos.empty()) stm["eos_token"] = f.eos;
  if (!f.pad.empty()) stm["pad_token"] = f.pad;

  std::filesystem::create_directories(dir);
  write_json(std::filesystem::path(dir) / "tokenizer.json", tj);
  write_json(std::filesystem::path(dir) / "tokenizer_config.json", cfg);
  write_json(std::filesystem::path(dir) / "special_tokens_map.json", stm);
}

}  // namespace zmlx::text
