// Stratified weighted reservoir sampling with hash-derived keys (bottom-k / Efraimidis-Spirakis).
//
// Every item gets a key that is a pure function of (seed, stratum code, item id, weight):
//   h   = item_hash(stratum_seed(seed, code), id)        a bijection of id for a fixed stratum
//   key = -log(1 - u(h)) / weight                        an Exp(weight) variate, u(h) uniform in (0, 1)
// and each stratum keeps the `capacity` items with the smallest (key, h, id). Taking the k smallest
// Exp(w_i) variates is Efraimidis-Spirakis sampling without replacement (largest u^(1/w) <=> smallest
// -log(u)/w); with all weights equal it is a uniform k-subset. Because keys do not depend on arrival
// order, batching, threads or sharding, a merge of shard reservoirs equals the single pass exactly.
//
// Repeated ids within a stratum count as one item, with their largest weight (= smallest key).
// No Python here.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "common.h"

namespace mlmix::sample {

// One candidate: its key, its hash (tie-break, distinct for distinct ids in a stratum) and its id.
struct Entry {
  double key;
  uint64_t hash;
  uint64_t id;
};

// The strict total order of the sample: smaller is preferred.
inline bool entry_less(const Entry& a, const Entry& b) {
  if (a.key != b.key) return a.key < b.key;
  if (a.hash != b.hash) return a.hash < b.hash;
  return a.id < b.id;
}

struct EntryLess {
  bool operator()(const Entry& a, const Entry& b) const { return entry_less(a, b); }
};

// Per-stratum 128-bit key derived from the user seed and the stratum's stable code.
struct StratumSeed {
  uint64_t a;
  uint64_t b;
};
StratumSeed stratum_seed(uint64_t seed, uint64_t code);

// Two keyed rounds of splitmix64's finaliser: a bijection of `id`, so distinct ids never share a hash in a stratum.
inline uint64_t item_hash(StratumSeed s, uint64_t id) {
  return splitmix64_mix(splitmix64_mix(id ^ s.a) ^ s.b);
}

// Exp(1) variate from a hash: -log1p(-u) with u = h / 2^64 (full relative precision for the small
// keys that get selected), nondecreasing in h, always finite.
double exp_key(uint64_t h);

// Fills out[i] = item_hash(stratum_seed(seed, code), ids[i]).
void hash_ids(uint64_t seed, uint64_t code, const uint64_t* ids, std::size_t n, uint64_t* out);

// Keyed BLAKE2b with an 8-byte digest (RFC 7693), read as a little-endian integer: out[i] is
// blake2b(prefix + values[offsets[i]:offsets[i+1]], digest_size=8, key=key8), as Python's
// hashlib.blake2b computes it. The seeded orders of string ids (mlmix.recipes) are these keys.
void blake2b64_strings(const uint8_t key[8], const uint8_t* prefix, std::size_t prefix_len, const uint8_t* values,
                       const int64_t* offsets, std::size_t n, uint64_t* out);

class StratifiedReservoir {
 public:
  // codes[s]: stable 64-bit code of stratum s (mixed into its keys); capacities[s] >= 0.
  StratifiedReservoir(uint64_t seed, std::vector<uint64_t> codes, std::vector<int64_t> capacities);

  // Offers n items. strata[i] is a raw stratum value mapped through lut (lut[v] = dense stratum
  // index or -1 for "not a stratum"); weights may be null (all 1). Validates everything before
  // changing any state (strong exception guarantee). `threads` > 1 splits the batch; the result is
  // the same for every thread count.
  template <class S>
  void add(const S* strata, std::size_t n, const int32_t* lut, std::size_t lut_size, const uint64_t* ids,
           const double* weights, int threads);

  // Folds another reservoir (same seed, codes and capacities) into this one.
  void merge(const StratifiedReservoir& other);

  // The sample of stratum s: at most capacity entries, sorted by entry_less (best first).
  std::vector<Entry> sample(std::size_t s) const;

  // Appends entries as candidates to stratum s (used to restore a saved state).
  void load(std::size_t s, const Entry* entries, std::size_t n, uint64_t seen);

  std::size_t num_strata() const { return strata_.size(); }
  uint64_t seed() const { return seed_; }
  uint64_t seen(std::size_t s) const { return strata_[s].seen; }
  int64_t capacity(std::size_t s) const { return static_cast<int64_t>(strata_[s].capacity); }
  uint64_t code(std::size_t s) const { return strata_[s].code; }

 private:
  // Unit-weight entries are ordered by (hash, id) alone, which agrees with (key, hash, id) because
  // the unit key exp_key(hash) is nondecreasing in the hash. So a stratum that has only seen unit
  // weights ("unkeyed") stores no keys and never calls log1p; its keys are computed on the way out,
  // or for all its entries at once when the first other weight arrives.
  struct Stratum {
    uint64_t code = 0;
    StratumSeed sseed{};
    std::size_t capacity = 0;
    std::size_t buffer_limit = 0;  // compaction happens when the buffer reaches this size
    std::vector<Entry> buffer;     // candidates; the sample is its `capacity` smallest distinct ids
    Entry threshold{};             // the capacity-th smallest entry (key always set), valid once `full`
    bool full = false;             // the stratum has held `capacity` distinct ids
    bool keyed = false;            // entries carry keys (else: unit weights, key field unused)
    uint64_t hash_cut = 0;         // no unit-weight item with hash > hash_cut can beat threshold
    uint64_t seen = 0;             // items offered (repeats included)
  };

  static void offer_unit(Stratum& st, uint64_t h, uint64_t id);
  static void offer_keyed(Stratum& st, const Entry& e);
  static void make_keyed(Stratum& st);
  static void push(Stratum& st, const Entry& e);
  static void compact(Stratum& st);
  static void update_cut(Stratum& st);
  template <class S>
  void add_serial(const S* strata, std::size_t begin, std::size_t end, const int32_t* lut, const uint64_t* ids,
                  const double* weights);
  StratifiedReservoir empty_clone() const;

  uint64_t seed_;
  std::vector<Stratum> strata_;
};

}  // namespace mlmix::sample
