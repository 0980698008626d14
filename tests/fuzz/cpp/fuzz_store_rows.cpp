// libFuzzer target: the store's row reader (csrc/store.h check_compact_rows / materialize_compact_rows),
// which the Python store hands memory-mapped arrays read from disk. Arbitrary row and segment offsets,
// segment lengths and requested rows: check_compact_rows must refuse every inconsistent request (an
// exception), and whatever it accepts must be read without a memory error.
#include <fuzzer/FuzzedDataProvider.h>

#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <vector>

#include "store.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  const int64_t seq_len = in.ConsumeIntegralInRange<int64_t>(1, 64);
  const size_t num_rows = in.ConsumeIntegralInRange<size_t>(0, 16);
  const size_t num_segments = in.ConsumeIntegralInRange<size_t>(0, 40);
  const size_t num_tokens = in.ConsumeIntegralInRange<size_t>(0, 400);
  const bool monotone = in.ConsumeBool();  // half the inputs start from plausible offsets, to get deeper
  std::vector<int64_t> row_offsets(num_rows + 1), seg_offsets(num_rows + 1);
  for (size_t r = 0; r <= num_rows; ++r) {
    if (monotone) {
      row_offsets[r] = (r ? row_offsets[r - 1] : 0) + in.ConsumeIntegralInRange<int64_t>(r ? 0 : 0, seq_len);
      seg_offsets[r] = (r ? seg_offsets[r - 1] : 0) + in.ConsumeIntegralInRange<int64_t>(0, 4);
    } else {
      row_offsets[r] = in.ConsumeIntegral<int64_t>();
      seg_offsets[r] = in.ConsumeIntegral<int64_t>();
    }
  }
  std::vector<int32_t> seg_lens(num_segments);
  for (auto& l : seg_lens) l = monotone ? in.ConsumeIntegralInRange<int32_t>(-1, static_cast<int32_t>(seq_len))
                                        : in.ConsumeIntegral<int32_t>();
  const size_t batch = in.ConsumeIntegralInRange<size_t>(0, 8);
  std::vector<int64_t> rows(batch);
  for (auto& r : rows) r = in.ConsumeIntegralInRange<int64_t>(-2, static_cast<int64_t>(num_rows) + 1);
  // never a null data pointer (numpy never hands one over, even for 0 elements; see docs/hardening.md)
  std::vector<uint32_t> tokens(num_tokens + 1);
  std::vector<uint8_t> mask(num_tokens + 1);
  for (size_t t = 0; t < num_tokens; ++t) {
    tokens[t] = static_cast<uint32_t>(t);
    mask[t] = static_cast<uint8_t>(t & 1);
  }
  mlmix::CompactRows store{row_offsets.data(), seg_offsets.data(), seg_lens.data(), static_cast<int64_t>(num_rows),
                           static_cast<int64_t>(num_segments), static_cast<int64_t>(num_tokens)};
  try {
    mlmix::check_compact_rows(store, rows.data(), static_cast<int64_t>(batch), seq_len);
  } catch (const std::invalid_argument&) {
    return 0;
  } catch (const std::out_of_range&) {
    return 0;
  }
  const size_t cells = batch * static_cast<size_t>(seq_len);
  std::vector<uint32_t> ids(cells);
  std::vector<int64_t> labels(cells);
  std::vector<int32_t> pos(cells);
  mlmix::materialize_compact_rows<uint32_t>(tokens.data(), in.ConsumeBool() ? mask.data() : nullptr, store,
                                            rows.data(), static_cast<int64_t>(batch), seq_len, 0u, ids.data(),
                                            labels.data(), pos.data(), in.ConsumeIntegralInRange<int>(0, 7) == 0 ? 3 : 1);
  for (size_t b = 0; b < batch; ++b) {  // the real tokens of the row, in order, then padding
    const int64_t t0 = row_offsets[rows[b]], t1 = row_offsets[rows[b] + 1];
    for (int64_t c = 0; c < seq_len; ++c) {
      const uint32_t want = c < t1 - t0 ? static_cast<uint32_t>(t0 + c) : 0u;
      if (ids[b * seq_len + c] != want) std::abort();
    }
  }
  return 0;
}
