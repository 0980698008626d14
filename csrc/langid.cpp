// Native py3langid (see langid.h for what is computed and why the sums are done in double).
#include "langid.h"

#include "parallel.h"
#include "utf8.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <mutex>
#include <thread>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace mlmix::langid {
namespace {

// ---------------------------------------------------------------------------------------------
// UTF-8

// Decodes one code point of strict UTF-8 (what Python's decoder accepts: no overlong forms, no
// surrogates, nothing above U+10FFFF) at p[0..n); returns its length, or 0 if invalid.
inline int decode_utf8(const uint8_t* p, int64_t n, uint32_t& cp) {
  const uint8_t b0 = p[0];
  if (b0 < 0x80) {
    cp = b0;
    return 1;
  }
  auto cont = [&](int64_t i) { return i < n && (p[i] & 0xC0) == 0x80; };
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    if (!cont(1)) return 0;
    cp = (uint32_t(b0 & 0x1F) << 6) | (p[1] & 0x3F);
    return 2;
  }
  if (b0 >= 0xE0 && b0 <= 0xEF) {
    if (n < 2) return 0;
    const uint8_t b1 = p[1];
    const uint8_t lo = b0 == 0xE0 ? 0xA0 : 0x80, hi = b0 == 0xED ? 0x9F : 0xBF;
    if (b1 < lo || b1 > hi || !cont(2)) return 0;
    cp = (uint32_t(b0 & 0x0F) << 12) | (uint32_t(b1 & 0x3F) << 6) | (p[2] & 0x3F);
    return 3;
  }
  if (b0 >= 0xF0 && b0 <= 0xF4) {
    if (n < 2) return 0;
    const uint8_t b1 = p[1];
    const uint8_t lo = b0 == 0xF0 ? 0x90 : 0x80, hi = b0 == 0xF4 ? 0x8F : 0xBF;
    if (b1 < lo || b1 > hi || !cont(2) || !cont(3)) return 0;
    cp = (uint32_t(b0 & 0x07) << 18) | (uint32_t(b1 & 0x3F) << 12) | (uint32_t(p[2] & 0x3F) << 6) | (p[3] & 0x3F);
    return 4;
  }
  return 0;
}

[[noreturn]] void throw_bad_utf8(int64_t doc, int64_t at) {
  MLMIX_CHECK(false, "texts[" << doc << "] is not valid UTF-8 (at byte " << at << ")");
  std::terminate();  // not reached
}

// ---------------------------------------------------------------------------------------------
// Text preparation: is py3langid's _encode the identity on this cut (but for UTF-8 encoding)?

// Hangul syllables compose algorithmically: L + V, and LV + T.
inline bool hangul_composes(uint32_t a, uint32_t b) {
  if (a >= 0x1100 && a <= 0x1112 && b >= 0x1161 && b <= 0x1175) return true;
  if (a >= 0xAC00 && a <= 0xD7A3 && (a - 0xAC00) % 28 == 0 && b >= 0x11A8 && b <= 0x11C2) return true;
  return false;
}

class Prep {
 public:
  explicit Prep(const TextRules& r) : r_(r) {}

  // One code point of the cut, in order.
  void add(uint32_t cp) {
    if (cp < 0x80) {  // ASCII: a starter, NFC, composes with nothing
      any_upper_ |= cp - 'A' < 26;
      any_lower_ |= cp - 'a' < 26;
      starter_ = cp;
      has_starter_ = true;
      starter_decomposes_ = false;
      since_starter_ = 0;
      last_ccc_ = 0;
      return;
    }
    uint8_t f = 0, c = 0;
    if (cp < static_cast<uint64_t>(r_.size)) {
      f = r_.flags[cp];
      c = r_.ccc[cp];
    }
    any_upper_ |= (f & kUpper) != 0;
    any_lower_ |= (f & kLowerOrTitle) != 0;
    if (f & kNfcNo) unsure_ = true;
    if (c != 0 && last_ccc_ > c) unsure_ = true;  // not in canonical order
    // a "maybe" is decided only right after a starter without a decomposition that it does not compose
    // with (then NFC leaves the pair alone); anything else goes to py3langid's _encode
    if ((f & kNfcMaybe) &&
        ((f & kDecomposable) ||
         (has_starter_ && (since_starter_ > 0 || starter_decomposes_ || composes(starter_, cp)))))
      unsure_ = true;
    if (c == 0) {
      starter_ = cp;
      has_starter_ = true;
      starter_decomposes_ = (f & kDecomposable) != 0;
      since_starter_ = 0;
    } else {
      ++since_starter_;
    }
    last_ccc_ = c;
  }

  bool space(uint32_t cp) const { return cp < static_cast<uint64_t>(r_.size) && (r_.flags[cp] & kSpace); }

  // True when _encode would change more than the encoding: str.isupper() (then lower()), or not
  // surely NFC.
  bool needs_prep() const { return unsure_ || (any_upper_ && !any_lower_); }

 private:
  bool composes(uint32_t a, uint32_t b) const {
    if (hangul_composes(a, b)) return true;
    const uint64_t key = (static_cast<uint64_t>(a) << 21) | b;
    return std::binary_search(r_.pairs, r_.pairs + r_.num_pairs, key);
  }

  const TextRules& r_;
  bool any_upper_ = false, any_lower_ = false, unsure_ = false, has_starter_ = false, starter_decomposes_ = false;
  uint8_t last_ccc_ = 0;
  uint32_t starter_ = 0;
  int64_t since_starter_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Scoring

// Texts are classified a chunk at a time: each is prepared (its bytes found), then the DFA walks of
// kLanes texts are interleaved (one byte of each in turn: the walks are chains of dependent loads
// into a table of tens of MB, so one walk at a time waits on memory at every byte; 16 lanes walked
// py3langid's model 1.2-1.3x faster than 8 on a 2-core AMD EPYC VM), then each text's features are scored.
constexpr int64_t kChunk = 32;
constexpr int kLanes = 16;

struct Scratch {
  std::vector<uint8_t> bytes[kChunk];    // a text's UTF-8 (str input only)
  std::vector<int32_t> features[kChunk];  // the features its DFA walk emitted, in order
  std::vector<int32_t> counts;     // per feature, all 0 between texts
  std::vector<int32_t> touched;    // the features seen, in order of first occurrence
  std::vector<int32_t> group_of;   // per count value: its group in the current block, -1 if none
  std::vector<int32_t> group_count;
  std::vector<int32_t> iacc;       // per group, num_columns exact fixed-point sums
  std::vector<double> acc, prob;
};

// Adds the fixed-point row to an int32 accumulator (no overflow: see kBlock).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void add_row(int32_t* __restrict a, const int16_t* __restrict row, int64_t n) {
  for (int64_t c = 0; c < n; ++c) a[c] += row[c];
}

// Rows are fetched kAhead features ahead of their use: each is a few cache lines at a random place in a
// table of tens of MB.
constexpr size_t kAhead = 6;
inline void prefetch_row(const int16_t* row, int64_t n) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(int16_t)); b += 64) __builtin_prefetch(p + b);
}

// Features summed in int32 before their group is folded into the double scores: 65536 rows of
// |value| <= 32768 cannot overflow.
constexpr size_t kBlock = 1 << 16;

// A Dfa entry's two halves: the next row and the feature + 1 (0: none).
struct NarrowEntry {
  const uint32_t* table;
  uint32_t rows;
  uint64_t magic;
  uint32_t row(uint32_t e, uint32_t& f1) const {
    f1 = static_cast<uint32_t>((static_cast<unsigned __int128>(magic) * e) >> 64);  // e / rows, exactly
    return e - f1 * rows;
  }
  uint32_t at(uint64_t i) const { return table[i]; }
  const void* address(uint64_t i) const { return table + i; }
};
struct WideEntry {
  const uint64_t* table;
  uint32_t row(uint64_t e, uint32_t& f1) const {
    f1 = static_cast<uint32_t>(e >> 32);
    return static_cast<uint32_t>(e);
  }
  uint64_t at(uint64_t i) const { return table[i]; }
  const void* address(uint64_t i) const { return table + i; }
};

// The DFA walks of texts `p[j][0..n[j])`, j < count, interleaved kLanes at a time; text j's features
// (in order of emission) into out[j].
template <class Entry>
void walk(const Entry dfa, uint32_t start, int64_t count, const uint8_t* const* p, const int64_t* n,
          std::vector<int32_t>* out) {
  int64_t doc[kLanes], pos[kLanes];
  uint32_t row[kLanes];
  int active = 0;
  int64_t next = 0;
  auto refill = [&](int j) {
    while (next < count && n[next] == 0) out[next++].clear();
    if (next >= count) return false;
    doc[j] = next;
    pos[j] = 0;
    row[j] = start;
    out[next].clear();
    ++next;
    return true;
  };
  int lanes = 0;
  while (lanes < kLanes && refill(lanes)) ++lanes;
  active = lanes;
  while (active > 0) {
    for (int j = 0; j < lanes; ++j) {
      if (doc[j] < 0) continue;
      const int64_t d = doc[j];
      uint32_t f1;
      const uint32_t r = dfa.row(dfa.at((static_cast<uint64_t>(row[j]) << 8) | p[d][pos[j]]), f1);
      row[j] = r;
      if (f1 != 0) out[d].push_back(static_cast<int32_t>(f1 - 1));
      if (++pos[j] < n[d]) {
        // the lane's next entry is known now: fetch it while the other lanes step
        __builtin_prefetch(dfa.address((static_cast<uint64_t>(r) << 8) | p[d][pos[j]]));
      } else if (!refill(j)) {
        doc[j] = -1;
        --active;
      }
    }
  }
}

void walk(const Dfa& dfa, int64_t count, const uint8_t* const* p, const int64_t* n, std::vector<int32_t>* out) {
  if (dfa.narrow())
    walk(NarrowEntry{dfa.narrow_table(), dfa.rows(), dfa.magic()}, dfa.start(), count, p, n, out);
  else
    walk(WideEntry{dfa.wide_table()}, dfa.start(), count, p, n, out);
}

// Label and probability of a text of `n` bytes whose DFA walk emitted `features`.
void score_features(const Model& m, const Selection& sel, const std::vector<int32_t>& features, int64_t n,
                    Scratch& s, int32_t& label, double& prob) {
  // the selection's own cut of the table where it has one (its column j is the model's sel.columns[j])
  const bool cut = !sel.ptc.empty();
  const int64_t C = cut ? static_cast<int64_t>(sel.columns.size()) : m.num_columns;
  const int16_t* ptc = cut ? sel.ptc.data() : m.ptc;
  if (s.counts.empty()) s.counts.assign(static_cast<size_t>(m.num_features), 0);
  s.touched.clear();
  for (const int32_t f : features)
    if (s.counts[f]++ == 0) s.touched.push_back(f);
  const size_t k = sel.columns.size();
  s.prob.assign(k, 0.0);
  if (!s.touched.empty()) {
    s.acc.assign(static_cast<size_t>(C), 0.0);
    double* acc = s.acc.data();
    for (size_t b0 = 0; b0 < s.touched.size(); b0 += kBlock) {
      const size_t b1 = std::min(s.touched.size(), b0 + kBlock);
      s.group_count.clear();
      for (size_t t = b0; t < b1; ++t) {
        if (t + kAhead < b1) prefetch_row(ptc + static_cast<int64_t>(s.touched[t + kAhead]) * C, C);
        const int32_t f = s.touched[t];
        const int32_t count = s.counts[f];
        if (static_cast<size_t>(count) >= s.group_of.size()) s.group_of.resize(static_cast<size_t>(count) + 1, -1);
        int32_t g = s.group_of[count];
        if (g < 0) {
          g = static_cast<int32_t>(s.group_count.size());
          s.group_of[count] = g;
          s.group_count.push_back(count);
          if (s.iacc.size() < (static_cast<size_t>(g) + 1) * C) s.iacc.resize((static_cast<size_t>(g) + 1) * C);
          std::fill_n(s.iacc.begin() + static_cast<int64_t>(g) * C, C, 0);
        }
        add_row(s.iacc.data() + static_cast<int64_t>(g) * C, ptc + static_cast<int64_t>(f) * C, C);
      }
      for (size_t g = 0; g < s.group_count.size(); ++g) {
        const int32_t count = s.group_count[g];
        s.group_of[count] = -1;
        const float lw = count < m.log1p_size ? m.log1p[count]
                                              : static_cast<float>(std::log1p(static_cast<double>(count)));
        // exact: a power of two times a float32, times an int32
        const double w = static_cast<double>(lw) * m.ptc_unit;
        const int32_t* a = s.iacc.data() + static_cast<int64_t>(g) * C;
        for (int64_t c = 0; c < C; ++c) acc[c] += w * static_cast<double>(a[c]);
      }
    }
    for (const int32_t f : s.touched) s.counts[f] = 0;
    const double scale = 1.0 / std::sqrt(static_cast<double>(n > 0 ? n : 1));
    for (size_t j = 0; j < k; ++j) {
      const int32_t c = sel.columns[j];
      s.prob[j] = (acc[cut ? static_cast<int64_t>(j) : c] + static_cast<double>(m.pc[c])) * scale;
    }
  }  // no feature: every score 0 (py3langid leaves pc out too)
  double top = -std::numeric_limits<double>::infinity();
  for (size_t j = 0; j < k; ++j) top = std::max(top, s.prob[j]);
  double total = 0.0;
  for (size_t j = 0; j < k; ++j) {
    s.prob[j] = std::exp(s.prob[j] - top);
    total += s.prob[j];
  }
  // a label's columns are summed (in column order); its first column holds the sum
  s.acc.assign(static_cast<size_t>(sel.num_labels), 0.0);
  for (size_t j = 0; j < k; ++j) s.acc[sel.label[j]] += s.prob[j] / total;
  int32_t best = 0;
  for (int32_t l = 1; l < sel.num_labels; ++l)
    if (s.acc[l] > s.acc[best]) best = l;
  label = best;
  prob = s.acc[best];
}

// The bytes py3langid would classify for `doc` into (*bytes, *size) (pointing into `doc` or into `buf`),
// and true; or false with the final label (kEmpty, kNeedsPrep).
bool prepare(const TextRules& rules, const TextView& doc, int64_t index, const Options& opts,
             std::vector<uint8_t>& buf, const uint8_t** out_bytes, int64_t* out_size, int32_t& label, double& prob) {
  if (opts.prepared) {
    *out_bytes = static_cast<const uint8_t*>(doc.data);
    *out_size = doc.len;
    return true;
  }
  Prep prep(rules);
  bool content = false;  // a code point that is not whitespace
  const uint8_t* bytes = nullptr;
  int64_t cut_bytes = 0;
  if (doc.width == 0) {
    const auto* p = static_cast<const uint8_t*>(doc.data);
    const int64_t n = doc.len;
    int64_t i = 0, chars = 0;
    for (; i < n && chars < opts.max_chars; ++chars) {
      uint32_t cp;
      const int len = decode_utf8(p + i, n - i, cp);
      if (len == 0) throw_bad_utf8(index, i);
      prep.add(cp);
      content = content || !prep.space(cp);
      i += len;
    }
    cut_bytes = i;
    // the rest is only validated (and searched for content if there was none yet)
    while (i < n) {
      if (p[i] < 0x80) {
        content = content || !prep.space(p[i]);
        ++i;
        continue;
      }
      uint32_t cp;
      const int len = decode_utf8(p + i, n - i, cp);
      if (len == 0) throw_bad_utf8(index, i);
      content = content || !prep.space(cp);
      i += len;
    }
    bytes = p;
  } else {
    const int64_t cut = std::min(doc.len, opts.max_chars);
    buf.clear();
    auto at = [&](int64_t i) -> uint32_t {
      if (doc.width == 1) return static_cast<const uint8_t*>(doc.data)[i];
      if (doc.width == 2) return static_cast<const uint16_t*>(doc.data)[i];
      return static_cast<const uint32_t*>(doc.data)[i];
    };
    for (int64_t i = 0; i < cut; ++i) {
      const uint32_t cp = at(i);
      prep.add(cp);
      content = content || !prep.space(cp);
      utf8::append(buf, cp);
    }
    for (int64_t i = cut; i < doc.len && !content; ++i) content = !prep.space(at(i));
    bytes = buf.data();
    cut_bytes = static_cast<int64_t>(buf.size());
  }
  if (!content || prep.needs_prep()) {
    label = content ? kNeedsPrep : kEmpty;
    prob = 0.0;
    return false;
  }
  *out_bytes = bytes;
  *out_size = cut_bytes;
  return true;
}

}  // namespace

LargeBuffer::LargeBuffer(size_t bytes) {
  constexpr size_t kHuge = size_t{1} << 21;
#if defined(__linux__)
  if (bytes >= kHuge) {
    mapped_ = (bytes + 2 * kHuge - 1) / kHuge * kHuge;
    void* p = mmap(nullptr, mapped_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p != MAP_FAILED) {
      base_ = p;
      const auto addr = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(uintptr_t{kHuge} - 1);
      data_ = reinterpret_cast<void*>(addr);
#ifdef MADV_HUGEPAGE
      madvise(data_, mapped_ - (addr - reinterpret_cast<uintptr_t>(p)), MADV_HUGEPAGE);  // advice only
#endif
    }
  }
#endif
  if (!data_) {
    data_ = ::operator new(bytes > 0 ? bytes : 1);
    mapped_ = 0;
  }
}

LargeBuffer::LargeBuffer(const void* src, size_t bytes) : LargeBuffer(bytes) {
  if (bytes > 0) std::memcpy(data_, src, bytes);
}

LargeBuffer::~LargeBuffer() {
#if defined(__linux__)
  if (base_) {
    munmap(base_, mapped_);
    return;
  }
#endif
  ::operator delete(data_);
}

void check_model(const Model& m) {
  MLMIX_CHECK(m.num_rows >= 1 && m.num_states >= 1, "langid model: needs at least one DFA row and state");
  MLMIX_CHECK(m.num_columns >= 1 && m.num_features >= 1, "langid model: needs at least one feature and class");
  MLMIX_CHECK(m.log1p_size >= 1, "langid model: log1p table is empty");
  for (int64_t i = 0; i < m.num_rows * 256; ++i)
    MLMIX_CHECK(m.nextmove[i] < static_cast<uint64_t>(m.num_states),
                "langid model: nextmove[" << i << "] = " << m.nextmove[i] << " is not a state (< " << m.num_states
                                          << ")");
  for (int64_t s = 0; s < m.num_states; ++s) {
    MLMIX_CHECK(m.state_row[s] < static_cast<uint64_t>(m.num_rows),
                "langid model: state_row[" << s << "] = " << m.state_row[s] << " is not a row (< " << m.num_rows
                                           << ")");
    MLMIX_CHECK(m.state_feature[s] >= -1 && m.state_feature[s] < m.num_features,
                "langid model: state_feature[" << s << "] = " << m.state_feature[s] << " is not -1 or a feature (< "
                                               << m.num_features << ")");
  }
  int exp2 = 0;
  MLMIX_CHECK(m.ptc_unit > 0 && std::frexp(m.ptc_unit, &exp2) == 0.5,
              "langid model: ptc_unit must be a power of two, got " << m.ptc_unit);
}

Dfa::Dfa(const Model& m, bool wide) {
  check_model(m);
  MLMIX_CHECK(m.num_rows <= UINT32_MAX && m.num_features < UINT32_MAX,
              "langid model: " << m.num_rows << " rows and " << m.num_features << " features do not fit 32 bits");
  const int64_t total = m.num_rows * 256;
  const uint64_t rows = static_cast<uint64_t>(m.num_rows);
  rows_ = static_cast<uint32_t>(rows);
  start_ = m.state_row[0];
  // (feature + 1) * rows + row < (num_features + 1) * rows
  // rows >= 2: ceil(2^64 / rows) fits 64 bits
  if (!wide && rows >= 2 && static_cast<uint64_t>(m.num_features + 1) * rows <= UINT32_MAX) {
    magic_ = UINT64_MAX / rows + 1;
    table_.emplace(static_cast<size_t>(total) * sizeof(uint32_t));
    auto* t = static_cast<uint32_t*>(table_->data());
    for (int64_t i = 0; i < total; ++i) {
      const uint32_t s = m.nextmove[i];
      t[i] = static_cast<uint32_t>(static_cast<uint64_t>(m.state_feature[s] + 1) * rows + m.state_row[s]);
    }
    narrow_ = t;
  } else {
    table_.emplace(static_cast<size_t>(total) * sizeof(uint64_t));
    auto* t = static_cast<uint64_t*>(table_->data());
    for (int64_t i = 0; i < total; ++i) {
      const uint32_t s = m.nextmove[i];
      t[i] = (static_cast<uint64_t>(m.state_feature[s] + 1) << 32) | m.state_row[s];
    }
    wide_ = t;
  }
}

void check_rules(const TextRules& r) {
  MLMIX_CHECK(r.size >= 0 && r.size <= 0x110000, "langid rules: size must be in [0, 0x110000], got " << r.size);
  for (int64_t i = 1; i < r.num_pairs; ++i)
    MLMIX_CHECK(r.pairs[i - 1] < r.pairs[i], "langid rules: composition pairs must be sorted and unique");
}

Selection make_selection(const Model& m, const std::vector<int32_t>& columns, const int32_t* column_label,
                         bool compact) {
  MLMIX_CHECK(!columns.empty(), "langid: no language selected");
  Selection sel;
  sel.columns = columns;
  sel.label.assign(column_label, column_label + columns.size());
  for (size_t j = 0; j < columns.size(); ++j) {
    MLMIX_CHECK(columns[j] >= 0 && columns[j] < m.num_columns,
                "langid: columns[" << j << "] = " << columns[j] << " is not a class (< " << m.num_columns << ")");
    MLMIX_CHECK(j == 0 || columns[j] > columns[j - 1], "langid: columns must be strictly increasing");
    // labels numbered by their first column: a new label is the next number
    MLMIX_CHECK(sel.label[j] >= 0 && sel.label[j] <= sel.num_labels,
                "langid: labels[" << j << "] = " << sel.label[j] << " must be an earlier label or " << sel.num_labels);
    if (sel.label[j] == sel.num_labels) ++sel.num_labels;
  }
  const int64_t k = static_cast<int64_t>(columns.size());
  if (compact && 2 * k <= m.num_columns) {
    sel.ptc.resize(static_cast<size_t>(m.num_features * k));
    for (int64_t f = 0; f < m.num_features; ++f) {
      const int16_t* row = m.ptc + f * m.num_columns;
      int16_t* out = sel.ptc.data() + f * k;
      for (int64_t j = 0; j < k; ++j) out[j] = row[columns[static_cast<size_t>(j)]];
    }
  }
  return sel;
}

void check_offsets(const int64_t* offsets, int64_t count, int64_t data_size) {
  MLMIX_CHECK(count >= 0, "offsets must have count + 1 >= 1 entries");
  MLMIX_CHECK(offsets[0] >= 0, "offsets[0] = " << offsets[0] << " is negative");
  for (int64_t i = 0; i < count; ++i)
    MLMIX_CHECK(offsets[i + 1] >= offsets[i],
                "offsets must be non-decreasing: offsets[" << i + 1 << "] = " << offsets[i + 1] << " < " << offsets[i]);
  MLMIX_CHECK(offsets[count] <= data_size,
              "offsets[-1] = " << offsets[count] << " exceeds the data size " << data_size);
}

void classify(const Model& m, const Selection& sel, const TextRules& rules, const Texts& texts,
              const Options& opts, int32_t* label, double* prob) {
  const Dfa dfa(m);
  classify(m, dfa, sel, rules, texts, opts, label, prob);
}

void classify(const Model& m, const Dfa& dfa, const Selection& sel, const TextRules& rules, const Texts& texts,
              const Options& opts, int32_t* label, double* prob) {
  MLMIX_CHECK(opts.max_chars >= 1, "max_chars must be >= 1, got " << opts.max_chars);
  MLMIX_CHECK(!sel.columns.empty() && sel.columns.size() == sel.label.size(),
              "langid: empty or inconsistent selection");
  parallel_chunks_with<Scratch>(texts.count, opts.num_threads, kChunk, [&](Scratch& s, int64_t begin, int64_t end) {
    const uint8_t* bytes[kChunk];
    int64_t size[kChunk], which[kChunk];
    int64_t k = 0;
    for (int64_t i = begin; i < end; ++i) {
      const TextView doc = texts.doc(i);
      MLMIX_CHECK(!opts.prepared || doc.width == 0, "texts[" << i << "]: prepared texts must be UTF-8 bytes");
      if (prepare(rules, doc, i, opts, s.bytes[k], &bytes[k], &size[k], label[i], prob[i])) which[k++] = i;
    }
    walk(dfa, k, bytes, size, s.features);
    for (int64_t j = 0; j < k; ++j) score_features(m, sel, s.features[j], size[j], s, label[which[j]], prob[which[j]]);
  });
}

}  // namespace mlmix::langid
