// JSON lines -> RecordBlock columns (records.h). Each line is checked as UTF-8, parsed by a strict RFC 8259
// parser into a small tree of spans over the line (strings are decoded only when they are written out), and
// turned into a record by the rules of readers.to_record. A line is handed back to the caller whenever the
// result could differ from Python's in any way, including every case where Python raises.
#include "records.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <exception>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>

#include "common.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace mlmix::records {

namespace {

// ---------------------------------------------------------------------------------------------
// Small helpers

// What Python's str.strip() removes, among ASCII characters (str.isspace): \t \n \v \f \r, \x1c-\x1f, space.
inline bool python_space(uint8_t c) { return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20); }

inline bool all_python_space(const uint8_t* s, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (!python_space(s[i])) return false;
  return true;
}

// Each byte's value as a hex digit, or -1.
struct HexTable {
  int8_t v[256];
  constexpr HexTable() : v() {
    for (int c = 0; c < 256; ++c) {
      v[c] = static_cast<int8_t>(c >= '0' && c <= '9' ? c - '0'
                                 : c >= 'a' && c <= 'f' ? c - 'a' + 10
                                 : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                                        : -1);
    }
  }
};
constexpr HexTable kHex;

// The four hex digits at s (s + 4 <= end checked by the caller), or -1.
inline int32_t hex4(const uint8_t* s) {
  const int32_t a = kHex.v[s[0]], b = kHex.v[s[1]], c = kHex.v[s[2]], d = kHex.v[s[3]];
  if ((a | b | c | d) < 0) return -1;
  return (a << 12) | (b << 8) | (c << 4) | d;
}

// The first '"', '\\', control character (< 0x20) or non-ASCII byte (>= 0x80) in [p, end), or end.
inline const uint8_t* find_string_special(const uint8_t* p, const uint8_t* end) {
#if defined(__SSE2__)
  const __m128i quote = _mm_set1_epi8('"');
  const __m128i backslash = _mm_set1_epi8('\\');
  const __m128i ctl = _mm_set1_epi8(0x1F);
  while (p + 16 <= end) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i hit = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(v, quote), _mm_cmpeq_epi8(v, backslash)),
                                     _mm_cmpeq_epi8(_mm_max_epu8(v, ctl), ctl));
    const int mask = _mm_movemask_epi8(hit) | _mm_movemask_epi8(v);
    if (mask != 0) return p + __builtin_ctz(static_cast<unsigned>(mask));
    p += 16;
  }
#endif
  while (p < end && *p != '"' && *p != '\\' && *p >= 0x20 && *p < 0x80) ++p;
  return p;
}

// The length of the UTF-8 sequence at p (*p >= 0x80) that Python's strict decoder accepts, or 0.
inline size_t utf8_sequence(const uint8_t* p, const uint8_t* end) {
  const uint8_t c = p[0];
  const size_t room = static_cast<size_t>(end - p);
  if (c < 0xC2) return 0;
  if (c < 0xE0) return room >= 2 && (p[1] & 0xC0) == 0x80 ? 2 : 0;
  if (c < 0xF0) {
    if (room < 3 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80) return 0;
    if ((c == 0xE0 && p[1] < 0xA0) || (c == 0xED && p[1] >= 0xA0)) return 0;  // overlong, surrogate
    return 3;
  }
  if (c < 0xF5) {
    if (room < 4 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80 || (p[3] & 0xC0) != 0x80) return 0;
    if ((c == 0xF0 && p[1] < 0x90) || (c == 0xF4 && p[1] >= 0x90)) return 0;  // overlong, past U+10FFFF
    return 4;
  }
  return 0;
}

// Writes code point cp (not a surrogate) as UTF-8 at w; returns the end.
inline uint8_t* put_utf8(uint8_t* w, uint32_t cp) {
  if (cp < 0x80) {
    *w++ = static_cast<uint8_t>(cp);
  } else if (cp < 0x800) {
    *w++ = static_cast<uint8_t>(0xC0 | (cp >> 6));
    *w++ = static_cast<uint8_t>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    *w++ = static_cast<uint8_t>(0xE0 | (cp >> 12));
    *w++ = static_cast<uint8_t>(0x80 | ((cp >> 6) & 0x3F));
    *w++ = static_cast<uint8_t>(0x80 | (cp & 0x3F));
  } else {
    *w++ = static_cast<uint8_t>(0xF0 | (cp >> 18));
    *w++ = static_cast<uint8_t>(0x80 | ((cp >> 12) & 0x3F));
    *w++ = static_cast<uint8_t>(0x80 | ((cp >> 6) & 0x3F));
    *w++ = static_cast<uint8_t>(0x80 | (cp & 0x3F));
  }
  return w;
}

inline void append_bytes(std::vector<uint8_t>& out, const void* p, size_t n) {
  if (n == 0) return;
  const size_t at = out.size();
  out.resize(at + n);
  std::memcpy(out.data() + at, p, n);
}
inline void append_bytes(std::vector<uint8_t>& out, std::string_view s) { append_bytes(out, s.data(), s.size()); }

inline void append_decimal(std::vector<uint8_t>& out, int64_t v) {
  char buf[24];
  int n = 0;
  const bool neg = v < 0;
  uint64_t u = neg ? 0 - static_cast<uint64_t>(v) : static_cast<uint64_t>(v);
  do {
    buf[n++] = static_cast<char>('0' + u % 10);
    u /= 10;
  } while (u != 0);
  if (neg) buf[n++] = '-';
  const size_t at = out.size();
  out.resize(at + n);
  for (int k = 0; k < n; ++k) out[at + k] = static_cast<uint8_t>(buf[n - 1 - k]);
}

// ---------------------------------------------------------------------------------------------
// The JSON parser: one line into a tree of spans

enum NodeType : uint8_t { kNull, kFalse, kTrue, kInt, kFloat, kString, kArray, kObject };

// One JSON value of the line, in document order (an object's children alternate key, value). Only values at
// most kStoredLevels containers deep are kept (the row, its fields, a list's items, a message's fields): the
// rest is checked, never looked at.
struct Node {
  NodeType type = kNull;
  bool escaped = false;   // a string with backslash escapes
  uint32_t count = 0;     // a container's items (an object's pairs)
  uint32_t next = 0;      // the index after this node's kept subtree
  size_t begin = 0;       // the value's bytes in the line; a string's without its quotes
  size_t end = 0;
};

constexpr int kStoredLevels = 3;    // the row is level 0
constexpr size_t kMaxIntDigits = 640;  // the smallest limit sys.set_int_max_str_digits accepts

class LineParser {
 public:
  // Parses the line starting at `line`, which ends after its first "\n" or at `end`: true when it is valid
  // UTF-8 and one JSON value by RFC 8259 (with JSON whitespace around it) that Python's json reads the same way
  // (no NaN / Infinity, no lone surrogate escapes, no int past kMaxIntDigits digits, no deeper nesting than
  // max_depth). Then line_end() is where the line ends (after its "\n"). A line holds no "\n" but its last
  // byte, so the parser takes "\n" for the line's end, never for whitespace inside the value; and UTF-8 is
  // checked inside strings only, since a byte >= 0x80 anywhere else fails the parse.
  bool parse(const uint8_t* line, const uint8_t* end, int max_depth) {
    base_ = line;
    p_ = line;
    end_ = end;
    max_depth_ = max_depth;
    nodes_.clear();
    if (!value(0)) return false;
    skip_space();
    if (p_ == end_) {
      line_end_ = p_;
      return true;
    }
    if (*p_ != '\n') return false;
    line_end_ = p_ + 1;
    return true;
  }

  const uint8_t* line_end() const { return line_end_; }

  const Node& node(uint32_t i) const { return nodes_[i]; }
  const uint8_t* base() const { return base_; }

 private:
  void skip_space() {  // JSON whitespace but "\n", which ends the line
    while (p_ < end_ && (*p_ == ' ' || *p_ == '\t' || *p_ == '\r')) ++p_;
  }

  uint32_t push(bool keep) {
    if (!keep) return UINT32_MAX;
    nodes_.emplace_back();
    return static_cast<uint32_t>(nodes_.size() - 1);
  }

  void finish(uint32_t at, NodeType type, size_t begin, size_t end) {
    if (at == UINT32_MAX) return;
    Node& nd = nodes_[at];
    nd.type = type;
    nd.begin = begin;
    nd.end = end;
    nd.next = static_cast<uint32_t>(nodes_.size());
  }

  bool value(int level) {
    skip_space();
    if (p_ >= end_) return false;
    const bool keep = level <= kStoredLevels;
    const uint32_t at = push(keep);
    const size_t begin = static_cast<size_t>(p_ - base_);
    switch (*p_) {
      case '{':
      case '[': {
        const bool object = *p_ == '{';
        const uint8_t close = object ? '}' : ']';
        if (level + 1 > max_depth_) return false;
        ++p_;
        skip_space();
        uint32_t count = 0;
        if (p_ < end_ && *p_ == close) {
          ++p_;
        } else {
          for (;;) {
            if (object) {
              skip_space();
              if (p_ >= end_ || *p_ != '"') return false;
              if (!string(push(level + 1 <= kStoredLevels))) return false;
              skip_space();
              if (p_ >= end_ || *p_ != ':') return false;
              ++p_;
            }
            if (!value(level + 1)) return false;
            if (++count == UINT32_MAX) return false;  // counts and node indices are 32-bit
            skip_space();
            if (p_ >= end_) return false;
            if (*p_ == ',') {
              ++p_;
              continue;
            }
            if (*p_ == close) {
              ++p_;
              break;
            }
            return false;
          }
        }
        finish(at, object ? kObject : kArray, begin, static_cast<size_t>(p_ - base_));
        if (at != UINT32_MAX) nodes_[at].count = count;
        return true;
      }
      case '"':
        return string(at);
      case 't':
        return literal("true", 4, at, kTrue, begin);
      case 'f':
        return literal("false", 5, at, kFalse, begin);
      case 'n':
        return literal("null", 4, at, kNull, begin);
      default:
        return number(at, begin);
    }
  }

  bool literal(const char* word, size_t len, uint32_t at, NodeType type, size_t begin) {
    if (static_cast<size_t>(end_ - p_) < len || std::memcmp(p_, word, len) != 0) return false;
    p_ += len;
    finish(at, type, begin, begin + len);
    return true;
  }

  bool number(uint32_t at, size_t begin) {
    const uint8_t* s = p_;
    if (s < end_ && *s == '-') ++s;
    if (s >= end_) return false;
    const uint8_t* digits = s;
    if (*s == '0') {
      ++s;
    } else if (*s >= '1' && *s <= '9') {
      while (s < end_ && *s >= '0' && *s <= '9') ++s;
    } else {
      return false;  // also "-Infinity", which Python reads
    }
    const size_t int_digits = static_cast<size_t>(s - digits);
    bool is_float = false;
    if (s < end_ && *s == '.') {
      ++s;
      if (s >= end_ || *s < '0' || *s > '9') return false;
      while (s < end_ && *s >= '0' && *s <= '9') ++s;
      is_float = true;
    }
    if (s < end_ && (*s == 'e' || *s == 'E')) {
      ++s;
      if (s < end_ && (*s == '+' || *s == '-')) ++s;
      if (s >= end_ || *s < '0' || *s > '9') return false;
      while (s < end_ && *s >= '0' && *s <= '9') ++s;
      is_float = true;
    }
    if (!is_float && int_digits > kMaxIntDigits) return false;  // Python may refuse to convert it
    p_ = s;
    finish(at, is_float ? kFloat : kInt, begin, static_cast<size_t>(s - base_));
    return true;
  }

  // At the opening quote.
  bool string(uint32_t at) {
    ++p_;
    const size_t begin = static_cast<size_t>(p_ - base_);
    bool escaped = false;
    for (;;) {
      p_ = find_string_special(p_, end_);
      if (p_ >= end_) return false;
      const uint8_t c = *p_;
      if (c >= 0x80) {
        do {
          const size_t n = utf8_sequence(p_, end_);
          if (n == 0) return false;
          p_ += n;
        } while (p_ < end_ && *p_ >= 0x80);
        continue;
      }
      if (c == '"') break;
      if (c < 0x20) return false;  // Python's json (strict) refuses raw control characters
      escaped = true;
      do {  // escapes often come in runs (ensure_ascii's \uXXXX): no search between them
        ++p_;
        if (p_ >= end_) return false;
        switch (*p_) {
          case '"': case '\\': case '/': case 'b': case 'f': case 'n': case 'r': case 't':
            ++p_;
            break;
          case 'u': {
            if (end_ - p_ < 5) return false;
            const int32_t cp = hex4(p_ + 1);
            if (cp < 0) return false;
            p_ += 5;
            if (cp >= 0xDC00 && cp <= 0xDFFF) return false;  // a lone low surrogate
            if (cp >= 0xD800 && cp <= 0xDBFF) {  // needs a low surrogate right after it
              if (end_ - p_ < 6 || p_[0] != '\\' || p_[1] != 'u') return false;
              const int32_t lo = hex4(p_ + 2);
              if (lo < 0xDC00 || lo > 0xDFFF) return false;
              p_ += 6;
            }
            break;
          }
          default:
            return false;
        }
      } while (p_ < end_ && *p_ == '\\');
    }
    const size_t end = static_cast<size_t>(p_ - base_);
    ++p_;
    finish(at, kString, begin, end);
    if (at != UINT32_MAX) nodes_[at].escaped = escaped;
    return true;
  }

  const uint8_t* base_ = nullptr;
  const uint8_t* line_end_ = nullptr;
  const uint8_t* p_ = nullptr;
  const uint8_t* end_ = nullptr;
  int max_depth_ = kMaxDepth;
  std::vector<Node> nodes_;
};

// Writes the decoded value of a string node that LineParser accepted (escapes valid, surrogates paired) to dst,
// which has room for the raw bytes (decoding never lengthens a string); returns its length.
size_t decode_string_to(const uint8_t* base, const Node& nd, uint8_t* dst) {
  const uint8_t* p = base + nd.begin;
  const uint8_t* end = base + nd.end;
  uint8_t* w = dst;
  while (p < end) {
    if (*p != '\\') {
      // copy up to the next backslash; escapes are often dense (ensure_ascii's \uXXXX), so no memchr per run
      const uint8_t* bs = p;
#if defined(__SSE2__)
      // 16 bytes at a time; storing all 16 is safe: w - dst <= p - (base + nd.begin) and bs + 16 <= end
      const __m128i backslash = _mm_set1_epi8('\\');
      while (bs + 16 <= end) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bs));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(w + (bs - p)), v);
        const int mask = _mm_movemask_epi8(_mm_cmpeq_epi8(v, backslash));
        if (mask != 0) {
          bs += __builtin_ctz(static_cast<unsigned>(mask));
          break;
        }
        bs += 16;
      }
      if (bs + 16 > end) {
        const uint8_t* q = bs;
        while (q < end && *q != '\\') ++q;
        std::memcpy(w + (bs - p), bs, static_cast<size_t>(q - bs));
        bs = q;
      }
#else
      while (bs < end && *bs != '\\') ++bs;
      std::memcpy(w, p, static_cast<size_t>(bs - p));
#endif
      w += bs - p;
      p = bs;
      if (p >= end) break;
    }
    ++p;  // the backslash
    if (p >= end) break;
    switch (*p) {
      case 'b': *w++ = '\b'; ++p; break;
      case 'f': *w++ = '\f'; ++p; break;
      case 'n': *w++ = '\n'; ++p; break;
      case 'r': *w++ = '\r'; ++p; break;
      case 't': *w++ = '\t'; ++p; break;
      case 'u': {
        // the parser checked the escape; the bounds are checked again all the same (a caller's buffer that
        // changed during the call must not make this read past the string)
        if (end - p < 5) return static_cast<size_t>(w - dst);
        int32_t cp = hex4(p + 1);
        p += 5;
        if (cp >= 0xD800 && cp <= 0xDBFF && end - p >= 6) {
          const int32_t lo = hex4(p + 2);
          if (lo >= 0xDC00 && lo <= 0xDFFF) {
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            p += 6;
          }
        }
        w = put_utf8(w, cp < 0 ? 0xFFFD : static_cast<uint32_t>(cp));
        break;
      }
      default: *w++ = *p++; break;  // " \ /
    }
  }
  return static_cast<size_t>(w - dst);
}

void decode_string(const uint8_t* base, const Node& nd, std::string& out) {
  const size_t at = out.size();
  out.resize(at + (nd.end - nd.begin));
  out.resize(at + decode_string_to(base, nd, reinterpret_cast<uint8_t*>(out.data()) + at));
}

// ---------------------------------------------------------------------------------------------
// Rows -> records (readers.to_record)

constexpr std::string_view kMessagesKeys[] = {"messages", "conversations", "conversation"};
constexpr std::string_view kPromptKeys[] = {"prompt", "instruction", "question", "query"};
constexpr std::string_view kResponseKeys[] = {"response", "completion", "output", "answer", "chosen"};
constexpr std::string_view kOutputKeys[] = {"output", "response", "completion", "output", "answer", "chosen"};
constexpr std::string_view kTextKeys[] = {"text", "content"};
constexpr std::string_view kSystemKeys[] = {"system"};
constexpr std::string_view kInstructionKeys[] = {"instruction"};
constexpr std::string_view kInputKeys[] = {"input"};

constexpr int64_t kNone = -1;

// An object's fields, keys decoded; duplicates kept, looked up from the back (the last one wins, as in a dict).
class Fields {
 public:
  void load(const LineParser& parser, uint32_t obj) {
    entries_.clear();
    decoded_.clear();
    const Node& o = parser.node(obj);
    // decoded keys first (rare), so that the views into decoded_ stay put
    size_t need = 0;
    uint32_t i = obj + 1;
    for (uint32_t k = 0; k < o.count; ++k) {
      const Node& key = parser.node(i);
      if (key.escaped) need += key.end - key.begin;
      i = parser.node(i + 1).next;
    }
    decoded_.reserve(need);
    i = obj + 1;
    for (uint32_t k = 0; k < o.count; ++k) {
      const Node& key = parser.node(i);
      std::string_view name;
      if (key.escaped) {
        const size_t at = decoded_.size();
        decode_string(parser.base(), key, decoded_);
        name = std::string_view(decoded_.data() + at, decoded_.size() - at);
      } else {
        name = std::string_view(reinterpret_cast<const char*>(parser.base() + key.begin), key.end - key.begin);
      }
      entries_.push_back({name, i + 1});
      i = parser.node(i + 1).next;
    }
  }

  // The value's node of `key` (the last one), or kNone.
  int64_t find(std::string_view key) const {
    for (size_t k = entries_.size(); k-- > 0;)
      if (entries_[k].key == key) return entries_[k].value;
    return kNone;
  }
  bool has(std::string_view key) const { return find(key) != kNone; }

 private:
  struct Entry {
    std::string_view key;
    uint32_t value;
  };
  std::vector<Entry> entries_;
  std::string decoded_;
};

// One turn to write: a role and a content (plus "\n\n" + extra for alpaca's input).
struct Turn {
  std::string_view role;
  uint32_t content;
  int64_t extra;
};

enum class Truth { kFalsy, kString, kHandBack };

using RoleMap = std::unordered_map<std::string_view, std::string_view>;

class RecordMaker {
 public:
  RecordMaker(const RecordOptions& options, const RoleMap& roles) : opt_(options), roles_(roles) {}

  // Reads the line at s (it ends after its first "\n", else at `end`) into `out`: a record (true), a blank line
  // (true, nothing written) or a line to hand back (false, nothing written). *line_end: where the line ends.
  bool line(const uint8_t* s, const uint8_t* end, int64_t lineno, RecordColumns& out, const uint8_t** line_end) {
    if (!parser_.parse(s, end, opt_.max_depth)) {
      const void* nl = std::memchr(s, '\n', static_cast<size_t>(end - s));
      *line_end = nl ? static_cast<const uint8_t*>(nl) + 1 : end;
      return all_python_space(s, static_cast<size_t>(*line_end - s));
    }
    *line_end = parser_.line_end();
    if (parser_.node(0).type != kObject) return false;
    row_.load(parser_, 0);
    if (!opt_.where.empty()) {
      const Match m = matches();
      if (m == Match::kNo) return true;  // filtered out: nothing written, nothing handed back
      if (m == Match::kHandBack) return false;
    }
    if (!plan()) return false;
    write(lineno, out);
    return true;
  }

 private:
  const Node& node(int64_t i) const { return parser_.node(static_cast<uint32_t>(i)); }

  // readers._get: the mapped field if the source maps this one, else the first candidate present; a null
  // value counts as missing.
  template <size_t N>
  int64_t get(const std::optional<std::string>& mapped, const std::string_view (&candidates)[N]) const {
    if (mapped) {
      const int64_t v = row_.find(*mapped);
      return v != kNone && node(v).type != kNull ? v : kNone;
    }
    for (std::string_view c : candidates) {
      const int64_t v = row_.find(c);
      if (v != kNone && node(v).type != kNull) return v;
    }
    return kNone;
  }

  template <size_t N>
  bool any_present(const std::string_view (&keys)[N]) const {
    for (std::string_view k : keys)
      if (row_.has(k)) return true;
    return false;
  }

  // Python's truth value of a field that must be a string when true; kHandBack where it would raise or where
  // the answer takes more than a glance (floats).
  Truth truth(int64_t v) const {
    if (v == kNone) return Truth::kFalsy;
    const Node& nd = node(v);
    switch (nd.type) {
      case kNull:
      case kFalse:
        return Truth::kFalsy;
      case kString:
        return nd.end > nd.begin ? Truth::kString : Truth::kFalsy;
      case kArray:
      case kObject:
        return nd.count == 0 ? Truth::kFalsy : Truth::kHandBack;
      case kInt: {
        const size_t len = nd.end - nd.begin;
        const uint8_t* p = parser_.base() + nd.begin;
        const bool zero = (len == 1 && p[0] == '0') || (len == 2 && p[0] == '-' && p[1] == '0');
        return zero ? Truth::kFalsy : Truth::kHandBack;
      }
      default:
        return Truth::kHandBack;
    }
  }

  bool is_string(int64_t v) const { return v != kNone && node(v).type == kString; }

  enum class Match { kNo, kYes, kHandBack };

  // An int node's value as Python's str() writes it: JSON's digits, but "-0" is 0.
  std::string_view int_digits(const Node& nd) const {
    const std::string_view d(reinterpret_cast<const char*>(parser_.base() + nd.begin), nd.end - nd.begin);
    return d == "-0" ? std::string_view("0") : d;
  }

  // `row.get(term.key) == value` as Python computes it (json.loads's values: None, bool, int, float, str, list,
  // dict); kHandBack where Python compares a float (with an int or a bool: exact comparisons best left to it).
  Match compare(const WhereTerm& term) {
    using Kind = WhereTerm::Kind;
    const int64_t v = row_.find(term.key);
    const NodeType t = v == kNone ? kNull : node(v).type;
    if (t == kNull) return term.kind == Kind::kNone ? Match::kYes : Match::kNo;
    switch (term.kind) {
      case Kind::kNone:
        return Match::kNo;
      case Kind::kString:
        return t == kString && string_value(v, scratch_) == term.text ? Match::kYes : Match::kNo;
      case Kind::kInt:
      case Kind::kBool: {
        // True == 1 and False == 0 in Python, either way round
        const std::string_view want = term.kind == Kind::kInt ? std::string_view(term.text)
                                                                : (term.flag ? std::string_view("1") : "0");
        if (t == kTrue || t == kFalse) return want == (t == kTrue ? "1" : "0") ? Match::kYes : Match::kNo;
        if (t == kInt) return int_digits(node(v)) == want ? Match::kYes : Match::kNo;
        if (t == kFloat) return Match::kHandBack;
        return Match::kNo;  // a str, list or dict never equals a number
      }
    }
    return Match::kHandBack;
  }

  // all(row.get(k) == v for k, v in where): == never raises on json.loads's values, so one term that fails
  // decides, whatever the order; else a term Python must decide hands the row back.
  Match matches() {
    Match out = Match::kYes;
    for (const WhereTerm& term : opt_.where) {
      const Match m = compare(term);
      if (m == Match::kNo) return Match::kNo;
      if (m == Match::kHandBack) out = Match::kHandBack;
    }
    return out;
  }

  // A string node's decoded value; a view into the line where it has no escapes.
  std::string_view string_value(int64_t v, std::string& scratch) const {
    const Node& nd = node(v);
    if (!nd.escaped) return {reinterpret_cast<const char*>(parser_.base() + nd.begin), nd.end - nd.begin};
    scratch.clear();
    decode_string(parser_.base(), nd, scratch);
    return scratch;
  }

  // Everything to_record checks, before anything is written; false to hand the line back.
  bool plan() {
    turns_.clear();
    // id: row.get(id_field), else the fallback id; str() of a str or an int only
    id_ = row_.find(opt_.id_field);
    if (id_ != kNone) {
      const Node& nd = node(id_);
      if (nd.type == kNull) {
        id_ = kNone;
      } else if (nd.type == kInt) {
        const uint8_t* p = parser_.base() + nd.begin;
        if (nd.end - nd.begin == 2 && p[0] == '-' && p[1] == '0') return false;  // str(-0) is "0"
      } else if (nd.type != kString) {
        return false;
      }
    }
    // lang: the fixed one, or the row's lang_field (a string, or null; "" is None)
    lang_ = kNone;
    if (opt_.lang_from_field) {
      const int64_t v = row_.find(opt_.lang_field);
      if (v != kNone && node(v).type != kNull) {
        if (node(v).type != kString) return false;
        if (node(v).end > node(v).begin) lang_ = v;
      }
    }

    RecordFormat fmt = opt_.format;
    if (fmt == RecordFormat::kAuto) {
      if (any_present(kMessagesKeys) || opt_.field_messages) {
        fmt = RecordFormat::kMessages;
      } else if ((opt_.field_text || row_.has("text")) && !any_present(kPromptKeys)) {
        fmt = RecordFormat::kText;
      } else if (opt_.field_instruction || row_.has("input")) {
        fmt = RecordFormat::kAlpaca;
      } else {
        fmt = RecordFormat::kPromptResponse;
      }
    }

    if (fmt == RecordFormat::kText) {
      const int64_t t = get(opt_.field_text, kTextKeys);
      if (!is_string(t)) return false;
      kind_ = kText;
      turns_.push_back({std::string_view(), static_cast<uint32_t>(t), kNone});
      return true;
    }

    kind_ = kChat;
    const int64_t system = get(opt_.field_system, kSystemKeys);
    switch (truth(system)) {
      case Truth::kFalsy: break;
      case Truth::kString: turns_.push_back({"system", static_cast<uint32_t>(system), kNone}); break;
      case Truth::kHandBack: return false;
    }

    if (fmt == RecordFormat::kMessages) {
      const int64_t conv = get(opt_.field_messages, kMessagesKeys);
      if (conv == kNone || node(conv).type != kArray || node(conv).count == 0) return false;
      const std::string_view role_key = opt_.field_role ? std::string_view(*opt_.field_role) : std::string_view();
      const std::string_view content_key =
          opt_.field_content ? std::string_view(*opt_.field_content) : std::string_view();
      uint32_t m = static_cast<uint32_t>(conv) + 1;
      for (uint32_t j = 0; j < node(conv).count; ++j, m = node(m).next) {
        if (node(m).type != kObject) return false;
        msg_.load(parser_, m);
        const std::string_view rk = !role_key.empty() ? role_key : (msg_.has("role") ? "role" : "from");
        const std::string_view ck = !content_key.empty() ? content_key : (msg_.has("content") ? "content" : "value");
        const int64_t r = msg_.find(rk);
        const int64_t c = msg_.find(ck);
        if (!is_string(r) || !is_string(c)) return false;
        const auto role = roles_.find(string_value(r, scratch_));
        if (role == roles_.end()) return false;
        turns_.push_back({role->second, static_cast<uint32_t>(c), kNone});
      }
    } else {
      int64_t prompt, response, extra = kNone;
      if (fmt == RecordFormat::kAlpaca) {
        prompt = get(opt_.field_instruction, kInstructionKeys);
        response = get(opt_.field_output, kOutputKeys);
        extra = get(opt_.field_input, kInputKeys);
      } else {
        prompt = get(opt_.field_prompt, kPromptKeys);
        response = get(opt_.field_response, kResponseKeys);
      }
      if (!is_string(prompt) || !is_string(response)) return false;
      switch (truth(extra)) {
        case Truth::kFalsy: extra = kNone; break;
        case Truth::kString: break;
        case Truth::kHandBack: return false;
      }
      turns_.push_back({"user", static_cast<uint32_t>(prompt), extra});
      turns_.push_back({"assistant", static_cast<uint32_t>(response), kNone});
    }
    for (const Turn& t : turns_)
      if (t.role == "assistant") return true;
    return false;  // no assistant turn: to_record raises
  }

  void append_node(int64_t v, std::vector<uint8_t>& out) {
    const Node& nd = node(v);
    if (!nd.escaped || nd.type != kString) {
      append_bytes(out, parser_.base() + nd.begin, nd.end - nd.begin);
      return;
    }
    const size_t at = out.size();
    out.resize(at + (nd.end - nd.begin));  // decoding never lengthens a string
    const size_t n = decode_string_to(parser_.base(), nd, out.data() + at);
    out.resize(at + n);
  }

  void write(int64_t lineno, RecordColumns& out) {
    out.kind.push_back(kind_);
    out.line.push_back(lineno);
    if (id_ == kNone) {
      append_bytes(out.id.values, opt_.id_prefix);
      append_decimal(out.id.values, lineno);
    } else {
      append_node(id_, out.id.values);  // a string's value, an int's digits
    }
    out.id.offsets.push_back(static_cast<int64_t>(out.id.values.size()));
    bool has_lang = false;
    if (opt_.lang_from_field) {
      if (lang_ != kNone) {
        append_node(lang_, out.lang.values);
        has_lang = true;
      }
    } else if (opt_.lang) {
      append_bytes(out.lang.values, *opt_.lang);
      has_lang = true;
    }
    out.has_lang.push_back(has_lang ? 1 : 0);
    out.lang.offsets.push_back(static_cast<int64_t>(out.lang.values.size()));
    append_bytes(out.where.values, opt_.where_prefix);
    append_decimal(out.where.values, lineno);
    out.where.offsets.push_back(static_cast<int64_t>(out.where.values.size()));
    for (const Turn& t : turns_) {
      append_bytes(out.role.values, t.role);
      out.role.offsets.push_back(static_cast<int64_t>(out.role.values.size()));
      append_node(t.content, out.content.values);
      if (t.extra != kNone) {
        append_bytes(out.content.values, std::string_view("\n\n"));
        append_node(t.extra, out.content.values);
      }
      out.content.offsets.push_back(static_cast<int64_t>(out.content.values.size()));
    }
    out.turn_offsets.push_back(static_cast<int64_t>(out.role.size()));
  }

  const RecordOptions& opt_;
  const RoleMap& roles_;
  LineParser parser_;
  Fields row_, msg_;
  std::vector<Turn> turns_;
  std::string scratch_;
  int64_t id_ = kNone, lang_ = kNone;
  uint8_t kind_ = kChat;
};

// Reads the lines of [begin, end) (whole lines), the first numbered first_line.
void read_range(const uint8_t* data, size_t begin, size_t end, int64_t first_line, const RecordOptions& options,
                const RoleMap& roles, RecordColumns& out) {
  RecordMaker maker(options, roles);
  // the columns never outgrow the bytes read (content) or a line's worth per record (the rest): reserving
  // address space up front saves the copies of growing
  reserve_huge(out.content.values, end - begin);
  int64_t lineno = first_line;
  size_t pos = begin;
  while (pos < end) {
    const uint8_t* line_end = nullptr;
    const bool kept = maker.line(data + pos, data + end, lineno, out, &line_end);
    const size_t stop = static_cast<size_t>(line_end - data);
    if (!kept) {
      out.handback_line.push_back(lineno);
      out.handback_begin.push_back(static_cast<int64_t>(pos));
      out.handback_end.push_back(static_cast<int64_t>(stop));
    }
    ++lineno;
    pos = stop;
  }
  out.lines += lineno - first_line;
}

template <class F>
void run_threads(int threads, F&& body) {
  if (threads <= 1) {
    body(0);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(threads - 1));
  for (int t = 1; t < threads; ++t) pool.emplace_back([&body, t] { body(t); });
  body(0);
  for (auto& th : pool) th.join();
}

// Appends `part`'s strings to `dst` at record position `at` and byte position `at_byte` (dst sized already).
void place_strings(const StringColumn& part, StringColumn& dst, size_t at, int64_t at_byte) {
  if (!part.values.empty()) std::memcpy(dst.values.data() + at_byte, part.values.data(), part.values.size());
  for (size_t i = 1; i < part.offsets.size(); ++i) dst.offsets[at + i] = part.offsets[i] + at_byte;
}

constexpr size_t kMinBytesPerThread = 1 << 18;

}  // namespace

RecordColumns read_json_lines(const uint8_t* data, size_t size, int64_t first_line, const RecordOptions& options) {
  MLMIX_CHECK(options.max_depth >= 1 && options.max_depth <= kMaxDepth,
              "max_depth must be in [1, " << kMaxDepth << "], got " << options.max_depth);
  MLMIX_CHECK(first_line >= 0 && static_cast<uint64_t>(first_line) < (uint64_t{1} << 62) - size,
              "first_line must be in [0, 2**62 - len(data)), got " << first_line);
  RoleMap roles;
  for (const auto& [from, to] : options.roles) roles[from] = to;  // later entries win, as in a dict merge

  const int threads = static_cast<int>(std::max<size_t>(
      1, std::min<size_t>(static_cast<size_t>(resolve_threads(options.num_threads)), size / kMinBytesPerThread)));
  if (threads == 1) {
    RecordColumns out;
    read_range(data, 0, size, first_line, options, roles, out);
    return out;
  }

  // Ranges of whole lines, about equal in bytes; each range but the last ends just after a "\n".
  std::vector<size_t> cut(static_cast<size_t>(threads) + 1, size);
  cut[0] = 0;
  for (int t = 1; t < threads; ++t) {
    size_t at = std::max(cut[t - 1], size / threads * static_cast<size_t>(t));
    const void* nl = at < size ? std::memchr(data + at, '\n', size - at) : nullptr;
    cut[t] = nl ? static_cast<size_t>(static_cast<const uint8_t*>(nl) - data) + 1 : size;
  }
  // Line numbers: each range's first line follows the "\n"s of the ranges before it.
  std::vector<int64_t> newlines(static_cast<size_t>(threads), 0);
  run_threads(threads, [&](int t) {
    newlines[t] = std::count(data + cut[t], data + cut[t + 1], static_cast<uint8_t>('\n'));
  });
  std::vector<RecordColumns> parts(static_cast<size_t>(threads));
  std::vector<int64_t> first(static_cast<size_t>(threads), first_line);
  for (int t = 1; t < threads; ++t) first[t] = first[t - 1] + newlines[t - 1];
  std::exception_ptr error;
  std::mutex error_mutex;
  run_threads(threads, [&](int t) {
    try {
      read_range(data, cut[t], cut[t + 1], first[t], options, roles, parts[t]);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  });
  if (error) std::rethrow_exception(error);

  // Concatenate the parts, each thread copying its own.
  struct Base {
    size_t records = 0, turns = 0, handbacks = 0;
    int64_t id = 0, lang = 0, where = 0, role = 0, content = 0;
  };
  std::vector<Base> base(static_cast<size_t>(threads) + 1);
  for (int t = 0; t < threads; ++t) {
    const RecordColumns& p = parts[t];
    Base b = base[t];
    b.records += p.size();
    b.turns += p.role.size();
    b.handbacks += p.handback_line.size();
    b.id += static_cast<int64_t>(p.id.values.size());
    b.lang += static_cast<int64_t>(p.lang.values.size());
    b.where += static_cast<int64_t>(p.where.values.size());
    b.role += static_cast<int64_t>(p.role.values.size());
    b.content += static_cast<int64_t>(p.content.values.size());
    base[t + 1] = b;
  }
  const Base& total = base[threads];
  RecordColumns out;
  out.kind.resize(total.records);
  out.has_lang.resize(total.records);
  out.line.resize(total.records);
  out.turn_offsets.resize(total.records + 1);
  for (auto [col, bytes] : {std::pair<StringColumn*, int64_t>{&out.id, total.id}, {&out.lang, total.lang},
                            {&out.where, total.where}}) {
    reserve_huge(col->values, static_cast<size_t>(bytes));
    col->values.resize(static_cast<size_t>(bytes));
    col->offsets.resize(total.records + 1);
  }
  out.role.values.resize(static_cast<size_t>(total.role));
  out.role.offsets.resize(total.turns + 1);
  reserve_huge(out.content.values, static_cast<size_t>(total.content));
  out.content.values.resize(static_cast<size_t>(total.content));
  out.content.offsets.resize(total.turns + 1);
  for (const RecordColumns& p : parts) {
    out.lines += p.lines;
    out.handback_line.insert(out.handback_line.end(), p.handback_line.begin(), p.handback_line.end());
    out.handback_begin.insert(out.handback_begin.end(), p.handback_begin.begin(), p.handback_begin.end());
    out.handback_end.insert(out.handback_end.end(), p.handback_end.begin(), p.handback_end.end());
  }
  run_threads(threads, [&](int t) {
    const RecordColumns& p = parts[t];
    const Base& b = base[t];
    std::copy(p.kind.begin(), p.kind.end(), out.kind.begin() + b.records);
    std::copy(p.has_lang.begin(), p.has_lang.end(), out.has_lang.begin() + b.records);
    std::copy(p.line.begin(), p.line.end(), out.line.begin() + b.records);
    for (size_t i = 1; i < p.turn_offsets.size(); ++i)
      out.turn_offsets[b.records + i] = p.turn_offsets[i] + static_cast<int64_t>(b.turns);
    place_strings(p.id, out.id, b.records, b.id);
    place_strings(p.lang, out.lang, b.records, b.lang);
    place_strings(p.where, out.where, b.records, b.where);
    place_strings(p.role, out.role, b.turns, b.role);
    place_strings(p.content, out.content, b.turns, b.content);
    parts[t] = RecordColumns();  // its memory goes as soon as it is copied
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// record_texts

namespace {

void check_offsets(const int64_t* offsets, int64_t count, int64_t limit, const char* name, const char* limit_name) {
  MLMIX_CHECK(offsets[0] >= 0, name << "[0] must be >= 0, got " << offsets[0]);
  for (int64_t i = 0; i < count; ++i)
    MLMIX_CHECK(offsets[i] <= offsets[i + 1], name << " must not decrease (at " << i + 1 << ")");
  MLMIX_CHECK(offsets[count] <= limit,
              name << "[-1] = " << offsets[count] << " exceeds " << limit_name << " (" << limit << ")");
}

constexpr std::string_view kSystemRole = "system";

// The output of taking `rows` of a column (`count` strings of `itemsize`-byte items, offsets and itemsize
// already checked by the caller): its offsets, and its values sized (to be filled by the caller). Throws
// std::invalid_argument on a negative row count or a row out of range.
StringColumn sized_take(const int64_t* offsets, int64_t count, const int64_t* rows, int64_t n_rows, int64_t itemsize) {
  MLMIX_CHECK(n_rows >= 0, "negative size");
  StringColumn out;
  out.offsets.resize(static_cast<size_t>(n_rows) + 1);
  out.offsets[0] = 0;
  for (int64_t j = 0; j < n_rows; ++j) {
    const int64_t r = rows[j];
    MLMIX_CHECK(r >= 0 && r < count, "rows[" << j << "] = " << r << " is out of range [0, " << count << ")");
    out.offsets[static_cast<size_t>(j) + 1] = out.offsets[static_cast<size_t>(j)] + (offsets[r + 1] - offsets[r]);
  }
  reserve_huge(out.values, static_cast<size_t>(out.offsets.back() * itemsize));
  out.values.resize(static_cast<size_t>(out.offsets.back() * itemsize));
  return out;
}

}  // namespace

StringColumn take_strings(const uint8_t* values, int64_t value_bytes, const int64_t* offsets, int64_t count,
                          const int64_t* rows, int64_t n_rows, int64_t itemsize) {
  MLMIX_CHECK(count >= 0 && value_bytes >= 0, "negative size");
  MLMIX_CHECK(itemsize == 1 || itemsize == 2 || itemsize == 4 || itemsize == 8,
              "itemsize must be 1, 2, 4 or 8, got " << itemsize);
  MLMIX_CHECK(value_bytes % itemsize == 0, "the size of values (" << value_bytes << " bytes) is not a multiple of "
                                                                   << "itemsize " << itemsize);
  check_offsets(offsets, count, value_bytes / itemsize, "offsets", "the number of values");
  StringColumn out = sized_take(offsets, count, rows, n_rows, itemsize);
  for (int64_t j = 0; j < n_rows; ++j) {
    const int64_t r = rows[j], n = offsets[r + 1] - offsets[r];
    if (n > 0) std::memcpy(out.values.data() + out.offsets[static_cast<size_t>(j)] * itemsize,
                           values + offsets[r] * itemsize, static_cast<size_t>(n * itemsize));
  }
  return out;
}

namespace {

// `file_items` items of `itemsize` bytes in the open regular file fd from byte `base` (checked against its
// size once), read with pread.
class FileItems {
 public:
  FileItems(int fd, int64_t base, int64_t file_items, int64_t itemsize)
      : fd_(fd), base_(base), items_(file_items), itemsize_(itemsize) {
    MLMIX_CHECK(file_items >= 0 && base >= 0, "negative size or offset");
    MLMIX_CHECK(itemsize == 1 || itemsize == 2 || itemsize == 4 || itemsize == 8,
                "itemsize must be 1, 2, 4 or 8, got " << itemsize);
    struct stat st {};
    if (::fstat(fd, &st) != 0) throw std::runtime_error(std::string("fstat failed: ") + std::strerror(errno));
    MLMIX_CHECK(S_ISREG(st.st_mode), "fd " << fd << " is not a regular file");
    MLMIX_CHECK(file_items <= (static_cast<int64_t>(st.st_size) - std::min<int64_t>(base, st.st_size)) / itemsize,
                "the file holds " << st.st_size << " bytes: fewer than " << file_items << " items of " << itemsize
                                  << " bytes from byte " << base);
  }
  int64_t items() const { return items_; }
  // items [item, item + count) (in range: checked by the caller) to dst
  void read(int64_t item, int64_t count, uint8_t* dst) const {
    const int64_t want = count * itemsize_, at = base_ + item * itemsize_;
    for (int64_t done = 0; done < want;) {
      const ssize_t got = ::pread(fd_, dst + done, static_cast<size_t>(want - done), static_cast<off_t>(at + done));
      if (got < 0 && errno == EINTR) continue;
      if (got < 0) throw std::runtime_error(std::string("pread failed: ") + std::strerror(errno));
      if (got == 0) throw std::runtime_error("the file ends at byte " + std::to_string(at + done) +
                                             ", before the " + std::to_string(want) + " bytes asked from byte " +
                                             std::to_string(at));
      done += got;
    }
  }

 private:
  int fd_;
  int64_t base_, items_, itemsize_;
};

}  // namespace

StringColumn read_strings(int fd, int64_t base, int64_t file_items, const int64_t* offsets, int64_t count,
                          const int64_t* rows, int64_t n_rows, int64_t itemsize) {
  MLMIX_CHECK(count >= 0, "negative size or offset");
  const FileItems file(fd, base, file_items, itemsize);
  check_offsets(offsets, count, file_items, "offsets", "the number of values in the file");
  StringColumn out = sized_take(offsets, count, rows, n_rows, itemsize);
  // one read per run of rows that follow each other in the file as in the output
  for (int64_t j = 0; j < n_rows;) {
    int64_t k = j + 1;
    while (k < n_rows && offsets[rows[k]] == offsets[rows[k - 1] + 1]) ++k;
    const int64_t first = offsets[rows[j]], items = offsets[rows[k - 1] + 1] - first;
    if (items > 0) file.read(first, items, out.values.data() + out.offsets[static_cast<size_t>(j)] * itemsize);
    j = k;
  }
  return out;
}

std::vector<uint8_t> read_spans(int fd, int64_t base, int64_t file_items, const int64_t* starts,
                                const int64_t* lengths, int64_t n_spans, int64_t itemsize) {
  MLMIX_CHECK(n_spans >= 0, "negative number of spans");
  const FileItems file(fd, base, file_items, itemsize);
  int64_t total = 0;
  for (int64_t k = 0; k < n_spans; ++k) {
    MLMIX_CHECK(starts[k] >= 0 && lengths[k] >= 0 && starts[k] <= file_items && lengths[k] <= file_items - starts[k],
                "span " << k << " (items " << starts[k] << " + " << lengths[k] << ") is not within the "
                        << file_items << " items of the file");
    MLMIX_CHECK(lengths[k] <= std::numeric_limits<int64_t>::max() / itemsize - total,
                "the spans hold more than " << std::numeric_limits<int64_t>::max() / itemsize << " items");
    total += lengths[k];
  }
  std::vector<uint8_t> out(static_cast<size_t>(total * itemsize));
  // one read per run of spans that follow each other in the file as in the output
  int64_t at = 0;
  for (int64_t j = 0; j < n_spans;) {
    int64_t k = j + 1, items = lengths[j];
    while (k < n_spans && starts[k] == starts[k - 1] + lengths[k - 1]) items += lengths[k++];
    if (items > 0) file.read(starts[j], items, out.data() + at * itemsize);
    at += items;
    j = k;
  }
  return out;
}

StringColumn record_texts(const RecordTextsInput& in, int num_threads) {
  MLMIX_CHECK(in.count >= 0 && in.turns >= 0, "negative count");
  check_offsets(in.turn_offsets, in.count, in.turns, "turn_offsets", "the number of turns");
  check_offsets(in.role_offsets, in.turns, in.role_bytes, "role_offsets", "the size of role_values");
  check_offsets(in.content_offsets, in.turns, in.content_bytes, "content_offsets", "the size of content_values");
  for (int64_t i = 0; i < in.count; ++i) {
    MLMIX_CHECK(in.kind[i] == kText || in.kind[i] == kChat, "kind[" << i << "] must be 0 (text) or 1 (chat), got "
                                                                    << static_cast<int>(in.kind[i]));
    MLMIX_CHECK(in.kind[i] != kText || in.turn_offsets[i + 1] - in.turn_offsets[i] == 1,
                "record " << i << " is a text record but has " << in.turn_offsets[i + 1] - in.turn_offsets[i]
                          << " turns (it must have 1)");
  }
  auto is_system = [&](int64_t t) {
    const int64_t a = in.role_offsets[t], b = in.role_offsets[t + 1];
    return b - a == static_cast<int64_t>(kSystemRole.size()) &&
           std::memcmp(in.role_values + a, kSystemRole.data(), kSystemRole.size()) == 0;
  };
  auto content_size = [&](int64_t t) { return in.content_offsets[t + 1] - in.content_offsets[t]; };

  StringColumn out;
  out.offsets.assign(static_cast<size_t>(in.count) + 1, 0);
  const int threads = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>(resolve_threads(num_threads), in.count / 4096)));
  auto range = [&](int t) {
    return std::pair<int64_t, int64_t>{in.count * t / threads, in.count * (t + 1) / threads};
  };
  // sizes
  run_threads(threads, [&](int t) {
    const auto [lo, hi] = range(t);
    for (int64_t i = lo; i < hi; ++i) {
      int64_t n = 0;
      if (in.kind[i] == kText) {
        n = content_size(in.turn_offsets[i]);
      } else {
        int64_t parts = 0;
        for (int64_t k = in.turn_offsets[i]; k < in.turn_offsets[i + 1]; ++k) {
          if (is_system(k)) continue;
          n += content_size(k) + (parts++ > 0 ? 1 : 0);
        }
      }
      out.offsets[static_cast<size_t>(i) + 1] = n;
    }
  });
  for (size_t i = 1; i < out.offsets.size(); ++i) out.offsets[i] += out.offsets[i - 1];
  reserve_huge(out.values, static_cast<size_t>(out.offsets.back()));
  out.values.resize(static_cast<size_t>(out.offsets.back()));
  // bytes
  run_threads(threads, [&](int t) {
    const auto [lo, hi] = range(t);
    for (int64_t i = lo; i < hi; ++i) {
      uint8_t* dst = out.values.data() + out.offsets[static_cast<size_t>(i)];
      bool first_part = true;
      for (int64_t k = in.turn_offsets[i]; k < in.turn_offsets[i + 1]; ++k) {
        if (in.kind[i] == kChat && is_system(k)) continue;
        if (!first_part) *dst++ = '\n';
        first_part = false;
        const int64_t n = content_size(k);
        if (n > 0) std::memcpy(dst, in.content_values + in.content_offsets[k], static_cast<size_t>(n));
        dst += n;
      }
    }
  });
  return out;
}

}  // namespace mlmix::records
