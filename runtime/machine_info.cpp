#include "kvtier/runtime/machine_info.h"

namespace kvtier::runtime {

MachineFacts describe_machine(const std::string& dir) { return scheduler::probe_machine(dir); }
nlohmann::json machine_json(const MachineFacts& facts) { return scheduler::to_json(facts); }
std::string machine_text(const MachineFacts& facts) { return scheduler::to_text(facts); }

}  // namespace kvtier::runtime
