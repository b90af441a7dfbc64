// Python methods of str / list / dict that chat templates call
// (message.content.startswith(...), d.items(), ...) and Python slicing.
#pragma once
#include <optional>
#include <string>

#include "zmlx/text/template_value.h"

namespace zmlx::text::tmpl {

bool is_dict_method(const std::string& name);
bool has_method(const Value& obj, const std::string& name);
// Throws zmlx::Error "unsupported construct: method ..." for a method it lacks.
Value call_method(const Value& obj, const std::string& name, const ValueList& args, const KwArgs& kw);
// obj[start:stop:step] for strings (by code point) and lists.
Value slice(const Value& obj, std::optional<int64_t> start, std::optional<int64_t> stop,
            std::optional<int64_t> step);

}  // namespace zmlx::text::tmpl
