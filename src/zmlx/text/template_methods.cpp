#include "zmlx/text/template_methods.h"

#include <algorithm>

#include "zmlx/core/error.h"
#include "zmlx/text/unicode.h"

namespace zmlx::text::tmpl {

namespace {

const char* const kStrMethods[] = {"startswith", "endswith", "split", "rsplit", "strip", "lstrip", "rstrip",
                                   "replace", "upper", "lower", "title", "capitalize", "find", "rfind",
                                   "count", "join", "isdigit", "isalpha", "isalnum", "isspace", "islower",
                                   "isupper", "splitlines", "index"};
const char* const kDictMethods[] = {"items", "keys", "values", "get"};
const char* const kListMethods[] = {"index", "count"};

template <size_t N>
bool in_list(const char* const (&list)[N], const std::string& name) {
  for (const char* m : list)
    if (name == m) return true;
  return false;
}

// Python's str.isspace() set.
bool py_space(char32_t c) { return is_unicode_whitespace(c) || (c >= 0x1C && c <= 0x1F); }

std::u32string to_u32(const std::string& s) {
  std::u32string out;
  for (size_t i = 0; i < s.size();) out += utf8_next(s, i);
  return out;
}
std::string to_u8(const std::u32string& s) {
  std::string out;
  for (char32_t c : s) utf8_append(out, c);
  return out;
}

const Value& arg(const ValueList& args, size_t i, const std::string& method) {
  if (i >= args.size()) fail("{}() is missing argument {}", method, i + 1);
  return args[i];
}

std::string strip(const std::string& s, const Value* chars, bool left, bool right) {
  std::u32string u = to_u32(s);
  std::u32string set;
  bool ws = !chars || chars->is_none();
  if (!ws) set = to_u32(chars->s);
  auto drop = [&](char32_t c) { return ws ? py_space(c) : set.find(c) != std::u32string::npos; };
  size_t b = 0, e = u.size();
  if (left)
    while (b < e && drop(u[b])) ++b;
  if (right)
    while (e > b && drop(u[e - 1])) --e;
  return to_u8(u.substr(b, e - b));
}

ValueList split(const std::string& s, const Value* sep, int64_t maxsplit, bool from_right) {
  ValueList out;
  if (!sep || sep->is_none()) {
    // Runs of whitespace separate; leading/trailing whitespace is ignored.
    std::u32string u = to_u32(s);
    std::vector<std::u32string> parts;
    if (!from_right) {
      size_t i = 0;
      while (i < u.size()) {
        while (i < u.size() && py_space(u[i])) ++i;
        if (i >= u.size()) break;
        if (maxsplit >= 0 && static_cast<int64_t>(parts.size()) == maxsplit) {
          size_t e = u.size();
          while (e > i && py_space(u[e - 1])) --e;
          parts.push_back(u.substr(i, e - i));
          break;
        }
        size_t j = i;
        while (j < u.size() && !py_space(u[j])) ++j;
        parts.push_back(u.substr(i, j - i));
        i = j;
      }
    } else {
      long i = static_cast<long>(u.size()) - 1;
      while (i >= 0) {
        while (i >= 0 && py_space(u[i])) --i;
        if (i < 0) break;
        if (maxsplit >= 0 && static_cast<int64_t>(parts.size()) == maxsplit) {
          size_t b = 0;
          while (b < static_cast<size_t>(i) && py_space(u[b])) ++b;
          parts.push_back(u.substr(b, i - b + 1));
          break;
        }
        long j = i;
        while (j >= 0 && !py_space(u[j])) --j;
        parts.push_back(u.substr(j + 1, i - j));
        i = j;
      }
      std::reverse(parts.begin(), parts.end());
    }
    for (auto& p : parts) out.push_back(Value::string(to_u8(p)));
    return out;
  }
  if (!sep->is_string()) fail("split() separator must be a string");
  const std::string& d = sep->s;
  if (d.empty()) fail("split(): empty separator");
  std::vector<std::string> parts;
  if (!from_right) {
    size_t pos = 0;
    while (true) {
      size_t f = (maxsplit >= 0 && static_cast<int64_t>(parts.size()) >= maxsplit) ? std::string::npos
                                                                                     : s.find(d, pos);
      if (f == std::string::npos) {
        parts.push_back(s.substr(pos));
        break;
      }
      parts.push_back(s.substr(pos, f - pos));
      pos = f + d.size();
    }
  } else {
    size_t end = s.size();
    while (true) {
      size_t f = std::string::npos;
      if (!(maxsplit >= 0 && static_cast<int64_t>(parts.size()) >= maxsplit) && end >= d.size())
        f = s.rfind(d, end - d.size());
      if (f == std::string::npos) {
        parts.push_back(s.substr(0, end));
        break;
      }
      parts.push_back(s.substr(f + d.size(), end - f - d.size()));
      end = f;
    }
    std::reverse(parts.begin(), parts.end());
  }
  for (auto& p : parts) out.push_back(Value::string(p));
  return out;
}

std::string case_map(const std::string& s, int mode) {  // 0 upper, 1 lower, 2 title, 3 capitalize
  std::string out = s;
  bool start = true;
  for (size_t i = 0; i < out.size(); ++i) {
    char& c = out[i];
    bool alpha = std::isalpha(static_cast<unsigned char>(c)) != 0;
    bool up;
    if (mode == 0) up = true;
    else if (mode == 1) up = false;
    else if (mode == 2) up = start;
    else up = i == 0;
    if (alpha) c = static_cast<char>(up ? std::toupper(static_cast<unsigned char>(c))
                                        : std::tolower(static_cast<unsigned char>(c)));
    start = !alpha && !(static_cast<unsigned char>(c) >= 0x80);
  }
  return out;
}

}  // namespace

bool is_dict_method(const std::string& name) { return in_list(kDictMethods, name); }

bool has_method(const Value& obj, const std::string& name) {
  if (obj.is_string()) return in_list(kStrMethods, name);
  if (obj.is_dict()) return !obj.is_namespace && in_list(kDictMethods, name);
  if (obj.is_list()) return in_list(kListMethods, name);
  return false;
}

Value call_method(const Value& obj, const std::string& name, const ValueList& args, const KwArgs& kw) {
  auto kwarg = [&](size_t pos, const char* key) -> const Value* {
    if (pos < args.size()) return &args[pos];
    return kw.find(key);
  };
  if (obj.is_string()) {
    const std::string& s = obj.s;
    if (name == "startswith" || name == "endswith") {
      const Value& p = arg(args, 0, name);
      ValueList options = p.is_list() ? *p.list : ValueList{p};
      for (const auto& o : options) {
        if (!o.is_string()) fail("{}() argument must be str or a tuple of str", name);
        bool r = name == "startswith" ? s.compare(0, o.s.size(), o.s) == 0
                                      : s.size() >= o.s.size() && s.compare(s.size() - o.s.size(), o.s.size(), o.s) == 0;
        if (r) return Value::boolean(true);
      }
      return Value::boolean(false);
    }
    if (name == "split" || name == "rsplit") {
      const Value* m = kwarg(1, "maxsplit");
      return Value::make_list(split(s, kwarg(0, "sep"), m ? m->as_int() : -1, name == "rsplit"));
    }
    if (name == "strip") return Value::string(strip(s, kwarg(0, "chars"), true, true));
    if (name == "lstrip") return Value::string(strip(s, kwarg(0, "chars"), true, false));
    if (name == "rstrip") return Value::string(strip(s, kwarg(0, "chars"), false, true));
    if (name == "replace") {
      const std::string& from = arg(args, 0, name).s;
      const std::string& to = arg(args, 1, name).s;
      int64_t count = args.size() > 2 ? args[2].as_int() : -1;
      std::string out;
      if (from.empty()) {
        std::u32string u = to_u32(s);
        int64_t done = 0;
        for (size_t i = 0; i <= u.size(); ++i) {
          if (count < 0 || done < count) {
            out += to;
            ++done;
          }
          if (i < u.size()) utf8_append(out, u[i]);
        }
        return Value::string(out);
      }
      size_t pos = 0;
      int64_t done = 0;
      while (count < 0 || done < count) {
        size_t f = s.find(from, pos);
        if (f == std::string::npos) break;
        out.append(s, pos, f - pos);
        out += to;
        pos = f + from.size();
        ++done;
      }
      out.append(s, pos, std::string::npos);
      return Value::string(out);
    }
    if (name == "upper") return Value::string(case_map(s, 0));
    if (name == "lower") return Value::string(case_map(s, 1));
    if (name == "title") return Value::string(case_map(s, 2));
    if (name == "capitalize") return Value::string(case_map(s, 3));
    if (name == "find" || name == "rfind" || name == "index") {
      const std::string& sub = arg(args, 0, name).s;
      size_t f = name == "rfind" ? s.rfind(sub) : s.find(sub);
      if (f == std::string::npos) {
        if (name == "index") fail("substring not found");
        return Value::integer(-1);
      }
      return Value::integer(static_cast<int64_t>(utf8_to_codepoints(s.substr(0, f)).size()));
    }
    if (name == "count") {
      const std::string& sub = arg(args, 0, name).s;
      if (sub.empty()) return Value::integer(static_cast<int64_t>(utf8_to_codepoints(s).size()) + 1);
      int64_t n = 0;
      for (size_t pos = s.find(sub); pos != std::string::npos; pos = s.find(sub, pos + sub.size())) ++n;
      return Value::integer(n);
    }
    if (name == "join") {
      const Value& items = arg(args, 0, name);
      if (!items.is_list()) fail("join() expects a list");
      std::string out;
      for (size_t k = 0; k < items.list->size(); ++k) {
        if (k) out += s;
        const Value& v = (*items.list)[k];
        if (!v.is_string()) fail("sequence item {}: expected str instance, {} found", k, type_name(v));
        out += v.s;
      }
      return Value::string(out);
    }
    if (name == "splitlines") {
      ValueList out;
      size_t pos = 0;
      while (pos < s.size()) {
        size_t f = s.find_first_of("\r\n", pos);
        if (f == std::string::npos) {
          out.push_back(Value::string(s.substr(pos)));
          break;
        }
        out.push_back(Value::string(s.substr(pos, f - pos)));
        pos = f + ((s[f] == '\r' && f + 1 < s.size() && s[f + 1] == '\n') ? 2 : 1);
      }
      return Value::make_list(std::move(out));
    }
    if (name.rfind("is", 0) == 0) {
      if (s.empty()) return Value::boolean(false);
      bool any_cased = false, ok = true;
      for (unsigned char c : s) {
        if (name == "isdigit") ok = ok && std::isdigit(c);
        else if (name == "isalpha") ok = ok && std::isalpha(c);
        else if (name == "isalnum") ok = ok && std::isalnum(c);
        else if (name == "isspace") ok = ok && std::isspace(c);
        else if (name == "islower") {
          ok = ok && !std::isupper(c);
          any_cased = any_cased || std::islower(c);
        } else if (name == "isupper") {
          ok = ok && !std::islower(c);
          any_cased = any_cased || std::isupper(c);
        }
      }
      if (name == "islower" || name == "isupper") ok = ok && any_cased;
      return Value::boolean(ok);
    }
  } else if (obj.is_dict() && !obj.is_namespace) {
    const auto& items = obj.dict->items;
    if (name == "items") {
      ValueList l;
      for (const auto& [k, v] : items) {
        Value t = Value::make_list({Value::string(k), v});
        t.is_tuple = true;
        l.push_back(t);
      }
      return Value::make_list(std::move(l));
    }
    if (name == "keys" || name == "values") {
      ValueList l;
      for (const auto& [k, v] : items) l.push_back(name == "keys" ? Value::string(k) : v);
      return Value::make_list(std::move(l));
    }
    if (name == "get") {
      const Value& key = arg(args, 0, name);
      const Value* v = key.is_string() ? obj.dict->find(key.s) : nullptr;
      if (v) return *v;
      return args.size() > 1 ? args[1] : Value::none();
    }
  } else if (obj.is_list()) {
    if (name == "index" || name == "count") {
      const Value& x = arg(args, 0, name);
      int64_t n = 0;
      for (size_t k = 0; k < obj.list->size(); ++k)
        if (py_equal((*obj.list)[k], x)) {
          if (name == "index") return Value::integer(static_cast<int64_t>(k));
          ++n;
        }
      if (name == "index") fail("list.index(x): x not in list");
      return Value::integer(n);
    }
  }
  fail("unsupported construct: method '{}' of {}", name, type_name(obj));
}

Value slice(const Value& obj, std::optional<int64_t> start, std::optional<int64_t> stop,
            std::optional<int64_t> step_opt) {
  int64_t step = step_opt.value_or(1);
  if (step == 0) fail("slice step cannot be zero");
  std::vector<char32_t> cps;
  int64_t n;
  if (obj.is_string()) {
    cps = utf8_to_codepoints(obj.s);
    n = static_cast<int64_t>(cps.size());
  } else if (obj.is_list()) {
    n = static_cast<int64_t>(obj.list->size());
  } else if (obj.is_undefined()) {
    fail("'{}' is undefined (sliced)", obj.s.empty() ? "value" : obj.s);
  } else {
    fail("'{}' object is not subscriptable", type_name(obj));
  }
  // Python's PySlice_AdjustIndices.
  auto adjust = [&](std::optional<int64_t> v, int64_t dflt, bool is_stop) {
    if (!v) return dflt;
    int64_t x = *v;
    if (x < 0) {
      x += n;
      if (x < 0) x = step < 0 ? -1 : 0;
    } else if (x >= n) {
      x = step < 0 ? n - 1 : n;
    }
    (void)is_stop;
    return x;
  };
  int64_t b = adjust(start, step < 0 ? n - 1 : 0, false);
  int64_t e = adjust(stop, step < 0 ? -1 : n, true);
  std::vector<int64_t> idx;
  if (step > 0)
    for (int64_t i = b; i < e; i += step) idx.push_back(i);
  else
    for (int64_t i = b; i > e; i += step) idx.push_back(i);
  if (obj.is_string()) {
    std::string out;
    for (int64_t i : idx) utf8_append(out, cps[i]);
    return Value::string(out);
  }
  ValueList out;
  for (int64_t i : idx) out.push_back((*obj.list)[i]);
  Value r = Value::make_list(std::move(out));
  r.is_tuple = obj.is_tuple;
  return r;
}

}  // namespace zmlx::text::tmpl
