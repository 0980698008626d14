#include "sample.h"

#include <algorithm>
#include <bit>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <thread>

#include "common.h"

namespace mlmix::sample {

namespace {
constexpr double kTwoPow64 = 18446744073709551616.0;
constexpr double kTwoPowMinus64 = 1.0 / 18446744073709551616.0;
constexpr double kInf = std::numeric_limits<double>::infinity();
// Slack for the cheap pre-filters: they must never reject an item the exact comparison would keep.
constexpr double kCutSlack = 1.0 + 1e-9;
// Below this many items per thread, splitting a batch costs more than it saves.
constexpr std::size_t kMinItemsPerThread = std::size_t{1} << 16;
}  // namespace

StratumSeed stratum_seed(uint64_t seed, uint64_t code) {
  uint64_t state = seed;
  const uint64_t a = splitmix64(state);  // the first output of the generator seeded with `seed`
  const uint64_t b = splitmix64_mix(a ^ splitmix64_mix(code + 0x632be59bd9b4e019ULL));
  return {splitmix64_mix(b + 0x8cb92ba72f3d8dd7ULL), splitmix64_mix(b ^ 0xd1b54a32d192ed03ULL)};
}

double exp_key(uint64_t h) {
  // u = h / 2^64 rounded to the nearest double: exact relative precision near 0, where the selected
  // keys live; clamped below 1 so that the key stays finite. (0 maps to a key of 0: fine, the hash
  // still orders ties.)
  double u = static_cast<double>(h) * kTwoPowMinus64;
  if (u >= 1.0) u = 1.0 - DBL_EPSILON / 2;
  return -std::log1p(-u);
}

void hash_ids(uint64_t seed, uint64_t code, const uint64_t* ids, std::size_t n, uint64_t* out) {
  const StratumSeed s = stratum_seed(seed, code);
  for (std::size_t i = 0; i < n; ++i) out[i] = item_hash(s, ids[i]);
}

StratifiedReservoir::StratifiedReservoir(uint64_t seed, std::vector<uint64_t> codes, std::vector<int64_t> capacities)
    : seed_(seed) {
  MLMIX_CHECK(codes.size() == capacities.size(),
              "codes and capacities must have the same length, got " << codes.size() << " and " << capacities.size());
  MLMIX_CHECK(!codes.empty(), "capacities must name at least one stratum, got none");
  strata_.resize(codes.size());
  for (std::size_t s = 0; s < codes.size(); ++s) {
    MLMIX_CHECK(capacities[s] >= 0, "capacities must be >= 0, got " << capacities[s] << " for stratum " << s);
    for (std::size_t t = 0; t < s; ++t)
      MLMIX_CHECK(codes[t] != codes[s], "stratum codes must be distinct, got " << codes[s] << " twice");
    Stratum& st = strata_[s];
    st.code = codes[s];
    st.sseed = stratum_seed(seed, codes[s]);
    st.capacity = static_cast<std::size_t>(capacities[s]);
    // Room for as many new candidates as the sample holds: one O(k) selection per k candidates.
    st.buffer_limit = st.capacity + std::max<std::size_t>(st.capacity, 64);
    update_cut(st);
  }
}

void StratifiedReservoir::update_cut(Stratum& st) {
  if (st.capacity == 0) {
    st.hash_cut = 0;  // (offers to an empty-capacity stratum are dropped anyway)
  } else if (!st.full) {
    st.hash_cut = ~uint64_t{0};
  } else if (!st.keyed) {
    st.hash_cut = st.threshold.hash;  // unit entries: (h, id) < (threshold hash, id) needs h <= that
  } else if (!(st.threshold.key < kInf)) {
    st.hash_cut = ~uint64_t{0};
  } else {
    // key(h) = -log1p(-h/2^64) >= h/2^64, so h > t * 2^64 (with slack for rounding) cannot pass.
    const double bound = st.threshold.key * kTwoPow64 * kCutSlack + 2.0;
    st.hash_cut = bound >= kTwoPow64 ? ~uint64_t{0} : static_cast<uint64_t>(bound);
  }
}

namespace {

// Exact removal of repeated ids: sort by id, keep each id's best entry.
void dedupe_by_sort(std::vector<Entry>& b) {
  std::sort(b.begin(), b.end(), [](const Entry& x, const Entry& y) {
    return x.id != y.id ? x.id < y.id : entry_less(x, y);
  });
  b.erase(std::unique(b.begin(), b.end(), [](const Entry& x, const Entry& y) { return x.id == y.id; }), b.end());
}

// Whether b[0, k) holds an id twice, in O(k): repeats share their hash, so they fall into the same
// bucket of a bitmap; only the few entries of buckets hit twice are compared exactly.
bool has_repeated_id(const std::vector<Entry>& b, std::size_t k) {
  if (k < 2) return false;
  std::size_t bits = 64;
  while (bits < 32 * k) bits <<= 1;
  // Low bits: the selected entries have the smallest hashes, so their high bits are mostly zero.
  const uint64_t bucket_mask = bits - 1;
  thread_local std::vector<uint64_t> seen_bits, twice_bits;
  seen_bits.assign(bits / 64, 0);
  twice_bits.assign(bits / 64, 0);
  for (std::size_t i = 0; i < k; ++i) {
    const uint64_t bucket = b[i].hash & bucket_mask;
    const uint64_t mask = uint64_t{1} << (bucket & 63);
    twice_bits[bucket >> 6] |= seen_bits[bucket >> 6] & mask;
    seen_bits[bucket >> 6] |= mask;
  }
  std::vector<uint64_t> suspects;
  for (std::size_t i = 0; i < k; ++i) {
    const uint64_t bucket = b[i].hash & bucket_mask;
    if (twice_bits[bucket >> 6] >> (bucket & 63) & 1) suspects.push_back(b[i].id);
  }
  std::sort(suspects.begin(), suspects.end());
  return std::adjacent_find(suspects.begin(), suspects.end()) != suspects.end();
}

}  // namespace

namespace {
struct UnitLess {  // the order of unit-weight entries (see Stratum)
  bool operator()(const Entry& a, const Entry& b) const { return a.hash != b.hash ? a.hash < b.hash : a.id < b.id; }
};

// Keeps the k smallest entries of b (which must hold no repeated id among them), returns false if
// the k selected hold a repeated id (then b is only reordered).
template <class Less>
bool select_k(std::vector<Entry>& b, std::size_t k, Less less) {
  std::nth_element(b.begin(), b.begin() + static_cast<std::ptrdiff_t>(k - 1), b.end(), less);
  if (has_repeated_id(b, k)) return false;
  b.resize(k);
  return true;
}
}  // namespace

void StratifiedReservoir::compact(Stratum& st) {
  std::vector<Entry>& b = st.buffer;
  const std::size_t k = st.capacity;
  if (k == 0) {
    b.clear();
    return;
  }
  // A repeated id counts once, with its smallest key (largest weight): the set of distinct ids and
  // their best keys does not depend on how the repeats were spread over batches or shards. Repeats
  // are rare, so select first and fall back to an exact (sorting) dedupe only when the k selected
  // entries hold one.
  auto select = [&](auto less) {
    if (b.size() >= k && select_k(b, k, less)) return;
    if (st.keyed) {
      dedupe_by_sort(b);
    } else {
      // unit entries of one id are identical: any copy will do
      std::sort(b.begin(), b.end(), [](const Entry& x, const Entry& y) { return x.id < y.id; });
      b.erase(std::unique(b.begin(), b.end(), [](const Entry& x, const Entry& y) { return x.id == y.id; }), b.end());
    }
    if (b.size() >= k) {
      std::nth_element(b.begin(), b.begin() + static_cast<std::ptrdiff_t>(k - 1), b.end(), less);
      b.resize(k);
    }
  };
  if (st.keyed) {
    select(EntryLess{});
  } else {
    select(UnitLess{});
  }
  if (b.size() == k) {
    st.full = true;
    if (st.keyed) {
      st.threshold = *std::max_element(b.begin(), b.end(), EntryLess{});
    } else {
      st.threshold = *std::max_element(b.begin(), b.end(), UnitLess{});
      st.threshold.key = exp_key(st.threshold.hash);  // for the weighted pre-filter
    }
    update_cut(st);
  }
}

void StratifiedReservoir::make_keyed(Stratum& st) {
  if (st.keyed) return;
  for (Entry& e : st.buffer) e.key = exp_key(e.hash);
  if (st.full) st.threshold.key = exp_key(st.threshold.hash);
  st.keyed = true;
  update_cut(st);
}

inline void StratifiedReservoir::push(Stratum& st, const Entry& e) {
  // One allocation for the buffer's whole life (bounded by buffer_limit) instead of regrowth copies.
  if (st.buffer.capacity() == 0) st.buffer.reserve(std::min<std::size_t>(st.buffer_limit, std::size_t{1} << 22));
  st.buffer.push_back(e);
  if (st.buffer.size() >= st.buffer_limit) compact(st);
}

inline void StratifiedReservoir::offer_unit(Stratum& st, uint64_t h, uint64_t id) {
  if (st.capacity == 0) return;
  if (st.keyed) return offer_keyed(st, Entry{exp_key(h), h, id});
  if (st.full && !UnitLess{}(Entry{0.0, h, id}, st.threshold)) return;
  push(st, Entry{0.0, h, id});
}

inline void StratifiedReservoir::offer_keyed(Stratum& st, const Entry& e) {
  if (st.capacity == 0) return;
  make_keyed(st);
  if (st.full && !entry_less(e, st.threshold)) return;
  push(st, e);
}

template <class S>
void StratifiedReservoir::add_serial(const S* strata, std::size_t begin, std::size_t end, const int32_t* lut,
                                     const uint64_t* ids, const double* weights) {
  Stratum* strata_state = strata_.data();
  if (weights == nullptr) {
    for (std::size_t i = begin; i < end; ++i) {
      Stratum& st = strata_state[lut[static_cast<std::size_t>(strata[i])]];
      const uint64_t h = item_hash(st.sseed, ids[i]);
      if (h <= st.hash_cut) [[unlikely]] {
        offer_unit(st, h, ids[i]);
      }
    }
  } else {
    for (std::size_t i = begin; i < end; ++i) {
      Stratum& st = strata_state[lut[static_cast<std::size_t>(strata[i])]];
      const uint64_t h = item_hash(st.sseed, ids[i]);
      const double w = weights[i];
      if (w == 1.0) {  // exactly the unit weight: the same item as an unweighted one
        if (h <= st.hash_cut) [[unlikely]] offer_unit(st, h, ids[i]);
        continue;
      }
      // Pre-filter without a log: key = exp_key(h) / w >= (h / 2^64) / w. Weight 0 never passes.
      // (h >> 11) * 2^-53 <= h / 2^64, so the filter stays conservative; the 53-bit value converts
      // to double in one signed instruction.
      const double u_low = static_cast<double>(static_cast<int64_t>(h >> 11)) * 0x1p-53;
      if (w > 0 && (!st.full || u_low <= st.threshold.key * w * kCutSlack))
          [[unlikely]] {
        offer_keyed(st, Entry{exp_key(h) / w, h, ids[i]});
      }
    }
  }
}

StratifiedReservoir StratifiedReservoir::empty_clone() const {
  StratifiedReservoir r = *this;
  for (Stratum& st : r.strata_) {
    st.buffer.clear();
    st.buffer.shrink_to_fit();
    st.seen = 0;
  }
  return r;
}

template <class S>
void StratifiedReservoir::add(const S* strata, std::size_t n, const int32_t* lut, std::size_t lut_size,
                              const uint64_t* ids, const double* weights, int threads) {
  const std::size_t num = strata_.size();
  for (std::size_t v = 0; v < lut_size; ++v)
    MLMIX_CHECK(lut[v] >= -1 && lut[v] < static_cast<int64_t>(num), "stratum lookup table holds " << lut[v]
                                                                      << " at " << v << ", outside [-1, " << num << ")");
  // Validate first so that a bad batch leaves the reservoir untouched.
  std::vector<uint64_t> counts(num, 0);
  for (std::size_t i = 0; i < n; ++i) {
    const S v = strata[i];
    const bool in_range = !(v < S{0}) && static_cast<uint64_t>(v) < lut_size;
    MLMIX_CHECK(in_range && lut[static_cast<std::size_t>(v)] >= 0,
                "strata[" << i << "] = " << +v << " is not one of the reservoir's strata");
    ++counts[static_cast<std::size_t>(lut[static_cast<std::size_t>(v)])];
  }
  if (weights != nullptr) {
    for (std::size_t i = 0; i < n; ++i) {
      const double w = weights[i];
      MLMIX_CHECK(w >= 0.0 && w <= DBL_MAX,
                  "weights[" << i << "] = " << w << "; weights must be finite and >= 0");
    }
  }

  const std::size_t max_threads = std::max<std::size_t>(1, n / kMinItemsPerThread);
  const std::size_t nthreads = std::min<std::size_t>(static_cast<std::size_t>(resolve_threads(threads)), max_threads);
  if (nthreads <= 1) {
    add_serial(strata, 0, n, lut, ids, weights);
  } else {
    // Each thread fills a private reservoir that starts from our thresholds (valid pruning: they
    // only ever decrease); merging the privates is exact because keys do not depend on the split.
    std::vector<StratifiedReservoir> parts(nthreads, empty_clone());
    std::vector<std::exception_ptr> errors(nthreads);
    std::vector<std::thread> pool;
    pool.reserve(nthreads);
    for (std::size_t t = 0; t < nthreads; ++t) {
      const std::size_t b = n * t / nthreads, e = n * (t + 1) / nthreads;
      pool.emplace_back([&, t, b, e] {
        try {
          parts[t].add_serial(strata, b, e, lut, ids, weights);
        } catch (...) {
          errors[t] = std::current_exception();
        }
      });
    }
    for (std::thread& th : pool) th.join();
    for (const std::exception_ptr& err : errors)
      if (err) std::rethrow_exception(err);
    for (const StratifiedReservoir& part : parts) merge(part);
  }
  for (std::size_t s = 0; s < num; ++s) strata_[s].seen += counts[s];
}

void StratifiedReservoir::merge(const StratifiedReservoir& other) {
  MLMIX_CHECK(other.seed_ == seed_, "cannot merge reservoirs with different seeds: " << seed_ << " and " << other.seed_);
  MLMIX_CHECK(other.strata_.size() == strata_.size(),
              "cannot merge reservoirs with different strata: " << strata_.size() << " and " << other.strata_.size());
  for (std::size_t s = 0; s < strata_.size(); ++s) {
    MLMIX_CHECK(other.strata_[s].code == strata_[s].code && other.strata_[s].capacity == strata_[s].capacity,
                "cannot merge reservoirs with different strata or capacities (stratum " << s << ")");
  }
  if (&other == this) {
    // Merging with itself: every item is a repeat, so the sample does not change.
    for (Stratum& st : strata_) st.seen *= 2;
    return;
  }
  for (std::size_t s = 0; s < strata_.size(); ++s) {
    Stratum& st = strata_[s];
    const Stratum& theirs = other.strata_[s];
    for (const Entry& e : theirs.buffer) {
      if (theirs.keyed) {
        offer_keyed(st, e);
      } else {
        offer_unit(st, e.hash, e.id);
      }
    }
    st.seen += other.strata_[s].seen;
  }
}

std::vector<Entry> StratifiedReservoir::sample(std::size_t s) const {
  MLMIX_CHECK_INDEX(s < strata_.size(), "stratum index " << s << " out of range [0, " << strata_.size() << ")");
  Stratum copy = strata_[s];
  compact(copy);
  make_keyed(copy);
  std::sort(copy.buffer.begin(), copy.buffer.end(), EntryLess{});
  return std::move(copy.buffer);
}

void StratifiedReservoir::load(std::size_t s, const Entry* entries, std::size_t n, uint64_t seen) {
  MLMIX_CHECK_INDEX(s < strata_.size(), "stratum index " << s << " out of range [0, " << strata_.size() << ")");
  Stratum& st = strata_[s];
  for (std::size_t i = 0; i < n; ++i) {
    const Entry& e = entries[i];
    MLMIX_CHECK(e.key >= 0.0, "saved key " << e.key << " is not >= 0");
    MLMIX_CHECK(e.hash == item_hash(st.sseed, e.id),
                "saved entry for id " << e.id << " does not match this reservoir's seed and stratum");
  }
  for (std::size_t i = 0; i < n; ++i) {
    // an entry whose key is the unit key is indistinguishable from a unit-weight one
    const Entry& e = entries[i];
    if (e.key == exp_key(e.hash)) {
      offer_unit(st, e.hash, e.id);
    } else {
      offer_keyed(st, e);
    }
  }
  st.seen += seen;
}

#define MLMIX_INSTANTIATE_ADD(T)                                                                            \
  template void StratifiedReservoir::add<T>(const T*, std::size_t, const int32_t*, std::size_t, const uint64_t*, \
                                            const double*, int);
MLMIX_INSTANTIATE_ADD(int8_t)
MLMIX_INSTANTIATE_ADD(uint8_t)
MLMIX_INSTANTIATE_ADD(int16_t)
MLMIX_INSTANTIATE_ADD(uint16_t)
MLMIX_INSTANTIATE_ADD(int32_t)
MLMIX_INSTANTIATE_ADD(uint32_t)
MLMIX_INSTANTIATE_ADD(int64_t)
MLMIX_INSTANTIATE_ADD(uint64_t)
#undef MLMIX_INSTANTIATE_ADD

// ---------------------------------------------------------------------------------------------
// BLAKE2b-64, keyed (RFC 7693, section 3): the state starts at the IV with the parameter word
// (digest length, key length, fanout 1, depth 1) folded into h[0]; the key, zero-padded to one
// 128-byte block, is the first block; the last block is zero-padded and flagged final; the
// counter is the number of bytes hashed so far, the key block included.
namespace {

constexpr uint64_t kBlakeIV[8] = {0x6a09e667f3bcc908ull, 0xbb67ae8584caa73bull, 0x3c6ef372fe94f82bull,
                                  0xa54ff53a5f1d36f1ull, 0x510e527fade682d1ull, 0x9b05688c2b3e6c1full,
                                  0x1f83d9abfb41bd6bull, 0x5be0cd19137e2179ull};
constexpr uint8_t kBlakeSigma[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4}, {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13}, {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11}, {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5}, {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3}};

inline uint64_t rotr64(uint64_t x, int r) { return (x >> r) | (x << (64 - r)); }

inline uint64_t load_le64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  if constexpr (std::endian::native == std::endian::big) v = __builtin_bswap64(v);
  return v;
}

// one compression of a 128-byte block; `t` = bytes hashed up to and including this block
void blake2b_compress(uint64_t h[8], const uint8_t block[128], uint64_t t, bool last) {
  uint64_t m[16], v[16];
  for (int i = 0; i < 16; ++i) m[i] = load_le64(block + 8 * i);
  for (int i = 0; i < 8; ++i) {
    v[i] = h[i];
    v[i + 8] = kBlakeIV[i];
  }
  v[12] ^= t;  // the counter's high word stays 0: no input here reaches 2^64 bytes
  if (last) v[14] = ~v[14];
  auto g = [&](int a, int b, int c, int d, uint64_t x, uint64_t y) {
    v[a] = v[a] + v[b] + x;
    v[d] = rotr64(v[d] ^ v[a], 32);
    v[c] = v[c] + v[d];
    v[b] = rotr64(v[b] ^ v[c], 24);
    v[a] = v[a] + v[b] + y;
    v[d] = rotr64(v[d] ^ v[a], 16);
    v[c] = v[c] + v[d];
    v[b] = rotr64(v[b] ^ v[c], 63);
  };
  for (const auto& s : kBlakeSigma) {
    g(0, 4, 8, 12, m[s[0]], m[s[1]]);
    g(1, 5, 9, 13, m[s[2]], m[s[3]]);
    g(2, 6, 10, 14, m[s[4]], m[s[5]]);
    g(3, 7, 11, 15, m[s[6]], m[s[7]]);
    g(0, 5, 10, 15, m[s[8]], m[s[9]]);
    g(1, 6, 11, 12, m[s[10]], m[s[11]]);
    g(2, 7, 8, 13, m[s[12]], m[s[13]]);
    g(3, 4, 9, 14, m[s[14]], m[s[15]]);
  }
  for (int i = 0; i < 8; ++i) h[i] ^= v[i] ^ v[i + 8];
}

}  // namespace

void blake2b64_strings(const uint8_t key[8], const uint8_t* prefix, std::size_t prefix_len, const uint8_t* values,
                       const int64_t* offsets, std::size_t n, uint64_t* out) {
  uint64_t start[8];
  for (int i = 0; i < 8; ++i) start[i] = kBlakeIV[i];
  start[0] ^= 0x01010000ull ^ (8ull << 8) ^ 8ull;  // fanout 1, depth 1, key length 8, digest length 8
  uint8_t block[128] = {0};
  std::memcpy(block, key, 8);
  // the key block is the first of every message: its compression is shared, except for an empty
  // message, where it is also the last
  uint64_t keyed[8], empty[8];
  std::memcpy(keyed, start, sizeof start);
  std::memcpy(empty, start, sizeof start);
  blake2b_compress(keyed, block, 128, false);
  blake2b_compress(empty, block, 128, true);
  for (std::size_t s = 0; s < n; ++s) {
    const uint8_t* data = values + offsets[s];
    const auto len = static_cast<std::size_t>(offsets[s + 1] - offsets[s]);
    const std::size_t total = prefix_len + len;
    if (total == 0) {
      out[s] = empty[0];
      continue;
    }
    uint64_t h[8];
    std::memcpy(h, keyed, sizeof h);
    uint64_t t = 128;
    // the message (prefix, then the string) in 128-byte blocks; the last one (1-128 bytes) is final
    for (std::size_t pos = 0; pos < total;) {
      const std::size_t take = std::min<std::size_t>(128, total - pos);
      std::memset(block, 0, sizeof block);
      for (std::size_t k = 0; k < take;) {  // bytes [pos+k, pos+take) from whichever part holds them
        const std::size_t at = pos + k;
        if (at < prefix_len) {
          const std::size_t m = std::min(take - k, prefix_len - at);
          std::memcpy(block + k, prefix + at, m);
          k += m;
        } else {
          std::memcpy(block + k, data + (at - prefix_len), take - k);
          k = take;
        }
      }
      pos += take;
      t += take;
      blake2b_compress(h, block, t, pos == total);
    }
    out[s] = h[0];  // the digest's first 8 bytes, little-endian
  }
}

}  // namespace mlmix::sample
