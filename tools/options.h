// Shared handling of Boost.Program_options for the subcommands.
#pragma once

#include <boost/program_options.hpp>
#include <iosfwd>
#include <optional>
#include <string>
#include <vector>

namespace kvtier::cli {

// Parses args into vm. Returns an exit code when the command must stop now:
// 0 after printing --help, 2 after a one-line usage error naming the option.
std::optional<int> parse_options(const std::string& command, const std::vector<std::string>& args,
                                 const boost::program_options::options_description& options,
                                 const boost::program_options::positional_options_description* positional,
                                 boost::program_options::variables_map& vm, std::ostream& out, std::ostream& err);

}  // namespace kvtier::cli
