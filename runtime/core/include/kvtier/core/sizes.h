// Human sizes on the command line and in config files.
//
// Token counts: a plain integer, or K/M/G with binary multipliers, because
// context lengths are quoted that way (128K = 131072, 1M = 1048576 tokens).
// Byte sizes: B, KiB/MiB/GiB/TiB (binary), KB/MB/GB/TB (decimal, SI), and
// bare K/M/G/T meaning binary. A fractional mantissa ("1.5GiB") is accepted
// when the result is a whole number.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "kvtier/core/status.h"

namespace kvtier {

Result<uint64_t> parse_tokens(std::string_view text);
Result<uint64_t> parse_bytes(std::string_view text);

// 137438953472 -> "128 GiB"; 1536 -> "1.5 KiB"; 100 -> "100 B".
std::string format_bytes(uint64_t bytes);
// 1048576 -> "1M"; 131072 -> "128K"; 1000 -> "1000".
std::string format_tokens(uint64_t tokens);

}  // namespace kvtier
