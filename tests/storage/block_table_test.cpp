#include <doctest/doctest.h>

#include "kvtier/storage/block_table.h"

using namespace kvtier::storage;

TEST_CASE("LRU policy evicts the least recently used block, in O(1) steps") {
  auto lru = make_lru_policy(10);
  CHECK(!lru->victim());
  for (uint32_t b : {3u, 1u, 4u, 5u}) lru->inserted(b);
  CHECK(*lru->victim() == 3);
  lru->touched(3);  // 3 becomes most recent: 1 is now the oldest
  CHECK(*lru->victim() == 1);
  lru->removed(1);
  CHECK(*lru->victim() == 4);
  CHECK(lru->size() == 3);
  lru->removed(4);
  lru->removed(5);
  CHECK(*lru->victim() == 3);
  lru->removed(3);
  CHECK(!lru->victim());
  lru->touched(3);  // touching a block that is not cached changes nothing
  CHECK(lru->size() == 0);
}

TEST_CASE("home-aware policy evicts cheap copies first, each class least recently used first") {
  bool flip = false;  // after insertion, what `costly` says must not matter
  auto p = make_home_aware_policy(10, [&](uint32_t b) { return flip ? b < 5 : b >= 5; });
  CHECK(!p->victim());
  for (uint32_t b : {5u, 0u, 6u, 1u}) p->inserted(b);
  flip = true;
  CHECK(p->size() == 4);
  CHECK(*p->victim() == 0);  // the oldest cheap copy, though 5 is older
  p->touched(0);
  CHECK(*p->victim() == 1);
  p->removed(1);
  CHECK(*p->victim() == 0);
  p->removed(0);
  CHECK(*p->victim() == 5);  // no cheap copy left: the oldest costly one
  p->touched(5);
  CHECK(*p->victim() == 6);
  p->removed(6);
  p->removed(6);  // removing twice changes nothing
  CHECK(p->size() == 1);
  p->inserted(6);  // back in, now in the class `costly` names: cheap
  CHECK(*p->victim() == 6);
  p->removed(6);
  p->removed(5);
  CHECK(!p->victim());
  CHECK(p->size() == 0);
}

TEST_CASE("pinned and protected copies are never eviction candidates") {
  BlockTable t(8, make_lru_policy(8), make_lru_policy(8));
  for (uint32_t b = 0; b < 4; ++b) {
    t[b].gpu_slot = b;
    t.gpu_cached(b);
  }
  CHECK(*t.gpu_policy().victim() == 0);
  t.pin_gpu(0);
  CHECK(*t.gpu_policy().victim() == 1);
  t.set_gpu_protected(1, true);  // a window block: holds a pin while on the gpu
  CHECK(*t.gpu_policy().victim() == 2);
  CHECK(t.user_gpu_pins(1) == 0);
  CHECK(t[1].gpu_pins == 1);
  t.unpin_gpu(0);  // back as most recent
  t.set_gpu_protected(1, false);
  CHECK(*t.gpu_policy().victim() == 2);
  t.gpu_dropped(2);
  t.gpu_dropped(3);
  CHECK(*t.gpu_policy().victim() == 0);
  CHECK(t.gpu_policy().size() == 2);
}

TEST_CASE("protection set before the copy arrives takes effect on arrival") {
  BlockTable t(4, make_lru_policy(4), make_lru_policy(4));
  t.set_gpu_protected(2, true);
  t[2].gpu_slot = 7;
  t.gpu_cached(2);
  CHECK(t[2].gpu_pins == 1);
  CHECK(!t.gpu_policy().victim());
  t.gpu_dropped(2);  // dropping the copy (on rewrite) releases its protection pin
  CHECK(t[2].gpu_pins == 0);
}

TEST_CASE("host pins only affect the staging cache of nvme homes") {
  BlockTable t(4, make_lru_policy(4), make_lru_policy(4));
  t[0].home = Tier::kNvme;
  t[0].host_cache_slot = 0;
  t.host_cached(0);
  t[1].home = Tier::kHost;
  t.pin_host(1);
  t.unpin_host(1);
  CHECK(t.host_cache_policy().size() == 1);
  t.pin_host(0);
  CHECK(t.host_cache_policy().size() == 0);
  t.unpin_host(0);
  CHECK(*t.host_cache_policy().victim() == 0);
}
