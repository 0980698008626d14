// Shared helpers of the plain C++ core: error checks and thread-count handling. No Python here.
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace mlmix {

// Errors on user input are exceptions, never asserts: pybind11 maps std::invalid_argument to
// ValueError and std::out_of_range to IndexError, so nothing a Python caller passes aborts the process.
#define MLMIX_CHECK(cond, msg)                                  \
  do {                                                          \
    if (!(cond)) {                                              \
      std::ostringstream mlmix_check_os_;                       \
      mlmix_check_os_ << msg;                                   \
      throw std::invalid_argument(mlmix_check_os_.str());       \
    }                                                           \
  } while (0)

#define MLMIX_CHECK_INDEX(cond, msg)                            \
  do {                                                          \
    if (!(cond)) {                                              \
      std::ostringstream mlmix_check_os_;                       \
      mlmix_check_os_ << msg;                                   \
      throw std::out_of_range(mlmix_check_os_.str());           \
    }                                                           \
  } while (0)

// One document read in place: `len` code units of `width` bytes, the layouts of a Python str (1:
// Latin-1, 2: UCS-2, 4: UCS-4; lone surrogates possible in the last two) or 0: UTF-8 bytes.
struct TextView {
  const void* data = nullptr;
  int64_t len = 0;
  int width = 0;
};

// Number of worker threads to use: `requested` if positive, else the hardware concurrency
// (or MLMIX_NUM_THREADS when set).
int resolve_threads(int requested);

}  // namespace mlmix
