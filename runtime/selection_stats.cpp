#include "kvtier/runtime/selection_stats.h"

#include <algorithm>

namespace kvtier::runtime {

double selection_overlap(const std::vector<uint32_t>& previous, const std::vector<uint32_t>& current) {
  if (current.empty()) return 1.0;
  std::vector<uint32_t> prev = previous;
  std::sort(prev.begin(), prev.end());
  size_t kept = 0;
  for (uint32_t b : current) kept += std::binary_search(prev.begin(), prev.end(), b) ? 1 : 0;
  return static_cast<double>(kept) / static_cast<double>(current.size());
}

void OverlapMeter::add(const std::vector<uint32_t>& selection) {
  if (has_previous_) {
    sum_ += selection_overlap(previous_, selection);
    ++transitions_;
  }
  previous_ = selection;
  has_previous_ = true;
}

}  // namespace kvtier::runtime
