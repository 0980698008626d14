// Pre-tokenizers of the byte-level BPE families, as hand-written scanners over code points.
//
// Each scanner reproduces, match for match, what HF tokenizers' Oniguruma regex finds for one known
// pattern (Split(pattern, Isolated) or ByteLevel(use_regex=True)); the character classes come from
// csrc/unicode_data.h (Unicode 16.0, the version the onig crate in tokenizers 0.23 uses). No Python here.
#pragma once

#include <cstddef>
#include <cstdint>

#include "unicode_data.h"

namespace mlmix::bpe {

// The recognised pre-tokenizer patterns (python/mlmix/bpe.py maps pattern strings to these).
enum class PreTokenizer : int {
  // 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
  kGpt2 = 0,
  // (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
  kLlama3 = 1,
  // as kLlama3 with \p{N} (one digit per piece): Qwen, Qwen2, Qwen3
  kQwen2 = 2,
  // as kQwen2 with marks joining letters: [^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+ and [^\s\p{L}\p{M}\p{N}]: Qwen3.5/3.6
  kQwen35 = 3,
  // cl100k_base's tiktoken spelling as Oniguruma reads it: kLlama3's grammar, but `\p{N}{1,3}+` is not
  // possessive in Oniguruma's Ruby syntax, it repeats the group: (?:\p{N}{1,3})+ takes a whole digit run
  // (tiktoken itself cuts runs into threes, so its ids differ from HF's on numbers of 4+ digits)
  kCl100kOnig = 4,
  // o200k_base: [^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?
  //   |[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?
  //   |\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+
  kO200k = 5,
};

namespace detail {
inline bool is_crlf(uint32_t c) { return c == '\r' || c == '\n'; }
inline bool has(uint32_t c, uint8_t bits) { return (unicode::classes(c) & bits) != 0; }

// Case-insensitive contraction letters as Oniguruma folds them: only 's' has a non-ASCII partner (U+017F).
inline uint32_t fold_contraction_letter(uint32_t c) {
  if (c >= 'A' && c <= 'Z') return c + 32;
  if (c == 0x017F) return 's';
  return c;
}

// Length of the contraction starting at s[i] == '\'' (0 if none). `fold` gives (?i:...) semantics.
template <typename CU>
inline size_t contraction(const CU* s, size_t i, size_t n, bool fold) {
  if (i + 1 >= n) return 0;
  uint32_t a = s[i + 1];
  if (fold) a = fold_contraction_letter(a);
  if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
  if (i + 2 >= n) return 0;
  uint32_t b = s[i + 2];
  if (fold) b = fold_contraction_letter(b);
  if ((a == 'r' || a == 'v') && b == 'e') return 3;
  if (a == 'l' && b == 'l') return 3;
  return 0;
}

template <typename CU>
inline size_t run_end(const CU* s, size_t i, size_t n, uint8_t bits) {
  while (i < n && has(s[i], bits)) ++i;
  return i;
}

// \s+(?!\S)|\s+ at a whitespace character s[i]: the run, less its last character when a non-space follows.
template <typename CU>
inline size_t whitespace_tail(const CU* s, size_t i, size_t n) {
  size_t e = run_end(s, i, n, unicode::kWhitespace);
  if (e == n) return e - i;
  return e - i >= 2 ? e - 1 - i : 1;
}

template <typename CU>
inline size_t match_gpt2(const CU* s, size_t i, size_t n) {
  using namespace unicode;
  const uint32_t c = s[i];
  if (c == '\'') {
    if (size_t m = contraction(s, i, n, false)) return m;
  }
  const bool space_then = c == ' ' && i + 1 < n;
  const uint32_t c1 = space_then ? s[i + 1] : 0;
  const uint8_t cls = classes(c);
  // ' ?\p{L}+', ' ?\p{N}+'
  for (uint8_t bits : {kLetter, kNumber}) {
    if (space_then && has(c1, bits)) return run_end(s, i + 1, n, bits) - i;
    if (cls & bits) return run_end(s, i, n, bits) - i;
  }
  // ' ?[^\s\p{L}\p{N}]+'
  constexpr uint8_t kNotOther = kWhitespace | kLetter | kNumber;
  auto other = [&](uint32_t x) { return (classes(x) & kNotOther) == 0; };
  size_t j = space_then && other(c1) ? i + 1 : i;
  if (other(s[j])) {
    while (j < n && other(s[j])) ++j;
    return j - i;
  }
  return whitespace_tail(s, i, n);  // c is whitespace: every other class was tried
}

// \s*[\r\n]+|\s+(?!\S)|\s+ at a whitespace character s[i]: the run up to and including its last \r or \n,
// else whitespace_tail.
template <typename CU>
inline size_t whitespace_newlines(const CU* s, size_t i, size_t n) {
  const size_t e = run_end(s, i, n, unicode::kWhitespace);
  for (size_t k = e; k > i; --k) {
    if (is_crlf(s[k - 1])) return k - i;
  }
  return whitespace_tail(s, i, n);
}

template <typename CU>
inline size_t match_llama3(const CU* s, size_t i, size_t n, size_t max_digits, bool marks) {
  using namespace unicode;
  const uint32_t c = s[i];
  if (c == '\'') {
    if (size_t m = contraction(s, i, n, true)) return m;
  }
  const uint8_t cls = classes(c);
  // [^\r\n\p{L}\p{N}]?\p{L}+   (Qwen3.5: [^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+)
  const uint8_t body = marks ? (kLetter | kMark) : kLetter;
  const bool may_lead = !is_crlf(c) && (cls & (kLetter | kNumber)) == 0;
  if (may_lead && i + 1 < n && has(s[i + 1], body)) return run_end(s, i + 1, n, body) - i;
  if (cls & body) return run_end(s, i, n, body) - i;
  // \p{N}{1,3}  or  \p{N}
  if (cls & kNumber) {
    size_t j = i + 1;
    while (j < n && j - i < max_digits && has(s[j], kNumber)) ++j;
    return j - i;
  }
  //  ?[^\s\p{L}\p{N}]+[\r\n]*   (Qwen3.5: [^\s\p{L}\p{M}\p{N}])
  const uint8_t not_other = kWhitespace | kLetter | kNumber | (marks ? kMark : 0);
  auto other = [&](uint32_t x) { return (classes(x) & not_other) == 0; };
  size_t j = (c == ' ' && i + 1 < n && other(s[i + 1])) ? i + 1 : i;
  if (other(s[j])) {
    while (j < n && other(s[j])) ++j;
    while (j < n && is_crlf(s[j])) ++j;
    return j - i;
  }
  // c is whitespace now. \s*[\r\n]+ : the whitespace run up to and including its last \r or \n.
  return whitespace_newlines(s, i, n);
}

// o200k's two letter classes: "upper" [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}], "lower" [\p{Ll}\p{Lm}\p{Lo}\p{M}] (Lm, Lo and
// marks are in both).
inline bool o200k_upper(uint8_t cls) {
  using namespace unicode;
  return (cls & (kMark | kUpper)) != 0 || ((cls & kLetter) != 0 && (cls & kLower) == 0);
}
inline bool o200k_lower(uint8_t cls) {
  using namespace unicode;
  return (cls & (kMark | kLower)) != 0 || ((cls & kLetter) != 0 && (cls & kUpper) == 0);
}

// upper* lower+ contraction? from s[j], backtracking as a regex engine does: the upper run gives back
// characters until a lower one can start the lower run. Returns the end, or 0 if no match (j < n).
template <typename CU>
inline size_t o200k_word_lower(const CU* s, size_t j, size_t n) {
  size_t u = j;
  while (u < n && o200k_upper(unicode::classes(s[u]))) ++u;
  size_t k = u;
  if (!(u < n && o200k_lower(unicode::classes(s[u])))) {
    // the last character of the upper run that is also lower (Lm, Lo, a mark); none: no match
    for (k = u; k > j && !o200k_lower(unicode::classes(s[k - 1])); --k) {
    }
    if (k == j) return 0;
    --k;
  }
  size_t e = k;
  while (e < n && o200k_lower(unicode::classes(s[e]))) ++e;
  return e + ((e < n && s[e] == '\'') ? contraction(s, e, n, true) : 0);
}

// upper+ lower* contraction? from s[j]; 0 if s[j] is not upper.
template <typename CU>
inline size_t o200k_word_upper(const CU* s, size_t j, size_t n) {
  size_t e = j;
  while (e < n && o200k_upper(unicode::classes(s[e]))) ++e;
  if (e == j) return 0;
  while (e < n && o200k_lower(unicode::classes(s[e]))) ++e;
  return e + ((e < n && s[e] == '\'') ? contraction(s, e, n, true) : 0);
}

template <typename CU>
inline size_t match_o200k(const CU* s, size_t i, size_t n) {
  using namespace unicode;
  const uint32_t c = s[i];
  const uint8_t cls = classes(c);
  // the optional [^\r\n\p{L}\p{N}] before either word form is tried first, then the word without it
  const bool may_lead = !is_crlf(c) && (cls & (kLetter | kNumber)) == 0 && i + 1 < n;
  if (may_lead) {
    if (size_t e = o200k_word_lower(s, i + 1, n)) return e - i;
  }
  if (size_t e = o200k_word_lower(s, i, n)) return e - i;
  if (may_lead) {
    if (size_t e = o200k_word_upper(s, i + 1, n)) return e - i;
  }
  if (size_t e = o200k_word_upper(s, i, n)) return e - i;
  // \p{N}{1,3}
  if (cls & kNumber) {
    size_t j = i + 1;
    while (j < n && j - i < 3 && has(s[j], kNumber)) ++j;
    return j - i;
  }
  //  ?[^\s\p{L}\p{N}]+[\r\n/]*
  constexpr uint8_t kNotOther = kWhitespace | kLetter | kNumber;
  auto other = [&](uint32_t x) { return (classes(x) & kNotOther) == 0; };
  size_t j = (c == ' ' && i + 1 < n && other(s[i + 1])) ? i + 1 : i;
  if (other(s[j])) {
    while (j < n && other(s[j])) ++j;
    while (j < n && (is_crlf(s[j]) || s[j] == '/')) ++j;
    return j - i;
  }
  return whitespace_newlines(s, i, n);
}
}  // namespace detail

// Length (in code units, >= 1) of the piece that starts at s[i], i < n.
template <typename CU>
inline size_t next_piece(PreTokenizer p, const CU* s, size_t i, size_t n) {
  switch (p) {
    case PreTokenizer::kGpt2:
      return detail::match_gpt2(s, i, n);
    case PreTokenizer::kLlama3:
      return detail::match_llama3(s, i, n, 3, false);
    case PreTokenizer::kQwen2:
      return detail::match_llama3(s, i, n, 1, false);
    case PreTokenizer::kQwen35:
      return detail::match_llama3(s, i, n, 1, true);
    case PreTokenizer::kCl100kOnig:
      return detail::match_llama3(s, i, n, SIZE_MAX, false);
    case PreTokenizer::kO200k:
      return detail::match_o200k(s, i, n);
  }
  return 1;
}

}  // namespace mlmix::bpe
