// How much a sparse selection changes from one decode step to the next. High
// overlap is what lets a scheduler prefetch this step's blocks from the last
// step's choice; random queries have little (about k / far blocks).
#pragma once

#include <cstdint>
#include <vector>

namespace kvtier::runtime {

// Share of `current` (block indices, no duplicates) that is also in
// `previous`: the part of this step's selection that was already selected
// last step. 1 when current is empty (nothing new is needed).
double selection_overlap(const std::vector<uint32_t>& previous, const std::vector<uint32_t>& current);

// Mean step-to-step overlap over a sequence of selections of one (layer, KV head).
class OverlapMeter {
 public:
  // Adds this step's selection; from the second call on, records its overlap with the previous one.
  void add(const std::vector<uint32_t>& selection);
  uint64_t transitions() const { return transitions_; }
  // Mean overlap over the recorded transitions; 0 when there are none.
  double mean() const { return transitions_ == 0 ? 0.0 : sum_ / static_cast<double>(transitions_); }

 private:
  std::vector<uint32_t> previous_;
  bool has_previous_ = false;
  double sum_ = 0.0;
  uint64_t transitions_ = 0;
};

}  // namespace kvtier::runtime
