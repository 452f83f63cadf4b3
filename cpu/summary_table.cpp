// SummaryTable: per-(KV head, block) summary rows, 64-byte aligned, only the
// arrays the summary kind needs.
#include <sys/mman.h>

#include <cstddef>
#include <cstdint>

#include "kvtier/core/assert.h"
#include "kvtier/cpu/kernels.h"
#include "x86/kernels_isa.h"

namespace kvtier::cpu {
namespace {

bool has_f32_mean(SummaryKind kind) { return kind == SummaryKind::kMeanF32 || kind == SummaryKind::kMinMaxF32; }

// Sizes v to n zeroed elements, on transparent huge pages where the kernel
// grants them: the scorer streams every row each step, and with 4 KiB pages a
// 64 MiB array misses the TLB every 8 rows. Advised between reserving and
// touching, so that the first faults already take 2 MiB pages.
template <class Vec>
void allocate(Vec& v, uint64_t n) {
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  v.reserve(n);
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(v.data()) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(v.data() + n)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advice: failure is harmless
  v.resize(n);
}

// Row r = h * blocks + b of an array with `stride` elements per row.
template <class T, class Vec>
T* row_of(Vec& v, uint32_t h, uint32_t b, uint32_t kv_heads, uint32_t blocks, uint64_t stride) {
  KVT_ASSERT(h < kv_heads && b < blocks, "summary row (", h, ", ", b, ") of ", kv_heads, " x ", blocks);
  KVT_ASSERT(!v.empty(), "summary array absent for this kind");
  return v.data() + (uint64_t{h} * blocks + b) * stride;
}

}  // namespace

SummaryTable::SummaryTable(uint32_t kv_heads, uint32_t blocks, uint32_t head_dim, SummaryKind kind)
    : kv_heads_(kv_heads), blocks_(blocks), head_dim_(head_dim), kind_(kind),
      row_floats_(isa::f32_row_stride(head_dim)) {
  KVT_ASSERT(head_dim > 0, "head_dim=0");
  const uint64_t rows = uint64_t{kv_heads} * blocks;
  // Only the arrays the kind needs: at 1M tokens each is 64 MiB per layer.
  if (has_f32_mean(kind)) allocate(kmean_, rows * row_floats_);
  if (kind == SummaryKind::kMeanBf16) allocate(kmean_bf16_, rows * isa::bf16_row_stride(head_dim));
  if (kind == SummaryKind::kMinMaxF32) {
    allocate(kmin_, rows * row_floats_);
    allocate(kmax_, rows * row_floats_);
  }
  allocate(vmean_, rows * row_floats_);
  tokens_.resize(blocks);
}

float* SummaryTable::kmean_f32(uint32_t h, uint32_t b) {
  KVT_ASSERT(has_f32_mean(kind_), "kmean_f32 of a ", summary_kind_name(kind_), " table");
  return row_of<float>(kmean_, h, b, kv_heads_, blocks_, row_floats_);
}
const float* SummaryTable::kmean_f32(uint32_t h, uint32_t b) const {
  return const_cast<SummaryTable*>(this)->kmean_f32(h, b);
}

bf16* SummaryTable::kmean_bf16(uint32_t h, uint32_t b) {
  KVT_ASSERT(kind_ == SummaryKind::kMeanBf16, "kmean_bf16 of a ", summary_kind_name(kind_), " table");
  return row_of<bf16>(kmean_bf16_, h, b, kv_heads_, blocks_, isa::bf16_row_stride(head_dim_));
}
const bf16* SummaryTable::kmean_bf16(uint32_t h, uint32_t b) const {
  return const_cast<SummaryTable*>(this)->kmean_bf16(h, b);
}

float* SummaryTable::kmin(uint32_t h, uint32_t b) {
  KVT_ASSERT(kind_ == SummaryKind::kMinMaxF32, "kmin of a ", summary_kind_name(kind_), " table");
  return row_of<float>(kmin_, h, b, kv_heads_, blocks_, row_floats_);
}
const float* SummaryTable::kmin(uint32_t h, uint32_t b) const { return const_cast<SummaryTable*>(this)->kmin(h, b); }

float* SummaryTable::kmax(uint32_t h, uint32_t b) {
  KVT_ASSERT(kind_ == SummaryKind::kMinMaxF32, "kmax of a ", summary_kind_name(kind_), " table");
  return row_of<float>(kmax_, h, b, kv_heads_, blocks_, row_floats_);
}
const float* SummaryTable::kmax(uint32_t h, uint32_t b) const { return const_cast<SummaryTable*>(this)->kmax(h, b); }

float* SummaryTable::vmean(uint32_t h, uint32_t b) {
  return row_of<float>(vmean_, h, b, kv_heads_, blocks_, row_floats_);
}
const float* SummaryTable::vmean(uint32_t h, uint32_t b) const {
  return const_cast<SummaryTable*>(this)->vmean(h, b);
}

const void* SummaryTable::kmean_rows() const {
  return kind_ == SummaryKind::kMeanBf16 ? static_cast<const void*>(kmean_bf16_.data())
                                         : static_cast<const void*>(kmean_.data());
}

uint64_t SummaryTable::kmean_row_stride() const {
  return kind_ == SummaryKind::kMeanBf16 ? isa::bf16_row_stride(head_dim_) : row_floats_;
}

uint64_t SummaryTable::scoring_bytes() const {
  const uint64_t elems = uint64_t{kv_heads_} * blocks_ * head_dim_;
  switch (kind_) {
    case SummaryKind::kMeanF32: return elems * sizeof(float);
    case SummaryKind::kMeanBf16: return elems * sizeof(bf16);
    case SummaryKind::kMinMaxF32: return elems * sizeof(float) * 3;  // mean, min and max
  }
  return 0;
}

}  // namespace kvtier::cpu
