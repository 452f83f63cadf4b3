#include <doctest/doctest.h>
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <functional>
#include <memory>
#include <set>
#include <thread>
#include <vector>

#include "kvtier/storage/slot_allocator.h"
#include "random.h"

using kvtier::storage::SlotAllocator;

namespace {

// Runs fn in a child process with stderr silenced; true when it aborted, as
// KVT_ASSERT does. doctest has no death tests, so this is the smallest one.
bool aborts(const std::function<void()>& fn) {
  const pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    // doctest's crash handler would report the abort and carry on running
    // the suite in the child; the default action just ends it.
    std::signal(SIGABRT, SIG_DFL);
    const int null_fd = open("/dev/null", O_WRONLY);
    if (null_fd >= 0) {
      dup2(null_fd, STDOUT_FILENO);
      dup2(null_fd, STDERR_FILENO);
    }
    fn();
    _exit(0);
  }
  int status = 0;
  REQUIRE(waitpid(pid, &status, 0) == pid);
  return WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT;
}

}  // namespace

TEST_CASE("slot allocator hands out every slot exactly once, then none") {
  SlotAllocator slots(97);
  std::set<uint32_t> seen;
  for (uint32_t i = 0; i < 97; ++i) {
    const auto s = slots.allocate();
    REQUIRE(s.has_value());
    CHECK(*s < 97);
    CHECK(seen.insert(*s).second);
  }
  CHECK(slots.free_count() == 0);
  CHECK_FALSE(slots.allocate().has_value());
  for (uint32_t s : seen) slots.free(s);
  CHECK(slots.free_count() == 97);
}

TEST_CASE("a freed slot is handed out again") {
  SlotAllocator slots(17);
  std::vector<uint32_t> taken;
  for (int i = 0; i < 17; ++i) taken.push_back(*slots.allocate());
  slots.free(taken[5]);
  CHECK(slots.free_count() == 1);
  const auto again = slots.allocate();
  REQUIRE(again.has_value());
  CHECK(*again == taken[5]);
  CHECK_FALSE(slots.allocate().has_value());
}

TEST_CASE("allocate_run takes the lowest run of free slots, which single allocations then skip") {
  SlotAllocator slots(20);
  std::vector<uint32_t> taken;
  for (int i = 0; i < 6; ++i) taken.push_back(*slots.allocate());  // 0..5
  slots.free(2);
  slots.free(3);  // a hole of 2: too short for a run of 3
  const auto run = slots.allocate_run(3);
  REQUIRE(run.has_value());
  CHECK(*run == 6);
  CHECK(slots.free_count() == 20 - 4 - 3);
  // Every slot handed out afterwards lies outside the run, and each once.
  std::set<uint32_t> rest;
  while (auto s = slots.allocate()) {
    CHECK((*s < 6 || *s > 8));
    CHECK(rest.insert(*s).second);
  }
  CHECK(rest.size() == 20 - 4 - 3);
  CHECK_FALSE(slots.allocate_run(1).has_value());
  for (uint32_t s = 6; s < 9; ++s) slots.free(s);  // the run's slots free one by one
  CHECK(slots.free_count() == 3);
  CHECK_FALSE(slots.allocate_run(4).has_value());
  CHECK_FALSE(slots.allocate_run(0).has_value());
  CHECK(slots.allocate_run(3) == std::optional<uint32_t>(6));
}

TEST_CASE("a zero-capacity allocator has nothing to give") {
  SlotAllocator slots(0);
  CHECK(slots.capacity() == 0);
  CHECK_FALSE(slots.allocate().has_value());
}

TEST_CASE("allocate and free cost the same at a million slots (O(1))") {
  // An O(n) free list would make this 10^12 steps and time out.
  constexpr uint32_t kSlots = 1u << 20;
  SlotAllocator slots(kSlots);
  std::vector<uint32_t> taken(kSlots);
  for (uint32_t& s : taken) s = *slots.allocate();
  for (uint32_t s : taken) slots.free(s);
  CHECK(slots.free_count() == kSlots);
}

TEST_CASE("threads hammering allocate/free never share a slot") {
  constexpr uint32_t kSlots = 257;
  constexpr int kThreads = 8, kRounds = 20000;
  SlotAllocator slots(kSlots);
  auto owner = std::make_unique<std::atomic<int>[]>(kSlots);
  for (uint32_t i = 0; i < kSlots; ++i) owner[i] = -1;
  std::atomic<int> doubles{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      auto gen = kvtier::test::rng(1000 + t);
      std::vector<uint32_t> held;
      for (int r = 0; r < kRounds; ++r) {
        // Hold up to 64 slots so that the pool runs dry now and then.
        if (held.size() < 64 && (gen() & 1)) {
          if (const auto s = slots.allocate()) {
            int expected = -1;
            if (!owner[*s].compare_exchange_strong(expected, t)) ++doubles;
            held.push_back(*s);
          }
        } else if (!held.empty()) {
          const uint32_t s = held.back();
          held.pop_back();
          owner[s] = -1;
          slots.free(s);
        }
      }
      for (uint32_t s : held) {
        owner[s] = -1;
        slots.free(s);
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(doubles.load() == 0);
  CHECK(slots.free_count() == kSlots);
}

TEST_CASE("double free and out-of-range free are bugs that abort") {
  CHECK(aborts([] {
    SlotAllocator slots(4);
    const uint32_t s = *slots.allocate();
    slots.free(s);
    slots.free(s);
  }));
  CHECK(aborts([] {
    SlotAllocator slots(4);
    slots.free(4);
  }));
  CHECK(aborts([] {
    SlotAllocator slots(4);
    slots.free(2);  // never allocated
  }));
}
