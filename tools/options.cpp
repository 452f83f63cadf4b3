#include "options.h"

#include <ostream>

namespace po = boost::program_options;

namespace kvtier::cli {

std::optional<int> parse_options(const std::string& command, const std::vector<std::string>& args,
                                 const po::options_description& options,
                                 const po::positional_options_description* positional, po::variables_map& vm,
                                 std::ostream& out, std::ostream& err) {
  try {
    po::command_line_parser parser(args);
    parser.options(options);
    if (positional != nullptr) parser.positional(*positional);
    po::store(parser.run(), vm);
    if (vm.count("help") != 0) {
      out << "usage: kvtier " << command << " [options]\n" << options;
      return 0;
    }
    po::notify(vm);
  } catch (const po::error& e) {
    // Boost's messages already name the option ("unrecognised option '--x'").
    err << "kvtier " << command << ": " << e.what() << " (see kvtier " << command << " --help)\n";
    return 2;
  }
  return std::nullopt;
}

}  // namespace kvtier::cli
