// libFuzzer target: the packing planner and the row materializer (csrc/pack.h).
// An accepted plan must honour the packing contract: every row holds at most seq_len tokens, the
// segments pass check_segments, and materialized rows carry exactly the planned example tokens.
#include <fuzzer/FuzzedDataProvider.h>

#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <vector>

#include "pack.h"

#define FUZZ_ASSERT(cond) \
  do {                    \
    if (!(cond)) std::abort(); \
  } while (0)

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  const int64_t seq_len = in.ConsumeIntegralInRange<int64_t>(-2, 80);
  const auto strategy = static_cast<mlmix::PackStrategy>(in.ConsumeIntegralInRange<int>(0, 2));
  const auto overlong = static_cast<mlmix::OverlongPolicy>(in.ConsumeIntegralInRange<int>(0, 3));
  const bool shuffle = in.ConsumeBool();
  const uint64_t seed = in.ConsumeIntegral<uint64_t>();
  const size_t n = in.ConsumeIntegralInRange<size_t>(0, 48);
  std::vector<int64_t> lengths(n);
  for (auto& l : lengths) l = in.ConsumeIntegralInRange<int64_t>(-1, 120);
  mlmix::PackPlanData plan;
  try {
    plan = mlmix::plan_pack(lengths.data(), static_cast<int64_t>(n), seq_len, strategy, overlong, shuffle, seed);
  } catch (const std::invalid_argument&) {
    return 0;
  }
  const int64_t rows = static_cast<int64_t>(plan.row_offsets.size()) - 1;
  FUZZ_ASSERT(rows >= 0 && plan.row_offsets[0] == 0);
  FUZZ_ASSERT(plan.assignment.size() == n);
  std::vector<int64_t> offsets(n + 1, 0);
  for (size_t i = 0; i < n; ++i) offsets[i + 1] = offsets[i] + lengths[i];
  mlmix::SegmentView segs{plan.seg_example.data(), plan.seg_start.data(), plan.seg_len.data(),
                          plan.row_offsets.data(), rows};
  mlmix::check_segments(offsets.data(), static_cast<int64_t>(n), segs, seq_len);  // must not throw
  int64_t packed = 0;
  for (size_t s = 0; s < plan.seg_len.size(); ++s) packed += plan.seg_len[s];
  FUZZ_ASSERT(packed == plan.tokens_packed);
  int64_t total = offsets[n];
  FUZZ_ASSERT(packed + plan.tokens_dropped == total || overlong == mlmix::OverlongPolicy::kSplit);
  // token value = its global index: materialized ids must be the planned slices
  std::vector<int32_t> values(static_cast<size_t>(total) + 1);  // + 1: never a null pointer, as from numpy
  for (int64_t t = 0; t < total; ++t) values[static_cast<size_t>(t)] = static_cast<int32_t>(t);
  std::vector<uint8_t> mask(static_cast<size_t>(total) + 1);
  for (int64_t t = 0; t < total; ++t) mask[static_cast<size_t>(t)] = static_cast<uint8_t>((t * 7) % 3 != 0);
  const size_t cells = static_cast<size_t>(rows * seq_len);
  std::vector<int32_t> ids(cells);
  std::vector<int64_t> labels(cells);
  std::vector<int32_t> pos(cells);
  // threads are started per call: several only for one input in eight, to keep executions fast
  const int threads = in.ConsumeIntegralInRange<int>(0, 7) == 0 ? 3 : 1;
  mlmix::materialize_rows<int32_t>(values.data(), offsets.data(), in.ConsumeBool() ? mask.data() : nullptr, segs,
                                   seq_len, -1, ids.data(), labels.data(), pos.data(), threads);
  for (int64_t r = 0; r < rows; ++r) {
    int64_t col = 0;
    for (int64_t s = plan.row_offsets[r]; s < plan.row_offsets[r + 1]; ++s) {
      const int64_t first = offsets[plan.seg_example[s]] + plan.seg_start[s];
      for (int32_t k = 0; k < plan.seg_len[s]; ++k, ++col) {
        FUZZ_ASSERT(ids[r * seq_len + col] == first + k);
        FUZZ_ASSERT(pos[r * seq_len + col] == k);
      }
    }
    FUZZ_ASSERT(col <= seq_len);
    for (; col < seq_len; ++col) FUZZ_ASSERT(ids[r * seq_len + col] == -1 && labels[r * seq_len + col] == -100);
  }
  return 0;
}
