// libFuzzer target: the stratified weighted reservoir (csrc/sample.h). Arbitrary strata, lookup
// tables, ids and weights (NaN, inf, negative, subnormal included). Accepted input must give a sample
// of at most `capacity` distinct offered ids per stratum, never an id of weight 0, and the same sample
// whether the items come in one batch, in two batches, or through two reservoirs merged.
#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <set>
#include <stdexcept>
#include <vector>

#include "sample.h"

using mlmix::sample::Entry;
using mlmix::sample::StratifiedReservoir;

static bool same(const std::vector<Entry>& a, const std::vector<Entry>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i].id != b[i].id || a[i].hash != b[i].hash || std::memcmp(&a[i].key, &b[i].key, sizeof(double)) != 0)
      return false;
  return true;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  const uint64_t seed = in.ConsumeIntegral<uint64_t>();
  const size_t num = in.ConsumeIntegralInRange<size_t>(0, 5);
  std::vector<uint64_t> codes(num);
  std::vector<int64_t> caps(num);
  for (size_t s = 0; s < num; ++s) {
    codes[s] = in.ConsumeIntegralInRange<uint64_t>(0, 8);
    caps[s] = in.ConsumeIntegralInRange<int64_t>(-1, 6);
  }
  const size_t lut_size = in.ConsumeIntegralInRange<size_t>(0, 8);
  std::vector<int32_t> lut(lut_size);
  for (auto& v : lut) v = in.ConsumeIntegralInRange<int32_t>(-2, static_cast<int32_t>(num));
  const size_t n = in.ConsumeIntegralInRange<size_t>(0, 64);
  std::vector<int16_t> strata(n);
  std::vector<uint64_t> ids(n);
  std::vector<double> weights(n);
  const bool weighted = in.ConsumeBool();
  for (size_t i = 0; i < n; ++i) {
    strata[i] = in.ConsumeIntegralInRange<int16_t>(-1, static_cast<int16_t>(lut_size));
    ids[i] = in.ConsumeIntegralInRange<uint64_t>(0, 40);  // repeats on purpose
    switch (in.ConsumeIntegralInRange<int>(0, 3)) {
      case 0: weights[i] = in.ConsumeFloatingPoint<double>(); break;  // any double, NaN and inf included
      case 1: weights[i] = 0.0; break;
      default: weights[i] = in.ConsumeFloatingPointInRange<double>(0.0, 10.0);
    }
  }
  const double* w = weighted ? weights.data() : nullptr;
  const size_t cut = n ? in.ConsumeIntegralInRange<size_t>(0, n) : 0;
  try {
    StratifiedReservoir one(seed, codes, caps);
    one.add<int16_t>(strata.data(), n, lut.data(), lut_size, ids.data(), w, 1);
    StratifiedReservoir two(seed, codes, caps);  // same items in two batches, threads allowed
    two.add<int16_t>(strata.data(), cut, lut.data(), lut_size, ids.data(), w, 2);
    two.add<int16_t>(strata.data() + cut, n - cut, lut.data(), lut_size, ids.data() + cut, w ? w + cut : nullptr, 2);
    StratifiedReservoir a(seed, codes, caps), b(seed, codes, caps);  // split over two merged reservoirs
    a.add<int16_t>(strata.data(), cut, lut.data(), lut_size, ids.data(), w, 1);
    b.add<int16_t>(strata.data() + cut, n - cut, lut.data(), lut_size, ids.data() + cut, w ? w + cut : nullptr, 1);
    a.merge(b);
    for (size_t s = 0; s < num; ++s) {
      const std::vector<Entry> got = one.sample(s);
      if (!same(got, two.sample(s)) || !same(got, a.sample(s))) std::abort();
      if (static_cast<int64_t>(got.size()) > caps[s]) std::abort();
      std::set<uint64_t> distinct;
      for (const Entry& e : got) {
        distinct.insert(e.id);
        bool offered = false;
        for (size_t i = 0; i < n; ++i)
          if (ids[i] == e.id && lut[static_cast<size_t>(strata[i])] == static_cast<int32_t>(s) && (!w || w[i] > 0))
            offered = true;
        if (!offered) std::abort();
      }
      if (distinct.size() != got.size()) std::abort();
      // a saved sample loads back into a fresh reservoir
      StratifiedReservoir c(seed, codes, caps);
      c.load(s, got.data(), got.size(), one.seen(s));
      if (!same(c.sample(s), got)) std::abort();
    }
  } catch (const std::invalid_argument&) {
  } catch (const std::out_of_range&) {
  }
  return 0;
}
