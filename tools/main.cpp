#include <exception>
#include <iostream>

#include "cli.h"

int main(int argc, char** argv) {
  std::ios::sync_with_stdio(true);
  try {
    return kvtier::cli::run(std::vector<std::string>(argv + 1, argv + argc), std::cout, std::cerr);
  } catch (const std::exception& e) {
    // Library code returns Status; anything thrown here is a bug, reported
    // rather than left to std::terminate.
    std::cerr << "kvtier: internal error: " << e.what() << "\n";
    return 1;
  }
}
