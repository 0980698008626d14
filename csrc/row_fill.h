// Filling fixed-length training rows from segments: what packing (plans over a Ragged, pack.h) and the
// packed store (compact rows read from disk, store.h) share. Internal to the core; no Python here.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "common.h"

namespace mlmix::rows {

// Copy one segment of `len` tokens from src into a row at offset t, with its labels (the token where
// the loss mask is set, else -100) and positions (0, 1, ...).
template <typename T>
inline void fill_segment(const T* src, const uint8_t* mask_src, int32_t len, T* ids, int64_t* lab, int32_t* pos) {
  if (len > 0) std::memcpy(ids, src, sizeof(T) * static_cast<size_t>(len));  // src may be null when len = 0
  for (int32_t j = 0; j < len; ++j) {
    pos[j] = j;
    bool keep = mask_src == nullptr || mask_src[j] != 0;
    lab[j] = keep ? static_cast<int64_t>(src[j]) : -100;
  }
  // nothing may predict across a segment boundary
  if (len > 0) lab[0] = -100;
}

// Pad a row from token t to seq_len: pad_id, label -100, position 0.
template <typename T>
inline void pad_row(int64_t t, int64_t seq_len, T pad_id, T* ids, int64_t* lab, int32_t* pos) {
  std::fill(ids + t, ids + seq_len, pad_id);
  std::fill(lab + t, lab + seq_len, int64_t{-100});
  std::fill(pos + t, pos + seq_len, 0);
}

// Run fill(begin, end) over [0, n) split into contiguous ranges among up to `threads` workers.
template <typename F>
void parallel_rows(int64_t n, int threads, F fill) {
  int64_t workers = std::min<int64_t>(resolve_threads(threads), std::max<int64_t>(n / 16, 1));
  if (workers <= 1) {
    fill(int64_t{0}, n);
    return;
  }
  std::vector<std::thread> pool;
  for (int64_t w = 0; w < workers; ++w) pool.emplace_back(fill, n * w / workers, n * (w + 1) / workers);
  for (auto& th : pool) th.join();
}

}  // namespace mlmix::rows
