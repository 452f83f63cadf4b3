#include "kvtier/core/sizes.h"

#include <array>
#include <cctype>
#include <cstdio>
#include <utility>

namespace kvtier {
namespace {

// Products of a 20-digit mantissa and a 2^40 multiplier need more than 64 bits.
__extension__ typedef unsigned __int128 u128;

struct Suffix {
  std::string_view text;
  uint64_t multiplier;
};

constexpr uint64_t kKi = 1024;
constexpr std::array kTokenSuffixes{Suffix{"", 1}, Suffix{"K", kKi}, Suffix{"k", kKi},
                                    Suffix{"M", kKi * kKi}, Suffix{"G", kKi * kKi * kKi}};
constexpr std::array kByteSuffixes{
    Suffix{"", 1},           Suffix{"B", 1},
    Suffix{"KiB", kKi},      Suffix{"MiB", kKi * kKi}, Suffix{"GiB", kKi * kKi * kKi}, Suffix{"TiB", kKi * kKi * kKi * kKi},
    Suffix{"KB", 1000},      Suffix{"MB", 1000 * 1000}, Suffix{"GB", 1000ull * 1000 * 1000},
    Suffix{"TB", 1000ull * 1000 * 1000 * 1000},
    Suffix{"K", kKi},        Suffix{"M", kKi * kKi},   Suffix{"G", kKi * kKi * kKi}, Suffix{"T", kKi * kKi * kKi * kKi},
};

// "'text'" built by appending: GCC 12 warns falsely (-Wrestrict) on
// "literal" + std::string temporaries.
std::string quote(std::string_view text) {
  std::string q;
  q.reserve(text.size() + 2);
  q.push_back('\'');
  q.append(text);
  q.push_back('\'');
  return q;
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  return s;
}

// Splits "1.5 GiB" into integer digits "1", fraction digits "5" and suffix "GiB".
struct Parts {
  std::string_view whole, fraction, suffix;
};

Result<Parts> split(std::string_view raw, std::string_view what, std::string_view example) {
  const std::string_view s = trim(raw);
  const std::string quoted = quote(raw);
  if (s.empty()) return invalid_argument("empty " + std::string(what) + "; expected e.g. " + std::string(example));
  if (s.front() == '-') return invalid_argument(std::string(what) + " " + quoted + " is negative");
  size_t i = 0;
  while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i]))) ++i;
  Parts p{s.substr(0, i), {}, {}};
  if (i < s.size() && s[i] == '.') {
    const size_t start = ++i;
    while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i]))) ++i;
    p.fraction = s.substr(start, i - start);
  }
  if (p.whole.empty() && p.fraction.empty())
    return invalid_argument(std::string(what) + " " + quoted + " does not start with a number; expected e.g. " +
                            std::string(example));
  p.suffix = trim(s.substr(i));
  return p;
}

template <size_t N>
Result<uint64_t> parse_with(std::string_view raw, const std::array<Suffix, N>& suffixes, std::string_view what,
                            std::string_view example, std::string_view accepted) {
  KVT_ASSIGN_OR_RETURN(Parts p, split(raw, what, example));
  const std::string quoted = quote(raw);
  const Suffix* suffix = nullptr;
  for (const Suffix& s : suffixes)
    if (s.text == p.suffix) suffix = &s;
  if (suffix == nullptr)
    return invalid_argument(std::string(what) + " " + quoted + " has unknown suffix '" + std::string(p.suffix) +
                            "' (accepted: " + std::string(accepted) + ")");
  if (p.whole.size() > 20 || p.fraction.size() > 18)
    return out_of_range(std::string(what) + " " + quoted + " has too many digits");
  u128 whole = 0, frac = 0, frac_scale = 1;
  for (char c : p.whole) whole = whole * 10 + static_cast<unsigned>(c - '0');
  for (char c : p.fraction) {
    frac = frac * 10 + static_cast<unsigned>(c - '0');
    frac_scale *= 10;
  }
  const u128 frac_scaled = frac * suffix->multiplier;
  if (frac_scaled % frac_scale != 0)
    return invalid_argument(std::string(what) + " " + quoted + " is not a whole number of " +
                            (what == "token count" ? "tokens" : "bytes"));
  const u128 total = whole * suffix->multiplier + frac_scaled / frac_scale;
  if (total > UINT64_MAX) return out_of_range(std::string(what) + " " + quoted + " does not fit in 64 bits");
  return static_cast<uint64_t>(total);
}

std::string trimmed_number(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f", v);
  std::string s = buf;
  if (s.size() > 2 && s.compare(s.size() - 2, 2, ".0") == 0) s.resize(s.size() - 2);
  return s;
}

}  // namespace

Result<uint64_t> parse_tokens(std::string_view text) {
  return parse_with(text, kTokenSuffixes, "token count", "131072, 128K or 1M", "none, K, M, G (binary: 1K = 1024)");
}

Result<uint64_t> parse_bytes(std::string_view text) {
  return parse_with(text, kByteSuffixes, "byte size", "24GiB, 512KiB or 4096",
                    "B, KiB, MiB, GiB, TiB, KB, MB, GB, TB, or K/M/G/T meaning KiB/MiB/GiB/TiB");
}

std::string format_bytes(uint64_t bytes) {
  static constexpr std::array<const char*, 5> kUnits{"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  size_t u = 0;
  while (v >= 1024.0 && u + 1 < kUnits.size()) {
    v /= 1024.0;
    ++u;
  }
  return (u == 0 ? std::to_string(bytes) : trimmed_number(v)) + " " + kUnits[u];
}

std::string format_tokens(uint64_t tokens) {
  for (auto [mult, suffix] : {std::pair{kKi * kKi * kKi, "G"}, std::pair{kKi * kKi, "M"}, std::pair{kKi, "K"}})
    if (tokens >= mult && tokens % mult == 0) return std::to_string(tokens / mult) + suffix;
  return std::to_string(tokens);
}

}  // namespace kvtier
