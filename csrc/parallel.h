// Deterministic parallel loops over [0, n) for the kernels. No Python here.
//
// The range is cut into chunks of `grain` items handed out by an atomic counter; a body writes each
// result at its item's index, so the output does not depend on the thread count. Of the exceptions
// thrown, the one from the lowest chunk is rethrown (within a chunk items run in order, so that is the
// lowest failing item), for the same reason. The calling thread is one of the workers.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <limits>
#include <mutex>
#include <thread>
#include <vector>

#include "common.h"

namespace mlmix {

// body(state, begin, end) with one default-constructed State per worker thread, kept across its
// chunks (scratch buffers allocated once per thread, not once per chunk). num_threads: as resolve_threads.
template <class State, class F>
void parallel_chunks_with(int64_t n, int num_threads, int64_t grain, F&& body) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t chunks = (n + grain - 1) / grain;
  const int threads = static_cast<int>(std::min<int64_t>(resolve_threads(num_threads), chunks));
  std::atomic<int64_t> next{0};
  std::mutex error_mutex;
  std::exception_ptr error;
  int64_t error_chunk = std::numeric_limits<int64_t>::max();
  auto worker = [&] {
    State state;
    for (;;) {
      const int64_t c = next.fetch_add(1);
      if (c >= chunks) return;
      try {
        body(state, c * grain, std::min(n, (c + 1) * grain));
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (c < error_chunk) {
          error_chunk = c;
          error = std::current_exception();
        }
      }
    }
  };
  if (threads <= 1) {
    worker();
  } else {
    std::vector<std::thread> pool;
    pool.reserve(static_cast<size_t>(threads - 1));
    for (int t = 1; t < threads; ++t) pool.emplace_back(worker);
    worker();
    for (auto& th : pool) th.join();
  }
  if (error) std::rethrow_exception(error);
}

// body(begin, end): parallel_chunks_with without per-thread state.
template <class F>
void parallel_chunks(int64_t n, int num_threads, int64_t grain, F&& body) {
  struct None {};
  parallel_chunks_with<None>(n, num_threads, grain, [&](None&, int64_t begin, int64_t end) { body(begin, end); });
}

}  // namespace mlmix
