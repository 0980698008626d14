// libFuzzer target: dedup's text kernels (csrc/dedup.h): check_texts, normalize_texts, exact_hashes,
// minhash_signatures and cluster_signatures on arbitrary bytes (invalid UTF-8, surrogates encoded in
// UTF-8, overlong forms, any code point) split into documents at 0xFF bytes, with fuzzed options.
// Checks beyond "no memory error": normalisation is idempotent, identical documents share an exact
// hash and a cluster, every cluster's kept document is in the cluster, and the thread count changes nothing.
// The same bytes are also read as a Python str's code units (TextSpan views of width 1, 2 or 4, lone
// surrogates and values past U+10FFFF included), which must normalise, hash and sign exactly as their
// UTF-8 form does (surrogates encoded as Python's surrogatepass does).
#include <fuzzer/FuzzedDataProvider.h>

#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "dedup.h"
#include "utf8.h"

using namespace mlmix::dedup;
using mlmix::TextView;

namespace {

void append_utf8(std::vector<uint8_t>& out, uint32_t cp) {
  if (cp > 0x10FFFF) {
    out.push_back(0xFF);  // no UTF-8 form: an invalid byte, one U+FFFD as the view gives
  } else {
    mlmix::utf8::append(out, cp);  // surrogates too, as surrogatepass writes them
  }
}

// Each document's bytes as code units of `width`, read in place, against the UTF-8 of those code points.
void check_views(const std::vector<uint8_t>& bytes, const std::vector<int64_t>& offsets, int width,
                 const MinHashOptions& mo, int threads) {
  const int64_t n = static_cast<int64_t>(offsets.size()) - 1;
  std::vector<std::vector<uint8_t>> u8(n);
  std::vector<std::vector<uint16_t>> u16(n);
  std::vector<std::vector<uint32_t>> u32(n);
  std::vector<TextView> views(n);
  std::vector<uint8_t> utf8;
  std::vector<int64_t> utf8_off{0};
  for (int64_t d = 0; d < n; ++d) {
    const uint8_t* p = bytes.data() + offsets[d];
    const int64_t len = offsets[d + 1] - offsets[d];
    if (width == 1) {
      u8[d].assign(p, p + len);
      for (uint8_t c : u8[d]) append_utf8(utf8, c);
      views[d] = TextView{u8[d].data(), static_cast<int64_t>(u8[d].size()), 1};
    } else if (width == 2) {
      for (int64_t i = 0; i + 1 < len; i += 2) u16[d].push_back(static_cast<uint16_t>(p[i] | p[i + 1] << 8));
      for (uint16_t c : u16[d]) append_utf8(utf8, c);
      views[d] = TextView{u16[d].data(), static_cast<int64_t>(u16[d].size()), 2};
    } else {
      for (int64_t i = 0; i + 2 < len; i += 3)
        u32[d].push_back(static_cast<uint32_t>(p[i] | p[i + 1] << 8 | (p[i + 2] & 0x1F) << 16));
      for (uint32_t c : u32[d]) append_utf8(utf8, c);
      views[d] = TextView{u32[d].data(), static_cast<int64_t>(u32[d].size()), 4};
    }
    utf8_off.push_back(static_cast<int64_t>(utf8.size()));
  }
  const TextSpan as_views{nullptr, nullptr, n, views.data()};
  const TextSpan as_utf8{utf8.data(), utf8_off.data(), n};
  std::vector<uint8_t> na, nb;
  std::vector<int64_t> na_off, nb_off;
  bool raised_a = false, raised_b = false;
  try {
    normalize_texts(as_views, mo.normalize, threads, na, na_off);
  } catch (const std::invalid_argument&) {
    raised_a = true;
  }
  try {
    normalize_texts(as_utf8, mo.normalize, 1, nb, nb_off);
  } catch (const std::invalid_argument&) {
    raised_b = true;
  }
  if (raised_a != raised_b) std::abort();
  if (raised_a) return;
  if (na != nb || na_off != nb_off) std::abort();
  std::vector<int64_t> sizes(n);
  utf8_sizes(as_views, sizes.data());
  for (int64_t d = 0; d < n; ++d)
    if (width != 4 && sizes[d] != utf8_off[d + 1] - utf8_off[d]) std::abort();  // 4: values past U+10FFFF
  std::vector<uint64_t> ha(2 * n), hb(2 * n);
  exact_hashes(as_views, mo.normalize, threads, ha.data());
  exact_hashes(as_utf8, mo.normalize, 1, hb.data());
  if (ha != hb) std::abort();
  if (mo.num_perm < 1 || mo.ngram < 1) return;
  std::vector<uint32_t> sa(static_cast<size_t>(n) * mo.num_perm), sb(sa.size());
  minhash_signatures(as_views, mo, threads, SignatureOutputs{sa.data()});
  minhash_signatures(as_utf8, mo, 1, SignatureOutputs{sb.data()});
  if (sa != sb) std::abort();
}

}  // namespace

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
  const int width_choice = in.ConsumeIntegralInRange<int>(0, 3);  // 0: no view check; else 1, 2, 4
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
  if (width_choice > 0) check_views(bytes, offsets, width_choice == 3 ? 4 : width_choice, mo, many);
  return 0;
}
