#include <filesystem>
#include <ostream>

#include "cli.h"
#include "kvtier/runtime/machine_info.h"
#include "options.h"

namespace po = boost::program_options;

namespace kvtier::cli {

int info_command(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  po::options_description options("kvtier info options");
  options.add_options()("help,h", "show this help")(
      "json", po::bool_switch(), "print one JSON object on stdout (default: text)")(
      "dir", po::value<std::string>()->default_value("."),
      "directory where io_uring and O_DIRECT are checked (where the NVMe tier would live)");
  po::variables_map vm;
  if (auto stop = parse_options("info", args, options, nullptr, vm, out, err)) return *stop;
  const std::string dir = vm["dir"].as<std::string>();
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) {
    err << "kvtier info: --dir '" << dir << "' is not a directory; pass an existing directory on the drive "
        << "that would hold the NVMe tier\n";
    return kExitUsage;
  }
  const runtime::MachineFacts facts = runtime::describe_machine(dir);
  if (vm["json"].as<bool>())
    out << runtime::machine_json(facts).dump(2) << "\n";
  else
    out << runtime::machine_text(facts);
  return kExitOk;
}

}  // namespace kvtier::cli
