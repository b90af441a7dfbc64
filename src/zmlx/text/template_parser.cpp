// Lexer and recursive-descent parser for chat templates. The grammar and
// operator precedence follow Jinja's: or < and < not < comparisons < + - <
// ~ < * / // % < ** < unary, with postfix (. [] ()) and filter/test (| is)
// binding tightest.
#include <cstring>

#include "zmlx/core/error.h"
#include "zmlx/text/template_ast.h"
#include "zmlx/text/unicode.h"

namespace zmlx::text::tmpl {

namespace {

struct Tok {
  enum Kind { Text, VarBegin, VarEnd, BlockBegin, BlockEnd, Name, Int, Float, Str, Op, Eof } k;
  std::string s;
  int64_t i = 0;
  double f = 0;
  int line = 0;
};

bool is_space_or_tab(const std::string& s) {
  for (char c : s)
    if (c != ' ' && c != '\t') return false;
  return true;
}

bool is_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

class Lexer {
 public:
  explicit Lexer(std::string src) : src_(std::move(src)) {
    // Jinja normalizes line endings in the template source and drops one trailing newline.
    std::string n;
    n.reserve(src_.size());
    for (size_t i = 0; i < src_.size(); ++i) {
      if (src_[i] == '\r') {
        n += '\n';
        if (i + 1 < src_.size() && src_[i + 1] == '\n') ++i;
      } else {
        n += src_[i];
      }
    }
    if (!n.empty() && n.back() == '\n') n.pop_back();
    src_ = std::move(n);
  }

  std::vector<Tok> run() {
    size_t pos = 0;
    bool strip_next = false, trim_next = false, line_starting = true;
    while (pos <= src_.size()) {
      size_t tag = find_tag(pos);
      std::string text = src_.substr(pos, (tag == std::string::npos ? src_.size() : tag) - pos);
      int text_line = line_;
      // Whitespace after the previous tag.
      if (strip_next) {
        size_t k = 0;
        while (k < text.size() && is_ws(text[k])) ++k;
        if (k) line_starting = text[k - 1] == '\n';
        text.erase(0, k);
        text_line += count_newlines(src_.substr(pos, k));
      } else if (trim_next && !text.empty() && text[0] == '\n') {
        text.erase(0, 1);
        text_line += 1;
        line_starting = true;
      }
      if (pos == 0) line_starting = true;
      line_ += count_newlines(src_.substr(pos, (tag == std::string::npos ? src_.size() : tag) - pos));
      if (tag == std::string::npos) {
        if (!text.empty()) emit(Tok::Text, text, text_line);
        break;
      }
      char kind = src_[tag + 1];  // '{', '%' or '#'
      char mod = tag + 2 < src_.size() ? src_[tag + 2] : 0;
      // Whitespace before this tag.
      if (mod == '-') {
        while (!text.empty() && is_ws(text.back())) text.pop_back();
      } else if ((kind == '%' || kind == '#') && mod != '+') {
        size_t nl = text.rfind('\n');
        if (nl != std::string::npos) {
          if (is_space_or_tab(text.substr(nl + 1))) text.erase(nl + 1);
        } else if (line_starting && is_space_or_tab(text)) {
          text.clear();
        }
      }
      if (!text.empty()) emit(Tok::Text, text, text_line);
      size_t p = tag + 2 + ((mod == '-' || mod == '+') ? 1 : 0);
      strip_next = trim_next = false;
      line_starting = false;
      if (kind == '#') {
        size_t end = src_.find("#}", p);
        if (end == std::string::npos) fail("chat template line {}: unclosed comment", line_);
        line_ += count_newlines(src_.substr(tag, end - tag));
        if (end > p && src_[end - 1] == '-') strip_next = true;
        else if (!(end > p && src_[end - 1] == '+')) trim_next = true;
        pos = end + 2;
        continue;
      }
      bool block = kind == '%';
      emit(block ? Tok::BlockBegin : Tok::VarBegin, "", line_);
      size_t first_tok = toks_.size();
      pos = lex_inside(p, block, strip_next, trim_next);
      // {% raw %} ... {% endraw %}: the content is text.
      if (block && toks_.size() == first_tok + 2 && toks_[first_tok].k == Tok::Name && toks_[first_tok].s == "raw") {
        toks_.resize(first_tok - 1);
        size_t search = pos;
        for (;;) {
          size_t t = src_.find("{%", search);
          if (t == std::string::npos) fail("chat template line {}: unclosed {{% raw %}}", line_);
          size_t q = t + 2;
          bool lm = q < src_.size() && src_[q] == '-';
          if (lm || (q < src_.size() && src_[q] == '+')) ++q;
          while (q < src_.size() && is_ws(src_[q])) ++q;
          if (src_.compare(q, 6, "endraw") == 0) {
            std::string raw = src_.substr(pos, t - pos);
            if (strip_next) {
              size_t k = 0;
              while (k < raw.size() && is_ws(raw[k])) ++k;
              raw.erase(0, k);
            } else if (trim_next && !raw.empty() && raw[0] == '\n') {
              raw.erase(0, 1);
            }
            if (lm) {
              while (!raw.empty() && is_ws(raw.back())) raw.pop_back();
            } else {
              size_t nl = raw.rfind('\n');
              if (nl != std::string::npos && is_space_or_tab(raw.substr(nl + 1))) raw.erase(nl + 1);
            }
            if (!raw.empty()) emit(Tok::Text, raw, line_);
            line_ += count_newlines(src_.substr(pos, t - pos));
            emit(Tok::BlockBegin, "", line_);
            strip_next = trim_next = false;
            pos = lex_inside(q, true, strip_next, trim_next);
            toks_.resize(toks_.size() - 3);  // drop the endraw tag tokens
            break;
          }
          search = t + 2;
        }
      }
      if (pos > src_.size()) break;
    }
    emit(Tok::Eof, "", line_);
    return std::move(toks_);
  }

 private:
  std::string src_;
  std::vector<Tok> toks_;
  int line_ = 1;

  static int count_newlines(const std::string& s) {
    int n = 0;
    for (char c : s) n += c == '\n';
    return n;
  }
  void emit(Tok::Kind k, std::string s, int line) {
    Tok t;
    t.k = k;
    t.s = std::move(s);
    t.line = line;
    toks_.push_back(std::move(t));
  }
  size_t find_tag(size_t pos) const {
    while (true) {
      size_t t = src_.find('{', pos);
      if (t == std::string::npos || t + 1 >= src_.size()) return std::string::npos;
      char c = src_[t + 1];
      if (c == '{' || c == '%' || c == '#') return t;
      pos = t + 1;
    }
  }

  // Lexes the inside of {% %} / {{ }} starting at p; returns the position after the end marker.
  size_t lex_inside(size_t p, bool block, bool& strip_next, bool& trim_next) {
    int depth = 0;
    const size_t n = src_.size();
    while (true) {
      while (p < n && is_ws(src_[p])) {
        if (src_[p] == '\n') ++line_;
        ++p;
      }
      if (p >= n) fail("chat template line {}: unclosed {}", line_, block ? "{% ... %}" : "{{ ... }}");
      const char* end2 = block ? "%}" : "}}";
      if (depth == 0) {
        if ((src_[p] == '-' || src_[p] == '+') && src_.compare(p + 1, 2, end2) == 0) {
          if (src_[p] == '-') strip_next = true;
          emit(block ? Tok::BlockEnd : Tok::VarEnd, "", line_);
          return p + 3;
        }
        if (src_.compare(p, 2, end2) == 0) {
          if (block) trim_next = true;
          emit(block ? Tok::BlockEnd : Tok::VarEnd, "", line_);
          return p + 2;
        }
      }
      char c = src_[p];
      if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
        size_t q = p;
        while (q < n && (std::isalnum(static_cast<unsigned char>(src_[q])) || src_[q] == '_')) ++q;
        emit(Tok::Name, src_.substr(p, q - p), line_);
        p = q;
      } else if (std::isdigit(static_cast<unsigned char>(c))) {
        size_t q = p;
        bool is_float = false;
        while (q < n && (std::isdigit(static_cast<unsigned char>(src_[q])) || src_[q] == '_')) ++q;
        if (q + 1 < n && src_[q] == '.' && std::isdigit(static_cast<unsigned char>(src_[q + 1]))) {
          is_float = true;
          ++q;
          while (q < n && (std::isdigit(static_cast<unsigned char>(src_[q])) || src_[q] == '_')) ++q;
        }
        if (q < n && (src_[q] == 'e' || src_[q] == 'E')) {
          size_t r = q + 1;
          if (r < n && (src_[r] == '+' || src_[r] == '-')) ++r;
          if (r < n && std::isdigit(static_cast<unsigned char>(src_[r]))) {
            is_float = true;
            q = r;
            while (q < n && std::isdigit(static_cast<unsigned char>(src_[q]))) ++q;
          }
        }
        std::string num;
        for (size_t k = p; k < q; ++k)
          if (src_[k] != '_') num += src_[k];
        Tok t;
        t.k = is_float ? Tok::Float : Tok::Int;
        t.line = line_;
        t.s = num;
        if (is_float) t.f = std::stod(num);
        else t.i = std::stoll(num);
        toks_.push_back(t);
        p = q;
      } else if (c == '\'' || c == '"') {
        std::string s;
        size_t q = p + 1;
        int start_line = line_;
        while (q < n && src_[q] != c) {
          if (src_[q] == '\\' && q + 1 < n) {
            char e = src_[++q];
            switch (e) {
              case 'n': s += '\n'; break;
              case 't': s += '\t'; break;
              case 'r': s += '\r'; break;
              case '0': s += '\0'; break;
              case 'b': s += '\b'; break;
              case 'f': s += '\f'; break;
              case 'v': s += '\v'; break;
              case '\\': s += '\\'; break;
              case '\'': s += '\''; break;
              case '"': s += '"'; break;
              case '\n': ++line_; break;  // line continuation
              case 'x':
              case 'u':
              case 'U': {
                int len = e == 'x' ? 2 : e == 'u' ? 4 : 8;
                if (q + len >= n) fail("chat template line {}: bad \\{} escape", line_, e);
                char32_t cp = static_cast<char32_t>(std::stoul(src_.substr(q + 1, len), nullptr, 16));
                utf8_append(s, cp);
                q += len;
                break;
              }
              default:
                s += '\\';
                s += e;
            }
            ++q;
            continue;
          }
          if (src_[q] == '\n') ++line_;
          s += src_[q++];
        }
        if (q >= n) fail("chat template line {}: unterminated string literal", start_line);
        emit(Tok::Str, s, start_line);
        p = q + 1;
      } else {
        static const char* kOps2[] = {"**", "//", "==", "!=", "<=", ">="};
        std::string op;
        for (const char* o : kOps2)
          if (src_.compare(p, 2, o) == 0) op = o;
        if (op.empty()) {
          if (!std::strchr("+-*/%~|.,:()[]{}<>=", c))
            fail("chat template line {}: unexpected character {:?}", line_, std::string(1, c));
          op = std::string(1, c);
          if (c == '(' || c == '[' || c == '{') ++depth;
          if ((c == ')' || c == ']' || c == '}') && depth > 0) --depth;
        }
        emit(Tok::Op, op, line_);
        p += op.size();
      }
    }
  }
};

const char* const kFilters[] = {
    "tojson", "trim", "length", "count", "string", "upper", "lower", "capitalize", "title", "replace",
    "join", "default", "d", "first", "last", "list", "items", "selectattr", "rejectattr", "select",
    "reject", "map", "unique", "sort", "reverse", "int", "float", "abs", "round", "sum", "min", "max",
    "dictsort", "indent", "wordcount", "safe", "escape", "e", "attr"};
const char* const kTests[] = {"defined", "undefined", "none", "string", "number", "integer", "float",
                              "boolean", "mapping", "sequence", "iterable", "callable", "true", "false",
                              "even", "odd", "divisibleby", "eq", "equalto", "==", "ne", "!=", "lt",
                              "lessthan", "<", "le", "<=", "gt", "greaterthan", ">", "ge", ">=", "in",
                              "lower", "upper", "sameas"};

class Parser {
 public:
  explicit Parser(std::vector<Tok> toks) : t_(std::move(toks)) {}

  NodeList parse_all() {
    std::string end;
    NodeList body = parse_body({}, end);
    return body;
  }

 private:
  std::vector<Tok> t_;
  size_t p_ = 0;

  const Tok& cur() const { return t_[p_]; }
  const Tok& peek(size_t k = 1) const { return t_[std::min(p_ + k, t_.size() - 1)]; }
  bool is_op(const char* op) const { return cur().k == Tok::Op && cur().s == op; }
  bool is_name(const char* n) const { return cur().k == Tok::Name && cur().s == n; }
  [[noreturn]] void error(const std::string& what) const { fail("chat template line {}: {}", cur().line, what); }
  std::string describe(const Tok& t) const {
    switch (t.k) {
      case Tok::Eof: return "end of template";
      case Tok::BlockEnd: return "'%}'";
      case Tok::VarEnd: return "'}}'";
      case Tok::Text: return "text";
      default: return "'" + t.s + "'";
    }
  }
  void expect_op(const char* op) {
    if (!is_op(op)) error(fmt::format("expected '{}', found {}", op, describe(cur())));
    ++p_;
  }
  std::string expect_name() {
    if (cur().k != Tok::Name) error(fmt::format("expected a name, found {}", describe(cur())));
    return t_[p_++].s;
  }
  void expect_block_end() {
    if (cur().k != Tok::BlockEnd) error(fmt::format("expected '%}}', found {}", describe(cur())));
    ++p_;
  }

  // Parses nodes until a block tag whose name is in `ends`; `end` gets that name.
  NodeList parse_body(const std::vector<std::string>& ends, std::string& end) {
    NodeList out;
    while (true) {
      const Tok& tk = cur();
      if (tk.k == Tok::Eof) {
        if (!ends.empty()) {
          std::string list;
          for (const auto& e : ends) list += (list.empty() ? "" : " or ") + ("{% " + e + " %}");
          error("unexpected end of template, expected " + list);
        }
        return out;
      }
      if (tk.k == Tok::Text) {
        auto n = std::make_shared<Node>();
        n->kind = Node::Kind::Text;
        n->line = tk.line;
        n->text = tk.s;
        out.push_back(n);
        ++p_;
        continue;
      }
      if (tk.k == Tok::VarBegin) {
        ++p_;
        auto n = std::make_shared<Node>();
        n->kind = Node::Kind::Output;
        n->line = tk.line;
        n->expr = parse_tuple_or_expr();
        if (cur().k != Tok::VarEnd) error(fmt::format("expected '}}}}', found {}", describe(cur())));
        ++p_;
        out.push_back(n);
        continue;
      }
      if (tk.k != Tok::BlockBegin) error("unexpected token " + describe(tk));
      ++p_;
      if (cur().k != Tok::Name) error("expected a statement name after '{%'");
      std::string kw = cur().s;
      for (const auto& e : ends)
        if (kw == e) {
          end = kw;
          ++p_;
          return out;
        }
      out.push_back(parse_statement());
    }
  }

  NodePtr parse_statement() {
    int line = cur().line;
    std::string kw = t_[p_++].s;
    auto n = std::make_shared<Node>();
    n->line = line;
    if (kw == "if") {
      n->kind = Node::Kind::If;
      ExprPtr cond = parse_expression();
      expect_block_end();
      while (true) {
        std::string end;
        NodeList body = parse_body({"elif", "else", "endif"}, end);
        n->branches.emplace_back(cond, std::move(body));
        if (end == "endif") {
          expect_block_end();
          break;
        }
        if (end == "else") {
          expect_block_end();
          std::string e2;
          NodeList eb = parse_body({"endif"}, e2);
          expect_block_end();
          n->branches.emplace_back(nullptr, std::move(eb));
          break;
        }
        cond = parse_expression();
        expect_block_end();
      }
    } else if (kw == "for") {
      n->kind = Node::Kind::For;
      bool paren = is_op("(");
      if (paren) ++p_;
      n->targets.push_back(expect_name());
      while (is_op(",")) {
        ++p_;
        n->targets.push_back(expect_name());
      }
      if (paren) expect_op(")");
      if (!is_name("in")) error("expected 'in' in for loop");
      ++p_;
      n->expr = parse_tuple_or_expr(/*allow_cond=*/false);
      if (is_name("if")) {
        ++p_;
        n->cond = parse_expression();
      }
      if (is_name("recursive")) error("unsupported construct: recursive for loop");
      expect_block_end();
      std::string end;
      n->body = parse_body({"else", "endfor"}, end);
      expect_block_end();
      if (end == "else") {
        n->else_body = parse_body({"endfor"}, end);
        expect_block_end();
      }
    } else if (kw == "set") {
      std::string first = expect_name();
      if (is_op(".")) {
        ++p_;
        n->kind = Node::Kind::Set;
        n->targets.push_back(first);
        n->attr = expect_name();
        expect_op("=");
        n->expr = parse_tuple_or_expr();
        expect_block_end();
      } else {
        n->targets.push_back(first);
        while (is_op(",")) {
          ++p_;
          n->targets.push_back(expect_name());
        }
        if (is_op("=")) {
          ++p_;
          n->kind = Node::Kind::Set;
          n->expr = parse_tuple_or_expr();
          expect_block_end();
        } else {
          if (is_op("|")) error("unsupported construct: filtered block set");
          n->kind = Node::Kind::SetBlock;
          expect_block_end();
          std::string end;
          n->body = parse_body({"endset"}, end);
          expect_block_end();
        }
      }
    } else if (kw == "macro") {
      n->kind = Node::Kind::Macro;
      n->name = expect_name();
      expect_op("(");
      while (!is_op(")")) {
        n->params.push_back(expect_name());
        if (is_op("=")) {
          ++p_;
          n->defaults.push_back(parse_expression());
        } else {
          n->defaults.push_back(nullptr);
        }
        if (!is_op(")")) expect_op(",");
      }
      ++p_;
      expect_block_end();
      std::string end;
      n->body = parse_body({"endmacro"}, end);
      if (cur().k == Tok::Name) ++p_;  // {% endmacro name %}
      expect_block_end();
    } else if (kw == "break" || kw == "continue") {
      n->kind = kw == "break" ? Node::Kind::Break : Node::Kind::Continue;
      expect_block_end();
    } else if (kw == "generation") {
      n->kind = Node::Kind::Scope;
      expect_block_end();
      std::string end;
      n->body = parse_body({"endgeneration"}, end);
      expect_block_end();
    } else {
      fail("chat template line {}: unsupported construct {{% {} %}}", line, kw);
    }
    return n;
  }

  ExprPtr make(Expr::Kind k, int line) {
    auto e = std::make_shared<Expr>();
    e->kind = k;
    e->line = line;
    return e;
  }

  // expr [, expr ...] → a tuple when there is a comma.
  ExprPtr parse_tuple_or_expr(bool allow_cond = true) {
    int line = cur().line;
    ExprPtr first = allow_cond ? parse_expression() : parse_or();
    if (!is_op(",")) return first;
    auto t = make(Expr::Kind::Tuple, line);
    t->items.push_back(first);
    while (is_op(",")) {
      ++p_;
      if (cur().k == Tok::BlockEnd || cur().k == Tok::VarEnd || is_name("if")) break;
      t->items.push_back(allow_cond ? parse_expression() : parse_or());
    }
    return t;
  }

  ExprPtr parse_expression() {
    ExprPtr e = parse_or();
    if (is_name("if")) {
      int line = cur().line;
      ++p_;
      auto c = make(Expr::Kind::Cond, line);
      c->a = e;
      c->b = parse_or();
      if (is_name("else")) {
        ++p_;
        c->c = parse_expression();
      }
      return c;
    }
    return e;
  }

  ExprPtr binary(Expr::Kind k, ExprPtr a, ExprPtr b, int line, std::string op = {}) {
    auto e = make(k, line);
    e->a = std::move(a);
    e->b = std::move(b);
    e->name = std::move(op);
    return e;
  }

  ExprPtr parse_or() {
    ExprPtr e = parse_and();
    while (is_name("or")) {
      int line = cur().line;
      ++p_;
      e = binary(Expr::Kind::Or, e, parse_and(), line);
    }
    return e;
  }
  ExprPtr parse_and() {
    ExprPtr e = parse_not();
    while (is_name("and")) {
      int line = cur().line;
      ++p_;
      e = binary(Expr::Kind::And, e, parse_not(), line);
    }
    return e;
  }
  ExprPtr parse_not() {
    if (is_name("not")) {
      int line = cur().line;
      ++p_;
      auto e = make(Expr::Kind::Not, line);
      e->a = parse_not();
      return e;
    }
    return parse_compare();
  }
  ExprPtr parse_compare() {
    int line = cur().line;
    ExprPtr first = parse_math1();
    ExprPtr cmp;
    while (true) {
      std::string op;
      if (cur().k == Tok::Op && (cur().s == "==" || cur().s == "!=" || cur().s == "<" || cur().s == ">" ||
                                 cur().s == "<=" || cur().s == ">=")) {
        op = cur().s;
        ++p_;
      } else if (is_name("in")) {
        op = "in";
        ++p_;
      } else if (is_name("not") && peek().k == Tok::Name && peek().s == "in") {
        op = "not in";
        p_ += 2;
      } else {
        break;
      }
      if (!cmp) {
        cmp = make(Expr::Kind::Compare, line);
        cmp->items.push_back(first);
      }
      cmp->ops.push_back(op);
      cmp->items.push_back(parse_math1());
    }
    return cmp ? cmp : first;
  }
  ExprPtr parse_math1() {
    ExprPtr e = parse_concat();
    while (is_op("+") || is_op("-")) {
      int line = cur().line;
      std::string op = t_[p_++].s;
      e = binary(Expr::Kind::Binary, e, parse_concat(), line, op);
    }
    return e;
  }
  ExprPtr parse_concat() {
    ExprPtr e = parse_math2();
    while (is_op("~")) {
      int line = cur().line;
      ++p_;
      e = binary(Expr::Kind::Binary, e, parse_math2(), line, "~");
    }
    return e;
  }
  ExprPtr parse_math2() {
    ExprPtr e = parse_pow();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      int line = cur().line;
      std::string op = t_[p_++].s;
      e = binary(Expr::Kind::Binary, e, parse_pow(), line, op);
    }
    return e;
  }
  ExprPtr parse_pow() {
    ExprPtr e = parse_unary(true);
    while (is_op("**")) {
      int line = cur().line;
      ++p_;
      e = binary(Expr::Kind::Binary, e, parse_unary(true), line, "**");
    }
    return e;
  }
  ExprPtr parse_unary(bool with_filter) {
    int line = cur().line;
    ExprPtr e;
    if (is_op("-") || is_op("+")) {
      bool neg = cur().s == "-";
      ++p_;
      e = make(neg ? Expr::Kind::Neg : Expr::Kind::Pos, line);
      e->a = parse_unary(false);
    } else {
      e = parse_primary();
    }
    e = parse_postfix(e);
    if (with_filter) e = parse_filter_expr(e);
    return e;
  }

  ExprPtr parse_primary() {
    const Tok& tk = cur();
    int line = tk.line;
    if (tk.k == Tok::Name) {
      ++p_;
      auto lit = [&](Value v) {
        auto e = make(Expr::Kind::Literal, line);
        e->value = std::move(v);
        return e;
      };
      if (tk.s == "true" || tk.s == "True") return lit(Value::boolean(true));
      if (tk.s == "false" || tk.s == "False") return lit(Value::boolean(false));
      if (tk.s == "none" || tk.s == "None") return lit(Value::none());
      auto e = make(Expr::Kind::Name, line);
      e->name = tk.s;
      return e;
    }
    if (tk.k == Tok::Str) {
      std::string s;
      while (cur().k == Tok::Str) s += t_[p_++].s;  // adjacent literals concatenate
      auto e = make(Expr::Kind::Literal, line);
      e->value = Value::string(std::move(s));
      return e;
    }
    if (tk.k == Tok::Int || tk.k == Tok::Float) {
      ++p_;
      auto e = make(Expr::Kind::Literal, line);
      e->value = tk.k == Tok::Int ? Value::integer(tk.i) : Value::number(tk.f);
      return e;
    }
    if (is_op("(")) {
      ++p_;
      if (is_op(")")) {
        ++p_;
        return make(Expr::Kind::Tuple, line);
      }
      ExprPtr first = parse_expression();
      if (is_op(")")) {
        ++p_;
        return first;
      }
      auto t = make(Expr::Kind::Tuple, line);
      t->items.push_back(first);
      while (is_op(",")) {
        ++p_;
        if (is_op(")")) break;
        t->items.push_back(parse_expression());
      }
      expect_op(")");
      return t;
    }
    if (is_op("[")) {
      ++p_;
      auto l = make(Expr::Kind::List, line);
      while (!is_op("]")) {
        l->items.push_back(parse_expression());
        if (!is_op("]")) expect_op(",");
      }
      ++p_;
      return l;
    }
    if (is_op("{")) {
      ++p_;
      auto d = make(Expr::Kind::Dict, line);
      while (!is_op("}")) {
        d->items.push_back(parse_expression());
        expect_op(":");
        d->items.push_back(parse_expression());
        if (!is_op("}")) expect_op(",");
      }
      ++p_;
      return d;
    }
    error("unexpected " + describe(tk));
  }

  void parse_call_args(Expr& e) {
    expect_op("(");
    while (!is_op(")")) {
      if (is_op("*") || is_op("**")) error("unsupported construct: *args / **kwargs in a call");
      if (cur().k == Tok::Name && peek().k == Tok::Op && peek().s == "=") {
        std::string k = t_[p_].s;
        p_ += 2;
        e.kwargs.emplace_back(k, parse_expression());
      } else {
        e.items.push_back(parse_expression());
      }
      if (!is_op(")")) expect_op(",");
    }
    ++p_;
  }

  ExprPtr parse_postfix(ExprPtr e) {
    while (true) {
      int line = cur().line;
      if (is_op(".")) {
        ++p_;
        if (cur().k == Tok::Int) {  // x.0 is x[0]
          auto g = make(Expr::Kind::GetItem, line);
          g->a = e;
          auto idx = make(Expr::Kind::Literal, line);
          idx->value = Value::integer(t_[p_++].i);
          g->b = idx;
          e = g;
          continue;
        }
        auto g = make(Expr::Kind::GetAttr, line);
        g->a = e;
        g->name = expect_name();
        e = g;
      } else if (is_op("[")) {
        ++p_;
        ExprPtr parts[3];
        int n = 0;
        bool slice = false;
        while (true) {
          if (is_op(":")) {
            slice = true;
            ++p_;
            ++n;
            if (n > 2) error("bad slice");
            continue;
          }
          if (is_op("]")) break;
          parts[n] = parse_expression();
          if (!is_op(":") && !is_op("]")) {
            if (is_op(",")) error("unsupported construct: tuple subscript");
            expect_op("]");
          }
        }
        ++p_;
        if (slice) {
          auto s = make(Expr::Kind::Slice, line);
          s->a = e;
          s->items = {parts[0], parts[1], parts[2]};
          e = s;
        } else {
          if (!parts[0]) error("empty subscript");
          auto g = make(Expr::Kind::GetItem, line);
          g->a = e;
          g->b = parts[0];
          e = g;
        }
      } else if (is_op("(")) {
        auto c = make(Expr::Kind::Call, line);
        c->a = e;
        parse_call_args(*c);
        e = c;
      } else {
        return e;
      }
    }
  }

  ExprPtr parse_filter_expr(ExprPtr e) {
    while (true) {
      int line = cur().line;
      if (is_op("|")) {
        ++p_;
        auto f = make(Expr::Kind::Filter, line);
        f->a = e;
        f->name = expect_name();
        if (!is_known_filter(f->name))
          fail("chat template line {}: unsupported construct: filter '{}'", line, f->name);
        if (is_op("(")) parse_call_args(*f);
        e = f;
      } else if (is_name("is")) {
        ++p_;
        auto t = make(Expr::Kind::Test, line);
        t->a = e;
        if (is_name("not")) {
          t->negated = true;
          ++p_;
        }
        if (cur().k == Tok::Name) {
          t->name = t_[p_++].s;
        } else if (cur().k == Tok::Op && (cur().s == "==" || cur().s == "!=" || cur().s == "<" ||
                                          cur().s == ">" || cur().s == "<=" || cur().s == ">=")) {
          t->name = t_[p_++].s;
        } else {
          error("expected a test name after 'is'");
        }
        if (!is_known_test(t->name)) fail("chat template line {}: unsupported construct: test '{}'", line, t->name);
        if (is_op("(")) {
          parse_call_args(*t);
        } else if ((cur().k == Tok::Str || cur().k == Tok::Int || cur().k == Tok::Float ||
                    (cur().k == Tok::Name && cur().s != "else" && cur().s != "or" && cur().s != "and" &&
                     cur().s != "if" && cur().s != "is" && cur().s != "in" && cur().s != "not")) ||
                   is_op("[") || is_op("{")) {
          t->items.push_back(parse_primary());
        }
        e = t;
      } else if (is_op("(")) {
        auto c = make(Expr::Kind::Call, line);
        c->a = e;
        parse_call_args(*c);
        e = c;
      } else {
        return e;
      }
    }
  }
};

}  // namespace

bool is_known_filter(const std::string& name) {
  for (const char* f : kFilters)
    if (name == f) return true;
  return false;
}

bool is_known_test(const std::string& name) {
  for (const char* t : kTests)
    if (name == t) return true;
  return false;
}

NodeList parse_template(const std::string& source) {
  Lexer lx(source);
  Parser ps(lx.run());
  return ps.parse_all();
}

}  // namespace zmlx::text::tmpl
