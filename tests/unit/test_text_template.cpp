// Chat-template constructs, with expected strings rendered by Python Jinja2
// under Hugging Face's settings (trim_blocks, lstrip_blocks).
#include <gtest/gtest.h>

#include "zmlx/core/error.h"
#include "zmlx/text/chat_template.h"

using nlohmann::ordered_json;
using zmlx::text::ChatTemplate;

namespace {

ordered_json ctx() {
  return {{"messages",
           {{{"role", "system"}, {"content", "S"}},
            {{"role", "user"}, {"content", " u1 "}},
            {{"role", "assistant"}, {"content", "<think>r</think>\n\na1"}}}}};
}

std::string render(const std::string& src) { return ChatTemplate(src).render(ctx()); }

std::string error_of(const std::string& src) {
  try {
    ChatTemplate(src).render(ctx());
  } catch (const zmlx::Error& e) {
    return e.what();
  }
  return "<no error>";
}

}  // namespace

TEST(TextTemplate, LoopVariables) {
  EXPECT_EQ(render("{% for m in messages %}{{ loop.index }}/{{ loop.length }}{{ m.role[0] }}{% if loop.first %}F{% "
                   "endif %}{% if loop.last %}L{% endif %}{{ loop.previtem.role if loop.previtem is defined else '-' "
                   "}} {% endfor %}"),
            "1/3sF- 2/3usystem 3/3aLuser ");
}

TEST(TextTemplate, NamespaceSurvivesLoopScope) {
  EXPECT_EQ(render("{% set ns = namespace(last=-1) %}{% for m in messages[::-1] %}{% if ns.last == -1 and m.role == "
                   "'user' %}{% set ns.last = messages|length - 1 - loop.index0 %}{% endif %}{% endfor %}{{ ns.last }}"),
            "1");
  // A plain set inside a loop does not leak out.
  EXPECT_EQ(render("{% set c = 0 %}{% for i in range(3) %}{% set c = c + 1 %}{{ c }}{% endfor %}{{ c }}"), "1110");
}

TEST(TextTemplate, WhitespaceControlMatchesTrimAndLstripBlocks) {
  EXPECT_EQ(render("A\n  {% if true %}\n    B\n  {% endif %}\n  {#- c -#}\n  C {{- ' D ' -}} E\n"), "A\n    B\nC D E");
}

TEST(TextTemplate, StringMethodsSlicingAndOperators) {
  EXPECT_EQ(render("{{ messages[2].content.split('</think>')[-1].lstrip('\\n') }}|{{ messages[1].content.strip() }}|{{ "
                   "'abc'[::-1] }}|{{ messages[0].content ~ 1 }}|{{ 'x' in 'xyz' }}|{{ 'q' not in ['a'] }}"),
            "a1|u1|cba|S1|True|True");
}

TEST(TextTemplate, TojsonLikeHuggingFace) {
  EXPECT_EQ(render("{{ {'b': [1, 2.5, none, true], 'a': 'é\"'}|tojson }}|{{ [1]|tojson(indent=2) }}"),
            "{\"b\": [1, 2.5, null, true], \"a\": \"é\\\"\"}|[\n  1\n]");
}

TEST(TextTemplate, MacrosTestsFilters) {
  EXPECT_EQ(render("{% macro f(x, y='d') %}<{{ x }}{{ y }}>{% endmacro %}{{ f(1) }}{{ f(2, y='e') }}"), "<1d><2e>");
  EXPECT_EQ(render("{{ x is defined }}{{ none is none }}{{ 'a' is string }}{{ {} is mapping }}{{ [] is sequence }}{{ 1 "
                   "is not none }}"),
            "FalseTrueTrueTrueTrueTrue");
  EXPECT_EQ(render("{{ messages|map(attribute='role')|join(',') }}|{{ "
                   "messages|selectattr('role','equalto','user')|list|length }}|{{ '  t  '|trim }}|{{ x|default('dflt') "
                   "}}|{{ [3,1,2]|sort|first }}"),
            "system,user,assistant|1|t|dflt|1");
}

TEST(TextTemplate, UnsupportedConstructIsAnErrorNamingItsLine) {
  std::string e = error_of("ok\n{% if true %}\n{% include 'other.jinja' %}\n{% endif %}");
  EXPECT_NE(e.find("line 3"), std::string::npos) << e;
  EXPECT_NE(e.find("include"), std::string::npos) << e;
  e = error_of("a\nb\n{{ messages|batch(2) }}");
  EXPECT_NE(e.find("line 3"), std::string::npos) << e;
  EXPECT_NE(e.find("batch"), std::string::npos) << e;
  e = error_of("{{ 'x'.zfill(3) }}");
  EXPECT_NE(e.find("zfill"), std::string::npos) << e;
  e = error_of("\n{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}");
  EXPECT_NE(e.find("first must be user"), std::string::npos) << e;
  EXPECT_NE(e.find("line 2"), std::string::npos) << e;
  e = error_of("{% for x in y %}");
  EXPECT_NE(e.find("endfor"), std::string::npos) << e;
}
