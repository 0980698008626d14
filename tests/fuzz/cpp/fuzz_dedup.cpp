// libFuzzer target: dedup's text kernels (csrc/dedup.h): check_texts, normalize_texts, exact_hashes,
// minhash_signatures and cluster_signatures on arbitrary bytes (invalid UTF-8, surrogates encoded in
// UTF-8, overlong forms, any code point) split into documents at 0xFF bytes, with fuzzed options.
// Checks beyond "no memory error": normalisation is idempotent, identical documents share an exact
// hash and a cluster, every cluster's kept document is in the cluster, and the thread count changes nothing.
#include <fuzzer/FuzzedDataProvider.h>

#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "dedup.h"

using namespace mlmix::dedup;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  MinHashOptions mo;
  mo.num_perm = in.ConsumeIntegralInRange<int>(0, 40);
  mo.ngram = in.ConsumeIntegralInRange<int>(0, 6);
  mo.mode = static_cast<ShingleMode>(in.ConsumeIntegralInRange<int>(0, 2));
  mo.seed = in.ConsumeIntegral<uint64_t>();
  mo.normalize.strip_marks = in.ConsumeBool();
  mo.normalize.errors = in.ConsumeBool() ? Utf8Errors::kStrict : Utf8Errors::kReplace;
  const double threshold = in.ConsumeFloatingPointInRange<double>(0.0, 1.2);
  const int bands = in.ConsumeIntegralInRange<int>(0, 12);
  const int rows = in.ConsumeIntegralInRange<int>(0, 6);
  const bool verify = in.ConsumeBool();
  const int64_t budget = in.ConsumeIntegralInRange<int64_t>(0, 4096);
  // threads are started per call: several only for one input in eight, to keep executions fast
  const int many = in.ConsumeIntegralInRange<int>(0, 7) == 0 ? 3 : 1;
  const std::string rest = in.ConsumeRemainingBytesAsString();

  std::vector<uint8_t> bytes;
  std::vector<int64_t> offsets{0};
  for (char c : rest) {
    if (static_cast<uint8_t>(c) == 0xFF) {
      offsets.push_back(static_cast<int64_t>(bytes.size()));
    } else {
      bytes.push_back(static_cast<uint8_t>(c));
    }
  }
  offsets.push_back(static_cast<int64_t>(bytes.size()));
  const int64_t n = static_cast<int64_t>(offsets.size()) - 1;
  TextSpan texts{bytes.data(), offsets.data(), n};
  try {
    check_texts(texts);
    std::vector<uint8_t> norm, norm2;
    std::vector<int64_t> norm_off, norm2_off;
    normalize_texts(texts, mo.normalize, 1, norm, norm_off);
    TextSpan normalized{norm.data(), norm_off.data(), n};
    NormalizeOptions again = mo.normalize;
    again.errors = Utf8Errors::kStrict;  // normalised text is valid UTF-8
    normalize_texts(normalized, again, many, norm2, norm2_off);
    if (norm2 != norm || norm2_off != norm_off) std::abort();

    std::vector<uint64_t> h1(2 * n), h2(2 * n);
    exact_hashes(texts, mo.normalize, 1, h1.data());
    exact_hashes(texts, mo.normalize, many, h2.data());
    if (h1 != h2) std::abort();

    std::vector<uint32_t> sig(static_cast<size_t>(n) * static_cast<size_t>(std::max(mo.num_perm, 0)));
    std::vector<uint64_t> hashes(2 * n);
    std::vector<int64_t> lengths(n);
    std::vector<uint8_t> char_mode(n);
    ShingleSets sets;
    minhash_signatures(texts, mo, many, SignatureOutputs{sig.data(), hashes.data(), lengths.data(), char_mode.data(),
                                                       verify ? &sets : nullptr, budget});
    if (hashes != h1) std::abort();
    ClusterInputs ci;
    ci.count = n;
    ci.num_perm = mo.num_perm;
    ci.signatures = sig.data();
    ci.hashes = hashes.data();
    ci.texts = &texts;
    ci.minhash = &mo;
    ci.shingle_sets = &sets;
    ClusterResult r1 = cluster_signatures(ci, ClusterOptions{threshold, LshParams{bands, rows}, verify, 1});
    ClusterResult r2 = cluster_signatures(ci, ClusterOptions{threshold, LshParams{bands, rows}, verify, many});
    if (r1.cluster != r2.cluster || r1.pair_first != r2.pair_first) std::abort();
    for (int64_t i = 0; i < n; ++i) {
      const int64_t k = r1.cluster[i];
      if (k < 0 || k >= n || r1.cluster[k] != k) std::abort();
      for (int64_t j = 0; j < i; ++j) {
        const bool equal = norm_off[i + 1] - norm_off[i] == norm_off[j + 1] - norm_off[j] &&
                           std::equal(norm.begin() + norm_off[i], norm.begin() + norm_off[i + 1], norm.begin() + norm_off[j]);
        if (equal && r1.cluster[i] != r1.cluster[j]) std::abort();
      }
    }
  } catch (const std::invalid_argument&) {
  }
  return 0;
}
