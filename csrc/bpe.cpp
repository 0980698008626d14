#include "bpe.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <mutex>
#include <queue>
#include <thread>
#include <unordered_map>

#include "common.h"
#include "parallel.h"
#include "utf8.h"

namespace mlmix::bpe {

namespace {

constexpr uint32_t kNone = 0xFFFFFFFFu;

// A hash of a short byte string, 8 bytes at a time, for the vocabulary's probing tables (only slots
// depend on it, never an output).
inline uint64_t hash_bytes(const uint8_t* p, size_t n) {
  uint64_t h = kSplitMix64Increment ^ (n * 0x100000001B3ULL);
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    h = splitmix64_mix(h ^ w) + kSplitMix64Increment;
    p += 8;
    n -= 8;
  }
  uint64_t w = 0;
  std::memcpy(&w, p, n);
  return splitmix64_mix(h ^ w ^ (uint64_t(n) << 59));
}

// How far ahead the table-building loops prefetch the slot of a later item (ByteVocab::build, the merges).
constexpr size_t kBuildAhead = 16;

inline size_t table_capacity(size_t n) {
  size_t cap = 16;
  while (cap < n * 2) cap <<= 1;
  return cap;
}

// Token bytes -> vocabulary index, open addressing with linear probing over 8-byte slots (hash tag, index):
// the strings live in one pool, found by index, so the probed table stays small (4 MB for 248k tokens).
class ByteVocab {
 public:
  void build(const std::string& bytes, const std::vector<int64_t>& offsets, const std::vector<uint32_t>& ids) {
    const size_t n = ids.size();
    MLMIX_CHECK(bytes.size() < (size_t{1} << 32) && n < kNone, "the vocabulary is too large (" << bytes.size() << " bytes, " << n << " tokens)");
    pool_ = bytes;
    ids_ = ids;
    starts_.assign(n + 1, 0);
    cap_ = table_capacity(n);
    reserve_huge(slots_, cap_);  // probed at random while encoding: huge pages spare TLB misses too
    slots_.assign(cap_, kEmpty);
    // every token's hash first (a sequential pass), then the inserts, each with the slot of the one kBuildAhead
    // later prefetched: the probes are cache misses at random places, overlapped instead of waited for in turn
    std::vector<uint64_t> hashes(n);
    for (size_t i = 0; i < n; ++i) {
      const int64_t lo = offsets[i], hi = offsets[i + 1];
      MLMIX_CHECK(lo >= 0 && hi >= lo && hi <= static_cast<int64_t>(pool_.size()),
                  "vocab offsets are inconsistent at token " << i);
      MLMIX_CHECK(hi > lo, "vocab token " << i << " (id " << ids[i] << ") is empty");
      starts_[i] = static_cast<uint32_t>(lo);
      starts_[i + 1] = static_cast<uint32_t>(hi);
      hashes[i] = hash_bytes(reinterpret_cast<const uint8_t*>(pool_.data()) + lo, static_cast<size_t>(hi - lo));
    }
    for (size_t i = 0; i < n; ++i) {
      if (i + kBuildAhead < n) __builtin_prefetch(&slots_[hashes[i + kBuildAhead] & (cap_ - 1)]);
      const auto* p = reinterpret_cast<const uint8_t*>(pool_.data()) + starts_[i];
      const size_t len = static_cast<size_t>(starts_[i + 1] - starts_[i]);
      const uint64_t h = hashes[i];
      for (size_t k = h & (cap_ - 1);; k = (k + 1) & (cap_ - 1)) {
        if (slots_[k] == kEmpty) {
          slots_[k] = (h & kTagMask) | i;
          break;
        }
        if (matches(slots_[k], p, len, h)) {
          slots_[k] = (h & kTagMask) | i;  // a duplicate string keeps the last id, as a JSON object would
          break;
        }
      }
    }
  }

  // The index of the token with these bytes (kNone if none); `h` is hash_bytes(p, len). `self` tells
  // whether the token was marked by mark_self().
  uint32_t find(const uint8_t* p, size_t len, uint64_t h, bool& self) const {
    for (size_t k = h & (cap_ - 1);; k = (k + 1) & (cap_ - 1)) {
      const uint64_t s = slots_[k];
      if (s == kEmpty) return kNone;
      if (matches(s, p, len, h)) {
        self = (s & kSelfBit) != 0;
        return static_cast<uint32_t>(s);
      }
    }
  }
  uint32_t find(const uint8_t* p, size_t len) const {
    bool self;
    return find(p, len, hash_bytes(p, len), self);
  }
  // Starts loading the slot where a lookup of hash `h` begins (a hint; see the constructors' loops).
  void prefetch(uint64_t h) const { __builtin_prefetch(&slots_[h & (cap_ - 1)]); }
  // Marks the tokens whose index has marked[index] set (the slot keeps the mark beside its hash tag).
  void mark_self(const std::vector<uint8_t>& marked) {
    for (uint64_t& s : slots_) {
      if (s != kEmpty && marked[static_cast<uint32_t>(s)]) s |= kSelfBit;
    }
  }
  const uint8_t* bytes(uint32_t index, size_t& len) const {
    len = starts_[index + 1] - starts_[index];
    return reinterpret_cast<const uint8_t*>(pool_.data()) + starts_[index];
  }
  uint32_t id(uint32_t index) const { return ids_[index]; }
  size_t size() const { return ids_.size(); }

 private:
  static constexpr uint64_t kEmpty = ~uint64_t{0};  // an index is below kNone, so no real slot is all ones
  static constexpr uint64_t kSelfBit = uint64_t{1} << 32;
  static constexpr uint64_t kTagMask = ~uint64_t{0} << 33;

  bool matches(uint64_t s, const uint8_t* p, size_t len, uint64_t h) const {
    if ((s ^ h) & kTagMask) return false;
    const auto i = static_cast<uint32_t>(s);
    return starts_[i + 1] - starts_[i] == len && std::memcmp(pool_.data() + starts_[i], p, len) == 0;
  }

  std::string pool_;
  std::vector<uint32_t> starts_;  // token i is pool_[starts_[i], starts_[i + 1])
  std::vector<uint32_t> ids_;
  std::vector<uint64_t> slots_;
  size_t cap_ = 0;
};

// (left id, right id) -> rank, and rank -> merged id. Each slot is one uint64 packing the pair and its rank
// when the three fit in 63 bits (ids below 2^21 and ranks below 2^21 always do): half the size of a
// (key, rank, merged) slot, which matters because merging is mostly waiting for these lookups.
class MergeMap {
 public:
  void reserve(size_t n, uint32_t max_id) {
    id_bits_ = std::max(1, static_cast<int>(std::bit_width(max_id)));
    rank_bits_ = std::max(1, static_cast<int>(std::bit_width(n)));
    compact_ = 2 * id_bits_ + rank_bits_ <= 63;
    cap_ = table_capacity(n);
    shift_ = 64 - std::countr_zero(cap_);
    if (compact_) {
      reserve_huge(slots_, cap_);  // probed at random while merging: huge pages spare TLB misses too
      slots_.assign(cap_, kEmpty);
    } else {
      reserve_huge(wide_, cap_);
      wide_.assign(cap_, Wide{});
    }
    merged_.assign(n, kNone);
  }
  void insert(uint32_t a, uint32_t b, uint32_t rank, uint32_t merged) {
    merged_[rank] = merged;
    const uint64_t key = (uint64_t(a) << 32) | b;
    if (compact_) {
      const uint64_t packed = ((uint64_t(a) << id_bits_ | b) << rank_bits_) | rank;
      for (size_t k = slot_of(key);; k = (k + 1) & (cap_ - 1)) {
        uint64_t& s = slots_[k];
        if (s == kEmpty || (s >> rank_bits_) == (packed >> rank_bits_)) {
          if (s == kEmpty) ++size_;
          s = packed;  // a repeated pair keeps its last rank, as HF's HashMap collect does
          return;
        }
      }
    }
    for (size_t k = slot_of(key);; k = (k + 1) & (cap_ - 1)) {
      Wide& s = wide_[k];
      if (s.rank == kNone || s.key == key) {
        if (s.rank == kNone) ++size_;
        s = Wide{key, rank};
        return;
      }
    }
  }
  // The rank of the merge of (a, b), kNone if the pair does not merge.
  uint32_t rank(uint32_t a, uint32_t b) const {
    const uint64_t key = (uint64_t(a) << 32) | b;
    if (compact_) {
      const uint64_t want = uint64_t(a) << id_bits_ | b;
      for (size_t k = slot_of(key);; k = (k + 1) & (cap_ - 1)) {
        const uint64_t s = slots_[k];
        if (s == kEmpty) return kNone;
        if ((s >> rank_bits_) == want) return static_cast<uint32_t>(s & ((uint64_t{1} << rank_bits_) - 1));
      }
    }
    for (size_t k = slot_of(key);; k = (k + 1) & (cap_ - 1)) {
      const Wide& s = wide_[k];
      if (s.rank == kNone) return kNone;
      if (s.key == key) return s.rank;
    }
  }
  // The same through a worker's cache of recent lookups (kPairCacheSize packed slots, all ones when empty):
  // the pairs a text needs are few next to the table, and their slots are scattered over it.
  static constexpr int kPairCacheBits = 14;
  static constexpr size_t kPairCacheSize = size_t{1} << kPairCacheBits;
  uint32_t rank(uint32_t a, uint32_t b, uint64_t* cache) const {
    uint32_t r;
    if (cached_rank(a, b, cache, r)) return r;
    r = rank(a, b);
    if (compact_) {
      const uint64_t key = pair_key(a, b);
      cache[pair_slot(key)] = (key << rank_bits_) | (r == kNone ? none_rank() : r);
    }
    return r;
  }
  // The rank of (a, b) into `r` when the worker's cache of lookups holds it, else false (always false for wide
  // tables): the batched merge reads the cache at once and, on a miss, prefetches the table for a later
  // rank(a, b, cache).
  bool cached_rank(uint32_t a, uint32_t b, const uint64_t* cache, uint32_t& r) const {
    if (!compact_) return false;
    const uint64_t key = pair_key(a, b);
    const uint64_t e = cache[pair_slot(key)];
    if ((e >> rank_bits_) != key) return false;  // never equal for an empty entry: a key has fewer bits than all ones
    r = (e & none_rank()) == none_rank() ? kNone : static_cast<uint32_t>(e & none_rank());
    return true;
  }
  uint32_t merged(uint32_t rank) const { return merged_[rank]; }
  size_t size() const { return size_; }
  // Starts loading the slot where the pair (a, b) is inserted or looked up (a hint).
  void prefetch(uint32_t a, uint32_t b) const {
    const size_t k = slot_of((uint64_t(a) << 32) | b);
    if (compact_) __builtin_prefetch(&slots_[k]);
    else __builtin_prefetch(&wide_[k]);
  }

 private:
  static constexpr uint64_t kEmpty = ~uint64_t{0};  // real slots use at most 63 bits
  struct Wide {
    uint64_t key = 0;
    uint32_t rank = kNone;
  };
  size_t slot_of(uint64_t key) const { return static_cast<size_t>((key * kSplitMix64Increment) >> shift_); }
  // a pair cache entry: the pair packed as in a compact slot, at a hashed place; a pair that does not merge
  // is cached with all ones as its rank (above every rank: ranks are below the count)
  uint64_t pair_key(uint32_t a, uint32_t b) const { return uint64_t(a) << id_bits_ | b; }
  static size_t pair_slot(uint64_t key) { return static_cast<size_t>((key * kSplitMix64Increment) >> (64 - kPairCacheBits)); }
  uint64_t none_rank() const { return (uint64_t{1} << rank_bits_) - 1; }

  bool compact_ = true;
  int id_bits_ = 1, rank_bits_ = 1, shift_ = 60;
  std::vector<uint64_t> slots_;
  std::vector<Wide> wide_;
  std::vector<uint32_t> merged_;  // by rank
  size_t cap_ = 0;
  size_t size_ = 0;
};

// Added tokens of one matching pass, as a trie over code points (leftmost-longest search).
class AddedTrie {
 public:
  void add(const std::u32string& s, uint32_t token_index) {
    if (nodes_.empty()) nodes_.emplace_back();
    size_t node = 0;
    for (char32_t c : s) {
      auto& kids = nodes_[node].kids;
      auto it = std::lower_bound(kids.begin(), kids.end(), std::make_pair(uint32_t(c), uint32_t(0)));
      if (it != kids.end() && it->first == uint32_t(c)) {
        node = it->second;
      } else {
        const auto child = static_cast<uint32_t>(nodes_.size());
        kids.insert(it, {uint32_t(c), child});
        nodes_.emplace_back();
        node = child;
      }
    }
    nodes_[node].token = token_index;
    const uint32_t c0 = s[0];
    if (c0 < 65536) first_[c0 >> 6] |= uint64_t(1) << (c0 & 63);
    else first_astral_ = true;
    only_first_ = (only_first_ == kUnset || only_first_ == c0) ? c0 : kNone;
  }
  bool empty() const { return nodes_.empty(); }

  // The first position in [i, n) where a token may start (n if none): with one first character for every
  // token (Qwen's and Llama's all begin with '<'), a scan for that character alone.
  template <typename CU>
  size_t next_candidate(const CU* s, size_t i, size_t n) const {
    if (only_first_ != kNone && only_first_ != kUnset) {
      if (only_first_ > std::numeric_limits<CU>::max()) return n;
      const CU c = static_cast<CU>(only_first_);
      if constexpr (sizeof(CU) == 1) {
        const void* hit = i < n ? std::memchr(s + i, c, n - i) : nullptr;
        return hit ? static_cast<size_t>(static_cast<const CU*>(hit) - s) : n;
      } else {
        while (i < n && s[i] != c) ++i;
        return i;
      }
    }
    for (; i < n; ++i) {
      const uint32_t c0 = s[i];
      if (c0 < 65536 ? (first_[c0 >> 6] >> (c0 & 63)) & 1 : first_astral_) return i;
    }
    return n;
  }

  // Longest token starting at s[i]: sets `len` and returns its index, or kNone.
  template <typename CU>
  uint32_t longest_at(const CU* s, size_t i, size_t n, size_t& len) const {
    const uint32_t c0 = s[i];
    if (c0 < 65536 ? !((first_[c0 >> 6] >> (c0 & 63)) & 1) : !first_astral_) return kNone;
    uint32_t best = kNone;
    size_t node = 0;
    for (size_t j = i; j < n; ++j) {
      const auto& kids = nodes_[node].kids;
      const uint32_t c = s[j];
      auto it = std::lower_bound(kids.begin(), kids.end(), std::make_pair(c, uint32_t(0)));
      if (it == kids.end() || it->first != c) break;
      node = it->second;
      if (nodes_[node].token != kNone) {
        best = nodes_[node].token;
        len = j + 1 - i;
      }
    }
    return best;
  }

 private:
  struct Node {
    std::vector<std::pair<uint32_t, uint32_t>> kids;  // sorted by code point
    uint32_t token = kNone;
  };
  std::vector<Node> nodes_;
  static constexpr uint32_t kUnset = 0xFFFFFFFEu;
  uint64_t first_[1024] = {};
  bool first_astral_ = false;
  uint32_t only_first_ = kUnset;  // the one first character of every token, else kNone
};

// kPrefixMasks[k]: a word whose first k bytes in memory are 0xFF and the others 0, whatever the byte order.
inline constexpr auto kPrefixMasks = [] {
  std::array<uint64_t, 9> m{};
  for (size_t k = 0; k <= 8; ++k) {
    std::array<uint8_t, 8> b{};
    for (size_t i = 0; i < k; ++i) b[i] = 0xFF;
    m[k] = std::bit_cast<uint64_t>(b);
  }
  return m;
}();

// hash_bytes(p, n) where the 8 bytes after p[n - 1] may be read too (a piece with the cache's read slack): the
// last word is read whole and masked instead of copied byte by byte.
inline uint64_t hash_piece(const uint8_t* p, size_t n) {
  uint64_t h = kSplitMix64Increment ^ (n * 0x100000001B3ULL);
  const size_t tail = n & 7;
  for (const uint8_t* end = p + (n - tail); p < end; p += 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    h = splitmix64_mix(h ^ w) + kSplitMix64Increment;
  }
  uint64_t w;
  std::memcpy(&w, p, 8);
  return splitmix64_mix(h ^ (w & kPrefixMasks[tail]) ^ (uint64_t(tail) << 59));
}

// Entries of pieces longer than a short cache entry holds: `kSlots` entries of up to `kKey` bytes and `kIds`
// ids, in 2-way sets (neighbouring slots), with their tags (hash bits, id count, length) apart so a miss
// reads one line.
template <size_t kKey, size_t kIds, size_t kSlots>
class LongTier {
 public:
  LongTier() : tags_(kSlots, 0), entries_(kSlots) {}
  static constexpr bool fits(size_t len, size_t n_ids) { return len <= kKey && n_ids <= kIds; }
  const uint32_t* find(const uint8_t* p, size_t len, uint64_t h, size_t& n_ids) const {
    const size_t k0 = h & (kSlots - 1);
    for (const size_t k : {k0, k0 ^ 1}) {  // a 2-way set: two neighbouring slots, their tags in one line
      const uint64_t t = tags_[k];
      if (((t ^ h) & ~uint64_t{0xFFFF}) != 0 || (t & 0xFF) != len) continue;
      const Entry& e = entries_[k];
      if (std::memcmp(e.key, p, len) != 0) continue;
      n_ids = (t >> 8) & 0xFF;
      return e.ids;
    }
    return nullptr;
  }
  void put(const uint8_t* p, size_t len, uint64_t h, const uint32_t* ids, size_t n_ids) {
    const size_t k0 = h & (kSlots - 1);
    const size_t k = tags_[k0] == 0 ? k0 : k0 ^ 1;  // the slot of this hash when free, else its neighbour
    tags_[k] = (h & ~uint64_t{0xFFFF}) | (n_ids << 8) | len;
    std::memcpy(entries_[k].key, p, len);
    std::memcpy(entries_[k].ids, ids, n_ids * sizeof(uint32_t));
  }

 private:
  static_assert(kKey < 256 && kIds < 256 && (kSlots & (kSlots - 1)) == 0);
  struct alignas(64) Entry {
    uint8_t key[kKey];
    uint32_t ids[kIds];
  };
  std::vector<uint64_t> tags_;
  std::vector<Entry> entries_;
};

// A fixed-size cache of piece -> ids, one per worker: memory stays bounded however many distinct pieces a
// batch has. Most pieces are short words of a few tokens: they go to 2-way sets of 32-byte entries (key up to
// 16 bytes stored zero-padded, up to 3 ids), a set per cache line, so a lookup reads one line and compares two
// words per entry. Longer pieces (a Devanagari word, a run of CJK text up to 128 bytes) go to two tiers of
// 2-way sets: 16,384 entries of up to 48 bytes and 20 ids, and 4,096 of up to 128 bytes and 32 ids (uncached,
// such a run costs a quadratic merge each time it recurs). 131,072 + 16,384 + 4,096 entries, 7.1 MB per worker
// (65,536 short entries, 5.1 MB, held ~10% fewer pieces of text with many distinct words and was ~8% slower on it).
class PieceCache {
 public:
  static constexpr size_t kSets = size_t{1} << 16, kShortKey = 16, kShortIds = 3;
  // find() and put() may read up to kShortKey bytes at p whatever `len` (the caller's buffer has that slack)
  static constexpr size_t kReadSlack = kShortKey;

  PieceCache() : sets_(kSets) {}

  const uint32_t* find(const uint8_t* p, size_t len, uint64_t h, size_t& n_ids) const {
    if (len <= kShortKey) {
      uint64_t w0, w1;
      words(p, len, w0, w1);
      const Set& set = sets_[h & (kSets - 1)];
      for (const ShortEntry& e : set.e) {
        if ((e.meta & kLenMask) == len && e.k0 == w0 && e.k1 == w1) {
          n_ids = e.meta >> kIdsShift;
          return e.ids;
        }
      }
    }
    if (Long::fits(len, 0)) return long_.find(p, len, h, n_ids);
    if (Huge::fits(len, 0)) return huge_.find(p, len, h, n_ids);
    return nullptr;
  }
  void put(const uint8_t* p, size_t len, uint64_t h, const uint32_t* ids, size_t n_ids) {
    if (len <= kShortKey && n_ids <= kShortIds) {
      Set& set = sets_[h & (kSets - 1)];
      set.e[1] = set.e[0];  // the older entry of the set goes
      ShortEntry& e = set.e[0];
      words(p, len, e.k0, e.k1);
      e.meta = static_cast<uint32_t>(len | (n_ids << kIdsShift));
      std::memcpy(e.ids, ids, n_ids * sizeof(uint32_t));
    } else if (Long::fits(len, n_ids)) {
      long_.put(p, len, h, ids, n_ids);
    } else if (Huge::fits(len, n_ids) && !Long::fits(len, 0)) {  // a long piece is looked up in long_ only
      huge_.put(p, len, h, ids, n_ids);
    }
  }

 private:
  using Long = LongTier<48, 20, size_t{1} << 14>;   // 128-byte entries
  using Huge = LongTier<128, 32, size_t{1} << 12>;  // 256-byte entries
  static constexpr uint32_t kLenMask = 0x1F, kIdsShift = 5;  // meta: length (0: empty) | id count << 5
  // the first `len` (<= 16) bytes at p as two words, zero-padded
  static void words(const uint8_t* p, size_t len, uint64_t& w0, uint64_t& w1) {
    std::memcpy(&w0, p, 8);
    std::memcpy(&w1, p + 8, 8);
    w0 &= kPrefixMasks[std::min<size_t>(len, 8)];
    w1 &= kPrefixMasks[len > 8 ? len - 8 : 0];
  }
  struct ShortEntry {
    uint64_t k0 = 0, k1 = 0;
    uint32_t meta = 0;
    uint32_t ids[kShortIds];
  };
  struct alignas(64) Set {
    ShortEntry e[2];
  };
  static_assert(sizeof(ShortEntry) == 32 && sizeof(Set) == 64);
  std::vector<Set> sets_;
  Long long_;
  Huge huge_;
};

// A UTF-8 document beside the code points decoded from it: code point i is bytes[pos[i], pos[i + 1]), or
// bytes[i] when pos is null (ASCII, whose code units are its bytes); `size` bytes at `bytes` may be read.
struct Utf8Source {
  const uint8_t* bytes;
  const uint32_t* pos;
  size_t size;
};

struct Segment {
  size_t start, end;
  uint32_t token;  // index into added_tokens, or kNone for text
};

// Scratch space of a worker that is written before it is read: grown without being initialised, and kept
// between documents.
template <typename T>
class Scratch {
 public:
  T* get(size_t n) {
    if (n > cap_) {
      p_.reset(new T[std::max<size_t>(n, 2 * cap_)]);
      cap_ = std::max<size_t>(n, 2 * cap_);
    }
    return p_.get();
  }
  T* data() const { return p_.get(); }
  void trim() {  // released past 1 MB (a huge document's)
    if (cap_ * sizeof(T) > (size_t{1} << 20)) {
      p_.reset();
      cap_ = 0;
    }
  }

 private:
  std::unique_ptr<T[]> p_;
  size_t cap_ = 0;
};

struct ThreadState {
  PieceCache cache;
  std::vector<uint8_t> piece_utf8;
  std::vector<char32_t> prefixed;
  Scratch<char32_t> decoded;  // a UTF-8 document's code points
  Scratch<uint32_t> byte_pos;  // the byte offset in the document of each of them, then its end
  std::vector<Segment> seg_a, seg_b;
  std::vector<uint64_t> pair_cache = std::vector<uint64_t>(MergeMap::kPairCacheSize, ~uint64_t{0});
  // Pieces whose merge is deferred (see Encoder::Impl::defer): where their ids go in `out`, their bytes (a
  // copy, at `off` in deferred_bytes), their hash, and once merged their ids (at ids_off in deferred_ids).
  struct Deferred {
    size_t at;
    uint32_t off, len;
    uint64_t h;
    uint32_t ids_off, n_ids;
  };
  std::vector<Deferred> deferred;
  std::vector<uint8_t> deferred_bytes;
  std::vector<uint32_t> deferred_ids, tail;

  // Buffers grown past 1 MB by a huge document are released when a call ends (the state outlives the call).
  void trim() {
    auto shrink = [](auto& v) {
      if (v.capacity() * sizeof(v[0]) > (size_t{1} << 20)) std::remove_reference_t<decltype(v)>().swap(v);
    };
    shrink(piece_utf8); shrink(deferred); shrink(deferred_bytes); shrink(deferred_ids); shrink(tail);
    decoded.trim(); byte_pos.trim(); shrink(prefixed); shrink(seg_a); shrink(seg_b);
  }
};

// Worker states (piece cache and scratch buffers) belong to the encoder and are lent to whichever thread
// encodes: a call's helper threads are new threads, so states kept per thread (thread_local) started every
// helper with a cold cache and a fresh 1 MB allocation. The pool keeps at most kHeldStates between calls.
constexpr size_t kHeldStates = 16;

class StatePool {
 public:
  std::unique_ptr<ThreadState> acquire() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!idle_.empty()) {
        auto s = std::move(idle_.back());  // the most recently used: its cache is the warmest
        idle_.pop_back();
        return s;
      }
    }
    return std::make_unique<ThreadState>();
  }
  void release(std::unique_ptr<ThreadState> s) {
    s->trim();
    std::lock_guard<std::mutex> lock(mu_);
    if (idle_.size() < kHeldStates) idle_.push_back(std::move(s));
  }

 private:
  std::mutex mu_;
  std::vector<std::unique_ptr<ThreadState>> idle_;
};

// Writes the UTF-8 form of code point c at p (room for 4 bytes) and returns the end.
inline uint8_t* put_utf8(uint8_t* p, uint32_t c) {
  if (c < 0x80) {
    *p++ = static_cast<uint8_t>(c);
  } else if (c < 0x800) {
    *p++ = static_cast<uint8_t>(0xC0 | (c >> 6));
    *p++ = static_cast<uint8_t>(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    *p++ = static_cast<uint8_t>(0xE0 | (c >> 12));
    *p++ = static_cast<uint8_t>(0x80 | ((c >> 6) & 0x3F));
    *p++ = static_cast<uint8_t>(0x80 | (c & 0x3F));
  } else {
    *p++ = static_cast<uint8_t>(0xF0 | (c >> 18));
    *p++ = static_cast<uint8_t>(0x80 | ((c >> 12) & 0x3F));
    *p++ = static_cast<uint8_t>(0x80 | ((c >> 6) & 0x3F));
    *p++ = static_cast<uint8_t>(0x80 | (c & 0x3F));
  }
  return p;
}

// Strict UTF-8 -> code points (no overlongs, no surrogates, nothing past U+10FFFF) at `out` (room for n),
// and with kPos each code point's byte offset at `pos` (room for n + 1), followed by n. Sets `count` and
// returns -1, or returns the byte offset of the first invalid sequence.
template <bool kPos>
int64_t decode_utf8(const uint8_t* p, size_t n, char32_t* out, uint32_t* pos, size_t& count) {
  size_t i = 0, k = 0;
  while (i < n) {
    if (i + 8 <= n) {  // eight ASCII bytes at once
      uint64_t w;
      std::memcpy(&w, p + i, 8);
      if ((w & 0x8080808080808080ULL) == 0) {
        for (size_t j = 0; j < 8; ++j) {
          out[k + j] = p[i + j];
          if constexpr (kPos) pos[k + j] = static_cast<uint32_t>(i + j);
        }
        i += 8;
        k += 8;
        continue;
      }
    }
    const uint8_t b0 = p[i];
    if constexpr (kPos) pos[k] = static_cast<uint32_t>(i);
    if (b0 < 0x80) {
      out[k++] = b0;
      ++i;
      continue;
    }
    size_t len;
    uint32_t c, min;
    if ((b0 & 0xE0) == 0xC0) { len = 2; c = b0 & 0x1F; min = 0x80; }
    else if ((b0 & 0xF0) == 0xE0) { len = 3; c = b0 & 0x0F; min = 0x800; }
    else if ((b0 & 0xF8) == 0xF0) { len = 4; c = b0 & 0x07; min = 0x10000; }
    else return static_cast<int64_t>(i);
    if (i + len > n) return static_cast<int64_t>(i);
    for (size_t j = 1; j < len; ++j) {
      if ((p[i + j] & 0xC0) != 0x80) return static_cast<int64_t>(i);
      c = (c << 6) | (p[i + j] & 0x3F);
    }
    if (c < min || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF)) return static_cast<int64_t>(i);
    out[k++] = c;
    i += len;
  }
  if constexpr (kPos) pos[k] = static_cast<uint32_t>(n);
  count = k;
  return -1;
}

template <typename CU>
int64_t find_surrogate(const CU* s, size_t n) {
  if constexpr (sizeof(CU) == 1) {
    (void)s;
    (void)n;
    return -1;
  } else {
    for (size_t i = 0; i < n; ++i) {
      const uint32_t c = s[i];
      if ((c >= 0xD800 && c <= 0xDFFF) || c > 0x10FFFF) return static_cast<int64_t>(i);
    }
    return -1;
  }
}

// UAX #15 quick check for NFC, answering only YES (true) or "not proven" (false: NO or MAYBE): every
// character NFC_QC=Yes and the combining classes of each run of non-starters non-decreasing.
template <typename CU>
bool nfc_quick_yes(const CU* s, size_t n) {
  uint8_t last_ccc = 0;
  for (size_t i = 0; i < n; ++i) {
    const uint32_t c = s[i];
    if (c < 0x300) {  // all NFC_QC=Yes starters
      last_ccc = 0;
      continue;
    }
    const uint8_t cls = unicode::classes(c);
    if (cls & unicode::kNfcNotYes) return false;
    const uint8_t ccc = (cls & unicode::kNonStarter) ? unicode::combining_class(c) : 0;
    if (ccc != 0 && last_ccc > ccc) return false;
    last_ccc = ccc;
  }
  return true;
}

inline bool is_white_space(uint32_t c) { return (unicode::classes(c) & unicode::kWhitespace) != 0; }

}  // namespace

struct Encoder::Impl {
  PreTokenizer pre_tokenizer;
  bool add_prefix_space;
  bool ignore_merges;
  bool nfc;
  ByteVocab vocab;
  size_t vocab_size = 0;
  uint32_t byte_id[256];
  MergeMap merges;
  // merges of two single bytes, dense: every piece starts with these lookups, so keep them off the big table
  std::vector<uint32_t> byte_pair_rank;

  std::vector<AddedToken> added;
  AddedTrie trie_raw, trie_normalized;  // normalized=false tokens, normalized=true tokens
  std::vector<uint32_t> prefix_ids, suffix_ids;
  // worker states (piece caches), lent to the threads of each call
  mutable StatePool states;

  explicit Impl(const Config& cfg)
      : pre_tokenizer(cfg.pre_tokenizer), add_prefix_space(cfg.add_prefix_space), ignore_merges(cfg.ignore_merges), nfc(cfg.nfc) {
    const size_t n = cfg.vocab_ids.size();
    MLMIX_CHECK(cfg.vocab_offsets.size() == n + 1,
                "vocab_offsets must have len(vocab_ids) + 1 = " << n + 1 << " entries, got " << cfg.vocab_offsets.size());
    vocab.build(cfg.vocab_bytes, cfg.vocab_offsets, cfg.vocab_ids);
    vocab_size = n;
    for (int b = 0; b < 256; ++b) {
      const auto byte = static_cast<uint8_t>(b);
      const uint32_t index = vocab.find(&byte, 1);
      MLMIX_CHECK(index != kNone, "the vocabulary has no token for byte " << b
                                      << ": a byte-level BPE needs all 256 (unknown bytes are not supported)");
      byte_id[b] = vocab.id(index);
    }

    // Token bytes by id, to find each merge's result.
    std::vector<std::pair<int64_t, int64_t>> span_of_id;
    for (size_t i = 0; i < n; ++i) {
      const uint32_t id = cfg.vocab_ids[i];
      MLMIX_CHECK(id < (1u << 30), "vocabulary id " << id << " is too large (ids must be below 2^30)");
      if (id >= span_of_id.size()) span_of_id.resize(size_t(id) + 1, {-1, -1});
      span_of_id[id] = {cfg.vocab_offsets[i], cfg.vocab_offsets[i + 1]};
    }
    MLMIX_CHECK(cfg.merges_left.size() == cfg.merges_right.size(), "merges_left and merges_right differ in length");
    merges.reserve(cfg.merges_left.size(), span_of_id.empty() ? 0 : static_cast<uint32_t>(span_of_id.size() - 1));
    // Each merge's result is looked up by its bytes (the two parts joined). As in ByteVocab::build: the hashes
    // of all the joined strings first, then the lookups and inserts with the slots kBuildAhead merges later
    // prefetched. (The strings are joined again in the second pass: short copies, cheaper than keeping them.)
    const size_t n_merges = cfg.merges_left.size();
    std::string joined;
    auto join = [&](size_t r) {
      const uint32_t a = cfg.merges_left[r], b = cfg.merges_right[r];
      MLMIX_CHECK(a < span_of_id.size() && span_of_id[a].first >= 0 && b < span_of_id.size() && span_of_id[b].first >= 0,
                  "merge " << r << " refers to an id that is not in the vocabulary (" << a << ", " << b << ")");
      joined.assign(cfg.vocab_bytes, span_of_id[a].first, span_of_id[a].second - span_of_id[a].first);
      joined.append(cfg.vocab_bytes, span_of_id[b].first, span_of_id[b].second - span_of_id[b].first);
    };
    std::vector<uint64_t> merge_hash(n_merges);
    for (size_t r = 0; r < n_merges; ++r) {
      const uint32_t a = cfg.merges_left[r], b = cfg.merges_right[r];
      if (a >= span_of_id.size() || span_of_id[a].first < 0 || b >= span_of_id.size() || span_of_id[b].first < 0)
        continue;  // reported by the second pass, in order with the other errors
      join(r);
      merge_hash[r] = hash_bytes(reinterpret_cast<const uint8_t*>(joined.data()), joined.size());
    }
    for (size_t r = 0; r < n_merges; ++r) {
      if (r + kBuildAhead < n_merges) {
        vocab.prefetch(merge_hash[r + kBuildAhead]);
        merges.prefetch(cfg.merges_left[r + kBuildAhead], cfg.merges_right[r + kBuildAhead]);
      }
      join(r);
      const uint32_t a = cfg.merges_left[r], b = cfg.merges_right[r];
      bool self;
      const uint32_t merged =
          vocab.find(reinterpret_cast<const uint8_t*>(joined.data()), joined.size(), merge_hash[r], self);
      MLMIX_CHECK(merged != kNone, "merge " << r << " (" << a << ", " << b << ") makes a token that is not in the vocabulary");
      merges.insert(a, b, static_cast<uint32_t>(r), vocab.id(merged));
    }
    byte_pair_rank.assign(256 * 256, kNone);
    for (int a = 0; a < 256; ++a) {
      for (int b = 0; b < 256; ++b) byte_pair_rank[a * 256 + b] = merges.rank(byte_id[a], byte_id[b]);
    }
    added = cfg.added_tokens;
    for (size_t i = 0; i < added.size(); ++i) {
      if (added[i].content.empty()) continue;  // HF ignores empty added tokens
      (added[i].normalized ? trie_normalized : trie_raw).add(added[i].content, static_cast<uint32_t>(i));
    }
    prefix_ids = cfg.prefix_ids;
    suffix_ids = cfg.suffix_ids;
    if (!ignore_merges) mark_self_merging(n);
  }

  // Marks in the vocabulary the tokens whose own bytes merge back into that one token: a piece that is such
  // a token then costs one lookup instead of a merge per byte. (Not every token does: a merge of lower rank
  // can take its bytes apart first.) Each token is merged once, on all cores: ~0.1 s per 100k tokens.
  void mark_self_merging(size_t n) {
    std::vector<uint8_t> marked(n, 0);
    const size_t threads = std::max<size_t>(1, std::min<size_t>(static_cast<size_t>(resolve_threads(0)), (n + 4095) / 4096));
    auto work = [&](size_t t) {
      auto ts = std::make_unique<ThreadState>();
      std::vector<uint32_t> out;
      for (size_t i = t; i < n; i += threads) {
        size_t len;
        const uint8_t* p = vocab.bytes(static_cast<uint32_t>(i), len);
        if (len < 2) {
          marked[i] = 1;
          continue;
        }
        out.clear();
        if (len <= kMaxSmall) {  // no token is marked yet: the piece is merged, not looked up
          defer(p, len, hash_bytes(p, len), *ts, out);
          flush_deferred(*ts, out);
        } else {
          merge_heap(p, len, out);
        }
        marked[i] = out.size() == 1 && out[0] == vocab.id(static_cast<uint32_t>(i));
      }
    };
    std::vector<std::thread> pool;
    for (size_t t = 1; t < threads; ++t) pool.emplace_back(work, t);
    work(0);
    for (auto& th : pool) th.join();
    vocab.mark_self(marked);
  }

  // --- step 3: one piece (UTF-8 bytes) -> ids ---------------------------------------------------
  // `h` is hash_bytes(p, len) (unused for a single byte).
  void encode_piece(const uint8_t* p, size_t len, uint64_t h, ThreadState& ts, std::vector<uint32_t>& out) const {
    if (len == 1) {
      out.push_back(byte_id[p[0]]);
      return;
    }
    // The worker's small cache first: frequent pieces then never touch the large tables.
    size_t n_cached;
    if (const uint32_t* ids = ts.cache.find(p, len, h, n_cached)) {
      out.insert(out.end(), ids, ids + n_cached);
      return;
    }
    if (len <= kMaxSmall) {  // merged with other misses (their lookups overlap): see defer
      defer(p, len, h, ts, out);
      return;
    }
    // A piece that is itself a token: one lookup instead of merging, when merging its bytes gives it back
    // (always with ignore_merges).
    bool self = false;
    const uint32_t index = vocab.find(p, len, h, self);
    if (index != kNone && (self || ignore_merges)) {
      const uint32_t id = vocab.id(index);
      out.push_back(id);
      ts.cache.put(p, len, h, &id, 1);
      return;
    }
    const size_t first = out.size();
    merge_heap(p, len, out);
    ts.cache.put(p, len, h, out.data() + first, out.size() - first);
  }

  // --- pieces that missed the cache, merged a batch at a time -----------------------------------------
  // A piece that misses the cache costs a chain of dependent lookups in tables of MBs (is it a token; then per
  // merge the ranks of the two new pairs, which miss the worker's pair cache on text with many distinct words).
  // Such pieces are noted with the position their ids take in `out` and merged kLanes at a time, one merge of
  // each in turn, with the table slots a merge needs prefetched at the lane's previous merge; then their ids are
  // spliced into place, in order. Lowest rank first, leftmost among equal ranks, by rescanning a short array per
  // piece (fastest for short pieces; merge_heap is the same order for longer ones). On 13.6 MB of translated UI messages (198
  // locales, a third of the pieces missing the cache) this made the encoder 1.25-1.33x faster at one thread.

  void defer(const uint8_t* p, size_t len, uint64_t h, ThreadState& ts, std::vector<uint32_t>& out) const {
    auto& bytes = ts.deferred_bytes;
    const auto off = static_cast<uint32_t>(bytes.size());
    bytes.insert(bytes.end(), p, p + len);
    ts.deferred.push_back({out.size(), off, static_cast<uint32_t>(len), h, 0, 0});
    vocab.prefetch(h);
    if (ts.deferred.size() >= kMaxDeferred) flush_deferred(ts, out);
  }

  // Merges the deferred pieces and puts their ids in place in `out` (and in the cache).
  void flush_deferred(ThreadState& ts, std::vector<uint32_t>& out) const {
    if (ts.deferred.empty()) return;
    ts.deferred_bytes.resize(ts.deferred_bytes.size() + PieceCache::kReadSlack);  // what the cache may read past
    merge_deferred(ts);
    const size_t base = ts.deferred.front().at;
    auto& tail = ts.tail;
    tail.assign(out.begin() + static_cast<std::ptrdiff_t>(base), out.end());
    out.resize(base);
    size_t from = 0;
    for (const auto& d : ts.deferred) {
      out.insert(out.end(), tail.begin() + static_cast<std::ptrdiff_t>(from), tail.begin() + static_cast<std::ptrdiff_t>(d.at - base));
      from = d.at - base;
      const uint32_t* ids = ts.deferred_ids.data() + d.ids_off;
      out.insert(out.end(), ids, ids + d.n_ids);
      ts.cache.put(ts.deferred_bytes.data() + d.off, d.len, d.h, ids, d.n_ids);
    }
    out.insert(out.end(), tail.begin() + static_cast<std::ptrdiff_t>(from), tail.end());
    ts.deferred.clear();
    ts.deferred_bytes.clear();
    ts.deferred_ids.clear();
  }

  static constexpr size_t kMaxSmall = 96;  // longer pieces: merge_heap, at once
  static constexpr size_t kMaxDeferred = 64;
  static constexpr int kLanes = 16;

  struct Lane {
    uint32_t sym[kMaxSmall], rank[kMaxSmall];
    size_t piece, n;
    int pending;  // ranks read at the lane's next merge (their slots prefetched): positions pend[0..pending)
    size_t pend[2];
    bool started;  // past the first step (the vocabulary lookup and the byte-pair ranks)
  };

  void merge_deferred(ThreadState& ts) const {
    auto& list = ts.deferred;
    const uint8_t* bytes = ts.deferred_bytes.data();
    uint64_t* pairs = ts.pair_cache.data();
    Lane lanes[kLanes];
    size_t next = 0;
    auto start = [&](Lane& l) {
      if (next >= list.size()) return false;
      l.piece = next++;
      const auto& d = list[l.piece];
      const uint8_t* p = bytes + d.off;
      l.n = d.len;
      for (size_t i = 0; i < l.n; ++i) l.sym[i] = byte_id[p[i]];
      for (size_t i = 0; i + 1 < l.n; ++i) __builtin_prefetch(&byte_pair_rank[size_t(p[i]) * 256 + p[i + 1]]);
      l.pending = 0;
      l.started = false;
      return true;
    };
    auto finish = [&](Lane& l) {
      auto& d = list[l.piece];
      d.ids_off = static_cast<uint32_t>(ts.deferred_ids.size());
      d.n_ids = static_cast<uint32_t>(l.n);
      ts.deferred_ids.insert(ts.deferred_ids.end(), l.sym, l.sym + l.n);
    };
    auto lookup = [&](Lane& l, size_t i) {
      if (!merges.cached_rank(l.sym[i], l.sym[i + 1], pairs, l.rank[i])) {
        merges.prefetch(l.sym[i], l.sym[i + 1]);
        l.pend[l.pending++] = i;
      }
    };
    // One merge of lane l's piece; false when the piece is done.
    auto step = [&](Lane& l) {
      if (!l.started) {
        const auto& d = list[l.piece];
        const uint8_t* p = bytes + d.off;
        bool self = false;
        const uint32_t index = vocab.find(p, d.len, d.h, self);
        if (index != kNone && (self || ignore_merges)) {
          l.sym[0] = vocab.id(index);
          l.n = 1;
          return false;
        }
        for (size_t i = 0; i + 1 < l.n; ++i) l.rank[i] = byte_pair_rank[size_t(p[i]) * 256 + p[i + 1]];
        l.rank[l.n - 1] = kNone;
        l.started = true;
      } else {
        for (int k = 0; k < l.pending; ++k) l.rank[l.pend[k]] = merges.rank(l.sym[l.pend[k]], l.sym[l.pend[k] + 1], pairs);
        l.pending = 0;
      }
      // the lowest rank, leftmost among equals
      size_t best = 0;
      uint32_t best_rank = l.rank[0];
      for (size_t i = 1; i + 1 < l.n; ++i) {
        if (l.rank[i] < best_rank) {
          best_rank = l.rank[i];
          best = i;
        }
      }
      if (best_rank == kNone) return false;
      l.sym[best] = merges.merged(best_rank);
      for (size_t i = best + 1; i + 1 < l.n; ++i) {
        l.sym[i] = l.sym[i + 1];
        l.rank[i] = l.rank[i + 1];
      }
      --l.n;
      if (l.n == 1) return false;
      if (best + 1 < l.n) lookup(l, best);
      if (best > 0) lookup(l, best - 1);
      return true;
    };
    int lanes_used = 0;
    while (lanes_used < kLanes && start(lanes[lanes_used])) ++lanes_used;
    bool live[kLanes];
    int active = lanes_used;
    for (int j = 0; j < lanes_used; ++j) live[j] = true;
    while (active > 0) {
      for (int j = 0; j < lanes_used; ++j) {
        if (!live[j]) continue;
        Lane& l = lanes[j];
        if (step(l)) continue;
        finish(l);
        if (!start(l)) {
          live[j] = false;
          --active;
        }
      }
    }
  }

  // The batched merge's order with a heap over a linked list of symbols (as HF's Word::merge_all): O(n log n).
  void merge_heap(const uint8_t* p, size_t len, std::vector<uint32_t>& out) const {
    struct Sym {
      uint32_t id;
      int64_t prev, next;
      bool alive;
    };
    struct Cand {
      uint32_t rank;
      uint64_t pos;
      uint32_t merged;
      bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    std::vector<Sym> sym(len);
    for (size_t i = 0; i < len; ++i) {
      sym[i] = Sym{byte_id[p[i]], static_cast<int64_t>(i) - 1, i + 1 < len ? static_cast<int64_t>(i + 1) : -1, true};
    }
    std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
    auto push = [&](uint32_t a, uint32_t b, uint64_t pos) {
      const uint32_t r = merges.rank(a, b);
      if (r != kNone) heap.push(Cand{r, pos, merges.merged(r)});
    };
    for (size_t i = 0; i + 1 < len; ++i) push(sym[i].id, sym[i + 1].id, i);
    while (!heap.empty()) {
      const Cand top = heap.top();
      heap.pop();
      Sym& left = sym[top.pos];
      if (!left.alive || left.next < 0) continue;
      Sym& right = sym[static_cast<size_t>(left.next)];
      // a stale entry: the pair at this position has changed since it was pushed
      const uint32_t r = merges.rank(left.id, right.id);
      if (r == kNone || merges.merged(r) != top.merged) continue;
      left.id = top.merged;
      right.alive = false;
      left.next = right.next;
      if (right.next >= 0) sym[static_cast<size_t>(right.next)].prev = static_cast<int64_t>(top.pos);
      if (left.prev >= 0) push(sym[static_cast<size_t>(left.prev)].id, left.id, static_cast<uint64_t>(left.prev));
      if (left.next >= 0) push(left.id, sym[static_cast<size_t>(left.next)].id, top.pos);
    }
    for (int64_t i = 0; i >= 0; i = sym[static_cast<size_t>(i)].next) out.push_back(sym[static_cast<size_t>(i)].id);
  }


  // --- step 2: a text segment -> pieces -> ids ------------------------------------------------------
  // `src`, when set, is the UTF-8 document the code units s[0, n) were decoded from: a piece's bytes are then
  // read from it in place instead of being encoded again.
  template <typename CU>
  void encode_text(const CU* s, size_t n, ThreadState& ts, std::vector<uint32_t>& out, const Utf8Source* src) const {
    if (n == 0) return;
    if (add_prefix_space && s[0] != ' ') {
      auto& buf = ts.prefixed;
      buf.assign(1, U' ');
      buf.insert(buf.end(), s, s + n);
      encode_pieces(buf.data(), buf.size(), ts, out, nullptr);
      return;
    }
    encode_pieces(s, n, ts, out, src);
  }

  template <typename CU>
  void encode_pieces(const CU* s, size_t n, ThreadState& ts, std::vector<uint32_t>& out, const Utf8Source* src) const {
    // nothing deferred outlives this call (a state whose last call was interrupted by an exception holds none)
    ts.deferred.clear();
    ts.deferred_bytes.clear();
    ts.deferred_ids.clear();
    auto& piece = ts.piece_utf8;
    for (size_t i = 0; i < n;) {
      const size_t len = next_piece(pre_tokenizer, s, i, n);
      if (src) {
        const size_t at = src->pos ? src->pos[i] : i, bytes = (src->pos ? src->pos[i + len] : i + len) - at;
        const uint8_t* p = src->bytes + at;
        // the cache and hash_piece read up to kReadSlack bytes past the piece: near the document's end, a copy
        if (at + bytes + PieceCache::kReadSlack > src->size) {
          if (piece.size() < bytes + PieceCache::kReadSlack) piece.resize(bytes + PieceCache::kReadSlack);
          std::memcpy(piece.data(), p, bytes);
          p = piece.data();
        }
        encode_piece(p, bytes, bytes > 1 ? hash_piece(p, bytes) : 0, ts, out);
        i += len;
        continue;
      }
      if (piece.size() < 4 * len + PieceCache::kReadSlack) piece.resize(4 * len + PieceCache::kReadSlack);
      uint8_t* end = piece.data();
      for (size_t k = i; k < i + len; ++k) end = put_utf8(end, s[k]);
      const auto bytes = static_cast<size_t>(end - piece.data());
      encode_piece(piece.data(), bytes, bytes > 1 ? hash_piece(piece.data(), bytes) : 0, ts, out);
      i += len;
    }
    flush_deferred(ts, out);
  }

  // --- step 1: added tokens ---------------------------------------------------------------------------
  // Splits s[lo, hi) on the tokens of `trie`, mirroring AddedVocabulary::find_matches.
  template <typename CU>
  void split_added(const CU* s, size_t lo, size_t hi, const AddedTrie& trie, bool split_special,
                   std::vector<Segment>& out) const {
    if (trie.empty()) {
      out.push_back({lo, hi, kNone});
      return;
    }
    size_t start_offset = lo;
    size_t i = lo;
    while (i < hi) {
      i = trie.next_candidate(s, i, hi);
      if (i >= hi) break;
      size_t len = 0;
      const uint32_t tok = trie.longest_at(s, i, hi, len);
      if (tok == kNone) {
        ++i;
        continue;
      }
      const AddedToken& t = added[tok];
      const size_t match_end = i + len;
      if (split_special && t.special) {  // left in the text, but the matcher still moves past it
        i = match_end;
        continue;
      }
      size_t start = i, stop = match_end;
      if (t.lstrip) {
        size_t ws = start;
        while (ws > lo && is_white_space(s[ws - 1])) --ws;
        start = std::max(ws, start_offset);
      }
      if (t.rstrip) {
        while (stop < hi && is_white_space(s[stop])) ++stop;
      }
      if (start_offset < start) out.push_back({start_offset, start, kNone});
      out.push_back({start, stop, tok});
      start_offset = stop;
      i = match_end;
    }
    if (start_offset < hi) out.push_back({start_offset, hi, kNone});
  }

  // Returns false, encoding nothing, when the document needs NFC normalization this encoder does not do.
  template <typename CU>
  bool encode_doc(const CU* s, size_t n, bool split_special, ThreadState& ts, std::vector<uint32_t>& out,
                  const Utf8Source* src = nullptr) const {
    if (nfc && !nfc_quick_yes(s, n)) return false;
    encode_doc_normalized(s, n, split_special, ts, out, src);
    return true;
  }

  template <typename CU>
  void encode_doc_normalized(const CU* s, size_t n, bool split_special, ThreadState& ts, std::vector<uint32_t>& out,
                             const Utf8Source* src = nullptr) const {
    if (trie_raw.empty() && trie_normalized.empty()) {
      encode_text(s, n, ts, out, src);
      return;
    }
    auto& first = ts.seg_a;
    auto& second = ts.seg_b;
    first.clear();
    second.clear();
    if (n > 0) split_added(s, 0, n, trie_raw, split_special, first);
    for (const Segment& seg : first) {
      if (seg.token != kNone) second.push_back(seg);
      else split_added(s, seg.start, seg.end, trie_normalized, split_special, second);
    }
    for (const Segment& seg : second) {
      if (seg.token != kNone) {
        out.push_back(added[seg.token].id);
      } else if (src) {
        const Utf8Source part = src->pos ? Utf8Source{src->bytes, src->pos + seg.start, src->size}
                                         : Utf8Source{src->bytes + seg.start, nullptr, src->size - seg.start};
        encode_text(s + seg.start, seg.end - seg.start, ts, out, &part);
      } else {
        encode_text(s + seg.start, seg.end - seg.start, ts, out, nullptr);
      }
    }
  }
};

namespace {
// GPT-2's ByteLevel alphabet: printable bytes stand for themselves, the other 68 map to U+0100.. in order.
struct ByteLevelAlphabet {
  int16_t byte_of[0x144];
  ByteLevelAlphabet() {
    std::fill(std::begin(byte_of), std::end(byte_of), int16_t(-1));
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      byte_of[printable ? b : 256 + extra++] = static_cast<int16_t>(b);
    }
  }
};

bool byte_level_decode(const std::string& token, std::string& out) {
  static const ByteLevelAlphabet alphabet;
  out.clear();
  const auto* p = reinterpret_cast<const uint8_t*>(token.data());
  const size_t n = token.size();
  for (size_t i = 0; i < n;) {
    uint32_t c;
    if (p[i] < 0x80) {
      c = p[i++];
    } else if ((p[i] & 0xE0) == 0xC0 && i + 1 < n) {
      c = ((p[i] & 0x1Fu) << 6) | (p[i + 1] & 0x3Fu);
      i += 2;
    } else {
      return false;  // three- and four-byte characters are all beyond U+0143
    }
    if (c >= 0x144 || alphabet.byte_of[c] < 0) return false;
    out.push_back(static_cast<char>(alphabet.byte_of[c]));
  }
  return !out.empty();
}
}  // namespace

void set_byte_level_model(Config& config, const std::vector<std::string>& vocab_tokens,
                          const std::vector<uint32_t>& vocab_ids, const std::vector<std::string>& merges_left,
                          const std::vector<std::string>& merges_right) {
  MLMIX_CHECK(vocab_tokens.size() == vocab_ids.size(), "vocab tokens and ids differ in length");
  MLMIX_CHECK(merges_left.size() == merges_right.size(), "merges_left and merges_right differ in length");
  // token string -> id, kNone - 1 marking a token that exists but is not byte-level
  std::unordered_map<std::string, uint32_t> id_of;
  id_of.reserve(vocab_tokens.size() * 2);
  config.vocab_bytes.clear();
  config.vocab_offsets.assign(1, 0);
  config.vocab_ids.clear();
  std::string raw;
  for (size_t i = 0; i < vocab_tokens.size(); ++i) {
    if (byte_level_decode(vocab_tokens[i], raw)) {
      config.vocab_bytes += raw;
      config.vocab_offsets.push_back(static_cast<int64_t>(config.vocab_bytes.size()));
      config.vocab_ids.push_back(vocab_ids[i]);
      id_of[vocab_tokens[i]] = vocab_ids[i];
    } else {
      id_of[vocab_tokens[i]] = kNone;
    }
  }
  config.merges_left.clear();
  config.merges_right.clear();
  for (size_t r = 0; r < merges_left.size(); ++r) {
    auto a = id_of.find(merges_left[r]);
    auto b = id_of.find(merges_right[r]);
    MLMIX_CHECK(a != id_of.end() && b != id_of.end(),
                "merge " << r << " ('" << merges_left[r] << "', '" << merges_right[r] << "') uses a token missing from the vocabulary");
    if (a->second == kNone || b->second == kNone) continue;  // can never apply to byte-level pieces
    config.merges_left.push_back(a->second);
    config.merges_right.push_back(b->second);
  }
}

Encoder::Encoder(const Config& config) : impl_(std::make_unique<Impl>(config)) {}
Encoder::~Encoder() = default;
size_t Encoder::vocab_size() const { return impl_->vocab_size; }
size_t Encoder::num_merges() const { return impl_->merges.size(); }

EncodeResult Encoder::encode_batch(const std::vector<TextView>& docs, const EncodeOptions& options) const {
  const Impl& impl = *impl_;
  const size_t n_docs = docs.size();
  for (size_t d = 0; d < n_docs; ++d) {
    const int w = docs[d].width;
    MLMIX_CHECK(w == 0 || w == 1 || w == 2 || w == 4, "document " << d << " has code unit width " << w << "; expected 0 (UTF-8), 1, 2 or 4");
    MLMIX_CHECK(docs[d].len >= 0 && (docs[d].len == 0 || docs[d].data != nullptr), "document " << d << " has a bad length or pointer");
  }

  // Work units: runs of consecutive documents of about `target` code units each, handed out in order.
  int64_t total_units = 0;
  for (const auto& doc : docs) total_units += doc.len;
  const int threads = std::max(1, std::min<int>(resolve_threads(options.num_threads), static_cast<int>(std::max<size_t>(n_docs, 1))));
  const int64_t target = std::clamp<int64_t>(total_units / (int64_t(threads) * 16 + 1), 4096, 1 << 20);
  std::vector<size_t> chunk_begin{0};
  int64_t acc = 0;
  for (size_t d = 0; d < n_docs; ++d) {
    acc += docs[d].len + 16;
    if (acc >= target && d + 1 < n_docs) {
      chunk_begin.push_back(d + 1);
      acc = 0;
    }
  }
  chunk_begin.push_back(n_docs);
  const size_t n_chunks = chunk_begin.size() - 1;

  // Each worker appends the ids of the units it takes to one buffer of its own (a local vector, moved here when
  // it ends: growing vectors side by side in one array would share cache lines between workers); a unit's ids
  // are found again by (worker, offset) and copied into place at the end. One buffer per worker, advised for
  // huge pages, instead of a fresh allocation per unit: its pages are faulted in once, in 2 MiB pages.
  const int helpers = std::min<int>(threads, static_cast<int>(n_chunks)) - 1;
  std::vector<std::vector<uint32_t>> worker_ids(static_cast<size_t>(std::max(helpers, 0)) + 1);
  std::vector<std::pair<uint32_t, size_t>> chunk_at(n_chunks);  // (worker, offset of the unit's first id)
  std::atomic<uint32_t> next_worker{0};
  std::vector<int64_t> doc_len(n_docs, 0);
  std::vector<uint8_t> doc_unencoded(n_docs, 0);
  std::atomic<size_t> next_chunk{0};
  std::atomic<bool> failed{false};
  std::mutex error_mutex;
  size_t error_doc = SIZE_MAX;
  bool error_is_invalid = false;  // error_doc is a document that is not valid Unicode (not an exception)
  std::string error_msg;

  auto worker = [&]() {
    struct Lent {  // this worker's state, given back (trimmed) to the encoder's pool however the worker ends
      StatePool& pool;
      std::unique_ptr<ThreadState> state;
      ~Lent() { pool.release(std::move(state)); }
    } lent{impl.states, impl.states.acquire()};
    ThreadState& ts = *lent.state;
    const uint32_t me = next_worker.fetch_add(1);
    struct Handback {  // the buffer goes to worker_ids[me] however the worker ends
      std::vector<uint32_t>& slot;
      std::vector<uint32_t> ids;
      ~Handback() { slot = std::move(ids); }
    } mine{worker_ids[me], {}};
    // most texts give fewer ids than code units over two; the buffer grows past that where they do not
    reserve_huge(mine.ids, static_cast<size_t>(total_units / (helpers + 1) / 2) + 1024);
    auto& out = mine.ids;
    for (;;) {
      const size_t c = next_chunk.fetch_add(1);
      // No early exit on another thread's error: the smallest bad index is then the one reported, whatever
      // the thread count.
      if (c >= n_chunks) return;
      chunk_at[c] = {me, out.size()};
      for (size_t d = chunk_begin[c]; d < chunk_begin[c + 1]; ++d) {
        const TextView& doc = docs[d];
        const size_t before = out.size();
        const size_t len = static_cast<size_t>(doc.len);
        int64_t bad = -1;
        bool encoded = true;
        if (options.add_special_tokens) out.insert(out.end(), impl.prefix_ids.begin(), impl.prefix_ids.end());
        try {
          switch (doc.width) {
            case 0: {
              // pieces are read from the document itself (byte offsets kept as uint32: below 4 GiB)
              const auto* bytes = static_cast<const uint8_t*>(doc.data);
              const bool in_place = len <= UINT32_MAX;
              char32_t* points = ts.decoded.get(len);
              size_t count = 0;
              bad = in_place ? decode_utf8<true>(bytes, len, points, ts.byte_pos.get(len + 1), count)
                             : decode_utf8<false>(bytes, len, points, nullptr, count);
              const Utf8Source src{bytes, ts.byte_pos.data(), len};
              if (bad < 0)
                encoded = impl.encode_doc(points, count, options.split_special_tokens, ts, out, in_place ? &src : nullptr);
              break;
            }
            case 1: {  // an ASCII text's units are its UTF-8 bytes: its pieces are read in place
              const auto* units = static_cast<const uint8_t*>(doc.data);
              const Utf8Source src{units, nullptr, len};
              encoded = impl.encode_doc(units, len, options.split_special_tokens, ts, out,
                                        utf8::is_ascii(units, len) ? &src : nullptr);
              break;
            }
            case 2:
              bad = find_surrogate(static_cast<const uint16_t*>(doc.data), len);
              if (bad < 0) encoded = impl.encode_doc(static_cast<const uint16_t*>(doc.data), len, options.split_special_tokens, ts, out);
              break;
            default:
              bad = find_surrogate(static_cast<const uint32_t*>(doc.data), len);
              if (bad < 0) encoded = impl.encode_doc(static_cast<const uint32_t*>(doc.data), len, options.split_special_tokens, ts, out);
              break;
          }
        } catch (const std::exception& e) {
          std::lock_guard<std::mutex> lock(error_mutex);
          if (d < error_doc) {
            error_doc = d;
            error_is_invalid = false;
            error_msg = std::string("document ") + std::to_string(d) + ": " + e.what();
          }
          failed = true;
          return;
        }
        if (bad >= 0) {
          std::lock_guard<std::mutex> lock(error_mutex);
          if (d < error_doc) {
            error_doc = d;
            error_is_invalid = true;
            error_msg = "texts[" + std::to_string(d) + "] is not valid Unicode: " +
                        (doc.width == 0 ? "invalid UTF-8 at byte " : "a lone surrogate or out-of-range code point at index ") +
                        std::to_string(bad);
          }
          failed = true;
          return;
        }
        if (!encoded) {
          out.resize(before);
          doc_unencoded[d] = 1;
          continue;
        }
        if (options.add_special_tokens) out.insert(out.end(), impl.suffix_ids.begin(), impl.suffix_ids.end());
        doc_len[d] = static_cast<int64_t>(out.size() - before);
      }
    }
  };

  // No more threads than work units, and the calling thread is one of them (its piece cache is warm): a
  // batch of a few short documents runs inline, without starting a thread.
  if (helpers <= 0) {
    worker();
  } else {
    std::vector<std::thread> pool;
    pool.reserve(helpers);
    for (int t = 0; t < helpers; ++t) pool.emplace_back(worker);
    std::exception_ptr caller_error;
    try {
      worker();
    } catch (...) {
      caller_error = std::current_exception();
    }
    for (auto& th : pool) th.join();
    if (caller_error) std::rethrow_exception(caller_error);
  }
  if (failed.load() && options.report_invalid && error_is_invalid) {
    EncodeResult invalid;
    invalid.first_invalid = static_cast<int64_t>(error_doc);
    return invalid;
  }
  MLMIX_CHECK(!failed.load(), error_msg);

  EncodeResult result;
  for (size_t d = 0; d < n_docs; ++d) {
    if (doc_unencoded[d]) result.unencoded.push_back(static_cast<int64_t>(d));
  }
  result.offsets.resize(n_docs + 1);
  result.offsets[0] = 0;
  for (size_t d = 0; d < n_docs; ++d) result.offsets[d + 1] = result.offsets[d] + doc_len[d];
  reserve_huge(result.values, static_cast<size_t>(result.offsets[n_docs]));
  result.values.resize(static_cast<size_t>(result.offsets[n_docs]));
  auto place = [&](int64_t c_lo, int64_t c_hi) {  // the work units' ids into place (their first touch)
    for (auto c = static_cast<size_t>(c_lo); c < static_cast<size_t>(c_hi); ++c) {
      const auto lo = static_cast<size_t>(result.offsets[chunk_begin[c]]);
      const auto hi = static_cast<size_t>(result.offsets[chunk_begin[c + 1]]);
      const auto& [w, at] = chunk_at[c];
      if (hi > lo) std::memcpy(result.values.data() + lo, worker_ids[w].data() + at, (hi - lo) * sizeof(uint32_t));
    }
  };
  // on the encoding's threads where there is enough to copy (a few MB): a thread start costs more than a small copy
  if (helpers > 0 && result.values.size() >= (size_t{1} << 20))
    parallel_chunks(static_cast<int64_t>(n_chunks), helpers + 1, 1, place);
  else
    place(0, static_cast<int64_t>(n_chunks));
  return result;
}

}  // namespace mlmix::bpe
