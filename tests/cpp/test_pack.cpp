// C++ test of the packing kernels without Python: plan invariants on random inputs, materialised rows,
// and errors on bad input. Built with -DMLMIX_BUILD_TESTS=ON; run build/dev/test_pack (exit 0 = pass).
#include <cstdio>
#include <random>
#include <stdexcept>
#include <vector>

#include "pack.h"
#include "check.h"

namespace {

using mlmix_test::failures;

using mlmix::OverlongPolicy;
using mlmix::PackStrategy;

// Every example's pieces tile it exactly once (split), rows never overflow, assignment points at piece 0.
void check_plan(const std::vector<int64_t>& lengths, int64_t seq_len, PackStrategy strategy) {
  auto plan = mlmix::plan_pack(lengths.data(), static_cast<int64_t>(lengths.size()), seq_len, strategy,
                               OverlongPolicy::kSplit, true, 42);
  std::vector<int64_t> covered(lengths.size(), 0);
  int64_t rows = static_cast<int64_t>(plan.row_offsets.size()) - 1;
  for (int64_t r = 0; r < rows; ++r) {
    int64_t used = 0;
    for (int64_t s = plan.row_offsets[r]; s < plan.row_offsets[r + 1]; ++s) {
      used += plan.seg_len[s];
      covered[plan.seg_example[s]] += plan.seg_len[s];
      if (plan.seg_start[s] == 0) EXPECT(plan.assignment[plan.seg_example[s]] == r);
    }
    EXPECT(used <= seq_len && used > 0);
  }
  for (size_t i = 0; i < lengths.size(); ++i) EXPECT(covered[i] == lengths[i]);
}

void test_random_plans() {
  std::mt19937_64 rng(7);
  for (int trial = 0; trial < 200; ++trial) {
    int64_t seq_len = 2 + static_cast<int64_t>(rng() % 300);
    std::vector<int64_t> lengths(rng() % 500);
    for (auto& x : lengths) x = 1 + static_cast<int64_t>(rng() % (2 * seq_len));
    for (auto s : {PackStrategy::kBestFitDecreasing, PackStrategy::kFirstFitDecreasing, PackStrategy::kWrapped}) {
      check_plan(lengths, seq_len, s);
    }
  }
}

void test_materialize() {
  // two examples [10 11 12] and [20 21] with masks [1 1 0] and [0 1], one row of 6
  std::vector<uint32_t> values = {10, 11, 12, 20, 21};
  std::vector<int64_t> offsets = {0, 3, 5};
  std::vector<uint8_t> mask = {1, 1, 0, 0, 1};
  std::vector<int64_t> lengths = {3, 2};
  auto plan = mlmix::plan_pack(lengths.data(), 2, 6, PackStrategy::kBestFitDecreasing, OverlongPolicy::kError,
                               false, 0);
  mlmix::SegmentView view{plan.seg_example.data(), plan.seg_start.data(), plan.seg_len.data(),
                          plan.row_offsets.data(), static_cast<int64_t>(plan.row_offsets.size()) - 1};
  mlmix::check_segments(offsets.data(), 2, view, 6);
  std::vector<uint32_t> ids(6);
  std::vector<int64_t> labels(6);
  std::vector<int32_t> pos(6);
  mlmix::materialize_rows<uint32_t>(values.data(), offsets.data(), mask.data(), view, 6, 7, ids.data(),
                                    labels.data(), pos.data(), 2);
  EXPECT((ids == std::vector<uint32_t>{10, 11, 12, 20, 21, 7}));
  EXPECT((labels == std::vector<int64_t>{-100, 11, -100, -100, 21, -100}));
  EXPECT((pos == std::vector<int32_t>{0, 1, 2, 0, 1, 0}));
}

void test_bad_input() {
  std::vector<int64_t> zero = {3, 0};
  std::vector<int64_t> longer = {9};
  bool threw = false;
  try {
    mlmix::plan_pack(zero.data(), 2, 8, PackStrategy::kBestFitDecreasing, OverlongPolicy::kError, false, 0);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  EXPECT(threw);
  threw = false;
  try {
    mlmix::plan_pack(longer.data(), 1, 8, PackStrategy::kBestFitDecreasing, OverlongPolicy::kError, false, 0);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  EXPECT(threw);
  threw = false;
  try {
    mlmix::plan_pack(longer.data(), 1, 1, PackStrategy::kBestFitDecreasing, OverlongPolicy::kSplit, false, 0);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  EXPECT(threw);
}

}  // namespace

int main() {
  test_random_plans();
  test_materialize();
  test_bad_input();
  if (failures) {
    std::fprintf(stderr, "test_pack: %d failure(s)\n", failures);
    return 1;
  }
  std::printf("test_pack: ok\n");
  return 0;
}
