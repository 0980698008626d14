// Language identification: a native port of py3langid's classifier (byte n-gram features found by a
// DFA, multinomial naive Bayes, normalised probabilities). No Python here: the model's arrays and the
// Unicode facts the text preparation needs are borrowed from the caller (mlmix.langid builds them
// from py3langid's own model file and from Python's unicodedata, so both always match the reference).
//
// What one text goes through, as mlmix.langid's py3langid wrapper does it:
//   1. a text whose every code point is Python whitespace (str.isspace) is "empty": label -1, p = 0;
//   2. it is cut to its first `max_chars` code points;
//   3. py3langid's _encode: lower-cased if str.isupper(), NFC-normalised, UTF-8 (surrogatepass);
//   4. the DFA's feature counts, then scores log1p(count) . ptc + pc (pc left out when there is no
//      feature), times 1 / sqrt(bytes), softmax, columns sharing a label summed, argmax.
// Step 3 is done natively only where it changes nothing (the cut is not all upper case, and is NFC
// by the quick check of UAX #15, where a "maybe" counts only right after a starter that neither has a
// decomposition nor composes with it: after reordering, a composite's own marks could otherwise let
// the mark compose, as in U+1E0A U+0323 -> U+1E0C U+0307); any other text is reported
// with label kNeedsPrep, and the caller prepares its bytes with py3langid's own _encode and
// classifies them with `prepared` set (step 4 only, no checks).
//
// Arithmetic: a text's features are grouped by their count; within a group the fixed-point ptc rows
// are summed exactly in int32, and each group's sum times log1p(count) (float32) is a product of at
// most 24 + 29 significant bits for py3langid's model (|ptc| <= 7680 units, <= 65536 rows a block),
// exact in double; the few groups are summed in double in a fixed order. So a text's scores are its
// exact naive Bayes scores to ~1e-15 relative, whatever the thread count or CPU. py3langid sums the
// same products in float32 through the BLAS (in the order of OpenBLAS's kernel for the CPU), so its
// probabilities carry ~1e-7..2e-4 relative rounding that a correct sum cannot reproduce.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "common.h"

namespace mlmix::langid {

inline constexpr int32_t kEmpty = -1;      // the text is empty after str.strip()
inline constexpr int32_t kNeedsPrep = -2;  // the caller must prepare the bytes (see above)

// Bits of TextRules::flags, one byte per code point (as Python's unicodedata / str methods say).
inline constexpr uint8_t kSpace = 1;       // str.isspace()
inline constexpr uint8_t kUpper = 2;       // ch.isupper()
inline constexpr uint8_t kLowerOrTitle = 4;  // lower or title case: such a char makes str.isupper() False
inline constexpr uint8_t kNfcNo = 8;       // NFC_Quick_Check = No (NFC of the char alone differs)
inline constexpr uint8_t kNfcMaybe = 16;   // the second char of some primary composite
inline constexpr uint8_t kDecomposable = 32;  // has a canonical decomposition (Hangul syllables aside)

// The Unicode facts of text preparation, borrowed. flags and ccc have `size` entries (code points
// at or above `size` count as flags 0, ccc 0); pairs are sorted keys (first << 21) | second of the
// canonical compositions (Hangul excluded: it is algorithmic).
struct TextRules {
  const uint8_t* flags = nullptr;
  const uint8_t* ccc = nullptr;
  int64_t size = 0;
  const uint64_t* pairs = nullptr;
  int64_t num_pairs = 0;
};

// A copy of a large table, 2 MiB aligned and backed by transparent huge pages where the OS allows
// (Linux, THP "madvise" or "always"): the DFA and the ptc rows are read at random places in tables of
// tens of MB, and with 4 KiB pages nearly every read would also miss the TLB.
class LargeBuffer {
 public:
  explicit LargeBuffer(size_t bytes);  // uninitialised
  LargeBuffer(const void* src, size_t bytes);
  ~LargeBuffer();
  LargeBuffer(const LargeBuffer&) = delete;
  LargeBuffer& operator=(const LargeBuffer&) = delete;
  const void* data() const { return data_; }
  void* data() { return data_; }

 private:
  void* base_ = nullptr;
  size_t mapped_ = 0;
  void* data_ = nullptr;
};

// The model, borrowed: py3langid's arrays.
struct Model {
  // DFA: state s moves on byte b to nextmove[(state_row[s] << 8) | b]; entering s emits feature
  // state_feature[s] when it is >= 0. State 0 is the start. (classify walks a Dfa built from these.)
  const uint32_t* nextmove = nullptr;
  int64_t num_rows = 0;  // nextmove has num_rows * 256 entries
  const uint32_t* state_row = nullptr;
  const int32_t* state_feature = nullptr;
  int64_t num_states = 0;
  // Naive Bayes: ptc (num_features x num_columns) in fixed point, the value being ptc[i] * ptc_unit
  // (py3langid's float16 table is exactly such a table: the caller picks the power of two), and pc.
  const int16_t* ptc = nullptr;
  double ptc_unit = 1.0;
  const float* pc = nullptr;
  int64_t num_features = 0;
  int64_t num_columns = 0;
  // log1p of a feature count as float32 (numpy's np.log1p on float32, what py3langid multiplies by);
  // counts at or beyond log1p_size use the float32 rounding of the double log1p.
  const float* log1p = nullptr;
  int64_t log1p_size = 0;
};

// Which columns take part (set_languages) and the label of each, labels numbered 0..num_labels-1 in
// the order of their first column (py3langid merges a label's columns into its first one).
// `ptc`, when not empty, is the model's table cut to the selected columns (num_features x columns.size()):
// scoring then reads and sums only those (a text's scores are the same integers either way).
struct Selection {
  std::vector<int32_t> columns;
  std::vector<int32_t> label;  // one per entry of columns
  int32_t num_labels = 0;
  std::vector<int16_t> ptc;
};

// Checks a model's shapes and contents (every index in range, ptc_unit a power of two); throws
// std::invalid_argument naming what is wrong. Walks the whole model once.
void check_model(const Model& m);
void check_rules(const TextRules& r);

// A model's DFA in the layout the walk reads: one entry per (row, byte) that holds both the next state's
// row and the feature entering it emits, so a step is one load where py3langid's arrays take three (the
// next state, then its row and its feature). The walks are chains of dependent loads into a table of tens
// of MB; a step's latency is the walk's speed. Entries are 32-bit, (feature + 1) * num_rows + row, where
// that fits (py3langid's model: 100,054 x 38,346 < 2^32) and num_rows >= 2, else 64-bit,
// (feature + 1) << 32 | row.
// Built from a model check_model accepts (it is called first: a bad model throws); owns its table, so the
// model's nextmove need not outlive it.
class Dfa {
 public:
  explicit Dfa(const Model& m, bool wide = false);  // wide: 64-bit entries even where 32 bits do (tests)
  bool narrow() const { return narrow_ != nullptr; }
  const uint32_t* narrow_table() const { return narrow_; }
  const uint64_t* wide_table() const { return wide_; }
  uint32_t rows() const { return rows_; }
  uint64_t magic() const { return magic_; }  // ceil(2^64 / rows): e / rows = mulhi(e, magic) for 32-bit e
  uint32_t start() const { return start_; }  // the start state's row

 private:
  std::optional<LargeBuffer> table_;
  const uint32_t* narrow_ = nullptr;
  const uint64_t* wide_ = nullptr;
  uint32_t rows_ = 0, start_ = 0;
  uint64_t magic_ = 0;
};

// A selection of `columns` (strictly increasing, in range) whose labels are `column_label[c]`. With `compact`,
// a selection of at most half the model's columns carries its own cut of the table (Selection::ptc): a few
// languages score several times faster.
Selection make_selection(const Model& m, const std::vector<int32_t>& columns, const int32_t* column_label,
                         bool compact = false);

// Texts: either UTF-8 (data + offsets, count + 1 entries) or views (TextView, str code units or UTF-8).
struct Texts {
  const uint8_t* data = nullptr;
  const int64_t* offsets = nullptr;
  int64_t count = 0;
  const TextView* views = nullptr;

  TextView doc(int64_t i) const {
    return views ? views[i] : TextView{data + offsets[i], offsets[i + 1] - offsets[i], 0};
  }
};

// Checks offsets (non-decreasing, starting at >= 0, within `data_size`).
void check_offsets(const int64_t* offsets, int64_t count, int64_t data_size);

struct Options {
  int64_t max_chars = 2000;  // the cut, in code points
  bool prepared = false;     // texts are already py3langid's bytes: no strip / cut / checks
  int num_threads = 0;       // common.h resolve_threads
};

// Label (index into the selection's labels, kEmpty or kNeedsPrep) and probability of every text into
// label[0..count), prob[0..count). UTF-8 that is not valid (as Python's strict decoder says) throws
// std::invalid_argument naming the lowest such text index. Deterministic: the output does not depend
// on the thread count.
// `dfa` must have been built from `m`; the overload without it builds one per call.
void classify(const Model& m, const Dfa& dfa, const Selection& sel, const TextRules& rules, const Texts& texts,
              const Options& opts, int32_t* label, double* prob);
void classify(const Model& m, const Selection& sel, const TextRules& rules, const Texts& texts,
              const Options& opts, int32_t* label, double* prob);

}  // namespace mlmix::langid
