// Always-on assertions for programmer errors (DESIGN.md section 7).
// Expected failures (I/O, capacity, bad input) use Status/Result instead.
#pragma once

#include <sstream>
#include <string>

namespace kvtier::detail {

// Prints "file:line: assertion failed: cond (detail)" to stderr and aborts.
[[noreturn]] void assert_fail(const char* file, int line, const char* cond, const std::string& detail);

template <class... Args>
std::string stream_all(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

}  // namespace kvtier::detail

// KVT_ASSERT(cond, details...): aborts with file:line, the condition and the
// streamed details (typically the offending values). Never compiled out.
#define KVT_ASSERT(cond, ...)                                                              \
  do {                                                                                     \
    if (!(cond)) [[unlikely]]                                                              \
      ::kvtier::detail::assert_fail(__FILE__, __LINE__, #cond,                             \
                                    ::kvtier::detail::stream_all("" __VA_OPT__(, ) __VA_ARGS__)); \
  } while (0)

// KVT_ASSERT_EQ(a, b): like KVT_ASSERT(a == b) but prints both values.
#define KVT_ASSERT_EQ(a, b)                                                                \
  do {                                                                                     \
    const auto& kvt_a_ = (a);                                                              \
    const auto& kvt_b_ = (b);                                                              \
    if (!(kvt_a_ == kvt_b_)) [[unlikely]]                                                  \
      ::kvtier::detail::assert_fail(__FILE__, __LINE__, #a " == " #b,                      \
                                    ::kvtier::detail::stream_all(kvt_a_, " vs ", kvt_b_)); \
  } while (0)
