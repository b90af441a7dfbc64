// The values a chat template computes with, with Python's semantics (Jinja
// runs on Python): truthiness, ==, str()/repr(), json.dumps for `tojson`.
#pragma once
#include <nlohmann/json.hpp>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace zmlx::text::tmpl {

struct Value;
using ValueList = std::vector<Value>;
struct ValueDict;
struct KwArgs;

// A callable (macro, global function, bound method): positional args, keyword args.
using NativeFn = std::function<Value(const ValueList& args, const KwArgs& kwargs)>;

struct Value {
  enum class Type { Undefined, None, Bool, Int, Float, String, List, Dict, Callable };
  Type type = Type::Undefined;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::string s;  // String; for Undefined: the name that was missing
  std::shared_ptr<ValueList> list;
  std::shared_ptr<ValueDict> dict;
  std::shared_ptr<NativeFn> fn;
  bool is_tuple = false;      // a List printed as (a, b)
  bool is_namespace = false;  // a Dict whose attributes can be assigned

  static Value undefined(std::string name = {});
  static Value none();
  static Value boolean(bool v);
  static Value integer(int64_t v);
  static Value number(double v);
  static Value string(std::string v);
  static Value make_list(ValueList v = {});
  static Value make_dict();
  static Value callable(NativeFn fn);

  bool is_undefined() const { return type == Type::Undefined; }
  bool is_none() const { return type == Type::None; }
  bool is_string() const { return type == Type::String; }
  bool is_list() const { return type == Type::List; }
  bool is_dict() const { return type == Type::Dict; }
  bool is_number() const { return type == Type::Int || type == Type::Float || type == Type::Bool; }
  bool truthy() const;
  double as_double() const;
  int64_t as_int() const;  // Int or Bool
};

struct ValueDict {
  std::vector<std::pair<std::string, Value>> items;  // insertion order, as a Python dict
  const Value* find(const std::string& key) const;
  void set(const std::string& key, Value v);
};

struct KwArgs {
  std::vector<std::pair<std::string, Value>> items;
  const Value* find(const std::string& key) const;
};

Value from_json(const nlohmann::ordered_json& j);
// json.dumps(v, ensure_ascii=False, indent=indent, sort_keys=...) as HF's tojson.
std::string to_json(const Value& v, int indent = -1, bool sort_keys = false,
                     const std::string& item_sep = "", const std::string& key_sep = "");
std::string py_str(const Value& v);   // str(v); Undefined prints as ""
std::string py_repr(const Value& v);  // repr(v)
std::string py_float_repr(double d);
bool py_equal(const Value& a, const Value& b);
// -1 / 0 / 1; throws zmlx::Error for values Python cannot order.
int py_compare(const Value& a, const Value& b);
std::string type_name(const Value& v);

}  // namespace zmlx::text::tmpl
