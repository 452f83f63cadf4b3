// A small leveled logger writing one line per message to stderr.
// KVTIER_LOG=debug|info|warn|error|off sets the threshold (default: warn).
#pragma once

#include <cstdint>
#include <string_view>

#include "kvtier/core/assert.h"

namespace kvtier {

enum class LogLevel : uint8_t { kDebug, kInfo, kWarn, kError, kOff };

void set_log_level(LogLevel level);
LogLevel log_level();
// Parses "debug", "info", "warn", "error" or "off"; false on anything else.
bool parse_log_level(std::string_view text, LogLevel* out);
// Writes "kvtier <level>: <message>" if level passes the threshold. Thread-safe.
void log_line(LogLevel level, std::string_view message);

}  // namespace kvtier

#define KVT_LOG(level, ...)                                                            \
  do {                                                                                 \
    if (::kvtier::LogLevel::level >= ::kvtier::log_level())                            \
      ::kvtier::log_line(::kvtier::LogLevel::level, ::kvtier::detail::stream_all(__VA_ARGS__)); \
  } while (0)
#define KVT_LOG_DEBUG(...) KVT_LOG(kDebug, __VA_ARGS__)
#define KVT_LOG_INFO(...) KVT_LOG(kInfo, __VA_ARGS__)
#define KVT_LOG_WARN(...) KVT_LOG(kWarn, __VA_ARGS__)
#define KVT_LOG_ERROR(...) KVT_LOG(kError, __VA_ARGS__)
