#include <doctest/doctest.h>

#include <unistd.h>

#include "kvtier/scheduler/machine.h"

using namespace kvtier;

TEST_CASE("machine facts agree with the operating system") {
  const scheduler::MachineFacts f = scheduler::probe_machine("/tmp");
  const uint64_t os_bytes = static_cast<uint64_t>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGESIZE);
  CHECK(f.memory_bytes > os_bytes * 9 / 10);
  CHECK(f.memory_bytes < os_bytes * 11 / 10);
  CHECK(f.io.dir == "/tmp");
  CHECK(f.cuda_built == gpu::built_with_cuda());
  if (f.gpus.empty()) CHECK(!f.gpu_error.empty());  // an empty list always says why
}

TEST_CASE("the JSON document has the documented shape") {
  const nlohmann::json j = scheduler::to_json(scheduler::probe_machine("/tmp"));
  CHECK(j["cpu"].is_object());
  CHECK(j["cpu"]["isa"]["avx2"].is_boolean());
  CHECK(j["memory_bytes"].is_number_unsigned());
  CHECK(j["gpus"].is_array());
  CHECK(j["io_uring"].size() >= 3);
  for (const char* key : {"available", "o_direct", "error"}) CHECK(j["io_uring"].contains(key));
  for (const char* key : {"kvtier", "onednn", "onetbb", "hwloc"}) CHECK(j["versions"][key].is_string());
}
