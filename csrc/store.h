// Kernels of the packed store (docs/store-format.md): reading a batch of compact rows -- the real
// tokens of each row with its segment lengths, as the store keeps them on disk and memory-maps them --
// into padded training rows. The rows are checked first, reading only the requested ones, since the
// arrays come from files that may be corrupt. Plain C++ over pointers; no Python types.
#pragma once

#include <cstdint>

namespace mlmix {

// A packed store's compact rows (docs/store-format.md): row r holds tokens [row_offsets[r],
// row_offsets[r + 1]) split into segments seg_lens[seg_offsets[r] .. seg_offsets[r + 1]).
struct CompactRows {
  const int64_t* row_offsets;  // num_rows + 1
  const int64_t* seg_offsets;  // num_rows + 1
  const int32_t* seg_lens;     // num_segments
  int64_t num_rows;
  int64_t num_segments;
  int64_t num_tokens;
};

// Checks that the selected rows are in range and consistent (segments sum to the row's tokens, at most
// seq_len); reads only those rows, so a batch costs O(batch), not O(store). Throws std::out_of_range
// for a row index outside the store, std::invalid_argument for an inconsistent row.
void check_compact_rows(const CompactRows& store, const int64_t* rows, int64_t batch, int64_t seq_len);

// Fill batch x seq_len rows from the compact rows `rows` of a store: input_ids (pad_id after the real
// tokens), labels (token id where the loss mask is set, else -100; -100 on padding and on the first
// token of every segment), position_ids (0, 1, ... restarting per segment; 0 on padding), as
// pack.h's materialize_rows does for a plan. `mask` (uint8 per token) may be null (all ones). Rows are
// split among `threads` workers; the output does not depend on their number. Call check_compact_rows
// first.
template <typename T>
void materialize_compact_rows(const T* tokens, const uint8_t* mask, const CompactRows& store, const int64_t* rows,
                              int64_t batch, int64_t seq_len, T pad_id, T* input_ids, int64_t* labels,
                              int32_t* position_ids, int threads);

}  // namespace mlmix
