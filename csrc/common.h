// Shared helpers of the plain C++ core: error checks, the one 64-bit mixer (splitmix64) and thread-count
// handling. No Python here.
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

// splitmix64 (Steele, Lea and Flood, "Fast splittable pseudorandom number generators", 2014): the core's
// one seeded sequence and 64-bit finaliser. Packing's seeded permutation and sampling's per-item keys
// are drawn from it; the Python side (mlmix.torch.data) reimplements the finaliser bit for bit.
// The state is a Weyl sequence: each step adds the golden-ratio increment.
inline constexpr uint64_t kSplitMix64Increment = 0x9E3779B97F4A7C15ull;

// Advances the state by one step and returns the new state.
inline constexpr uint64_t splitmix64_step(uint64_t& state) { return state += kSplitMix64Increment; }

// The finaliser: a bijection of 64-bit words with full avalanche.
inline constexpr uint64_t splitmix64_mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The next output of the generator whose state is `state`.
inline constexpr uint64_t splitmix64(uint64_t& state) { return splitmix64_mix(splitmix64_step(state)); }

// Number of worker threads to use: `requested` if positive, else MLMIX_NUM_THREADS when set, else the
// number of cores this process may run on (its CPU affinity: taskset, cpusets).
int resolve_threads(int requested);

}  // namespace mlmix
