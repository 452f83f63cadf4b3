// The kvtier command line: `kvtier <command> [options]`.
// Exit codes: 0 success, 1 the work failed, 2 bad usage (unknown command or
// option, malformed value); usage errors are one line naming the option.
#pragma once

#include <iosfwd>
#include <string>
#include <vector>

namespace kvtier::cli {

inline constexpr int kExitOk = 0;
inline constexpr int kExitFailure = 1;
inline constexpr int kExitUsage = 2;

// Runs one command; args excludes the program name.
int run(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);

// Subcommands, each parsing its own options.
int info_command(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);
int bench_command(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);
int calibrate_command(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);
int plan_command(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);
int demo_command(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);

}  // namespace kvtier::cli
