#include "dedup.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cmath>
#include <exception>
#include <iterator>
#include <limits>
#include <mutex>
#include <numeric>
#include <thread>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common.h"
#include "parallel.h"
#include "unicode_tables.h"
#include "utf8.h"

namespace mlmix::dedup {
namespace {

// ---------------------------------------------------------------------------------------------
// Hashing primitives (64-bit multiply/xor-shift mixing).

constexpr uint64_t kMulA = 0x9E3779B97F4A7C15ull;  // 2^64 / golden ratio
constexpr uint64_t kMulB = 0xC2B2AE3D27D4EB4Full;
constexpr uint64_t kMulC = 0xD6E8FEB86659FD93ull;

inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

// Dedup's finaliser. It is not splitmix64's (common.h): every exact hash, shingle hash, MinHash
// permutation and band key that dedup has ever written was mixed with it, so it stays.
inline uint64_t mix64(uint64_t x) {
  x ^= x >> 32;
  x *= kMulC;
  x ^= x >> 29;
  x *= kMulB;
  x ^= x >> 32;
  return x;
}

// The MinHash permutations' generator: splitmix64's state sequence through dedup's finaliser.
inline uint64_t permutation_draw(uint64_t& state) { return mix64(splitmix64_step(state)); }

// Streaming 128-bit hash of a code-point sequence: three 21-bit code points are packed into one
// 64-bit word, which feeds two lanes with different multipliers and rotations.
class Hash128 {
 public:
  __attribute__((always_inline)) void add(uint32_t cp) {
    word_ |= static_cast<uint64_t>(cp) << (21 * packed_);
    if (++packed_ == 3) flush();
    ++length_;
  }
  // The same as add() of each of c[0..n), three code points per step without branches.
  void add_all(const uint32_t* c, size_t n) {
    size_t k = 0;
    if (packed_ == 0) {
      for (; k + 3 <= n; k += 3) {
        word_ = static_cast<uint64_t>(c[k]) | static_cast<uint64_t>(c[k + 1]) << 21 |
                static_cast<uint64_t>(c[k + 2]) << 42;
        flush();
      }
      length_ += k;
    }
    for (; k < n; ++k) add(c[k]);
  }
  void finish(uint64_t* out) {
    if (packed_ != 0) flush();
    uint64_t a = lane_a_ ^ (length_ * kMulB);
    uint64_t b = lane_b_ + length_;
    a = mix64(a);
    b = mix64(b ^ rotl(a, 23));
    a = mix64(a + rotl(b, 41));
    out[0] = a;
    out[1] = b;
  }

 private:
  void flush() {
    lane_a_ = rotl((lane_a_ ^ word_) * kMulA, 29);
    lane_b_ = rotl((lane_b_ + word_) * kMulC, 37) ^ (lane_b_ >> 17);
    word_ = 0;
    packed_ = 0;
  }
  uint64_t lane_a_ = 0x243F6A8885A308D3ull;
  uint64_t lane_b_ = 0x13198A2E03707344ull;
  uint64_t word_ = 0;
  int packed_ = 0;
  uint64_t length_ = 0;
};

// ---------------------------------------------------------------------------------------------
// UTF-8 decoding and normalisation.

using tables::kClassMask, tables::kSeparator, tables::kMark, tables::kFormat, tables::kNoSpace,
    tables::kHasFold, tables::kHasDecomp, tables::kNonzeroCcc, tables::kComposesSecond;
constexpr uint32_t kReplacement = 0xFFFD;

inline uint8_t char_class(uint32_t cp) {
  return tables::kUnicodeStage2[static_cast<size_t>(tables::kUnicodeStage1[cp >> 8]) * 256 +
                                (cp & 255)];
}

[[noreturn]] void throw_invalid_utf8(int64_t doc, int64_t byte) {
  MLMIX_CHECK(false, "texts[" << doc << "] is not valid UTF-8 (byte offset " << byte
                              << "); errors='strict' was asked for, errors='replace' substitutes "
                                 "U+FFFD");
}

[[noreturn]] void throw_invalid_code_point(int64_t doc, int64_t index, uint32_t cp) {
  MLMIX_CHECK(false, "texts[" << doc << "] is not valid UTF-8: " << (cp <= 0x10FFFF ? "a lone surrogate" : "a value past U+10FFFF")
                              << " (0x" << std::hex << cp << std::dec << ") at index " << index
                              << "; errors='strict' was asked for, errors='replace' substitutes U+FFFD");
}

// Decodes one code point at p[i] (i < n) and advances i. Invalid input yields U+FFFD for the
// maximal valid prefix of a sequence (the Unicode "maximal subpart" practice, as Python does).
inline uint32_t decode_utf8(const uint8_t* p, int64_t n, int64_t& i, Utf8Errors errors,
                            int64_t doc) {
  const uint8_t b0 = p[i];
  if (b0 < 0x80) {
    ++i;
    return b0;
  }
  int need;
  uint32_t cp;
  uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    need = 1;
    cp = b0 & 0x1F;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    need = 2;
    cp = b0 & 0x0F;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;  // no UTF-16 surrogates
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    need = 3;
    cp = b0 & 0x07;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;  // nothing above U+10FFFF
  } else {
    if (errors == Utf8Errors::kStrict) throw_invalid_utf8(doc, i);
    ++i;
    return kReplacement;
  }
  const int64_t start = i;
  int64_t j = i + 1;
  for (int k = 0; k < need; ++k, ++j) {
    const uint8_t lo_k = k == 0 ? lo : 0x80, hi_k = k == 0 ? hi : 0xBF;
    if (j >= n || p[j] < lo_k || p[j] > hi_k) {
      if (errors == Utf8Errors::kStrict) throw_invalid_utf8(doc, start);
      i = j;  // the valid prefix is replaced by one U+FFFD; p[j] starts the next sequence
      return kReplacement;
    }
    cp = (cp << 6) | (p[j] & 0x3F);
  }
  i = j;
  return cp;
}

// Full case folding of a code point whose class has kHasFold: 1 to 3 code points into `out`.
inline uint32_t case_fold(uint32_t cp, uint32_t* out) {
  const auto* begin = std::begin(tables::kCaseFold);
  const auto* end = std::end(tables::kCaseFold);
  const auto* it = std::lower_bound(begin, end, cp, [](const tables::CaseFold& f, uint32_t c) { return f.cp < c; });
  if (it == end || it->cp != cp) {  // unreachable with consistent tables; keep the code point
    out[0] = cp;
    return 1;
  }
  for (uint32_t k = 0; k < it->length; ++k) out[k] = it->to[k];
  return it->length;
}

// Unicode normalisation form NFKC (or NFKD when compose is false), streaming (UAX #15): full
// compatibility decomposition, canonical ordering of combining marks, canonical composition.
// Code points are buffered from one starter to the next starter that cannot compose backwards.
// With drop_marks (only with NFKD), marks (Mn, Me) are dropped as they come out of the
// decomposition, before canonical ordering: a mark of class 0 dropped after ordering would leave
// the marks on either side of it out of order.
class NfkcStream {
 public:
  NfkcStream(bool compose, bool drop_marks) : compose_(compose), drop_marks_(drop_marks) {}

  // Output code points (with their classes) that are final: ready() after each push or finish,
  // to be consumed and then clear_ready(). The caller drains them inline rather than handing this
  // out-of-line path a callback, so that none of its hot-loop state escapes into memory.
  struct Ready {
    uint32_t cp;
    uint8_t cls;
  };
  const std::vector<Ready>& ready() const { return ready_; }
  void clear_ready() { ready_.clear(); }

  __attribute__((noinline)) void push(uint32_t cp) {  // the slow path: kept out of line
    auto out = [this](uint32_t c, uint8_t k) { ready_.push_back({c, k}); };
    const uint8_t cls = char_class(cp);
    if (!(cls & kHasDecomp)) {
      push_decomposed(cp, cls, out);
    } else if (cp >= kSBase && cp < kSBase + kSCount) {
      const uint32_t s = cp - kSBase;
      push_decomposed(kLBase + s / kNCount, char_class(kLBase + s / kNCount), out);
      push_decomposed(kVBase + (s % kNCount) / kTCount, char_class(kVBase + (s % kNCount) / kTCount), out);
      if (s % kTCount) push_decomposed(kTBase + s % kTCount, char_class(kTBase + s % kTCount), out);
    } else {
      const auto* begin = std::begin(tables::kDecomp);
      const auto* end = std::end(tables::kDecomp);
      const auto* it = std::lower_bound(begin, end, cp, [](const tables::Decomp& d, uint32_t c) { return d.cp < c; });
      if (it == end || it->cp != cp) {  // unreachable with consistent tables
        push_decomposed(cp, cls, out);
        return;
      }
      for (uint32_t k = 0; k < it->length; ++k) {
        const uint32_t d = tables::kDecompPool[it->offset + k];
        push_decomposed(d, char_class(d), out);
      }
    }
  }

  __attribute__((noinline)) void finish() {
    flush([this](uint32_t c, uint8_t k) { ready_.push_back({c, k}); });
  }

  // Buffers a simple code point (no decomposition, combining class 0) into an empty buffer.
  void hold(uint32_t cp, uint8_t cls) { buf_.push_back({cp, 0, cls}); }

 private:
  struct Item {
    uint32_t cp;
    uint32_t ccc;
    uint8_t cls;  // char_class(cp), handed on so that it is looked up once
  };
  static constexpr uint32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
  static constexpr uint32_t kLCount = 19, kVCount = 21, kTCount = 28, kNCount = kVCount * kTCount,
                            kSCount = kLCount * kNCount;

  static uint32_t ccc_of(uint32_t cp, uint8_t cls) {
    if (!(cls & kNonzeroCcc)) return 0;
    const auto* begin = std::begin(tables::kCcc);
    const auto* end = std::end(tables::kCcc);
    const auto* it = std::lower_bound(begin, end, cp, [](const tables::Ccc& c, uint32_t x) { return c.cp < x; });
    return it == end || it->cp != cp ? 0 : it->ccc;  // (not found: unreachable with consistent tables)
  }

  static bool compose_pair(uint32_t a, uint32_t b, uint32_t& out) {
    if (a >= kLBase && a < kLBase + kLCount && b >= kVBase && b < kVBase + kVCount) {
      out = kSBase + ((a - kLBase) * kVCount + (b - kVBase)) * kTCount;
      return true;
    }
    if (a >= kSBase && a < kSBase + kSCount && (a - kSBase) % kTCount == 0 && b > kTBase &&
        b < kTBase + kTCount) {
      out = a + (b - kTBase);
      return true;
    }
    const uint64_t key = (static_cast<uint64_t>(a) << 32) | b;
    const auto* begin = std::begin(tables::kCompose);
    const auto* end = std::end(tables::kCompose);
    const auto* it = std::lower_bound(begin, end, key, [](const tables::Compose& c, uint64_t k) { return c.pair < k; });
    if (it == end || it->pair != key) return false;
    out = it->composite;
    return true;
  }

  template <class Out>
  void push_decomposed(uint32_t cp, uint8_t cls, Out&& out) {
    if (drop_marks_ && (cls & kClassMask) == kMark) return;
    const uint32_t ccc = ccc_of(cp, cls);
    if (ccc == 0 && !(compose_ && (cls & kComposesSecond))) flush(out);
    buf_.push_back({cp, ccc, cls});
  }

  template <class Out>
  void flush(Out&& out) {
    if (buf_.size() == 1) {  // the common case: a lone starter
      out(buf_[0].cp, buf_[0].cls);
      buf_.clear();
      return;
    }
    if (buf_.empty()) return;
    {
      // Canonical ordering: a stable sort of each run of non-starters by combining class.
      for (size_t i = 1; i < buf_.size(); ++i) {
        const Item x = buf_[i];
        if (x.ccc == 0) continue;
        size_t j = i;
        while (j > 0 && buf_[j - 1].ccc > x.ccc) {
          buf_[j] = buf_[j - 1];
          --j;
        }
        buf_[j] = x;
      }
      if (compose_) compose();
    }
    for (const Item& x : buf_) out(x.cp, x.cls);
    buf_.clear();
  }

  // Canonical composition: each character combines with the last starter unless blocked.
  void compose() {
    size_t starter = 0, write = 1;
    uint32_t last_ccc = buf_[0].ccc == 0 ? 0 : 256;  // a leading non-starter has no starter
    for (size_t read = 1; read < buf_.size(); ++read) {
      const Item x = buf_[read];
      uint32_t composite;
      if ((last_ccc < x.ccc || last_ccc == 0) && last_ccc != 256 &&
          compose_pair(buf_[starter].cp, x.cp, composite)) {
        buf_[starter].cp = composite;
        buf_[starter].cls = char_class(composite);
        continue;
      }
      if (x.ccc == 0) starter = write;
      last_ccc = x.ccc;
      buf_[write++] = x;
    }
    buf_.resize(write);
  }

  bool compose_, drop_marks_;
  std::vector<Item> buf_;
  std::vector<Ready> ready_;
};

// Calls emit(cp, no_space_script) for each code point of the normalised text: format characters
// dropped, NFKC, full case folding, NFKC again, then separators collapsed. When stripping marks,
// NFKD stands for NFKC and marks are dropped before each canonical ordering.
//
// The second NFKC is what makes normalisation idempotent: case folding's output is not always NFKC
// (U+00DF + U+0301 folds to "ss" + U+0301, which composes to "s" + U+015B). Text that case folding
// leaves alone is already NFKC, so the second stream runs only from a code point that folding
// changed up to the next code point that starts a new composition unit; no case folding's first
// code point composes backwards or has a nonzero class, so what came before is unaffected.
//
// Unit is the document's code unit: uint8_t with kUtf8 (UTF-8 bytes, decoded with the errors
// policy), or uint8_t (Latin-1), uint16_t (UCS-2), uint32_t (UCS-4) code points as a Python str
// holds them, where a lone surrogate (or a value past U+10FFFF) is the invalid input.
template <class Unit, bool kUtf8, class Emit>
void normalize_units(const Unit* p, int64_t n, const NormalizeOptions& opts, int64_t doc, Emit&& emit) {
  bool pending_space = false, started = false;
  auto take = [&](uint32_t cp, uint8_t cls) __attribute__((always_inline)) {
    switch (cls & kClassMask) {
      case kSeparator:
        pending_space = started;
        return;
      case kFormat:
        return;
      case kMark:
        if (opts.strip_marks) return;
        break;
      default:
        break;
    }
    if (pending_space) {
      emit(uint32_t{' '}, false);
      pending_space = false;
    }
    started = true;
    emit(cp, (cls & kNoSpace) != 0);
  };
  const uint8_t slow = kHasDecomp | kNonzeroCcc | (opts.strip_marks ? 0 : kComposesSecond);
  // The second NFKC. It sees case folding's output from a code point that folding changed up to the
  // next simple code point it leaves alone, with the same held/stream split as the first (below).
  NfkcStream refold(!opts.strip_marks, opts.strip_marks);
  bool refolding = false, re_held = false, re_stream = false;
  uint32_t re_cp = 0;
  uint8_t re_cls = 0;
  auto drain_refold = [&]() __attribute__((always_inline)) {
    for (const NfkcStream::Ready& r : refold.ready()) take(r.cp, r.cls);
    refold.clear_ready();
  };
  auto refold_step = [&](uint32_t cp, uint8_t cls) {
    if (!(cls & slow)) {
      if (opts.strip_marks && (cls & kClassMask) == kMark) return;
      if (re_stream) {
        refold.finish();
        drain_refold();
        re_stream = false;
      } else if (re_held) {
        take(re_cp, re_cls);
      }
      re_cp = cp;
      re_cls = cls;
      re_held = true;
    } else {
      if (re_held) {
        refold.hold(re_cp, re_cls);
        re_held = false;
      }
      refold.push(cp);
      drain_refold();
      re_stream = true;
    }
  };
  auto refold_finish = [&]() {
    if (re_stream) {
      refold.finish();
      drain_refold();
    } else if (re_held) {
      take(re_cp, re_cls);
    }
    refolding = re_held = re_stream = false;
  };
  auto fold = [&](uint32_t cp, uint8_t cls) __attribute__((always_inline)) {
    if (cls & kHasFold) [[unlikely]] {
      uint32_t folded[3];
      const uint32_t count = case_fold(cp, folded);
      for (uint32_t k = 0; k < count; ++k) refold_step(folded[k], char_class(folded[k]));
      refolding = true;
    } else if (!refolding) [[likely]] {
      take(cp, cls);
    } else if (cls & slow) {
      refold_step(cp, cls);
    } else {
      refold_finish();
      take(cp, cls);
    }
  };
  NfkcStream nfkc(!opts.strip_marks, opts.strip_marks);
  // Inlined at each call: an out-of-line call taking these lambdas by reference would force the
  // loop's state (and the caller's) into memory.
  auto drain = [&]() __attribute__((always_inline)) {
    for (const NfkcStream::Ready& r : nfkc.ready()) fold(r.cp, r.cls);
    nfkc.clear_ready();
  };
  // Most code points have no decomposition, combining class 0 and nothing that composes with a
  // preceding starter ("simple"). NfkcStream::push of a simple code point flushes its buffer and
  // then buffers the code point alone; here that lone code point is held in `held` instead, and
  // handed to the stream (as its buffer) only when a code point that needs the stream comes.
  // The output is the same as pushing every code point through the stream.
  bool has_held = false, in_stream = false;
  uint32_t held_cp = 0;
  uint8_t held_cls = 0;
  auto step = [&](uint32_t cp) __attribute__((always_inline)) {
    const uint8_t cls = char_class(cp);
    if (!(cls & slow)) [[likely]] {
      // Format characters (Cf: no decomposition, class 0, never produced by NFKC or case folding) are
      // dropped before NFKC: kept as starters, they would block composition and canonical reordering
      // across them, and the text would change when normalised again. Marks of class 0 with no
      // decomposition are dropped here too when stripping marks, for the same reason.
      if ((cls & kClassMask) == kFormat || (opts.strip_marks && (cls & kClassMask) == kMark)) [[unlikely]] return;
      if (in_stream) {
        nfkc.finish();
        drain();
        in_stream = false;
      } else if (has_held) {
        fold(held_cp, held_cls);
      }
      held_cp = cp;
      held_cls = cls;
      has_held = true;
    } else {
      if (has_held) {
        nfkc.hold(held_cp, held_cls);
        has_held = false;
      }
      nfkc.push(cp);
      drain();
      in_stream = true;
    }
  };
  int64_t i = 0;
  while (i < n) {
    uint32_t cp = p[i];
    if constexpr (kUtf8) {
      // Well-formed 1- to 3-byte sequences are decoded here; the rest (4 bytes, overlong or
      // surrogate encodings, truncated or invalid bytes) by decode_utf8.
      if (cp < 0x80) {
        ++i;
      } else if (cp >= 0xC2 && cp <= 0xDF && i + 1 < n && (p[i + 1] & 0xC0) == 0x80) {
        cp = ((cp & 0x1F) << 6) | (p[i + 1] & 0x3F);
        i += 2;
      } else if ((cp & 0xF0) == 0xE0 && i + 2 < n && (p[i + 1] & 0xC0) == 0x80 && (p[i + 2] & 0xC0) == 0x80 &&
                 ((cp & 0x0F) << 12 | (p[i + 1] & 0x3F) << 6) >= 0x800 && !(cp == 0xED && p[i + 1] >= 0xA0)) {
        cp = ((cp & 0x0F) << 12) | ((p[i + 1] & 0x3F) << 6) | (p[i + 2] & 0x3F);
        i += 3;
      } else {
        cp = decode_utf8(p, n, i, opts.errors, doc);
      }
    } else {
      ++i;
      if constexpr (sizeof(Unit) > 1) {
        if (cp - 0xD800u < 0x800u || cp > 0x10FFFFu) [[unlikely]] {
          if (opts.errors == Utf8Errors::kStrict) throw_invalid_code_point(doc, i - 1, cp);
          // A surrogate's UTF-8 form (ED A0..BF 80..BF) is three invalid sequences: three U+FFFD,
          // as for the same str passed as surrogatepass-encoded bytes.
          if (cp <= 0x10FFFFu) {
            step(kReplacement);
            step(kReplacement);
          }
          cp = kReplacement;
        }
      }
    }
    step(cp);
  }
  if (has_held) fold(held_cp, held_cls);
  nfkc.finish();
  drain();
  refold_finish();
}

template <class Emit>
void for_each_normalized(const TextView& t, const NormalizeOptions& opts, int64_t doc, Emit&& emit) {
  switch (t.width) {
    case 0:
      normalize_units<uint8_t, true>(static_cast<const uint8_t*>(t.data), t.len, opts, doc, emit);
      break;
    case 1:
      normalize_units<uint8_t, false>(static_cast<const uint8_t*>(t.data), t.len, opts, doc, emit);
      break;
    case 2:
      normalize_units<uint16_t, false>(static_cast<const uint16_t*>(t.data), t.len, opts, doc, emit);
      break;
    default:
      normalize_units<uint32_t, false>(static_cast<const uint32_t*>(t.data), t.len, opts, doc, emit);
      break;
  }
}

// One pass over a document: exact hash, length, and the script statistic for the auto mode.
struct DocSummary {
  uint64_t hash[2];
  int64_t length = 0;
  bool char_mode = false;
};

// A reusable code-point buffer whose append is one compare and one store (std::vector's
// push_back is not inlined into the normalisation loop).
struct CodePoints {
  std::vector<uint32_t> storage;
  size_t size = 0;
  void clear() { size = 0; }
  __attribute__((always_inline)) void push(uint32_t cp) {
    if (size == storage.size()) [[unlikely]] storage.resize(2 * size + 256);
    storage[size++] = cp;
  }
  const uint32_t* begin() const { return storage.data(); }
  const uint32_t* end() const { return storage.data() + size; }
};

// With `keep`, the normalised code points are also appended to it, for a second pass without
// decoding and normalising again; the hash is then computed from that buffer afterwards, in a
// tight loop (the same value as Hash128 fed one code point at a time).
DocSummary summarize(const TextView& t, const NormalizeOptions& opts, int64_t doc, CodePoints* keep = nullptr) {
  DocSummary s;
  int64_t spaces = 0, no_space = 0;
  if (keep) {
    const size_t before = keep->size;
    for_each_normalized(t, opts, doc, [&](uint32_t cp, bool ns) __attribute__((always_inline)) {
      keep->push(cp);
      spaces += cp == ' ';
      no_space += ns;  // false for the space
    });
    const uint32_t* c = keep->begin() + before;
    s.length = static_cast<int64_t>(keep->size - before);
    Hash128 h;
    h.add_all(c, static_cast<size_t>(s.length));
    h.finish(s.hash);
  } else {
    Hash128 h;
    for_each_normalized(t, opts, doc, [&](uint32_t cp, bool ns) __attribute__((always_inline)) {
      h.add(cp);
      ++s.length;
      spaces += cp == ' ';
      no_space += ns;
    });
    h.finish(s.hash);
  }
  const int64_t letters = s.length - spaces;
  // Mostly written in a script without spaces between words: shingle by characters.
  s.char_mode = letters > 0 && 2 * no_space >= letters;
  return s;
}

// ---------------------------------------------------------------------------------------------
// Shingles: each shingle is a 64-bit hash of `ngram` consecutive tokens (words or code points).
// A document with fewer tokens than `ngram` (but at least one) has one shingle of all of them.

constexpr uint64_t kWordSalt = 0x5851F42D4C957F2Dull, kCharSalt = 0x14057B7EF767814Full;

// The window's tokens are combined as a polynomial sum w_0 K^(n-1) + ... + w_(n-1) mod 2^64, which
// rolls in O(1) per token (the tokens are already mixed 64-bit hashes), then mixed once more.
class ShingleHasher {
 public:
  ShingleHasher(int ngram, bool char_mode)
      : ngram_(ngram), salt_(char_mode ? kCharSalt : kWordSalt) {
    for (int k = 0; k < ngram; ++k) k_pow_n_ *= kMulB;
  }

  template <class Sink>
  __attribute__((always_inline)) void push_token(uint64_t token, Sink&& sink) {
    poly_ = poly_ * kMulB + token;
    if (seen_ >= static_cast<uint64_t>(ngram_)) poly_ -= window_[pos_] * k_pow_n_;  // leaves the window
    window_[pos_] = token;
    pos_ = pos_ + 1 == ngram_ ? 0 : pos_ + 1;
    ++seen_;
    if (seen_ >= static_cast<uint64_t>(ngram_)) sink(finalize(ngram_));
  }
  template <class Sink>
  void finish(Sink&& sink) {
    if (seen_ > 0 && seen_ < static_cast<uint64_t>(ngram_)) sink(finalize(static_cast<int>(seen_)));
  }

 private:
  uint64_t finalize(int len) const { return mix64(poly_ + salt_ + static_cast<uint64_t>(len) * kMulC); }
  int ngram_;
  uint64_t salt_;
  std::array<uint64_t, 64> window_{};  // the last ngram (<= 64) tokens, circular
  uint64_t k_pow_n_ = 1;
  uint64_t poly_ = 0;
  int pos_ = 0;
  uint64_t seen_ = 0;
};

inline uint64_t token_step(uint64_t h, uint32_t cp) { return rotl(h ^ cp, 27) * kMulA; }

// Calls sink(shingle_hash) for every shingle (repeats included) of the normalised code points
// that for_each_cp(f) passes to f.
template <class ForEachCp, class Sink>
void shingles_of(ForEachCp&& for_each_cp, int ngram, bool char_mode, Sink&& sink) {
  ShingleHasher shingles(ngram, char_mode);
  if (char_mode) {
    // Spaces are left out of character shingles: in scripts without word spaces they only mark
    // where punctuation was, which should not make two copies differ.
    for_each_cp([&](uint32_t cp) {
      if (cp != ' ') shingles.push_token(mix64(cp + kCharSalt), sink);
    });
  } else {
    uint64_t token = 0, token_len = 0;
    for_each_cp([&](uint32_t cp) {
      if (cp == ' ') {
        shingles.push_token(mix64(token ^ token_len), sink);
        token = 0;
        token_len = 0;
      } else {
        token = token_step(token, cp);
        ++token_len;
      }
    });
    if (token_len > 0) shingles.push_token(mix64(token ^ token_len), sink);
  }
  shingles.finish(sink);
}

template <class Sink>
void for_each_shingle(const TextView& t, const NormalizeOptions& norm, int ngram, bool char_mode, int64_t doc,
                      Sink&& sink) {
  shingles_of([&](auto&& f) { for_each_normalized(t, norm, doc, [&](uint32_t cp, bool) { f(cp); }); },
              ngram, char_mode, sink);
}

// Documents up to this many code units (bytes of UTF-8) are normalised once and shingled from a
// buffer of code points (4 bytes each); larger ones are normalised twice, streaming, to bound memory.
constexpr int64_t kMaxBufferedUnits = int64_t{16} << 20;

bool resolve_char_mode(const MinHashOptions& opts, const DocSummary& s) {
  switch (opts.mode) {
    case ShingleMode::kWord: return false;
    case ShingleMode::kChar: return true;
    default: return s.char_mode;
  }
}

void check_minhash_options(const MinHashOptions& o) {
  MLMIX_CHECK(o.num_perm >= 1 && o.num_perm <= 4096,
              "num_perm must be in [1, 4096], got " << o.num_perm);
  MLMIX_CHECK(o.ngram >= 1 && o.ngram <= 64, "ngram must be in [1, 64], got " << o.ngram);
}

// The per-document pass of the signature and shingle-set kernels: summarise (normalising once into
// `cps` when the document is small enough to buffer), choose the shingling mode (into char_mode),
// then sink(hash) for every shingle, repeats included.
template <class Sink>
DocSummary shingle_document(const TextView& t, const MinHashOptions& opts, int64_t doc, CodePoints& cps,
                            bool& char_mode, Sink&& sink) {
  const bool buffered = t.len <= kMaxBufferedUnits;
  cps.clear();
  const DocSummary s = summarize(t, opts.normalize, doc, buffered ? &cps : nullptr);
  char_mode = resolve_char_mode(opts, s);
  if (buffered) {
    shingles_of([&](auto&& f) { for (uint32_t cp : cps) f(cp); }, opts.ngram, char_mode, sink);
  } else {
    for_each_shingle(t, opts.normalize, opts.ngram, char_mode, doc, sink);
  }
  return s;
}

// MinHash update of sig[0..P) with a block of shingle keys: sig[k] = min(sig[k], h_k(key)) with
// h_k(x) = ((a_k * x + b_k) mod 2^64) >> 32 = ((a_lo_k * x + b_k) >> 32) + a_hi_k * x (mod 2^32).
constexpr size_t kShingleBlock = 256;

// The permutation constants, laid out for the vector kernels: within each group of 8
// permutations, b of the even and of the odd ones apart (the 32 x 32 -> 64-bit multiply only
// reads even 32-bit lanes, so even and odd permutations are computed in separate registers).
struct Permutations {
  int P = 0;
  std::vector<uint32_t> a_lo, a_hi;
  std::vector<uint64_t> b;               // P entries, in order
  std::vector<uint64_t> b_even, b_odd;   // b[8g + 2m] and b[8g + 2m + 1] at index 4g + m
};

void minhash_block_scalar(const Permutations& perm, int k_begin, const uint32_t* keys, size_t n_keys,
                          uint32_t* sig) {
  for (size_t j = 0; j < n_keys; ++j) {
    const uint32_t x = keys[j];
    for (int k = k_begin; k < perm.P; ++k) {
      const uint64_t t = static_cast<uint64_t>(perm.a_lo[k]) * x + perm.b[k];
      const uint32_t v = static_cast<uint32_t>(t >> 32) + perm.a_hi[k] * x;
      sig[k] = v < sig[k] ? v : sig[k];
    }
  }
}

#if defined(__x86_64__)
// Vector kernels: permutations in the outer loop so that a group's constants and running minima
// stay in registers across the keys. Permutations past the last full group go to the scalar loop.
__attribute__((target("avx2"))) void minhash_block_avx2(const Permutations& perm, const uint32_t* keys,
                                                         size_t n_keys, uint32_t* sig) {
  const int groups = perm.P / 8;
  for (int g = 0; g < groups; ++g) {
    const __m256i a_lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(perm.a_lo.data() + 8 * g));
    const __m256i a_lo_odd = _mm256_srli_epi64(a_lo, 32);
    const __m256i a_hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(perm.a_hi.data() + 8 * g));
    const __m256i b_even = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(perm.b_even.data() + 4 * g));
    const __m256i b_odd = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(perm.b_odd.data() + 4 * g));
    __m256i s = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sig + 8 * g));
    for (size_t j = 0; j < n_keys; ++j) {
      const __m256i x = _mm256_set1_epi32(static_cast<int>(keys[j]));
      const __m256i t_even = _mm256_add_epi64(_mm256_mul_epu32(a_lo, x), b_even);
      const __m256i t_odd = _mm256_add_epi64(_mm256_mul_epu32(a_lo_odd, x), b_odd);
      // High halves of the 64-bit sums, each in its permutation's 32-bit lane.
      const __m256i high = _mm256_blend_epi32(_mm256_srli_epi64(t_even, 32), t_odd, 0xAA);
      s = _mm256_min_epu32(s, _mm256_add_epi32(high, _mm256_mullo_epi32(a_hi, x)));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(sig + 8 * g), s);
  }
  minhash_block_scalar(perm, 8 * groups, keys, n_keys, sig);
}

// GCC 12 warns inside its own avx512fintrin.h (_mm512_undefined_epi32, GCC bug 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
__attribute__((target("avx512f"))) void minhash_block_avx512(const Permutations& perm, const uint32_t* keys,
                                                              size_t n_keys, uint32_t* sig) {
  const int groups = perm.P / 16;
  for (int g = 0; g < groups; ++g) {
    // Two 8-permutation groups of the layout make one 16-lane register.
    const __m512i a_lo = _mm512_loadu_si512(perm.a_lo.data() + 16 * g);
    const __m512i a_lo_odd = _mm512_srli_epi64(a_lo, 32);
    const __m512i a_hi = _mm512_loadu_si512(perm.a_hi.data() + 16 * g);
    const __m512i b_even = _mm512_loadu_si512(perm.b_even.data() + 8 * g);
    const __m512i b_odd = _mm512_loadu_si512(perm.b_odd.data() + 8 * g);
    __m512i s = _mm512_loadu_si512(sig + 16 * g);
    // One two-source permute gathers the high halves (odd 32-bit lanes) of both products into
    // their permutations' lanes: lane 2m from t_even's lane 2m + 1, lane 2m + 1 from t_odd's.
    const __m512i gather_high = _mm512_set_epi32(31, 15, 29, 13, 27, 11, 25, 9, 23, 7, 21, 5, 19, 3, 17, 1);
    for (size_t j = 0; j < n_keys; ++j) {
      const __m512i x = _mm512_set1_epi32(static_cast<int>(keys[j]));
      const __m512i t_even = _mm512_add_epi64(_mm512_mul_epu32(a_lo, x), b_even);
      const __m512i t_odd = _mm512_add_epi64(_mm512_mul_epu32(a_lo_odd, x), b_odd);
      const __m512i high = _mm512_permutex2var_epi32(t_even, gather_high, t_odd);
      s = _mm512_min_epu32(s, _mm512_add_epi32(high, _mm512_mullo_epi32(a_hi, x)));
    }
    _mm512_storeu_si512(sig + 16 * g, s);
  }
  minhash_block_scalar(perm, 16 * groups, keys, n_keys, sig);
}
#pragma GCC diagnostic pop

#endif  // __x86_64__

using MinhashBlockFn = void (*)(const Permutations&, const uint32_t*, size_t, uint32_t*);

// Picked once from the CPU's features; every kernel gives the same bits.
MinhashBlockFn pick_minhash_block() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return minhash_block_avx512;
  if (__builtin_cpu_supports("avx2")) return minhash_block_avx2;
#endif
  return [](const Permutations& perm, const uint32_t* keys, size_t n_keys, uint32_t* sig) {
    minhash_block_scalar(perm, 0, keys, n_keys, sig);
  };
}

void minhash_block(const Permutations& perm, const uint32_t* keys, size_t n_keys, uint32_t* sig) {
  static const MinhashBlockFn fn = pick_minhash_block();
  fn(perm, keys, n_keys, sig);
}

// Sorts v ascending (operator<), where key(x) is a well-mixed 64-bit hash that orders like x
// (key(x) < key(y) implies x < y). A counting pass on the key's top bits puts each value into one
// of about v.size() buckets, which are then nearly all of size 0 to 2; small buckets are finished
// by insertion sort, large ones (equal or colliding keys) by std::sort, so the worst case stays
// O(n log n). Much faster than std::sort on such data (no unpredictable comparisons).
template <class T, class Key>
void bucket_sort(std::vector<T>& v, std::vector<T>& scratch, std::vector<uint32_t>& starts, Key&& key) {
  const size_t n = v.size();
  if (n < 64 || n >= std::numeric_limits<uint32_t>::max()) {  // (starts counts in 32 bits)
    std::sort(v.begin(), v.end());
    return;
  }
  const int bits = std::min(20, static_cast<int>(std::bit_width(n)));
  const int shift = 64 - bits;
  const size_t buckets = size_t{1} << bits;
  starts.assign(buckets + 1, 0);
  for (const T& x : v) ++starts[(key(x) >> shift) + 1];
  for (size_t b = 0; b < buckets; ++b) starts[b + 1] += starts[b];
  scratch.resize(n);
  for (const T& x : v) scratch[starts[key(x) >> shift]++] = x;  // starts[b] becomes bucket b's end
  size_t begin = 0;
  for (size_t b = 0; b < buckets; ++b) {
    const size_t end = starts[b];
    if (end - begin > 32) [[unlikely]] std::sort(scratch.begin() + begin, scratch.begin() + end);
    begin = end;
  }
  // What is left out of order lies within buckets of at most 32 values: one insertion-sort pass
  // over the whole array finishes it (a loop per bucket would mispredict on each bucket's size).
  T* a = scratch.data();
  for (size_t i = 1; i < n; ++i) {
    const T x = a[i];
    if (!(x < a[i - 1])) continue;
    size_t j = i;
    do {
      a[j] = a[j - 1];
      --j;
    } while (j > 0 && x < a[j - 1]);
    a[j] = x;
  }
  v.swap(scratch);
}

struct HashSorter {
  std::vector<uint64_t> scratch;
  std::vector<uint32_t> starts;

  void sort_unique(std::vector<uint64_t>& v) {
    bucket_sort(v, scratch, starts, [](uint64_t x) { return x; });
    v.erase(std::unique(v.begin(), v.end()), v.end());
  }
};

// ---------------------------------------------------------------------------------------------
// Union-find with path halving; union by lower index keeps it deterministic.
struct DisjointSets {
  explicit DisjointSets(int64_t n) : parent(n) { std::iota(parent.begin(), parent.end(), 0); }
  int64_t find(int64_t x) {
    while (parent[x] != x) {
      parent[x] = parent[parent[x]];
      x = parent[x];
    }
    return x;
  }
  void unite(int64_t a, int64_t b) {
    a = find(a);
    b = find(b);
    if (a == b) return;
    if (a < b) std::swap(a, b);
    parent[a] = b;
  }
  std::vector<int64_t> parent;
};

// bucket_pairs with the sort's scratch buffers passed in (reused across the bands of a thread).
void bucket_pairs_with(std::vector<KeyedDoc>& rows, std::vector<KeyedDoc>& scratch, std::vector<uint32_t>& starts,
                       std::vector<DocPair>& out) {
  bucket_sort(rows, scratch, starts, [](const KeyedDoc& k) { return k.first; });
  rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
  size_t start = 0;
  while (start < rows.size()) {
    size_t stop = start + 1;
    while (stop < rows.size() && rows[stop].first == rows[start].first) ++stop;
    const int64_t size = static_cast<int64_t>(stop - start);
    if (size <= kMaxBucketAllPairs) {
      for (size_t x = start; x < stop; ++x)
        for (size_t y = x + 1; y < stop; ++y) out.emplace_back(rows[x].second, rows[y].second);
    } else {
      for (size_t y = start + 1; y < stop; ++y) {
        out.emplace_back(rows[start].second, rows[y].second);
        if (y - 1 > start) out.emplace_back(rows[y - 1].second, rows[y].second);
      }
    }
    start = stop;
  }
}

// Checks that both documents of every pair are in the index.
void check_pair_ids(const DocPair* pairs, int64_t count, const DocIndex& index, const char* what) {
  for (int64_t k = 0; k < count; ++k) {
    for (const int64_t id : {pairs[k].first, pairs[k].second}) {
      MLMIX_CHECK(index.row(id) >= 0, what << "[" << k << "] = (" << pairs[k].first << ", " << pairs[k].second
                                           << ") names document " << id << ", which is not one of the "
                                           << index.count() << " documents given");
    }
  }
}

// similarity[k] = sim(row of pairs[k].first, row of pairs[k].second), in parallel.
template <class Similarity>
void verify_rows(const DocPair* pairs, int64_t count, const DocIndex& index, const char* what, int num_threads,
                 Similarity&& sim, double* similarity) {
  check_pair_ids(pairs, count, index, what);
  parallel_chunks(count, num_threads, 256, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) similarity[k] = sim(index.row(pairs[k].first), index.row(pairs[k].second));
  });
}

}  // namespace

// ---------------------------------------------------------------------------------------------

const char* unicode_version() { return tables::kUnicodeVersion; }

void check_texts(const TextSpan& t) {
  MLMIX_CHECK(t.count >= 0, "texts: negative count " << t.count);
  if (t.count == 0) return;
  if (t.views) {
    for (int64_t i = 0; i < t.count; ++i) {
      const TextView& v = t.views[i];
      MLMIX_CHECK(v.width == 0 || v.width == 1 || v.width == 2 || v.width == 4,
                  "texts[" << i << "]: code unit width " << v.width << "; expected 0 (UTF-8), 1, 2 or 4");
      MLMIX_CHECK(v.len >= 0 && (v.len == 0 || v.data != nullptr),
                  "texts[" << i << "]: bad length " << v.len << " or null data");
    }
    return;
  }
  MLMIX_CHECK(t.offsets != nullptr, "texts: missing offsets");
  MLMIX_CHECK(t.offsets[0] == 0, "texts: offsets[0] must be 0, got " << t.offsets[0]);
  for (int64_t i = 0; i < t.count; ++i)
    MLMIX_CHECK(t.offsets[i + 1] >= t.offsets[i],
                "texts: offsets must be non-decreasing, offsets[" << i + 1 << "] = "
                                                                  << t.offsets[i + 1] << " < "
                                                                  << t.offsets[i]);
}

void utf8_sizes(const TextSpan& texts, int64_t* out) {
  for (int64_t i = 0; i < texts.count; ++i) {
    const TextView t = texts.doc(i);
    int64_t size = t.len;  // UTF-8 bytes, or one per code unit to begin with
    auto add_extra = [&](const auto* u) {
      for (int64_t k = 0; k < t.len; ++k) size += (u[k] >= 0x80) + (u[k] >= 0x800) + (u[k] >= 0x10000);
    };
    if (t.width == 1) add_extra(static_cast<const uint8_t*>(t.data));
    if (t.width == 2) add_extra(static_cast<const uint16_t*>(t.data));
    if (t.width == 4) add_extra(static_cast<const uint32_t*>(t.data));
    out[i] = size;
  }
}

void normalize_texts(const TextSpan& texts, const NormalizeOptions& opts, int num_threads,
                     std::vector<uint8_t>& out, std::vector<int64_t>& out_offsets) {
  const int64_t n = texts.count;
  constexpr int64_t kGrain = 256;
  const int64_t chunks = (n + kGrain - 1) / kGrain;
  std::vector<std::vector<uint8_t>> chunk_bytes(chunks);
  std::vector<int64_t> lengths(n);
  parallel_chunks(n, num_threads, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t>& buf = chunk_bytes[begin / kGrain];
    for (int64_t i = begin; i < end; ++i) {
      const size_t before = buf.size();
      for_each_normalized(texts.doc(i), opts, i, [&](uint32_t cp, bool) { utf8::append(buf, cp); });
      lengths[i] = static_cast<int64_t>(buf.size() - before);
    }
  });
  out_offsets.assign(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) out_offsets[i + 1] = out_offsets[i] + lengths[i];
  out.clear();
  out.reserve(static_cast<size_t>(out_offsets[n]));
  for (auto& b : chunk_bytes) out.insert(out.end(), b.begin(), b.end());
}

void exact_hashes(const TextSpan& texts, const NormalizeOptions& opts, int num_threads,
                  uint64_t* out) {
  parallel_chunks(texts.count, num_threads, 64, [&](int64_t begin, int64_t end) {
    CodePoints cps;
    for (int64_t i = begin; i < end; ++i) {
      const TextView t = texts.doc(i);
      cps.clear();
      const DocSummary s = summarize(t, opts, i, t.len <= kMaxBufferedUnits ? &cps : nullptr);
      out[2 * i] = s.hash[0];
      out[2 * i + 1] = s.hash[1];
    }
  });
}

void minhash_signatures(const TextSpan& texts, const MinHashOptions& opts, int num_threads,
                        const SignatureOutputs& out) {
  check_minhash_options(opts);
  const int P = opts.num_perm;
  // Permutation k maps the 32-bit key x of a shingle to the top 32 bits of a_k * x + b_k
  // (mod 2^64), Dietzfelbinger's multiply-add-shift family (strongly universal), computed as
  // 32 x 32 -> 64-bit products so that it vectorises (minhash_block).
  Permutations perm;
  perm.P = P;
  perm.a_lo.resize(P);
  perm.a_hi.resize(P);
  perm.b.resize(P);
  perm.b_even.resize(P / 2 + 1);
  perm.b_odd.resize(P / 2 + 1);
  uint64_t state = mix64(opts.seed ^ 0x6A09E667F3BCC908ull);
  for (int k = 0; k < P; ++k) {
    const uint64_t a = permutation_draw(state);
    perm.a_lo[k] = static_cast<uint32_t>(a);
    perm.a_hi[k] = static_cast<uint32_t>(a >> 32);
    perm.b[k] = permutation_draw(state);
    (k % 2 == 0 ? perm.b_even : perm.b_odd)[k / 2] = perm.b[k];
  }
  ShingleSets* sets = out.shingle_sets;
  constexpr int64_t kGrain = 16;
  if (sets) {
    sets->grain = kGrain;
    sets->blocks.assign((texts.count + kGrain - 1) / kGrain, {});
    sets->ends.assign(texts.count, 0);
  }
  std::atomic<int64_t> set_total{0};
  std::atomic<bool> over_budget{false};
  struct Scratch {
    std::vector<uint32_t> sig, keys;
    CodePoints cps;
    HashSorter sorter;
    std::vector<uint64_t> shingle_buf, chunk_sets;
  };
  parallel_chunks_with<Scratch>(texts.count, num_threads, kGrain, [&](Scratch& scratch, int64_t begin, int64_t end) {
    std::vector<uint32_t>& sig = scratch.sig;
    std::vector<uint32_t>& keys = scratch.keys;
    CodePoints& cps = scratch.cps;
    HashSorter& sorter = scratch.sorter;
    std::vector<uint64_t>& shingle_buf = scratch.shingle_buf;
    std::vector<uint64_t>& chunk_sets = scratch.chunk_sets;
    sig.resize(P);
    keys.reserve(kShingleBlock);
    // This chunk's sets, gathered one after the other in a buffer reused across chunks, then
    // stored in the chunk's block at their final size: one allocation per chunk.
    std::vector<uint64_t>* block = sets ? &sets->blocks[begin / kGrain] : nullptr;
    chunk_sets.clear();
    for (int64_t i = begin; i < end; ++i) {
      std::fill(sig.begin(), sig.end(), std::numeric_limits<uint32_t>::max());
      keys.clear();
      const bool keep_set = block && !over_budget.load(std::memory_order_relaxed);
      shingle_buf.clear();
      bool char_mode = false;
      const DocSummary s = shingle_document(texts.doc(i), opts, i, cps, char_mode, [&](uint64_t x) {
        if (keep_set) shingle_buf.push_back(x);
        keys.push_back(static_cast<uint32_t>(x >> 32));
        if (keys.size() == kShingleBlock) {
          minhash_block(perm, keys.data(), keys.size(), sig.data());
          keys.clear();
        }
      });
      minhash_block(perm, keys.data(), keys.size(), sig.data());
      std::copy(sig.begin(), sig.end(), out.signatures + i * P);
      if (keep_set) {
        sorter.sort_unique(shingle_buf);
        chunk_sets.insert(chunk_sets.end(), shingle_buf.begin(), shingle_buf.end());
        const auto added = static_cast<int64_t>(shingle_buf.size());
        if (set_total.fetch_add(added) + added > out.shingle_set_budget) over_budget = true;
      }
      if (block) sets->ends[i] = static_cast<int64_t>(chunk_sets.size());
      if (out.hashes) {
        out.hashes[2 * i] = s.hash[0];
        out.hashes[2 * i + 1] = s.hash[1];
      }
      if (out.lengths) out.lengths[i] = s.length;
      if (out.char_mode) out.char_mode[i] = char_mode ? 1 : 0;
    }
    if (block) block->assign(chunk_sets.begin(), chunk_sets.end());
  });
  // Which documents got a set before the budget ran out depends on thread timing: all or none.
  if (sets && over_budget) *sets = ShingleSets();
}

std::vector<uint64_t> shingle_set(const TextView& doc, const MinHashOptions& opts, int64_t doc_index) {
  check_minhash_options(opts);
  CodePoints cps;
  bool char_mode = false;
  std::vector<uint64_t> set;
  shingle_document(doc, opts, doc_index, cps, char_mode, [&](uint64_t x) { set.push_back(x); });
  HashSorter().sort_unique(set);
  return set;
}

void shingle_sets(const TextSpan& texts, const MinHashOptions& opts, int num_threads,
                  std::vector<uint64_t>& values, std::vector<int64_t>& offsets) {
  check_minhash_options(opts);
  const int64_t n = texts.count;
  constexpr int64_t kGrain = 64;
  const int64_t chunks = (n + kGrain - 1) / kGrain;
  // Each chunk's sets are concatenated into its own buffer, then the buffers in chunk order.
  std::vector<std::vector<uint64_t>> chunk_values(chunks);
  offsets.assign(n + 1, 0);
  parallel_chunks(n, num_threads, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t>& out = chunk_values[begin / kGrain];
    CodePoints cps;
    HashSorter sorter;
    std::vector<uint64_t> set;
    for (int64_t i = begin; i < end; ++i) {
      set.clear();
      bool char_mode = false;
      shingle_document(texts.doc(i), opts, i, cps, char_mode, [&](uint64_t x) { set.push_back(x); });
      sorter.sort_unique(set);
      out.insert(out.end(), set.begin(), set.end());
      offsets[i + 1] = static_cast<int64_t>(set.size());
    }
  });
  for (int64_t i = 0; i < n; ++i) offsets[i + 1] += offsets[i];
  values.clear();
  values.reserve(static_cast<size_t>(offsets[n]));
  for (auto& chunk : chunk_values) {
    values.insert(values.end(), chunk.begin(), chunk.end());
    std::vector<uint64_t>().swap(chunk);
  }
}

LshParams optimal_lsh_params(double threshold, int num_perm, double fp_weight, double fn_weight) {
  MLMIX_CHECK(threshold > 0.0 && threshold <= 1.0,
              "threshold must be in (0, 1], got " << threshold);
  // The search is O(num_perm log num_perm) S-curve integrations: bounded like the Python API's num_perm.
  MLMIX_CHECK(num_perm >= 1 && num_perm <= 4096, "num_perm must be in [1, 4096], got " << num_perm);
  // Trapezoid rule on a fixed grid: deterministic and accurate to ~1e-5 here.
  constexpr int kSteps = 512;
  auto area = [](double lo, double hi, int b, int r, bool false_negative) {
    if (hi <= lo) return 0.0;
    const double h = (hi - lo) / kSteps;
    double sum = 0.0;
    for (int k = 0; k <= kSteps; ++k) {
      const double s = lo + k * h;
      const double p_candidate = 1.0 - std::pow(1.0 - std::pow(s, r), b);
      const double y = false_negative ? 1.0 - p_candidate : p_candidate;
      sum += (k == 0 || k == kSteps) ? 0.5 * y : y;
    }
    return sum * h;
  };
  LshParams best{1, num_perm};
  double best_error = std::numeric_limits<double>::infinity();
  for (int b = 1; b <= num_perm; ++b) {
    for (int r = 1; r <= num_perm / b; ++r) {
      const double error = fp_weight * area(0.0, threshold, b, r, false) +
                           fn_weight * area(threshold, 1.0, b, r, true);
      if (error < best_error - 1e-12) {
        best_error = error;
        best = {b, r};
      }
    }
  }
  return best;
}

// ---------------------------------------------------------------------------------------------
// Clustering phases

std::vector<DocPair> exact_pairs(const uint64_t* hashes, const int64_t* groups, const int64_t* ids, int64_t count) {
  auto group_of = [&](int64_t i) -> int64_t { return groups ? groups[i] : 0; };
  auto id_of = [&](int64_t i) -> int64_t { return ids ? ids[i] : i; };
  std::vector<int64_t> order(static_cast<size_t>(count));
  std::iota(order.begin(), order.end(), 0);
  auto key_less = [&](int64_t x, int64_t y) {
    const int64_t gx = group_of(x), gy = group_of(y);
    if (gx != gy) return gx < gy;
    if (hashes[2 * x] != hashes[2 * y]) return hashes[2 * x] < hashes[2 * y];
    if (hashes[2 * x + 1] != hashes[2 * y + 1]) return hashes[2 * x + 1] < hashes[2 * y + 1];
    return id_of(x) < id_of(y);
  };
  std::sort(order.begin(), order.end(), key_less);
  std::vector<DocPair> pairs;
  for (int64_t k = 1; k < count; ++k) {
    const int64_t x = order[k - 1], y = order[k];
    if (group_of(x) == group_of(y) && hashes[2 * x] == hashes[2 * y] && hashes[2 * x + 1] == hashes[2 * y + 1])
      pairs.emplace_back(id_of(x), id_of(y));
  }
  return pairs;
}

bool has_shingles(const uint32_t* signature, int num_perm) {
  for (int k = 0; k < num_perm; ++k)
    if (signature[k] != std::numeric_limits<uint32_t>::max()) return true;
  return false;
}

uint64_t band_key(const uint32_t* signature, int band, int rows, uint64_t group) {
  const uint32_t* s = signature + static_cast<int64_t>(band) * rows;
  uint64_t h = mix64(static_cast<uint64_t>(band) * kMulB ^ group);
  for (int r = 0; r < rows; r += 2) {
    const uint64_t w = r + 1 < rows ? (static_cast<uint64_t>(s[r + 1]) << 32) | s[r] : s[r];
    h = mix64(h ^ (w * kMulA));
  }
  return h;
}

namespace {
void check_lsh(const LshParams& lsh, int num_perm) {
  MLMIX_CHECK(num_perm >= 1, "signatures must have at least one column, got " << num_perm);
  MLMIX_CHECK(lsh.bands >= 1 && lsh.rows >= 1 && static_cast<int64_t>(lsh.bands) * lsh.rows <= num_perm,
              "bands x rows must fit in num_perm = " << num_perm << ", got " << lsh.bands << " x " << lsh.rows);
}
}  // namespace

void band_keys(const uint32_t* signatures, int64_t count, int num_perm, const LshParams& lsh,
               const uint64_t* groups, int num_threads, uint64_t* keys, uint8_t* has_keys) {
  check_lsh(lsh, num_perm);
  const int bands = lsh.bands;
  parallel_chunks(count, num_threads, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint32_t* row = signatures + i * num_perm;
      uint64_t* out = keys + i * bands;
      const bool keyed = has_shingles(row, num_perm);
      has_keys[i] = keyed ? 1 : 0;
      for (int b = 0; b < bands; ++b) out[b] = keyed ? band_key(row, b, lsh.rows, groups ? groups[i] : 0) : 0;
    }
  });
}

void bucket_pairs(std::vector<KeyedDoc>& rows, std::vector<DocPair>& out) {
  std::vector<KeyedDoc> scratch;
  std::vector<uint32_t> starts;
  bucket_pairs_with(rows, scratch, starts, out);
}

void sort_unique_pairs(std::vector<DocPair>& pairs) {
  std::sort(pairs.begin(), pairs.end());
  pairs.erase(std::unique(pairs.begin(), pairs.end()), pairs.end());
}

std::vector<DocPair> candidate_pairs(const uint64_t* keys, const int64_t* ids, const uint64_t* groups, int64_t count) {
  std::vector<KeyedDoc> rows(static_cast<size_t>(count));
  for (int64_t k = 0; k < count; ++k) rows[k] = {keys[k], ids[k]};
  std::vector<DocPair> pairs;
  bucket_pairs(rows, pairs);
  std::vector<KeyedDoc>().swap(rows);
  sort_unique_pairs(pairs);
  if (groups) {
    // Each document's group, from its rows; then pairs across groups go.
    std::vector<std::pair<int64_t, uint64_t>> group_of(static_cast<size_t>(count));
    for (int64_t k = 0; k < count; ++k) group_of[k] = {ids[k], groups[k]};
    std::sort(group_of.begin(), group_of.end());
    group_of.erase(std::unique(group_of.begin(), group_of.end()), group_of.end());
    for (size_t k = 1; k < group_of.size(); ++k)
      MLMIX_CHECK(group_of[k].first != group_of[k - 1].first,
                  "document " << group_of[k].first << " has rows of two groups, " << group_of[k - 1].second
                              << " and " << group_of[k].second << "; a document belongs to one group");
    auto group = [&](int64_t id) {
      return std::lower_bound(group_of.begin(), group_of.end(), std::pair<int64_t, uint64_t>{id, 0})->second;
    };
    auto across = [&](const DocPair& p) { return group(p.first) != group(p.second); };
    pairs.erase(std::remove_if(pairs.begin(), pairs.end(), across), pairs.end());
  }
  return pairs;
}

double jaccard(const uint64_t* x, int64_t nx, const uint64_t* y, int64_t ny) {
  int64_t i = 0, j = 0, common = 0;
  // Branch-free merge: the comparisons of random hashes are unpredictable.
  while (i < nx && j < ny) {
    const uint64_t a = x[i], b = y[j];
    common += a == b;
    i += a <= b;
    j += b <= a;
  }
  const int64_t uni = nx + ny - common;
  return uni == 0 ? 0.0 : static_cast<double>(common) / static_cast<double>(uni);
}

double signature_agreement(const uint32_t* x, const uint32_t* y, int num_perm) {
  int equal = 0;
  for (int q = 0; q < num_perm; ++q) equal += x[q] == y[q];
  return static_cast<double>(equal) / num_perm;
}

DocIndex::DocIndex(const int64_t* ids, int64_t count, const char* what) : ids_(ids), count_(count) {
  MLMIX_CHECK(count >= 0, what << ": negative count " << count);
  if (!ids) return;
  sorted_.resize(static_cast<size_t>(count));
  for (int64_t r = 0; r < count; ++r) sorted_[r] = {ids[r], r};
  std::sort(sorted_.begin(), sorted_.end());
  for (size_t k = 1; k < sorted_.size(); ++k)
    MLMIX_CHECK(sorted_[k].first != sorted_[k - 1].first,
                what << " must be distinct document ids: " << sorted_[k].first << " is at " << sorted_[k - 1].second
                     << " and at " << sorted_[k].second);
}

int64_t DocIndex::row(int64_t id) const {
  if (!ids_) return id >= 0 && id < count_ ? id : -1;
  const auto it = std::lower_bound(sorted_.begin(), sorted_.end(), std::pair<int64_t, int64_t>{id, INT64_MIN});
  return it != sorted_.end() && it->first == id ? it->second : -1;
}

std::vector<int64_t> DocIndex::rows_by_id() const {
  std::vector<int64_t> rows(static_cast<size_t>(count_));
  if (!ids_) {
    std::iota(rows.begin(), rows.end(), 0);
  } else {
    for (int64_t k = 0; k < count_; ++k) rows[k] = sorted_[k].second;
  }
  return rows;
}

void check_sets(const uint64_t* values, int64_t n_values, const int64_t* offsets, int64_t count, const char* what) {
  MLMIX_CHECK(count >= 0, what << ": negative count " << count);
  MLMIX_CHECK(offsets[0] == 0, what << " offsets[0] must be 0, got " << offsets[0]);
  for (int64_t r = 0; r < count; ++r) {
    MLMIX_CHECK(offsets[r + 1] >= offsets[r] && offsets[r + 1] <= n_values,
                what << " offsets must be non-decreasing and at most " << n_values << " (the number of values), got "
                     << "offsets[" << r << "] = " << offsets[r] << ", offsets[" << r + 1 << "] = " << offsets[r + 1]);
    for (int64_t k = offsets[r] + 1; k < offsets[r + 1]; ++k)
      MLMIX_CHECK(values[k - 1] < values[k], what << " row " << r << " is not sorted strictly ascending at value "
                                                  << k - offsets[r] << " (sets hold sorted unique hashes, as "
                                                  << "shingle_sets gives them)");
  }
  MLMIX_CHECK(offsets[count] == n_values,
              what << " offsets[-1] must equal the number of values " << n_values << ", got " << offsets[count]);
}

void verify_pairs_by_sets(const DocPair* pairs, int64_t count, const DocIndex& index, const uint64_t* values,
                          const int64_t* offsets, int num_threads, double* similarity, const char* what) {
  verify_rows(pairs, count, index, what, num_threads,
              [&](int64_t x, int64_t y) {
                return jaccard(values + offsets[x], offsets[x + 1] - offsets[x], values + offsets[y],
                               offsets[y + 1] - offsets[y]);
              },
              similarity);
}

void verify_pairs_by_signatures(const DocPair* pairs, int64_t count, const DocIndex& index,
                                const uint32_t* signatures, int num_perm, int num_threads, double* similarity,
                                const char* what) {
  MLMIX_CHECK(num_perm >= 1, "signatures must have at least one column, got " << num_perm);
  verify_rows(pairs, count, index, what, num_threads,
              [&](int64_t x, int64_t y) {
                return signature_agreement(signatures + x * num_perm, signatures + y * num_perm, num_perm);
              },
              similarity);
}

std::vector<int64_t> connected_components(const DocIndex& index, const DocPair* pairs, int64_t count,
                                          const double* scores, const char* what) {
  check_pair_ids(pairs, count, index, what);
  const int64_t n = index.count();
  // Union-find over the ranks of the ids (rank order = id order), so that the union by lower index
  // makes each root the smallest id of its component. Without ids, rank = row = id.
  const bool identity = index.identity();
  std::vector<int64_t> row_at, rank_of;  // rank -> row, row -> rank
  if (!identity) {
    row_at = index.rows_by_id();
    rank_of.resize(static_cast<size_t>(n));
    for (int64_t k = 0; k < n; ++k) rank_of[row_at[k]] = k;
  }
  auto row_of_rank = [&](int64_t k) { return identity ? k : row_at[k]; };
  auto rank_of_id = [&](int64_t id) { return identity ? id : rank_of[index.row(id)]; };
  DisjointSets sets(n);
  for (int64_t k = 0; k < count; ++k) sets.unite(rank_of_id(pairs[k].first), rank_of_id(pairs[k].second));
  // Kept per component: the highest score, ties to the smallest id (the first met in rank order).
  std::vector<int64_t> best(static_cast<size_t>(n), -1);
  for (int64_t k = 0; k < n; ++k) {
    int64_t& b = best[sets.find(k)];
    if (b < 0 || (scores && scores[row_of_rank(k)] > scores[row_of_rank(b)])) b = k;
  }
  std::vector<int64_t> kept(static_cast<size_t>(n));
  for (int64_t k = 0; k < n; ++k) kept[row_of_rank(k)] = index.id(row_of_rank(best[sets.find(k)]));
  return kept;
}

ClusterResult cluster_signatures(const ClusterInputs& in, const ClusterOptions& opts) {
  const int64_t n = in.count;
  const int P = in.num_perm;
  MLMIX_CHECK(opts.threshold > 0.0 && opts.threshold <= 1.0,
              "threshold must be in (0, 1], got " << opts.threshold);
  check_lsh(opts.lsh, P);
  const bool given_sets = in.shingle_sets != nullptr && in.shingle_sets->count() == n;
  const bool exact_verify = opts.verify && (given_sets || (in.texts != nullptr && in.minhash != nullptr));
  auto group_of = [&](int64_t i) -> int64_t { return in.groups ? in.groups[i] : 0; };
  const DocIndex index(nullptr, n);  // the documents are 0..n-1

  ClusterResult result;
  std::vector<DocPair> edges;  // exact pairs, then the verified candidates

  // 1. Documents with equal (group, exact hash) are duplicates; only the first of each goes on.
  std::vector<uint8_t> is_rep(n, 1);
  if (in.hashes) {
    edges = exact_pairs(in.hashes, in.groups, nullptr, n);
    for (const DocPair& p : edges) is_rep[p.second] = 0;  // first < second within a run of equal keys
    result.exact_merged = static_cast<int64_t>(edges.size());
    result.pair_similarity.assign(edges.size(), 1.0);
  }

  // Documents without shingles have all-max signatures: exact merging only.
  std::vector<int64_t> lsh_docs;
  for (int64_t i = 0; i < n; ++i)
    if (is_rep[i] && has_shingles(in.signatures + i * P, P)) lsh_docs.push_back(i);

  // 2. LSH: per band, the (band key, doc) rows of the documents, bucketed and paired.
  const int bands = opts.lsh.bands, rows = opts.lsh.rows;
  std::vector<std::vector<DocPair>> band_pairs(bands);
  // Band keys are computed a few bands at a time, document by document, so that each
  // signature row is read in long runs (band by band, every row would be a cache miss);
  // then each band of the group is bucketed on its own thread.
  const size_t m = lsh_docs.size();
  const int group = std::max(1, std::min(bands, 32 / rows));
  std::vector<uint64_t> band_hash(static_cast<size_t>(group) * m);
  for (int first_band = 0; first_band < bands; first_band += group) {
    const int in_group = std::min(group, bands - first_band);
    parallel_chunks(static_cast<int64_t>(m), opts.num_threads, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t doc = lsh_docs[k];
        for (int j = 0; j < in_group; ++j)
          band_hash[static_cast<size_t>(j) * m + k] =
              band_key(in.signatures + doc * P, first_band + j, rows, static_cast<uint64_t>(group_of(doc)));
      }
    });
    parallel_chunks(in_group, opts.num_threads, 1, [&](int64_t begin, int64_t end) {
      std::vector<KeyedDoc> keys(m), scratch;
      std::vector<uint32_t> starts;
      for (int64_t j = begin; j < end; ++j) {
        keys.resize(m);
        for (size_t k = 0; k < m; ++k) keys[k] = {band_hash[j * m + k], lsh_docs[k]};
        bucket_pairs_with(keys, scratch, starts, band_pairs[first_band + j]);
      }
    });
  }
  std::vector<uint64_t>().swap(band_hash);
  std::vector<DocPair> candidates;
  for (auto& p : band_pairs) {
    candidates.insert(candidates.end(), p.begin(), p.end());
    std::vector<DocPair>().swap(p);
  }
  sort_unique_pairs(candidates);
  // Band keys include the group, but a 64-bit collision must still not join two groups.
  candidates.erase(std::remove_if(candidates.begin(), candidates.end(),
                                  [&](const DocPair& c) { return group_of(c.first) != group_of(c.second); }),
                   candidates.end());
  result.candidate_pairs = static_cast<int64_t>(candidates.size());

  // 3. Verification, in parallel; the edges are then applied in candidate order.
  std::vector<double> similarity(candidates.size(), 1.0);
  const auto n_candidates = static_cast<int64_t>(candidates.size());
  if (opts.verify) {
    if (given_sets) {
      const ShingleSets& sets_in = *in.shingle_sets;
      verify_rows(candidates.data(), n_candidates, index, "candidates", opts.num_threads,
                  [&](int64_t x, int64_t y) {
                    return jaccard(sets_in.data(x), sets_in.size(x), sets_in.data(y), sets_in.size(y));
                  },
                  similarity.data());
    } else if (exact_verify) {
      // Candidates are verified in blocks, so that only the shingle sets of one block's documents
      // are held at a time (candidates are sorted by their first document, which keeps a block's
      // documents few).
      constexpr size_t kPairsPerBlock = size_t{1} << 16;
      for (size_t block = 0; block < candidates.size(); block += kPairsPerBlock) {
        const size_t block_end = std::min(candidates.size(), block + kPairsPerBlock);
        std::vector<int64_t> involved;
        involved.reserve(2 * (block_end - block));
        for (size_t k = block; k < block_end; ++k) {
          involved.push_back(candidates[k].first);
          involved.push_back(candidates[k].second);
        }
        std::sort(involved.begin(), involved.end());
        involved.erase(std::unique(involved.begin(), involved.end()), involved.end());
        std::vector<std::vector<uint64_t>> shingles(involved.size());
        parallel_chunks(static_cast<int64_t>(involved.size()), opts.num_threads, 16,
                        [&](int64_t begin, int64_t end) {
                          for (int64_t k = begin; k < end; ++k) {
                            const int64_t doc = involved[k];
                            shingles[k] = shingle_set(in.texts->doc(doc), *in.minhash, doc);
                          }
                        });
        auto set_of = [&](int64_t doc) -> const std::vector<uint64_t>& {
          return shingles[std::lower_bound(involved.begin(), involved.end(), doc) - involved.begin()];
        };
        verify_rows(candidates.data() + block, static_cast<int64_t>(block_end - block), index, "candidates",
                    opts.num_threads,
                    [&](int64_t x, int64_t y) {
                      const std::vector<uint64_t>& a = set_of(x);
                      const std::vector<uint64_t>& b = set_of(y);
                      return jaccard(a.data(), static_cast<int64_t>(a.size()), b.data(),
                                     static_cast<int64_t>(b.size()));
                    },
                    similarity.data() + block);
      }
    } else {
      verify_pairs_by_signatures(candidates.data(), n_candidates, index, in.signatures, P, opts.num_threads,
                                 similarity.data(), "candidates");
    }
  }
  for (size_t k = 0; k < candidates.size(); ++k) {
    if (opts.verify && !(similarity[k] >= opts.threshold)) continue;
    edges.push_back(candidates[k]);
    result.pair_similarity.push_back(similarity[k]);
  }
  std::vector<DocPair>().swap(candidates);

  // 4. Connected components of the edges; each keeps its highest score, ties to the lowest index.
  result.cluster = connected_components(index, edges.data(), static_cast<int64_t>(edges.size()), in.scores, "edges");
  result.pair_first.reserve(edges.size());
  result.pair_second.reserve(edges.size());
  for (const DocPair& e : edges) {
    result.pair_first.push_back(e.first);
    result.pair_second.push_back(e.second);
  }
  return result;
}

}  // namespace mlmix::dedup
