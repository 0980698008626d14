// Packed-sequence construction: plan which example (piece) goes into which fixed-length row, from the
// lengths alone, then materialise rows of input_ids / labels / position_ids from the tokens.
// Plain C++ over pointers; no Python types. Errors on user input throw via MLMIX_CHECK.
#pragma once

#include <cstdint>
#include <vector>

namespace mlmix {

enum class PackStrategy { kBestFitDecreasing, kFirstFitDecreasing, kWrapped };
enum class OverlongPolicy { kError, kTruncate, kSplit, kDrop };

// Largest seq_len the capacity-indexed best-fit accepts (its index holds one bit per capacity).
inline constexpr int64_t kMaxSeqLen = int64_t{1} << 24;

// A plan: rows (sequences) made of segments; a segment is `len` tokens of example `example` starting
// at token `start` of that example. Segments of row r are [row_offsets[r], row_offsets[r + 1]).
struct PackPlanData {
  std::vector<int64_t> seg_example;
  std::vector<int32_t> seg_start;
  std::vector<int32_t> seg_len;
  std::vector<int64_t> row_offsets;  // num_rows + 1
  std::vector<int64_t> assignment;   // per example: row of its piece that starts at token 0, or -1 if dropped
  int64_t num_truncated = 0;         // examples cut to seq_len
  int64_t num_split = 0;             // examples split into several pieces
  int64_t num_dropped = 0;           // examples left out
  int64_t tokens_dropped = 0;        // tokens lost to truncate/drop
  int64_t tokens_packed = 0;         // real tokens placed in rows
};

// Plan the packing of n examples of the given lengths (each in [1, INT32_MAX]) into rows of seq_len
// tokens. BFD/FFD place whole pieces in decreasing length order (ties: ascending example index, or a
// seeded permutation when `shuffle`); wrapped concatenates in example order (or the seeded
// permutation) and cuts every seq_len tokens. O(n log n + seq_len) time, O(n + seq_len) memory.
PackPlanData plan_pack(const int64_t* lengths, int64_t n, int64_t seq_len, PackStrategy strategy,
                       OverlongPolicy overlong, bool shuffle, uint64_t seed);

// A view of a plan's segment table, for the kernels below.
struct SegmentView {
  const int64_t* seg_example;
  const int32_t* seg_start;
  const int32_t* seg_len;
  const int64_t* row_offsets;
  int64_t num_rows;
};

// Checks that every segment lies inside its example of the Ragged (offsets, n_examples) and that no
// row holds more than seq_len tokens; throws std::invalid_argument naming the first bad segment.
void check_segments(const int64_t* offsets, int64_t n_examples, const SegmentView& segs, int64_t seq_len);

// Fill num_rows x seq_len rows: input_ids (pad_id after the real tokens), labels (token id where the
// loss mask is set, else -100; -100 on padding and on the first token of every segment), position_ids
// (0, 1, ... restarting per segment; 0 on padding). `mask` (uint8 per token, parallel to values) may be
// null (all ones). Rows are split among `threads` workers; the output does not depend on their number.
// Call check_segments first.
template <typename T>
void materialize_rows(const T* values, const int64_t* offsets, const uint8_t* mask, const SegmentView& segs,
                      int64_t seq_len, T pad_id, T* input_ids, int64_t* labels, int32_t* position_ids,
                      int threads);

// Copy the real tokens of rows, segment after segment, into `out` (no padding): the packed order
// the store keeps on disk (store.h reads it back). Works for any element type (tokens, uint8 masks).
// Call check_segments first.
template <typename T>
void gather_segments(const T* values, const int64_t* offsets, const SegmentView& segs, T* out);

}  // namespace mlmix
