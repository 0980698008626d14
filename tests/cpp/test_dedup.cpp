// C++ test of the dedup clustering phases without Python: band keys depend only on (row, band, group),
// bucket pairing follows its rule, union-find keeps the right document, bad ids are errors, and the
// phases composed by hand give cluster_signatures' result. Built with -DMLMIX_BUILD_TESTS=ON; run
// build/dev/test_dedup (exit 0 = pass).
#include <algorithm>
#include <cstdio>
#include <limits>
#include <random>
#include <stdexcept>
#include <vector>

#include "dedup.h"
#include "check.h"

namespace {

using mlmix_test::failures;
using mlmix_test::throws_invalid;

using namespace mlmix::dedup;

constexpr uint32_t kEmpty = std::numeric_limits<uint32_t>::max();

// Random signatures over a small alphabet (so that buckets are large), some rows without shingles.
std::vector<uint32_t> random_signatures(std::mt19937_64& rng, int64_t n, int P) {
  std::vector<uint32_t> sig(static_cast<size_t>(n * P));
  for (auto& v : sig) v = static_cast<uint32_t>(rng() % 3);
  for (int64_t i = 0; i < n; ++i)
    if (rng() % 20 == 0) std::fill(sig.begin() + i * P, sig.begin() + (i + 1) * P, kEmpty);
  return sig;
}

void test_band_keys_per_row() {
  std::mt19937_64 rng(1);
  const int64_t n = 300;
  const int P = 16;
  const LshParams lsh{4, 4};
  auto sig = random_signatures(rng, n, P);
  std::vector<uint64_t> groups(n);
  for (auto& g : groups) g = rng() % 3;
  std::vector<uint64_t> keys(n * 4), part(n * 4);
  std::vector<uint8_t> has(n), part_has(n);
  band_keys(sig.data(), n, P, lsh, groups.data(), 3, keys.data(), has.data());
  // Two blocks computed apart, one thread each: the same keys.
  band_keys(sig.data(), 100, P, lsh, groups.data(), 1, part.data(), part_has.data());
  band_keys(sig.data() + 100 * P, n - 100, P, lsh, groups.data() + 100, 1, part.data() + 400, part_has.data() + 100);
  EXPECT(keys == part && has == part_has);
  for (int64_t i = 0; i < n; ++i) {
    EXPECT(has[i] == (has_shingles(sig.data() + i * P, P) ? 1 : 0));
    for (int b = 0; b < 4; ++b) {
      if (!has[i]) EXPECT(keys[i * 4 + b] == 0);
      else EXPECT(keys[i * 4 + b] == band_key(sig.data() + i * P, b, 4, groups[i]));
    }
  }
  // Another group, another key.
  EXPECT(band_key(sig.data(), 0, 4, 1) != band_key(sig.data(), 0, 4, 2));
  EXPECT(throws_invalid([&] { band_keys(sig.data(), n, P, LshParams{5, 4}, nullptr, 1, keys.data(), has.data()); }));
}

void test_bucket_rule() {
  for (int64_t size : {2, 128, 129, 500}) {
    std::vector<KeyedDoc> rows;
    for (int64_t k = size - 1; k >= 0; --k) rows.push_back({42, k * 1000});
    rows.push_back({42, 0});  // a repeated row counts once
    std::vector<DocPair> out;
    bucket_pairs(rows, out);
    const int64_t expected = size <= kMaxBucketAllPairs ? size * (size - 1) / 2 : 2 * (size - 1) - 1;
    EXPECT(static_cast<int64_t>(out.size()) == expected);
    for (const DocPair& p : out) EXPECT(p.first < p.second);
  }
  // Groups: a pair across groups is dropped; a document in two groups is an error.
  std::vector<uint64_t> keys = {7, 7, 7};
  std::vector<int64_t> ids = {5, 9, 1};
  std::vector<uint64_t> groups = {0, 0, 1};
  auto pairs = candidate_pairs(keys.data(), ids.data(), groups.data(), 3);
  EXPECT(pairs.size() == 1 && pairs[0] == DocPair(5, 9));
  std::vector<int64_t> twice = {5, 1, 5};  // document 5 in groups 0 and 1
  EXPECT(throws_invalid([&] { candidate_pairs(keys.data(), twice.data(), groups.data(), 3); }));
}

void test_components() {
  std::vector<int64_t> ids = {30, -4, 12, 7, 100};
  const DocIndex index(ids.data(), 5, "docs");
  std::vector<DocPair> pairs = {{30, 12}, {12, 100}};
  auto kept = connected_components(index, pairs.data(), 2, nullptr);
  EXPECT((kept == std::vector<int64_t>{12, -4, 12, 7, 12}));
  std::vector<double> scores = {1, 0, 0, 0, 1};  // a tie between 30 and 100: the smaller id
  kept = connected_components(index, pairs.data(), 2, scores.data());
  EXPECT((kept == std::vector<int64_t>{30, -4, 30, 7, 30}));
  std::vector<DocPair> bad = {{30, 31}};
  EXPECT(throws_invalid([&] { connected_components(index, bad.data(), 1, nullptr); }));
  std::vector<int64_t> repeated = {1, 2, 1};
  EXPECT(throws_invalid([&] { DocIndex(repeated.data(), 3, "docs"); }));
}

// cluster_signatures equals the phases composed here, by hand.
void test_composition() {
  std::mt19937_64 rng(3);
  for (int trial = 0; trial < 6; ++trial) {
    const int64_t n = 400;
    const int P = 8;
    const LshParams lsh{4, 2};
    auto sig = random_signatures(rng, n, P);
    std::vector<uint64_t> hashes(2 * n);
    for (auto& h : hashes) h = rng() % 50;  // many exact duplicates
    std::vector<int64_t> groups(n);
    for (auto& g : groups) g = static_cast<int64_t>(rng() % 2);
    const bool verify = trial % 2 == 0;
    ClusterInputs in;
    in.count = n;
    in.num_perm = P;
    in.signatures = sig.data();
    in.hashes = hashes.data();
    in.groups = groups.data();
    const ClusterResult r = cluster_signatures(in, ClusterOptions{0.5, lsh, verify, 2});

    std::vector<DocPair> edges = exact_pairs(hashes.data(), groups.data(), nullptr, n);
    std::vector<uint8_t> later(n, 0);
    for (const DocPair& e : edges) later[e.second] = 1;
    std::vector<uint64_t> keys(n * lsh.bands), codes(n);
    std::vector<uint8_t> has(n);
    for (int64_t i = 0; i < n; ++i) codes[i] = static_cast<uint64_t>(groups[i]);
    band_keys(sig.data(), n, P, lsh, codes.data(), 1, keys.data(), has.data());
    std::vector<uint64_t> row_keys, row_groups;
    std::vector<int64_t> row_ids;
    for (int64_t i = n - 1; i >= 0; --i) {  // rows in any order
      if (!has[i] || later[i]) continue;
      for (int b = 0; b < lsh.bands; ++b) {
        row_keys.push_back(keys[i * lsh.bands + b]);
        row_ids.push_back(i);
        row_groups.push_back(codes[i]);
      }
    }
    auto candidates = candidate_pairs(row_keys.data(), row_ids.data(), row_groups.data(),
                                      static_cast<int64_t>(row_keys.size()));
    EXPECT(static_cast<int64_t>(candidates.size()) == r.candidate_pairs);
    const DocIndex index(nullptr, n);
    std::vector<double> sim(candidates.size(), 1.0);
    if (verify)
      verify_pairs_by_signatures(candidates.data(), static_cast<int64_t>(candidates.size()), index, sig.data(), P, 1,
                                 sim.data());
    for (size_t k = 0; k < candidates.size(); ++k)
      if (!verify || sim[k] >= 0.5) edges.push_back(candidates[k]);
    const auto kept = connected_components(index, edges.data(), static_cast<int64_t>(edges.size()), nullptr);
    EXPECT(kept == r.cluster);
    EXPECT(edges.size() == r.pair_first.size());
    for (size_t k = 0; k < edges.size() && k < r.pair_first.size(); ++k)
      EXPECT(edges[k].first == r.pair_first[k] && edges[k].second == r.pair_second[k]);
  }
}

void test_sets() {
  std::vector<uint64_t> values = {1, 2, 3, 2, 3, 4, 9};
  std::vector<int64_t> offsets = {0, 3, 6, 6, 7};
  check_sets(values.data(), 7, offsets.data(), 4, "sets");
  const DocIndex index(nullptr, 4);
  std::vector<DocPair> pairs = {{0, 1}, {2, 2}, {0, 3}};
  std::vector<double> sim(3);
  verify_pairs_by_sets(pairs.data(), 3, index, values.data(), offsets.data(), 1, sim.data());
  EXPECT(sim[0] == 0.5 && sim[1] == 0.0 && sim[2] == 0.0);
  values[1] = 1;  // row 0 no longer strictly ascending
  EXPECT(throws_invalid([&] { check_sets(values.data(), 7, offsets.data(), 4, "sets"); }));
  offsets[4] = 8;
  EXPECT(throws_invalid([&] { check_sets(values.data(), 7, offsets.data(), 4, "sets"); }));
}

}  // namespace

int main() {
  test_band_keys_per_row();
  test_bucket_rule();
  test_components();
  test_composition();
  test_sets();
  if (failures) {
    std::fprintf(stderr, "test_dedup: %d failure(s)\n", failures);
    return 1;
  }
  std::printf("test_dedup: ok\n");
  return 0;
}
