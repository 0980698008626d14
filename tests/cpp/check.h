// What the C++ tests share: a failure count, EXPECT (reports file:line and goes on), and
// throws_invalid (the kernels report bad input as std::invalid_argument).
#pragma once

#include <cstdio>
#include <stdexcept>

namespace mlmix_test {
inline int failures = 0;

template <class F>
bool throws_invalid(F&& f) {
  try {
    f();
  } catch (const std::invalid_argument&) {
    return true;
  }
  return false;
}
}  // namespace mlmix_test

#define EXPECT(cond)                                                              \
  do {                                                                            \
    if (!(cond)) {                                                                \
      std::fprintf(stderr, "%s:%d: EXPECT(%s)\n", __FILE__, __LINE__, #cond);     \
      ++mlmix_test::failures;                                                     \
    }                                                                             \
  } while (0)
