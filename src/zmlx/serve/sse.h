// Server-sent events framing (text/event-stream), as OpenAI streams use it:
// each event is one or more "data: ..." lines and a blank line; the stream
// ends with "data: [DONE]".
#pragma once
#include <string>

namespace zmlx::serve {

// One event carrying `payload`; a payload with line breaks becomes several
// data lines (the client joins them with "\n"). CR and CRLF count as breaks.
std::string sse_event(const std::string& payload);
// The OpenAI end-of-stream marker.
std::string sse_done();
// A comment line (ignored by clients): keeps idle streams alive.
std::string sse_comment(const std::string& text);

}  // namespace zmlx::serve
