#include "store.h"

#include "common.h"
#include "row_fill.h"

namespace mlmix {

void check_compact_rows(const CompactRows& store, const int64_t* rows, int64_t batch, int64_t seq_len) {
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t r = rows[b];
    MLMIX_CHECK_INDEX(r >= 0 && r < store.num_rows, "row " << r << " is out of range for " << store.num_rows << " rows");
    const int64_t t0 = store.row_offsets[r], t1 = store.row_offsets[r + 1];
    const int64_t s0 = store.seg_offsets[r], s1 = store.seg_offsets[r + 1];
    MLMIX_CHECK(0 <= t0 && t0 <= t1 && t1 <= store.num_tokens && t1 - t0 <= seq_len,
                "store row " << r << " has token range [" << t0 << ", " << t1 << "), invalid for " << store.num_tokens
                             << " tokens and seq_len " << seq_len);
    MLMIX_CHECK(0 <= s0 && s0 <= s1 && s1 <= store.num_segments,
                "store row " << r << " has segment range [" << s0 << ", " << s1 << "), invalid");
    int64_t sum = 0;
    for (int64_t s = s0; s < s1; ++s) {
      MLMIX_CHECK(store.seg_lens[s] >= 0, "store segment " << s << " has negative length");
      sum += store.seg_lens[s];
    }
    MLMIX_CHECK(sum == t1 - t0, "store row " << r << ": segments hold " << sum << " tokens, the row " << t1 - t0);
  }
}

template <typename T>
void materialize_compact_rows(const T* tokens, const uint8_t* mask, const CompactRows& store, const int64_t* rows,
                              int64_t batch, int64_t seq_len, T pad_id, T* input_ids, int64_t* labels,
                              int32_t* position_ids, int threads) {
  rows::parallel_rows(batch, threads, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t r = rows[b];
      T* ids = input_ids + b * seq_len;
      int64_t* lab = labels + b * seq_len;
      int32_t* pos = position_ids + b * seq_len;
      int64_t src = store.row_offsets[r];
      int64_t t = 0;
      for (int64_t s = store.seg_offsets[r]; s < store.seg_offsets[r + 1]; ++s) {
        const int32_t len = store.seg_lens[s];
        rows::fill_segment(tokens + src, mask ? mask + src : nullptr, len, ids + t, lab + t, pos + t);
        src += len;
        t += len;
      }
      rows::pad_row(t, seq_len, pad_id, ids, lab, pos);
    }
  });
}

#define MLMIX_STORE_INSTANTIATE(T)                                                                        \
  template void materialize_compact_rows<T>(const T*, const uint8_t*, const CompactRows&, const int64_t*, \
                                            int64_t, int64_t, T, T*, int64_t*, int32_t*, int);

MLMIX_STORE_INSTANTIATE(uint32_t)
MLMIX_STORE_INSTANTIATE(int32_t)
MLMIX_STORE_INSTANTIATE(int64_t)

}  // namespace mlmix
