// Shared helpers of the plain C++ core: error checks, the one 64-bit mixer (splitmix64) and thread-count
// handling. No Python here.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

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

// Asks the kernel to back the 2 MiB-aligned part of [p, p + bytes) with transparent huge pages when it is
// first touched (Linux, THP mode "madvise" or "always"; advice only, ignored where unsupported). Memory touched
// for the first time costs a page fault per 4 KiB page, and one per 2 MiB page so advised: on the VMs these
// builds run on, a first touch of 64 MiB took 35 ms in 4 KiB pages and 8 ms in huge pages.
inline void advise_huge_pages(const void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (bytes < 2 * kHuge) return;
  const auto lo = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const auto hi = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

// v.reserve(n), the new storage advised for huge pages (advise_huge_pages) before anything touches it: for the
// large buffers a kernel fills (a block's columns, tokens and masks), called where `v` is still empty or small.
template <class T, class A>
void reserve_huge(std::vector<T, A>& v, size_t n) {
  if (n <= v.capacity()) return;
  v.reserve(n);
  advise_huge_pages(v.data(), v.capacity() * sizeof(T));
}

// An allocator whose resize() leaves trivially constructible elements uninitialised (it default-initialises
// instead of value-initialising): for the large outputs a kernel fills completely right after sizing them, on
// its worker threads, so that no serial zero-fill touches every page first.
template <class T>
struct DefaultInitAllocator : std::allocator<T> {
  template <class U>
  struct rebind {
    using other = DefaultInitAllocator<U>;
  };
  DefaultInitAllocator() noexcept = default;
  template <class U>
  DefaultInitAllocator(const DefaultInitAllocator<U>&) noexcept {}
  template <class U>
  void construct(U* p) noexcept(std::is_nothrow_default_constructible_v<U>) {
    ::new (static_cast<void*>(p)) U;
  }
  template <class U, class... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};
template <class T>
using FillVector = std::vector<T, DefaultInitAllocator<T>>;

// Number of worker threads to use: `requested` if positive, else MLMIX_NUM_THREADS when set, else the
// number of cores this process may run on (its CPU affinity: taskset, cpusets).
int resolve_threads(int requested);

}  // namespace mlmix
