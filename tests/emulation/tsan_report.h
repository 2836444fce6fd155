// What the standalone emulation programs (tsan_layer_norm.cpp, tsan_padding.cpp) print, in the
// form tests/test_emulated_*.py check: one line per case, starting "ok  " or "FAIL", and a last
// line "PASSED: 0 failure(s)" (or "FAILED: n failure(s)", exit code 1).
#pragma once

#include <cstdio>

namespace emu_report {

// The start of a case's line.
inline const char* status(bool ok) { return ok ? "ok  " : "FAIL"; }

// Counts the failed cases; finish() prints the summary line and returns the exit code.
class Failures {
 public:
  void add(bool ok) { count_ += ok ? 0 : 1; }
  // A case whose line is just its name.
  void check(const char* what, bool ok) {
    std::printf("%s %s\n", status(ok), what);
    add(ok);
  }
  int finish() const {
    std::printf("%s: %d failure(s)\n", count_ ? "FAILED" : "PASSED", count_);
    return count_ ? 1 : 0;
  }

 private:
  int count_ = 0;
};

}  // namespace emu_report
