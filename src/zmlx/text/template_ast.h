// The syntax tree of a chat template (the Jinja subset real templates use)
// and the parser that builds it. Whitespace control follows Hugging Face's
// environment: trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False.
#pragma once
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "zmlx/text/template_value.h"

namespace zmlx::text::tmpl {

struct Expr;
using ExprPtr = std::shared_ptr<Expr>;

struct Expr {
  enum class Kind {
    Literal,  // value
    Name,     // name
    List,     // items
    Tuple,    // items
    Dict,     // items: key0, value0, key1, value1, ...
    GetAttr,  // a.name
    GetItem,  // a[b]
    Slice,    // a[items[0]:items[1]:items[2]] (entries may be null)
    Call,     // a(items..., kwargs...)
    Filter,   // a | name(items..., kwargs...)
    Test,     // a is [not] name(items...)
    Not,      // not a
    Neg,      // -a
    Pos,      // +a
    Binary,   // a name b   (+ - * / // % ** ~)
    And,      // a and b
    Or,       // a or b
    Compare,  // items[0] ops[0] items[1] ops[1] items[2] ...
    Cond,     // a if b else c
  };
  Kind kind;
  int line = 0;
  Value value;
  std::string name;
  ExprPtr a, b, c;
  std::vector<ExprPtr> items;
  std::vector<std::string> ops;
  std::vector<std::pair<std::string, ExprPtr>> kwargs;
  bool negated = false;
};

struct Node;
using NodePtr = std::shared_ptr<Node>;
using NodeList = std::vector<NodePtr>;

struct Node {
  enum class Kind {
    Text,      // text
    Output,    // {{ expr }}
    If,        // branches (cond null = else)
    For,       // for targets in expr [if cond]: body [else: else_body]
    Set,       // set targets = expr, or set targets[0].attr = expr (attr non-empty)
    SetBlock,  // set targets[0] %}body{% endset
    Macro,     // macro name(params=defaults) body
    Break,
    Continue,
    Scope,     // body rendered in place ({% generation %})
  };
  Kind kind;
  int line = 0;
  std::string text;
  ExprPtr expr, cond;
  std::vector<std::pair<ExprPtr, NodeList>> branches;
  std::vector<std::string> targets;
  std::string attr;
  NodeList body, else_body;
  std::string name;
  std::vector<std::string> params;
  std::vector<ExprPtr> defaults;  // one per param, null when none
};

// Parses a template; an unsupported construct is a zmlx::Error naming it and its line.
NodeList parse_template(const std::string& source);

// The filters and tests the renderer implements (checked at parse time).
bool is_known_filter(const std::string& name);
bool is_known_test(const std::string& name);

}  // namespace zmlx::text::tmpl
