// C++ test of the store kernels without Python: compact rows read back as the padded rows that packing
// materialises from the same plan, and errors on inconsistent rows. Built with -DMLMIX_BUILD_TESTS=ON;
// run build/dev/test_store (exit 0 = pass).
#include <cstdio>
#include <random>
#include <stdexcept>
#include <vector>

#include "pack.h"
#include "store.h"
#include "check.h"

namespace {

using mlmix_test::failures;
using mlmix_test::throws_invalid;

// A plan's rows written compactly (gather_segments, as the store writes them) and read back with
// materialize_compact_rows equal materialize_rows of the plan, in any row order and thread count.
void test_round_trip() {
  std::mt19937_64 rng(11);
  for (int trial = 0; trial < 50; ++trial) {
    const int64_t seq_len = 2 + static_cast<int64_t>(rng() % 40);
    const int64_t n = static_cast<int64_t>(rng() % 60);
    std::vector<int64_t> lengths(n), offsets(n + 1, 0);
    for (int64_t i = 0; i < n; ++i) {
      lengths[i] = 1 + static_cast<int64_t>(rng() % (2 * seq_len));
      offsets[i + 1] = offsets[i] + lengths[i];
    }
    std::vector<int32_t> values(offsets[n]);
    std::vector<uint8_t> mask(offsets[n]);
    for (auto& v : values) v = static_cast<int32_t>(rng() % 1000);
    for (auto& m : mask) m = static_cast<uint8_t>(rng() % 2);
    auto plan = mlmix::plan_pack(lengths.data(), n, seq_len, mlmix::PackStrategy::kBestFitDecreasing,
                                 mlmix::OverlongPolicy::kSplit, true, 5);
    const int64_t rows = static_cast<int64_t>(plan.row_offsets.size()) - 1;
    mlmix::SegmentView view{plan.seg_example.data(), plan.seg_start.data(), plan.seg_len.data(),
                            plan.row_offsets.data(), rows};
    std::vector<int32_t> ids(rows * seq_len);
    std::vector<int64_t> labels(rows * seq_len);
    std::vector<int32_t> pos(rows * seq_len);
    mlmix::materialize_rows<int32_t>(values.data(), offsets.data(), mask.data(), view, seq_len, -1, ids.data(),
                                     labels.data(), pos.data(), 1);
    // The compact form: tokens and mask in packed order, per-row token and segment offsets.
    std::vector<int32_t> tokens(plan.tokens_packed);
    std::vector<uint8_t> packed_mask(plan.tokens_packed);
    mlmix::gather_segments<int32_t>(values.data(), offsets.data(), view, tokens.data());
    mlmix::gather_segments<uint8_t>(mask.data(), offsets.data(), view, packed_mask.data());
    std::vector<int64_t> row_offsets(rows + 1, 0);
    for (int64_t r = 0; r < rows; ++r) {
      int64_t used = 0;
      for (int64_t s = plan.row_offsets[r]; s < plan.row_offsets[r + 1]; ++s) used += plan.seg_len[s];
      row_offsets[r + 1] = row_offsets[r] + used;
    }
    mlmix::CompactRows store{row_offsets.data(), plan.row_offsets.data(), plan.seg_len.data(), rows,
                             static_cast<int64_t>(plan.seg_len.size()), static_cast<int64_t>(tokens.size())};
    std::vector<int64_t> batch(rows);
    for (int64_t b = 0; b < rows; ++b) batch[b] = rows - 1 - b;  // reversed
    mlmix::check_compact_rows(store, batch.data(), rows, seq_len);
    for (int threads : {1, 3}) {
      std::vector<int32_t> ids2(rows * seq_len);
      std::vector<int64_t> labels2(rows * seq_len);
      std::vector<int32_t> pos2(rows * seq_len);
      mlmix::materialize_compact_rows<int32_t>(tokens.data(), packed_mask.data(), store, batch.data(), rows, seq_len,
                                               -1, ids2.data(), labels2.data(), pos2.data(), threads);
      for (int64_t b = 0; b < rows; ++b) {
        const int64_t r = batch[b];
        for (int64_t t = 0; t < seq_len; ++t) {
          EXPECT(ids2[b * seq_len + t] == ids[r * seq_len + t]);
          EXPECT(labels2[b * seq_len + t] == labels[r * seq_len + t]);
          EXPECT(pos2[b * seq_len + t] == pos[r * seq_len + t]);
        }
      }
    }
  }
}

void test_bad_rows() {
  // one row of 3 tokens in segments of 2 and 1
  std::vector<int64_t> row_offsets = {0, 3}, seg_offsets = {0, 2};
  std::vector<int32_t> seg_lens = {2, 1};
  mlmix::CompactRows store{row_offsets.data(), seg_offsets.data(), seg_lens.data(), 1, 2, 3};
  std::vector<int64_t> rows = {0};
  mlmix::check_compact_rows(store, rows.data(), 1, 4);
  EXPECT(throws_invalid([&] { mlmix::check_compact_rows(store, rows.data(), 1, 2); }));  // longer than seq_len
  std::vector<int64_t> out_of_range = {1};
  bool threw = false;
  try {
    mlmix::check_compact_rows(store, out_of_range.data(), 1, 4);
  } catch (const std::out_of_range&) {
    threw = true;
  }
  EXPECT(threw);
  seg_lens[1] = 2;  // segments hold 4 tokens, the row 3
  EXPECT(throws_invalid([&] { mlmix::check_compact_rows(store, rows.data(), 1, 8); }));
  seg_lens[1] = -1;
  EXPECT(throws_invalid([&] { mlmix::check_compact_rows(store, rows.data(), 1, 8); }));
  seg_lens[1] = 1;
  row_offsets[1] = 5;  // past the tokens
  EXPECT(throws_invalid([&] { mlmix::check_compact_rows(store, rows.data(), 1, 8); }));
}

}  // namespace

int main() {
  test_round_trip();
  test_bad_rows();
  if (failures) {
    std::fprintf(stderr, "test_store: %d failure(s)\n", failures);
    return 1;
  }
  std::printf("test_store: ok\n");
  return 0;
}
