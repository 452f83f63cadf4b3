#include "kvtier/core/log.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <mutex>

namespace kvtier {
namespace {

LogLevel initial_level() {
  LogLevel level = LogLevel::kWarn;
  if (const char* env = std::getenv("KVTIER_LOG")) {
    if (!parse_log_level(env, &level))
      std::fprintf(stderr, "kvtier warn: KVTIER_LOG=%s is not one of debug, info, warn, error, off; using warn\n", env);
  }
  return level;
}

std::atomic<LogLevel>& level_ref() {
  static std::atomic<LogLevel> level{initial_level()};
  return level;
}

const char* level_name(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug: return "debug";
    case LogLevel::kInfo: return "info";
    case LogLevel::kWarn: return "warn";
    case LogLevel::kError: return "error";
    case LogLevel::kOff: return "off";
  }
  return "?";
}

}  // namespace

void set_log_level(LogLevel level) { level_ref().store(level, std::memory_order_relaxed); }
LogLevel log_level() { return level_ref().load(std::memory_order_relaxed); }

bool parse_log_level(std::string_view text, LogLevel* out) {
  for (LogLevel l : {LogLevel::kDebug, LogLevel::kInfo, LogLevel::kWarn, LogLevel::kError, LogLevel::kOff}) {
    if (text == level_name(l)) {
      *out = l;
      return true;
    }
  }
  return false;
}

void log_line(LogLevel level, std::string_view message) {
  if (level < log_level()) return;
  static std::mutex mu;
  std::lock_guard lock(mu);
  std::fprintf(stderr, "kvtier %s: %.*s\n", level_name(level), static_cast<int>(message.size()), message.data());
}

}  // namespace kvtier
