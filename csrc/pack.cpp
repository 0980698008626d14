#include "pack.h"

#include <algorithm>
#include <climits>
#include <cstring>

#include "common.h"
#include "row_fill.h"

namespace mlmix {
namespace {

// One piece of an example to place: `len` tokens of example `example` from token `start`.
struct Item {
  int32_t example;
  int32_t start;
  int32_t len;
};

// Fisher-Yates permutation of [0, n) driven by splitmix64 (common.h) seeded with `seed`: the same on every
// platform.
std::vector<int32_t> seeded_permutation(int64_t n, uint64_t seed) {
  std::vector<int32_t> perm(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) perm[i] = static_cast<int32_t>(i);
  uint64_t state = seed;
  for (int64_t i = n - 1; i > 0; --i) {
    // multiply-shift maps a 64-bit draw onto [0, i] without a modulo bias worth measuring here
    uint64_t r = splitmix64(state);
    auto j = static_cast<int64_t>((static_cast<unsigned __int128>(r) * static_cast<uint64_t>(i + 1)) >> 64);
    std::swap(perm[i], perm[j]);
  }
  return perm;
}

// The set of capacities in [0, max] that have at least one open row; finds the smallest member >= x
// in O(log64(max)) with a hierarchy of 64-bit words (bit b of a level-k+1 word: word b of level k is non-zero).
class CapacitySet {
 public:
  explicit CapacitySet(int64_t max) {
    int64_t bits = max + 1;
    do {
      int64_t words = (bits + 63) / 64;
      levels_.emplace_back(static_cast<size_t>(words), 0);
      bits = words;
    } while (bits > 1);
  }
  void insert(int64_t i) {
    for (auto& level : levels_) {
      level[i >> 6] |= uint64_t{1} << (i & 63);
      i >>= 6;
    }
  }
  void erase(int64_t i) {
    for (auto& level : levels_) {
      level[i >> 6] &= ~(uint64_t{1} << (i & 63));
      if (level[i >> 6] != 0) return;
      i >>= 6;
    }
  }
  // Smallest member >= x, or -1.
  int64_t next(int64_t x) const {
    size_t k = 0;
    int64_t pos = x;
    for (;;) {
      if (k == levels_.size()) return -1;
      int64_t w = pos >> 6;
      if (w >= static_cast<int64_t>(levels_[k].size())) return -1;
      uint64_t bits = levels_[k][w] & (~uint64_t{0} << (pos & 63));
      if (bits) {
        pos = (w << 6) + __builtin_ctzll(bits);
        break;
      }
      pos = w + 1;
      ++k;
    }
    while (k > 0) {
      --k;
      pos = (pos << 6) + __builtin_ctzll(levels_[k][pos]);
    }
    return pos;
  }

 private:
  std::vector<std::vector<uint64_t>> levels_;
};

// The items in decreasing length; equal lengths keep their order (a stable counting sort).
std::vector<Item> sort_decreasing(const std::vector<Item>& items, int64_t seq_len) {
  std::vector<int64_t> start(static_cast<size_t>(seq_len) + 2, 0);
  for (const Item& it : items) ++start[seq_len - it.len + 1];
  for (int64_t c = 1; c <= seq_len + 1; ++c) start[c] += start[c - 1];
  std::vector<Item> sorted(items.size());
  for (const Item& it : items) sorted[start[seq_len - it.len]++] = it;
  return sorted;
}

// Best fit: each item goes to the open row whose remaining capacity is the smallest that holds it
// (among equals, the most recently filled), else to a new row. Rows per capacity form intrusive stacks.
int32_t best_fit(const std::vector<Item>& sorted, int64_t seq_len, std::vector<int32_t>& item_row) {
  std::vector<int32_t> head(static_cast<size_t>(seq_len) + 1, -1);
  std::vector<int32_t> below;  // next row in the same capacity stack
  CapacitySet open(seq_len);
  int32_t rows = 0;
  for (size_t i = 0; i < sorted.size(); ++i) {
    const int32_t len = sorted[i].len;
    int64_t cap = open.next(len);
    int32_t row;
    int64_t left;
    if (cap < 0) {
      row = rows++;
      below.push_back(-1);
      left = seq_len - len;
    } else {
      row = head[cap];
      head[cap] = below[row];
      if (head[cap] < 0) open.erase(cap);
      left = cap - len;
    }
    if (left > 0) {
      below[row] = head[left];
      head[left] = row;
      open.insert(left);
    }
    item_row[i] = row;
  }
  return rows;
}

// First fit: each item goes to the lowest-numbered row with room, found by descending a max-tree of
// remaining capacities in which not-yet-opened rows count as empty. The tree doubles when all its
// leaves are open, so it stays proportional to the rows used, not to the items.
int32_t first_fit(const std::vector<Item>& sorted, int64_t seq_len, std::vector<int32_t>& item_row) {
  const auto empty = static_cast<int32_t>(seq_len);
  size_t leaves = 1024;
  std::vector<int32_t> tree(2 * leaves, empty);
  int32_t rows = 0;
  for (size_t i = 0; i < sorted.size(); ++i) {
    const int32_t len = sorted[i].len;
    if (tree[1] < len) {  // every leaf is an open row without room: double the leaves
      std::vector<int32_t> grown(4 * leaves, empty);
      std::copy(tree.begin() + static_cast<std::ptrdiff_t>(leaves), tree.end(),
                grown.begin() + static_cast<std::ptrdiff_t>(2 * leaves));
      leaves *= 2;
      for (size_t node = leaves - 1; node >= 1; --node) grown[node] = std::max(grown[2 * node], grown[2 * node + 1]);
      tree.swap(grown);
    }
    size_t node = 1;
    while (node < leaves) node = tree[2 * node] >= len ? 2 * node : 2 * node + 1;
    auto row = static_cast<int32_t>(node - leaves);
    rows = std::max(rows, row + 1);
    tree[node] -= len;
    for (node >>= 1; node >= 1; node >>= 1) {
      int32_t best = std::max(tree[2 * node], tree[2 * node + 1]);
      if (tree[node] == best) break;  // ancestors already hold the right maximum
      tree[node] = best;
    }
    item_row[i] = row;
  }
  return rows;
}

}  // namespace

PackPlanData plan_pack(const int64_t* lengths, int64_t n, int64_t seq_len, PackStrategy strategy,
                       OverlongPolicy overlong, bool shuffle, uint64_t seed) {
  MLMIX_CHECK(seq_len >= 2 && seq_len <= kMaxSeqLen,
              "seq_len must be in [2, " << kMaxSeqLen << "], got " << seq_len);
  MLMIX_CHECK(n >= 0 && n < INT32_MAX, "lengths may hold at most " << INT32_MAX - 1 << " examples, got " << n);
  for (int64_t i = 0; i < n; ++i) {
    MLMIX_CHECK(lengths[i] >= 1 && lengths[i] <= INT32_MAX,
                "lengths[" << i << "] must be in [1, " << INT32_MAX << "], got " << lengths[i]);
  }
  PackPlanData plan;
  plan.assignment.assign(static_cast<size_t>(n), -1);
  std::vector<int32_t> scan;
  if (shuffle) scan = seeded_permutation(n, seed);
  auto example_at = [&](int64_t k) { return shuffle ? static_cast<int64_t>(scan[k]) : k; };

  if (strategy == PackStrategy::kWrapped) {
    int64_t row = 0, used = 0;
    plan.row_offsets.push_back(0);
    for (int64_t k = 0; k < n; ++k) {
      int64_t ex = example_at(k);
      int64_t len = lengths[ex];
      if (len > seq_len) ++plan.num_split;
      plan.assignment[ex] = row;
      for (int64_t start = 0; start < len;) {
        int64_t take = std::min(len - start, seq_len - used);
        plan.seg_example.push_back(ex);
        plan.seg_start.push_back(static_cast<int32_t>(start));
        plan.seg_len.push_back(static_cast<int32_t>(take));
        start += take;
        used += take;
        if (used == seq_len) {
          plan.row_offsets.push_back(static_cast<int64_t>(plan.seg_len.size()));
          ++row;
          used = 0;
        }
      }
      plan.tokens_packed += len;
    }
    if (used > 0) plan.row_offsets.push_back(static_cast<int64_t>(plan.seg_len.size()));
    return plan;
  }

  // Pieces to place, in scan order; over-long examples follow the policy.
  std::vector<Item> items;
  items.reserve(static_cast<size_t>(n));
  for (int64_t k = 0; k < n; ++k) {
    int64_t ex = example_at(k);
    int64_t len = lengths[ex];
    auto ex32 = static_cast<int32_t>(ex);
    if (len <= seq_len) {
      items.push_back({ex32, 0, static_cast<int32_t>(len)});
      continue;
    }
    switch (overlong) {
      case OverlongPolicy::kError:
        MLMIX_CHECK(false, "lengths[" << ex << "] = " << len << " exceeds seq_len = " << seq_len
                                      << "; pass overlong='truncate', 'split' or 'drop', or strategy='bfd_split'");
        break;
      case OverlongPolicy::kTruncate:
        items.push_back({ex32, 0, static_cast<int32_t>(seq_len)});
        ++plan.num_truncated;
        plan.tokens_dropped += len - seq_len;
        break;
      case OverlongPolicy::kDrop:
        ++plan.num_dropped;
        plan.tokens_dropped += len;
        break;
      case OverlongPolicy::kSplit:
        ++plan.num_split;
        for (int64_t start = 0; start < len; start += seq_len) {
          items.push_back({ex32, static_cast<int32_t>(start), static_cast<int32_t>(std::min(seq_len, len - start))});
        }
        break;
    }
  }
  MLMIX_CHECK(items.size() < static_cast<size_t>(INT32_MAX), "too many pieces to pack: " << items.size());

  // Ties keep the order items were made in (already permuted when shuffling).
  std::vector<Item> sorted = sort_decreasing(items, seq_len);
  std::vector<Item>().swap(items);
  std::vector<int32_t> item_row(sorted.size());
  int32_t rows = strategy == PackStrategy::kBestFitDecreasing ? best_fit(sorted, seq_len, item_row)
                                                              : first_fit(sorted, seq_len, item_row);

  // Segment table grouped by row; within a row, segments keep their placement order.
  plan.row_offsets.assign(static_cast<size_t>(rows) + 1, 0);
  for (int32_t r : item_row) ++plan.row_offsets[r + 1];
  for (int32_t r = 0; r < rows; ++r) plan.row_offsets[r + 1] += plan.row_offsets[r];
  std::vector<int64_t> fill(plan.row_offsets.begin(), plan.row_offsets.end() - 1);
  plan.seg_example.resize(sorted.size());
  plan.seg_start.resize(sorted.size());
  plan.seg_len.resize(sorted.size());
  for (size_t i = 0; i < sorted.size(); ++i) {
    const Item& it = sorted[i];
    int64_t s = fill[item_row[i]]++;
    plan.seg_example[s] = it.example;
    plan.seg_start[s] = it.start;
    plan.seg_len[s] = it.len;
    plan.tokens_packed += it.len;
    if (it.start == 0) plan.assignment[it.example] = item_row[i];
  }
  return plan;
}

void check_segments(const int64_t* offsets, int64_t n_examples, const SegmentView& segs, int64_t seq_len) {
  MLMIX_CHECK(segs.row_offsets[0] == 0, "plan row offsets must start at 0");
  for (int64_t r = 0; r < segs.num_rows; ++r) {
    MLMIX_CHECK(segs.row_offsets[r + 1] >= segs.row_offsets[r], "plan row offsets decrease at row " << r);
    int64_t used = 0;
    for (int64_t s = segs.row_offsets[r]; s < segs.row_offsets[r + 1]; ++s) {
      int64_t ex = segs.seg_example[s];
      MLMIX_CHECK(ex >= 0 && ex < n_examples,
                  "segment " << s << " refers to example " << ex << ", but tokens hold " << n_examples);
      int64_t ex_len = offsets[ex + 1] - offsets[ex];
      MLMIX_CHECK(segs.seg_start[s] >= 0 && segs.seg_len[s] >= 0 &&
                      int64_t{segs.seg_start[s]} + segs.seg_len[s] <= ex_len,
                  "segment " << s << " (example " << ex << ", tokens [" << segs.seg_start[s] << ", "
                             << int64_t{segs.seg_start[s]} + segs.seg_len[s] << ")) lies outside the example, which has "
                             << ex_len << " tokens: were the tokens planned with other lengths?");
      used += segs.seg_len[s];
    }
    MLMIX_CHECK(used <= seq_len, "row " << r << " holds " << used << " tokens, more than seq_len = " << seq_len);
  }
}

template <typename T>
void materialize_rows(const T* values, const int64_t* offsets, const uint8_t* mask, const SegmentView& segs,
                      int64_t seq_len, T pad_id, T* input_ids, int64_t* labels, int32_t* position_ids,
                      int threads) {
  rows::parallel_rows(segs.num_rows, threads, [&](int64_t row_begin, int64_t row_end) {
    for (int64_t r = row_begin; r < row_end; ++r) {
      T* ids = input_ids + r * seq_len;
      int64_t* lab = labels + r * seq_len;
      int32_t* pos = position_ids + r * seq_len;
      int64_t t = 0;
      for (int64_t s = segs.row_offsets[r]; s < segs.row_offsets[r + 1]; ++s) {
        const int64_t src = offsets[segs.seg_example[s]] + segs.seg_start[s];
        const int32_t len = segs.seg_len[s];
        rows::fill_segment(values + src, mask ? mask + src : nullptr, len, ids + t, lab + t, pos + t);
        t += len;
      }
      rows::pad_row(t, seq_len, pad_id, ids, lab, pos);
    }
  });
}

template <typename T>
void gather_segments(const T* values, const int64_t* offsets, const SegmentView& segs, T* out) {
  int64_t t = 0;
  for (int64_t s = segs.row_offsets[0]; s < segs.row_offsets[segs.num_rows]; ++s) {
    const int64_t src = offsets[segs.seg_example[s]] + segs.seg_start[s];
    // an empty token array may come as a null pointer; memcpy(null, ..., 0) is undefined behaviour
    if (segs.seg_len[s] > 0) std::memcpy(out + t, values + src, sizeof(T) * static_cast<size_t>(segs.seg_len[s]));
    t += segs.seg_len[s];
  }
}

#define MLMIX_PACK_INSTANTIATE(T)                                                                              \
  template void materialize_rows<T>(const T*, const int64_t*, const uint8_t*, const SegmentView&, int64_t, T, \
                                    T*, int64_t*, int32_t*, int);                                             \
  template void gather_segments<T>(const T*, const int64_t*, const SegmentView&, T*);

MLMIX_PACK_INSTANTIATE(uint32_t)
MLMIX_PACK_INSTANTIATE(int32_t)
MLMIX_PACK_INSTANTIATE(int64_t)
template void gather_segments<uint8_t>(const uint8_t*, const int64_t*, const SegmentView&, uint8_t*);
template void gather_segments<uint16_t>(const uint16_t*, const int64_t*, const SegmentView&, uint16_t*);

}  // namespace mlmix
