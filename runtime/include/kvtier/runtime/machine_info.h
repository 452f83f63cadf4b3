// The machine as the runtime sees it: the facts behind `kvtier info`.
#pragma once

#include <string>

#include "kvtier/scheduler/machine.h"

namespace kvtier::runtime {

using scheduler::MachineFacts;

// Probes this machine; io_uring and O_DIRECT are checked in `dir`.
MachineFacts describe_machine(const std::string& dir);
nlohmann::json machine_json(const MachineFacts& facts);
std::string machine_text(const MachineFacts& facts);

}  // namespace kvtier::runtime
