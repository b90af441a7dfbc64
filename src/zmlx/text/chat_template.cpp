// Renders a parsed chat template with Jinja's semantics as Hugging Face
// configures it (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks,
// loopcontrols, tojson with ensure_ascii=False, raise_exception, strftime_now).
#include "zmlx/text/chat_template.h"

#include <algorithm>
#include <cmath>
#include <ctime>
#include <unordered_map>

#include "zmlx/core/error.h"
#include "zmlx/text/template_ast.h"
#include "zmlx/text/template_methods.h"
#include "zmlx/text/tokenizer.h"
#include "zmlx/text/unicode.h"

namespace zmlx::text {

using namespace tmpl;

namespace {

const std::string kLinePrefix = "chat template line ";

[[noreturn]] void fail_at(int line, const std::string& msg) {
  if (msg.rfind(kLinePrefix, 0) == 0) throw Error(msg);
  throw Error(kLinePrefix + std::to_string(line) + ": " + msg);
}

struct Scope {
  std::unordered_map<std::string, Value> vars;
  const Scope* parent = nullptr;
  const Value* find(const std::string& name) const {
    for (const Scope* s = this; s; s = s->parent) {
      auto it = s->vars.find(name);
      if (it != s->vars.end()) return &it->second;
    }
    return nullptr;
  }
};

enum class Flow { Normal, Break, Continue };

ValueList iterate(const Value& v) {
  switch (v.type) {
    case Value::Type::Undefined: return {};
    case Value::Type::List: return *v.list;
    case Value::Type::Dict: {
      ValueList keys;
      for (const auto& kv : v.dict->items) keys.push_back(Value::string(kv.first));
      return keys;
    }
    case Value::Type::String: {
      ValueList chars;
      for (size_t i = 0; i < v.s.size();) {
        size_t st = i;
        utf8_next(v.s, i);
        chars.push_back(Value::string(v.s.substr(st, i - st)));
      }
      return chars;
    }
    default: fail("'{}' object is not iterable", type_name(v));
  }
}

Value arg_or(const ValueList& args, const KwArgs& kw, size_t pos, const char* name, Value dflt) {
  if (pos < args.size()) return args[pos];
  if (const Value* v = kw.find(name)) return *v;
  return dflt;
}

Value make_tuple(ValueList items) {
  Value t = Value::make_list(std::move(items));
  t.is_tuple = true;
  return t;
}

class Renderer {
 public:
  explicit Renderer(const Scope& globals) : globals_(globals) {}

  Flow exec(const NodeList& nodes, Scope& scope, std::string& out) {
    for (const auto& n : nodes) {
      Flow f;
      try {
        f = exec_node(*n, scope, out);
      } catch (const Error& e) {
        fail_at(n->line, e.what());
      }
      if (f != Flow::Normal) return f;
    }
    return Flow::Normal;
  }

  Value eval(const Expr& e, const Scope& scope);

 private:
  const Scope& globals_;
  int loop_depth_ = 0;

  Flow exec_node(const Node& n, Scope& scope, std::string& out);
  Value call(const Expr& e, const Scope& scope);
  Value apply_filter(const std::string& name, const Value& in, const ValueList& args, const KwArgs& kw,
                     int line);
  bool apply_test(const std::string& name, const Value& in, const ValueList& args);
  Value get_attr(const Value& obj, const std::string& name, int line);
  Value get_item(const Value& obj, const Value& key);
  Value binary(const std::string& op, const Value& a, const Value& b);
  Value make_macro(const Node& n);
};

Flow Renderer::exec_node(const Node& n, Scope& scope, std::string& out) {
  switch (n.kind) {
    case Node::Kind::Text: out += n.text; return Flow::Normal;
    case Node::Kind::Output: out += py_str(eval(*n.expr, scope)); return Flow::Normal;
    case Node::Kind::If:
      for (const auto& [cond, body] : n.branches)
        if (!cond || eval(*cond, scope).truthy()) return exec(body, scope, out);
      return Flow::Normal;
    case Node::Kind::For: {
      ValueList items = iterate(eval(*n.expr, scope));
      if (n.cond) {  // the filter sees each item bound to the targets
        ValueList kept;
        for (const auto& it : items) {
          Scope s;
          s.parent = &scope;
          if (n.targets.size() == 1) {
            s.vars[n.targets[0]] = it;
          } else {
            ValueList parts = iterate(it);
            for (size_t k = 0; k < n.targets.size() && k < parts.size(); ++k) s.vars[n.targets[k]] = parts[k];
          }
          if (eval(*n.cond, s).truthy()) kept.push_back(it);
        }
        items = std::move(kept);
      }
      if (items.empty()) {
        Scope s;
        s.parent = &scope;
        return exec(n.else_body, s, out) == Flow::Normal ? Flow::Normal : Flow::Normal;
      }
      const int64_t len = static_cast<int64_t>(items.size());
      ++loop_depth_;
      for (int64_t k = 0; k < len; ++k) {
        Scope s;
        s.parent = &scope;
        const Value& it = items[k];
        if (n.targets.size() == 1) {
          s.vars[n.targets[0]] = it;
        } else {
          ValueList parts = iterate(it);
          if (parts.size() != n.targets.size())
            fail("cannot unpack {} values into {} loop variables", parts.size(), n.targets.size());
          for (size_t t = 0; t < parts.size(); ++t) s.vars[n.targets[t]] = parts[t];
        }
        Value loop = Value::make_dict();
        auto& d = *loop.dict;
        d.set("index", Value::integer(k + 1));
        d.set("index0", Value::integer(k));
        d.set("revindex", Value::integer(len - k));
        d.set("revindex0", Value::integer(len - k - 1));
        d.set("first", Value::boolean(k == 0));
        d.set("last", Value::boolean(k == len - 1));
        d.set("length", Value::integer(len));
        d.set("depth", Value::integer(1));
        d.set("depth0", Value::integer(0));
        d.set("previtem", k > 0 ? items[k - 1] : Value::undefined("previtem"));
        d.set("nextitem", k + 1 < len ? items[k + 1] : Value::undefined("nextitem"));
        d.set("cycle", Value::callable([k](const ValueList& args, const KwArgs&) {
          if (args.empty()) fail("loop.cycle() needs at least one argument");
          return args[static_cast<size_t>(k) % args.size()];
        }));
        s.vars["loop"] = loop;
        Flow f = exec(n.body, s, out);
        if (f == Flow::Break) break;
      }
      --loop_depth_;
      return Flow::Normal;
    }
    case Node::Kind::Set: {
      Value v = eval(*n.expr, scope);
      if (!n.attr.empty()) {
        const Value* ns = scope.find(n.targets[0]);
        if (!ns || !ns->is_dict() || !ns->is_namespace)
          fail("cannot assign attribute '{}' on '{}': not a namespace() object", n.attr, n.targets[0]);
        ns->dict->set(n.attr, std::move(v));  // namespaces are shared and mutable
        return Flow::Normal;
      }
      if (n.targets.size() == 1) {
        scope.vars[n.targets[0]] = std::move(v);
      } else {
        ValueList parts = iterate(v);
        if (parts.size() != n.targets.size())
          fail("cannot unpack {} values into {} names", parts.size(), n.targets.size());
        for (size_t t = 0; t < parts.size(); ++t) scope.vars[n.targets[t]] = parts[t];
      }
      return Flow::Normal;
    }
    case Node::Kind::SetBlock: {
      std::string captured;
      Scope s;
      s.parent = &scope;
      exec(n.body, s, captured);
      scope.vars[n.targets[0]] = Value::string(std::move(captured));
      return Flow::Normal;
    }
    case Node::Kind::Macro: scope.vars[n.name] = make_macro(n); return Flow::Normal;
    case Node::Kind::Break:
    case Node::Kind::Continue:
      if (loop_depth_ == 0) fail("'{}' outside of a loop", n.kind == Node::Kind::Break ? "break" : "continue");
      return n.kind == Node::Kind::Break ? Flow::Break : Flow::Continue;
    case Node::Kind::Scope: return exec(n.body, scope, out);
  }
  return Flow::Normal;
}

Value Renderer::make_macro(const Node& n) {
  const Node* node = &n;
  return Value::callable([this, node](const ValueList& args, const KwArgs& kw) {
    Scope s;
    s.parent = &globals_;
    if (args.size() > node->params.size())
      fail("macro '{}' takes {} arguments, {} given", node->name, node->params.size(), args.size());
    for (size_t k = 0; k < node->params.size(); ++k) {
      const std::string& p = node->params[k];
      if (k < args.size()) s.vars[p] = args[k];
      else if (const Value* v = kw.find(p)) s.vars[p] = *v;
      else if (node->defaults[k]) s.vars[p] = eval(*node->defaults[k], s);
      else s.vars[p] = Value::undefined(p);
    }
    for (const auto& [k, v] : kw.items)
      if (std::find(node->params.begin(), node->params.end(), k) == node->params.end())
        fail("macro '{}' got an unexpected keyword argument '{}'", node->name, k);
    std::string out;
    int saved = loop_depth_;
    loop_depth_ = 0;
    exec(node->body, s, out);
    loop_depth_ = saved;
    return Value::string(std::move(out));
  });
}

Value Renderer::get_attr(const Value& obj, const std::string& name, int line) {
  if (obj.is_undefined())
    fail("'{}' is undefined (reading attribute '{}')", obj.s.empty() ? "value" : obj.s, name);
  if (obj.is_dict() && !obj.is_namespace && !is_dict_method(name)) {
    const Value* v = obj.dict->find(name);
    return v ? *v : Value::undefined(name);
  }
  if (obj.is_dict() && obj.is_namespace) {
    const Value* v = obj.dict->find(name);
    return v ? *v : Value::undefined(name);
  }
  if (has_method(obj, name)) {
    Value self = obj;
    std::string nm = name;
    return Value::callable(
        [self, nm](const ValueList& args, const KwArgs& kw) { return call_method(self, nm, args, kw); });
  }
  return Value::undefined(name);
}

Value Renderer::get_item(const Value& obj, const Value& key) {
  if (obj.is_undefined()) fail("'{}' is undefined (subscripted)", obj.s.empty() ? "value" : obj.s);
  if (obj.is_dict()) {
    if (!key.is_string()) return Value::undefined();
    const Value* v = obj.dict->find(key.s);
    return v ? *v : Value::undefined(key.s);
  }
  if (obj.is_list() || obj.is_string()) {
    if (key.is_string()) return get_attr(obj, key.s, 0);
    if (key.type != Value::Type::Int && key.type != Value::Type::Bool) return Value::undefined();
    int64_t i = key.as_int();
    if (obj.is_list()) {
      int64_t n = static_cast<int64_t>(obj.list->size());
      if (i < 0) i += n;
      if (i < 0 || i >= n) return Value::undefined();
      return (*obj.list)[i];
    }
    auto cps = utf8_to_codepoints(obj.s);
    int64_t n = static_cast<int64_t>(cps.size());
    if (i < 0) i += n;
    if (i < 0 || i >= n) return Value::undefined();
    std::string s;
    utf8_append(s, cps[i]);
    return Value::string(s);
  }
  return Value::undefined();
}

Value Renderer::binary(const std::string& op, const Value& a, const Value& b) {
  if (op == "~") return Value::string(py_str(a) + py_str(b));
  auto bad = [&]() -> Value {
    fail("unsupported operand type(s) for {}: '{}' and '{}'", op, type_name(a), type_name(b));
  };
  bool nums = a.is_number() && b.is_number();
  bool flt = nums && (a.type == Value::Type::Float || b.type == Value::Type::Float);
  if (op == "+") {
    if (nums) return flt ? Value::number(a.as_double() + b.as_double()) : Value::integer(a.as_int() + b.as_int());
    if (a.is_string() && b.is_string()) return Value::string(a.s + b.s);
    if (a.is_list() && b.is_list()) {
      ValueList l = *a.list;
      l.insert(l.end(), b.list->begin(), b.list->end());
      return Value::make_list(std::move(l));
    }
    return bad();
  }
  if (op == "-") {
    if (!nums) return bad();
    return flt ? Value::number(a.as_double() - b.as_double()) : Value::integer(a.as_int() - b.as_int());
  }
  if (op == "*") {
    if (nums) return flt ? Value::number(a.as_double() * b.as_double()) : Value::integer(a.as_int() * b.as_int());
    const Value* seq = a.is_string() || a.is_list() ? &a : (b.is_string() || b.is_list()) ? &b : nullptr;
    const Value* cnt = seq == &a ? &b : &a;
    if (!seq || (cnt->type != Value::Type::Int && cnt->type != Value::Type::Bool)) return bad();
    int64_t times = std::max<int64_t>(0, cnt->as_int());
    if (seq->is_string()) {
      std::string s;
      for (int64_t k = 0; k < times; ++k) s += seq->s;
      return Value::string(s);
    }
    ValueList l;
    for (int64_t k = 0; k < times; ++k) l.insert(l.end(), seq->list->begin(), seq->list->end());
    return Value::make_list(std::move(l));
  }
  if (!nums) {
    if (op == "%" && a.is_string()) fail("string formatting with '%' is not supported");
    return bad();
  }
  if (op == "/") {
    if (b.as_double() == 0) fail("division by zero");
    return Value::number(a.as_double() / b.as_double());
  }
  if (op == "//" || op == "%") {
    if (b.as_double() == 0) fail("integer division or modulo by zero");
    if (flt) {
      double x = a.as_double(), y = b.as_double();
      double q = std::floor(x / y);
      return op == "//" ? Value::number(q) : Value::number(x - q * y);
    }
    int64_t x = a.as_int(), y = b.as_int();
    int64_t q = x / y;
    if ((x % y != 0) && ((x < 0) != (y < 0))) --q;
    return op == "//" ? Value::integer(q) : Value::integer(x - q * y);
  }
  if (op == "**") {
    if (!flt && b.as_int() >= 0) {
      int64_t r = 1;
      for (int64_t k = 0; k < b.as_int(); ++k) r *= a.as_int();
      return Value::integer(r);
    }
    return Value::number(std::pow(a.as_double(), b.as_double()));
  }
  return bad();
}

bool contains(const Value& container, const Value& item) {
  if (container.is_string()) {
    if (!item.is_string()) fail("'in <string>' requires string as left operand, not {}", type_name(item));
    return container.s.find(item.s) != std::string::npos;
  }
  if (container.is_list()) {
    for (const auto& v : *container.list)
      if (py_equal(v, item)) return true;
    return false;
  }
  if (container.is_dict()) return item.is_string() && container.dict->find(item.s) != nullptr;
  if (container.is_undefined()) return false;
  fail("argument of type '{}' is not iterable", type_name(container));
}

Value Renderer::eval(const Expr& e, const Scope& scope) {
  switch (e.kind) {
    case Expr::Kind::Literal: return e.value;
    case Expr::Kind::Name: {
      const Value* v = scope.find(e.name);
      return v ? *v : Value::undefined(e.name);
    }
    case Expr::Kind::List:
    case Expr::Kind::Tuple: {
      ValueList l;
      for (const auto& it : e.items) l.push_back(eval(*it, scope));
      return e.kind == Expr::Kind::Tuple ? make_tuple(std::move(l)) : Value::make_list(std::move(l));
    }
    case Expr::Kind::Dict: {
      Value d = Value::make_dict();
      for (size_t k = 0; k + 1 < e.items.size(); k += 2) {
        Value key = eval(*e.items[k], scope);
        if (!key.is_string()) fail("dict literal keys must be strings here, got {}", type_name(key));
        d.dict->set(key.s, eval(*e.items[k + 1], scope));
      }
      return d;
    }
    case Expr::Kind::GetAttr: return get_attr(eval(*e.a, scope), e.name, e.line);
    case Expr::Kind::GetItem: return get_item(eval(*e.a, scope), eval(*e.b, scope));
    case Expr::Kind::Slice: {
      Value obj = eval(*e.a, scope);
      std::optional<int64_t> idx[3];
      for (int k = 0; k < 3; ++k)
        if (e.items[k]) {
          Value v = eval(*e.items[k], scope);
          if (!v.is_none()) idx[k] = v.as_int();
        }
      return slice(obj, idx[0], idx[1], idx[2]);
    }
    case Expr::Kind::Call: return call(e, scope);
    case Expr::Kind::Filter: {
      Value in = eval(*e.a, scope);
      ValueList args;
      KwArgs kw;
      for (const auto& a : e.items) args.push_back(eval(*a, scope));
      for (const auto& [k, v] : e.kwargs) kw.items.emplace_back(k, eval(*v, scope));
      return apply_filter(e.name, in, args, kw, e.line);
    }
    case Expr::Kind::Test: {
      Value in = eval(*e.a, scope);
      ValueList args;
      for (const auto& a : e.items) args.push_back(eval(*a, scope));
      bool r = apply_test(e.name, in, args);
      return Value::boolean(e.negated ? !r : r);
    }
    case Expr::Kind::Not: return Value::boolean(!eval(*e.a, scope).truthy());
    case Expr::Kind::Neg:
    case Expr::Kind::Pos: {
      Value v = eval(*e.a, scope);
      if (!v.is_number()) fail("bad operand type for unary {}: '{}'", e.kind == Expr::Kind::Neg ? "-" : "+",
                               type_name(v));
      if (e.kind == Expr::Kind::Pos) return v.type == Value::Type::Bool ? Value::integer(v.as_int()) : v;
      return v.type == Value::Type::Float ? Value::number(-v.f) : Value::integer(-v.as_int());
    }
    case Expr::Kind::Binary: return binary(e.name, eval(*e.a, scope), eval(*e.b, scope));
    case Expr::Kind::And: {
      Value a = eval(*e.a, scope);
      return a.truthy() ? eval(*e.b, scope) : a;
    }
    case Expr::Kind::Or: {
      Value a = eval(*e.a, scope);
      return a.truthy() ? a : eval(*e.b, scope);
    }
    case Expr::Kind::Compare: {
      Value left = eval(*e.items[0], scope);
      for (size_t k = 0; k < e.ops.size(); ++k) {
        Value right = eval(*e.items[k + 1], scope);
        const std::string& op = e.ops[k];
        bool r;
        if (op == "==") r = py_equal(left, right);
        else if (op == "!=") r = !py_equal(left, right);
        else if (op == "in") r = contains(right, left);
        else if (op == "not in") r = !contains(right, left);
        else {
          int c = py_compare(left, right);
          r = op == "<" ? c < 0 : op == "<=" ? c <= 0 : op == ">" ? c > 0 : c >= 0;
        }
        if (!r) return Value::boolean(false);
        left = std::move(right);
      }
      return Value::boolean(true);
    }
    case Expr::Kind::Cond: {
      if (eval(*e.b, scope).truthy()) return eval(*e.a, scope);
      return e.c ? eval(*e.c, scope) : Value::undefined();
    }
  }
  fail("unknown expression");
}

Value Renderer::call(const Expr& e, const Scope& scope) {
  ValueList args;
  KwArgs kw;
  for (const auto& a : e.items) args.push_back(eval(*a, scope));
  for (const auto& [k, v] : e.kwargs) kw.items.emplace_back(k, eval(*v, scope));
  Value callee = eval(*e.a, scope);
  if (callee.type != Value::Type::Callable) {
    std::string what = e.a->kind == Expr::Kind::Name ? "'" + e.a->name + "'"
                       : e.a->kind == Expr::Kind::GetAttr ? "method '" + e.a->name + "'"
                                                          : "value";
    if (callee.is_undefined()) fail("unsupported construct: {} is not defined / not callable", what);
    fail("{} ({}) is not callable", what, type_name(callee));
  }
  return (*callee.fn)(args, kw);
}

bool Renderer::apply_test(const std::string& name, const Value& v, const ValueList& args) {
  auto arg0 = [&]() -> const Value& {
    if (args.empty()) fail("test '{}' needs an argument", name);
    return args[0];
  };
  using T = Value::Type;
  if (name == "defined") return !v.is_undefined();
  if (name == "undefined") return v.is_undefined();
  if (name == "none") return v.is_none();
  if (name == "string") return v.is_string();
  if (name == "number") return v.is_number();
  if (name == "integer") return v.type == T::Int;
  if (name == "float") return v.type == T::Float;
  if (name == "boolean") return v.type == T::Bool;
  if (name == "true") return v.type == T::Bool && v.b;
  if (name == "false") return v.type == T::Bool && !v.b;
  if (name == "mapping") return v.is_dict();
  if (name == "sequence") return v.is_list() || v.is_string() || v.is_dict();
  if (name == "iterable") return v.is_list() || v.is_string() || v.is_dict() || v.is_undefined();
  if (name == "callable") return v.type == T::Callable;
  if (name == "even") return v.as_int() % 2 == 0;
  if (name == "odd") return v.as_int() % 2 != 0;
  if (name == "divisibleby") return arg0().as_int() != 0 && v.as_int() % arg0().as_int() == 0;
  if (name == "eq" || name == "equalto" || name == "==") return py_equal(v, arg0());
  if (name == "ne" || name == "!=") return !py_equal(v, arg0());
  if (name == "lt" || name == "lessthan" || name == "<") return py_compare(v, arg0()) < 0;
  if (name == "le" || name == "<=") return py_compare(v, arg0()) <= 0;
  if (name == "gt" || name == "greaterthan" || name == ">") return py_compare(v, arg0()) > 0;
  if (name == "ge" || name == ">=") return py_compare(v, arg0()) >= 0;
  if (name == "in") return contains(arg0(), v);
  if (name == "lower") return v.is_string() && call_method(v, "islower", {}, {}).truthy();
  if (name == "upper") return v.is_string() && call_method(v, "isupper", {}, {}).truthy();
  if (name == "sameas") {
    const Value& o = arg0();
    if (v.type != o.type) return false;
    if (v.is_list()) return v.list == o.list;
    if (v.is_dict()) return v.dict == o.dict;
    return py_equal(v, o);
  }
  fail("unsupported construct: test '{}'", name);
}

Value Renderer::apply_filter(const std::string& name, const Value& in, const ValueList& args, const KwArgs& kw,
                             int line) {
  auto arg = [&](size_t pos, const char* key, Value dflt) { return arg_or(args, kw, pos, key, dflt); };
  if (name == "tojson") {
    Value indent = arg(0, "indent", Value::none());
    Value sort = kw.find("sort_keys") ? *kw.find("sort_keys") : Value::boolean(false);
    std::string item_sep, key_sep;
    if (const Value* sep = kw.find("separators"); sep && sep->is_list() && sep->list->size() == 2) {
      item_sep = (*sep->list)[0].s;
      key_sep = (*sep->list)[1].s;
    }
    return Value::string(to_json(in, indent.is_none() ? -1 : static_cast<int>(indent.as_int()), sort.truthy(),
                                 item_sep, key_sep));
  }
  if (name == "safe") return in;
  if (name == "string") return in.is_string() ? in : Value::string(py_str(in));
  if (name == "trim") {
    ValueList a;
    if (!args.empty()) a.push_back(args[0]);
    return call_method(Value::string(py_str(in)), "strip", a, {});
  }
  if (name == "length" || name == "count") {
    if (in.is_string()) return Value::integer(static_cast<int64_t>(utf8_to_codepoints(in.s).size()));
    if (in.is_list()) return Value::integer(static_cast<int64_t>(in.list->size()));
    if (in.is_dict()) return Value::integer(static_cast<int64_t>(in.dict->items.size()));
    if (in.is_undefined()) return Value::integer(0);
    fail("object of type '{}' has no len()", type_name(in));
  }
  if (name == "upper" || name == "lower" || name == "capitalize" || name == "title")
    return call_method(Value::string(py_str(in)), name, {}, {});
  if (name == "replace") {
    ValueList a = {arg(0, "old", Value::string("")), arg(1, "new", Value::string(""))};
    Value cnt = arg(2, "count", Value::none());
    if (!cnt.is_none()) a.push_back(cnt);
    return call_method(Value::string(py_str(in)), "replace", a, {});
  }
  if (name == "default" || name == "d") {
    Value dflt = arg(0, "default_value", Value::string(""));
    bool boolean = arg(1, "boolean", Value::boolean(false)).truthy();
    if (in.is_undefined() || (boolean && !in.truthy())) return dflt;
    return in;
  }
  if (name == "join") {
    std::string sep = py_str(arg(0, "d", Value::string("")));
    Value attr = arg(1, "attribute", Value::none());
    std::string out;
    bool first = true;
    for (const auto& v : iterate(in)) {
      if (!first) out += sep;
      first = false;
      out += py_str(attr.is_none() ? v : get_attr(v, py_str(attr), line));
    }
    return Value::string(out);
  }
  if (name == "first" || name == "last") {
    ValueList items = iterate(in);
    if (items.empty()) return Value::undefined();
    return name == "first" ? items.front() : items.back();
  }
  if (name == "list") return Value::make_list(iterate(in));
  if (name == "items") {
    if (in.is_undefined()) return Value::make_list();
    if (!in.is_dict()) fail("items filter expects a mapping, got {}", type_name(in));
    ValueList l;
    for (const auto& [k, v] : in.dict->items) l.push_back(make_tuple({Value::string(k), v}));
    return Value::make_list(std::move(l));
  }
  if (name == "reverse") {
    if (in.is_string()) return slice(in, std::nullopt, std::nullopt, -1);
    ValueList l = iterate(in);
    std::reverse(l.begin(), l.end());
    return Value::make_list(std::move(l));
  }
  if (name == "selectattr" || name == "rejectattr" || name == "select" || name == "reject") {
    bool attr_mode = name == "selectattr" || name == "rejectattr";
    bool want = name == "selectattr" || name == "select";
    size_t k0 = attr_mode ? 1 : 0;
    std::string attr = attr_mode ? py_str(arg(0, "attribute", Value::string(""))) : "";
    ValueList out;
    for (const auto& v : iterate(in)) {
      Value x = attr_mode ? get_attr(v, attr, line) : v;
      bool r;
      if (args.size() <= k0) {
        r = x.truthy();
      } else {
        std::string test = py_str(args[k0]);
        if (!is_known_test(test)) fail("unsupported construct: test '{}'", test);
        r = apply_test(test, x, ValueList(args.begin() + k0 + 1, args.end()));
      }
      if (r == want) out.push_back(v);
    }
    return Value::make_list(std::move(out));
  }
  if (name == "map") {
    ValueList out;
    if (const Value* attr = kw.find("attribute")) {
      const Value* dflt = kw.find("default");
      for (const auto& v : iterate(in)) {
        Value x = get_attr(v, py_str(*attr), line);
        out.push_back(x.is_undefined() && dflt ? *dflt : x);
      }
    } else {
      if (args.empty()) fail("map filter needs a filter name or attribute=");
      std::string f = py_str(args[0]);
      if (!is_known_filter(f)) fail("unsupported construct: filter '{}'", f);
      ValueList rest(args.begin() + 1, args.end());
      for (const auto& v : iterate(in)) out.push_back(apply_filter(f, v, rest, {}, line));
    }
    return Value::make_list(std::move(out));
  }
  if (name == "attr") return get_attr(in, py_str(arg(0, "name", Value::string(""))), line);
  auto fold = [](const Value& v, bool cs) {
    if (!v.is_string() || cs) return v;
    return call_method(v, "lower", {}, {});
  };
  if (name == "unique") {
    bool cs = arg(0, "case_sensitive", Value::boolean(false)).truthy();
    Value attr = arg(1, "attribute", Value::none());
    ValueList out, seen;
    for (const auto& v : iterate(in)) {
      Value key = fold(attr.is_none() ? v : get_attr(v, py_str(attr), line), cs);
      bool dup = false;
      for (const auto& s : seen) dup = dup || py_equal(s, key);
      if (!dup) {
        seen.push_back(key);
        out.push_back(v);
      }
    }
    return Value::make_list(std::move(out));
  }
  if (name == "sort" || name == "dictsort" || name == "min" || name == "max") {
    bool dict_mode = name == "dictsort";
    bool minmax = name == "min" || name == "max";
    bool reverse = !minmax && arg(dict_mode ? 2 : 0, "reverse", Value::boolean(false)).truthy();
    bool cs = arg(minmax ? 0 : 1, "case_sensitive", Value::boolean(false)).truthy();
    Value attr = dict_mode ? Value::none() : arg(minmax ? 1 : 2, "attribute", Value::none());
    ValueList items;
    if (dict_mode) {
      if (!in.is_dict()) fail("dictsort expects a mapping");
      for (const auto& [k, v] : in.dict->items) items.push_back(make_tuple({Value::string(k), v}));
    } else {
      items = iterate(in);
    }
    auto key = [&](const Value& v) {
      if (dict_mode) return fold((*v.list)[0], cs);
      return fold(attr.is_none() ? v : get_attr(v, py_str(attr), line), cs);
    };
    std::stable_sort(items.begin(), items.end(), [&](const Value& a, const Value& b) {
      int c = py_compare(key(a), key(b));
      return reverse ? c > 0 : c < 0;
    });
    if (minmax) {
      if (items.empty()) return Value::undefined();
      return name == "min" ? items.front() : items.back();
    }
    return Value::make_list(std::move(items));
  }
  if (name == "int") {
    Value dflt = arg(0, "default", Value::integer(0));
    if (in.type == Value::Type::Int || in.type == Value::Type::Bool) return Value::integer(in.as_int());
    if (in.type == Value::Type::Float) return Value::integer(static_cast<int64_t>(in.f));
    if (in.is_string()) {
      try {
        size_t used = 0;
        std::string s = call_method(in, "strip", {}, {}).s;
        int64_t x = std::stoll(s, &used, 10);
        if (used == s.size()) return Value::integer(x);
        double d = std::stod(s, &used);
        if (used == s.size()) return Value::integer(static_cast<int64_t>(d));
      } catch (const std::exception&) {
      }
    }
    return dflt;
  }
  if (name == "float") {
    Value dflt = arg(0, "default", Value::number(0.0));
    if (in.is_number()) return Value::number(in.as_double());
    if (in.is_string()) {
      try {
        size_t used = 0;
        std::string s = call_method(in, "strip", {}, {}).s;
        double d = std::stod(s, &used);
        if (used == s.size()) return Value::number(d);
      } catch (const std::exception&) {
      }
    }
    return dflt;
  }
  if (name == "abs") {
    if (in.type == Value::Type::Float) return Value::number(std::fabs(in.f));
    return Value::integer(std::llabs(in.as_int()));
  }
  if (name == "round") {
    int64_t prec = arg(0, "precision", Value::integer(0)).as_int();
    std::string method = py_str(arg(1, "method", Value::string("common")));
    double m = std::pow(10.0, static_cast<double>(prec)), x = in.as_double() * m;
    double r = method == "ceil" ? std::ceil(x) : method == "floor" ? std::floor(x) : std::round(x);
    return Value::number(r / m);
  }
  if (name == "sum") {
    Value attr = arg(0, "attribute", Value::none());
    Value total = arg(1, "start", Value::integer(0));
    for (const auto& v : iterate(in)) total = binary("+", total, attr.is_none() ? v : get_attr(v, py_str(attr), line));
    return total;
  }
  if (name == "indent") {
    Value w = arg(0, "width", Value::integer(4));
    bool first = arg(1, "first", Value::boolean(false)).truthy();
    bool blank = arg(2, "blank", Value::boolean(false)).truthy();
    std::string pad = w.is_string() ? w.s : std::string(static_cast<size_t>(std::max<int64_t>(0, w.as_int())), ' ');
    std::string s = py_str(in), out;
    size_t start = 0;
    bool first_line = true;
    while (true) {
      size_t nl = s.find('\n', start);
      std::string ln = s.substr(start, nl == std::string::npos ? std::string::npos : nl - start);
      bool add = first_line ? first : (blank || !ln.empty());
      if (add && !(first_line && ln.empty() && !blank && false)) out += pad;
      out += ln;
      if (nl == std::string::npos) break;
      out += '\n';
      start = nl + 1;
      first_line = false;
    }
    return Value::string(out);
  }
  if (name == "wordcount") return Value::integer(static_cast<int64_t>(call_method(Value::string(py_str(in)), "split", {}, {}).list->size()));
  if (name == "escape" || name == "e") {
    std::string out;
    for (char c : py_str(in)) {
      switch (c) {
        case '&': out += "&amp;"; break;
        case '<': out += "&lt;"; break;
        case '>': out += "&gt;"; break;
        case '"': out += "&#34;"; break;
        case '\'': out += "&#39;"; break;
        default: out += c;
      }
    }
    return Value::string(out);
  }
  fail("unsupported construct: filter '{}'", name);
}

Value namespace_fn(const ValueList& args, const KwArgs& kw) {
  Value ns = Value::make_dict();
  ns.is_namespace = true;
  for (const auto& a : args)
    if (a.is_dict())
      for (const auto& [k, v] : a.dict->items) ns.dict->set(k, v);
  for (const auto& [k, v] : kw.items) ns.dict->set(k, v);
  return ns;
}

Value range_fn(const ValueList& args, const KwArgs&) {
  int64_t start = 0, stop, step = 1;
  if (args.size() == 1) {
    stop = args[0].as_int();
  } else if (args.size() == 2 || args.size() == 3) {
    start = args[0].as_int();
    stop = args[1].as_int();
    if (args.size() == 3) step = args[2].as_int();
  } else {
    fail("range() takes 1 to 3 arguments");
  }
  if (step == 0) fail("range() step must not be zero");
  ValueList l;
  for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) {
    l.push_back(Value::integer(i));
    if (l.size() > 10'000'000) fail("range() too large");
  }
  return Value::make_list(std::move(l));
}

void add_globals(Scope& g) {
  g.vars["namespace"] = Value::callable(namespace_fn);
  g.vars["range"] = Value::callable(range_fn);
  g.vars["dict"] = Value::callable([](const ValueList& args, const KwArgs& kw) {
    Value d = Value::make_dict();
    for (const auto& a : args)
      if (a.is_dict())
        for (const auto& [k, v] : a.dict->items) d.dict->set(k, v);
    for (const auto& [k, v] : kw.items) d.dict->set(k, v);
    return d;
  });
  g.vars["raise_exception"] = Value::callable([](const ValueList& args, const KwArgs&) -> Value {
    fail("raise_exception: {}", args.empty() ? std::string() : py_str(args[0]));
  });
  g.vars["strftime_now"] = Value::callable([](const ValueList& args, const KwArgs&) {
    std::string f = args.empty() ? std::string("%Y-%m-%d") : py_str(args[0]);
    std::time_t t = std::time(nullptr);
    std::tm tm{};
    localtime_r(&t, &tm);
    char buf[256];
    size_t n = std::strftime(buf, sizeof buf, f.c_str(), &tm);
    return Value::string(std::string(buf, n));
  });
}

}  // namespace

struct ChatTemplate::Impl {
  NodeList nodes;
};

ChatTemplate::ChatTemplate(const std::string& source) : impl_(std::make_unique<Impl>()) {
  impl_->nodes = parse_template(source);
}
ChatTemplate::~ChatTemplate() = default;
ChatTemplate::ChatTemplate(ChatTemplate&&) noexcept = default;
ChatTemplate& ChatTemplate::operator=(ChatTemplate&&) noexcept = default;

std::string ChatTemplate::render(const nlohmann::json& context) const {
  return render(nlohmann::ordered_json(context));
}

std::string ChatTemplate::render(const nlohmann::ordered_json& context) const {
  ZMLX_CHECK(context.is_object(), "chat template context must be a JSON object");
  Scope globals;
  add_globals(globals);
  for (auto it = context.begin(); it != context.end(); ++it) globals.vars[it.key()] = from_json(it.value());
  Scope top;
  top.parent = &globals;
  Renderer r(top);
  std::string out;
  r.exec(impl_->nodes, top, out);
  return out;
}

std::string apply_chat_template(const Tokenizer& tok, const nlohmann::ordered_json& messages,
                                bool add_generation_prompt, const nlohmann::ordered_json& extra) {
  const std::string& src = tok.chat_template();
  ZMLX_CHECK(!src.empty(), "the tokenizer has no chat template (tokenizer_config.json chat_template or "
                           "chat_template.jinja)");
  ZMLX_CHECK(messages.is_array(), "messages must be a JSON array, got {}", messages.type_name());
  nlohmann::ordered_json ctx = nlohmann::ordered_json::object();
  // As transformers renders: tools and documents are always passed (None when absent).
  ctx["messages"] = messages;
  ctx["tools"] = nullptr;
  ctx["documents"] = nullptr;
  ctx["add_generation_prompt"] = add_generation_prompt;
  if (auto b = tok.bos_token()) ctx["bos_token"] = *b;
  if (auto e = tok.eos_token()) ctx["eos_token"] = *e;
  if (extra.is_object())
    for (auto it = extra.begin(); it != extra.end(); ++it) ctx[it.key()] = it.value();
  return ChatTemplate(src).render(ctx);
}

std::string apply_chat_template(const Tokenizer& tok, const nlohmann::json& messages, bool add_generation_prompt,
                                const nlohmann::json& extra) {
  return apply_chat_template(tok, nlohmann::ordered_json(messages), add_generation_prompt,
                             nlohmann::ordered_json(extra));
}

}  // namespace zmlx::text
