// Status and Result<T>: expected failures carried as values, with a message a
// user can act on (what failed, which file/block/size, what to do).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

#include "kvtier/core/assert.h"

namespace kvtier {

enum class StatusCode : uint8_t {
  kOk,
  kInvalidArgument,  // bad option, shape, policy or config value
  kOutOfRange,       // a value outside what the format or device allows
  kNotFound,         // missing file, device or entry
  kIoError,          // read/write/open failed (errno text in the message)
  kCorrupt,          // checksum mismatch or malformed on-disk data
  kNoSpace,          // file system or tier budget exhausted
  kOutOfMemory,      // host or device allocation failed
  kUnsupported,      // valid but not implemented for this shape/device
  kUnavailable,      // a capability this machine lacks (GPU, io_uring, AVX-512)
  kInternal,         // a library call failed unexpectedly
};

// Short lowercase name of a code ("invalid_argument").
std::string_view status_code_name(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {
    KVT_ASSERT(code != StatusCode::kOk, "an error Status needs an error code");
  }
  static Status ok_status() { return Status(); }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }
  // "invalid_argument: <message>", or "ok".
  std::string to_string() const;
  // Prefixes context to the message: "while opening x: <message>".
  Status with_context(std::string_view context) const;

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

inline Status invalid_argument(std::string m) { return {StatusCode::kInvalidArgument, std::move(m)}; }
inline Status out_of_range(std::string m) { return {StatusCode::kOutOfRange, std::move(m)}; }
inline Status not_found(std::string m) { return {StatusCode::kNotFound, std::move(m)}; }
inline Status io_error(std::string m) { return {StatusCode::kIoError, std::move(m)}; }
inline Status corrupt(std::string m) { return {StatusCode::kCorrupt, std::move(m)}; }
inline Status no_space(std::string m) { return {StatusCode::kNoSpace, std::move(m)}; }
inline Status out_of_memory(std::string m) { return {StatusCode::kOutOfMemory, std::move(m)}; }
inline Status unsupported(std::string m) { return {StatusCode::kUnsupported, std::move(m)}; }
inline Status unavailable(std::string m) { return {StatusCode::kUnavailable, std::move(m)}; }
inline Status internal_error(std::string m) { return {StatusCode::kInternal, std::move(m)}; }

// "<what>: <field>=<value> <rule>", e.g. "model shape: head_dim=96 is unsupported (supported: 64, 128)".
Status invalid_field(std::string_view what, std::string_view field, uint64_t value, std::string_view rule);

// Either a T or an error Status. Reading the value of an error is a bug.
template <class T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}  // NOLINT: implicit by design
  Result(Status status) : v_(std::move(status)) {  // NOLINT
    KVT_ASSERT(!std::get<Status>(v_).ok(), "Result built from an ok Status has no value");
  }

  bool ok() const { return std::holds_alternative<T>(v_); }
  const Status& status() const {
    static const Status kOkStatus;
    return ok() ? kOkStatus : std::get<Status>(v_);
  }
  T& value() & { check(); return std::get<T>(v_); }
  const T& value() const& { check(); return std::get<T>(v_); }
  T&& value() && { check(); return std::get<T>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

 private:
  void check() const {
    KVT_ASSERT(ok(), "value() of an error Result: ", std::get<Status>(v_).to_string());
  }
  std::variant<T, Status> v_;
};

}  // namespace kvtier

// Returns the Status from the enclosing function if `expr` (a Status) failed.
#define KVT_RETURN_IF_ERROR(expr)              \
  do {                                         \
    ::kvtier::Status kvt_st_ = (expr);         \
    if (!kvt_st_.ok()) return kvt_st_;         \
  } while (0)

#define KVT_CONCAT_INNER_(a, b) a##b
#define KVT_CONCAT_(a, b) KVT_CONCAT_INNER_(a, b)
// KVT_ASSIGN_OR_RETURN(auto x, f()): binds the value or returns the Status.
#define KVT_ASSIGN_OR_RETURN(decl, expr) \
  KVT_ASSIGN_OR_RETURN_IMPL_(KVT_CONCAT_(kvt_res_, __LINE__), decl, expr)
#define KVT_ASSIGN_OR_RETURN_IMPL_(tmp, decl, expr) \
  auto tmp = (expr);                                \
  if (!tmp.ok()) return tmp.status();               \
  decl = std::move(tmp).value()
