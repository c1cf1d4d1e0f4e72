// Runner of the C++ kernel tests: every case that test_<stem>.cpp files registered (see harness.h).
//
//   gptkernels_cpu_tests                 run all cases
//   gptkernels_cpu_tests layernorm fp16  run the cases whose name contains every argument
//   gptkernels_cpu_tests --list          print the case names
//
// Prints one line per case, the worst error/bound ratio per checked quantity, and "N passed, N failed" last.
// Exits non-zero when a case failed or when no case matched.
#include <chrono>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "harness.h"

int main(int argc, char** argv) {
  bool list = false;
  std::vector<std::string> filters;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--list") {
      list = true;
    } else if (a == "-h" || a == "--help") {
      std::printf("usage: %s [--list] [substring...]\n", argv[0]);
      return 0;
    } else {
      filters.push_back(a);
    }
  }

  int passed = 0, failed = 0;
  std::vector<std::string> failed_names;
  const auto t_start = std::chrono::steady_clock::now();
  for (const gk::TestCase& tc : gk::registry()) {
    bool match = true;
    for (const std::string& f : filters) match = match && tc.name.find(f) != std::string::npos;
    if (!match) continue;
    if (list) {
      std::printf("%s\n", tc.name.c_str());
      continue;
    }
    gk::CaseState state{tc.name};
    gk::current_case() = &state;
    const auto t0 = std::chrono::steady_clock::now();
    try {
      tc.fn();
    } catch (const std::exception& e) {
      gk::fail(__FILE__, __LINE__, std::string("exception: ") + e.what());
    } catch (...) {
      gk::fail(__FILE__, __LINE__, "unknown exception");
    }
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    gk::current_case() = nullptr;
    if (state.failures == 0) {
      ++passed;
      std::printf("[  OK  ] %s (%.1f ms)\n", tc.name.c_str(), ms);
    } else {
      ++failed;
      failed_names.push_back(tc.name);
      std::printf("[ FAIL ] %s: %d failed check(s) (%.1f ms)\n", tc.name.c_str(), state.failures, ms);
    }
    std::fflush(stdout);
  }
  if (list) return 0;

  if (!gk::margins().empty()) {
    std::printf("\nworst error / bound per quantity (<= 1 passes):\n");
    for (const auto& kv : gk::margins()) std::printf("  %-32s %.3g\n", kv.first.c_str(), kv.second);
  }
  if (!failed_names.empty()) {
    std::printf("\nfailed:\n");
    for (const std::string& n : failed_names) std::printf("  %s\n", n.c_str());
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  std::printf("\n%.2f s\n", s);
  if (passed + failed == 0) std::printf("no test case matched\n");
  std::printf("%d passed, %d failed\n", passed, failed);
  return (failed == 0 && passed > 0) ? 0 : 1;
}
