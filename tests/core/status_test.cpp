#include <doctest/doctest.h>

#include "kvtier/core/status.h"

using namespace kvtier;

namespace {

Result<int> half(int x) {
  if (x % 2 != 0) return invalid_argument("x=" + std::to_string(x) + " is odd");
  return x / 2;
}

Result<int> quarter(int x) {
  KVT_ASSIGN_OR_RETURN(int h, half(x));
  KVT_ASSIGN_OR_RETURN(int q, half(h));
  return q;
}

Status check_even(int x) {
  KVT_RETURN_IF_ERROR(half(x).status());
  return Status::ok_status();
}

}  // namespace

TEST_CASE("Status carries code and message, with context") {
  const Status ok;
  CHECK(ok.ok());
  CHECK(ok.to_string() == "ok");
  const Status err = io_error("read of /x failed: EIO").with_context("opening context");
  CHECK_FALSE(err.ok());
  CHECK(err.code() == StatusCode::kIoError);
  CHECK(err.to_string() == "io_error: opening context: read of /x failed: EIO");
}

TEST_CASE("Result propagates values and errors") {
  CHECK(quarter(8).ok());
  CHECK(*quarter(8) == 2);
  const Result<int> r = quarter(6);  // 6 -> 3 -> odd
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().code() == StatusCode::kInvalidArgument);
  CHECK(r.status().message() == "x=3 is odd");
  CHECK(check_even(4).ok());
  CHECK(check_even(5).message() == "x=5 is odd");
}
