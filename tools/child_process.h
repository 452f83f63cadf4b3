// Running another program of this build (kvtier-bench) as a child process:
// its stdout captured, its stderr passed on line by line as progress and its
// tail kept for an error message.
#pragma once

#include <iosfwd>
#include <string>
#include <string_view>
#include <vector>

#include "kvtier/core/status.h"

namespace kvtier::cli {

// The path of program `name` in the directory of the running kvtier binary.
Result<std::string> program_beside_self(std::string_view name);

struct ChildResult {
  int exit_code = -1;    // the child's exit status; -1 when a signal ended it
  std::string signal;    // the signal's name when one ended it
  std::string out;       // everything it wrote to stdout
  std::string err_tail;  // the last lines it wrote to stderr (at most 4 KiB)
};

// Runs argv (argv[0] a path) to completion. Each stderr line goes to
// `progress` behind `prefix` as it arrives. Fails only when the child cannot
// be started or its output cannot be read; a non-zero exit is a result.
Result<ChildResult> run_child(const std::vector<std::string>& argv, std::ostream& progress, std::string_view prefix);

}  // namespace kvtier::cli
