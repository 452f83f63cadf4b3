#include "kvtier/core/status.h"

#include <cstdio>
#include <cstdlib>
#include <sstream>

namespace kvtier {

namespace detail {

void assert_fail(const char* file, int line, const char* cond, const std::string& detail) {
  std::fprintf(stderr, "%s:%d: kvtier assertion failed: %s%s%s\n", file, line, cond,
               detail.empty() ? "" : " (", detail.empty() ? "" : (detail + ")").c_str());
  std::fflush(stderr);
  std::abort();
}

}  // namespace detail

std::string_view status_code_name(StatusCode code) {
  switch (code) {
    case StatusCode::kOk: return "ok";
    case StatusCode::kInvalidArgument: return "invalid_argument";
    case StatusCode::kOutOfRange: return "out_of_range";
    case StatusCode::kNotFound: return "not_found";
    case StatusCode::kIoError: return "io_error";
    case StatusCode::kCorrupt: return "corrupt";
    case StatusCode::kNoSpace: return "no_space";
    case StatusCode::kOutOfMemory: return "out_of_memory";
    case StatusCode::kUnsupported: return "unsupported";
    case StatusCode::kUnavailable: return "unavailable";
    case StatusCode::kInternal: return "internal";
  }
  return "unknown";
}

std::string Status::to_string() const {
  if (ok()) return "ok";
  return std::string(status_code_name(code_)) + ": " + message_;
}

Status Status::with_context(std::string_view context) const {
  if (ok()) return *this;
  return Status(code_, std::string(context) + ": " + message_);
}

Status invalid_field(std::string_view what, std::string_view field, uint64_t value, std::string_view rule) {
  std::ostringstream os;
  os << what << ": " << field << "=" << value << " " << rule;
  return invalid_argument(os.str());
}

}  // namespace kvtier
