// Exact and near-duplicate detection over UTF-8 documents: normalisation (Unicode class tables,
// whitespace/punctuation collapsing, optional mark stripping), 128-bit exact hashes, MinHash
// signatures over word or character shingles, LSH banding, verification and union-find clustering.
// Plain C++ over pointers; no Python here. The input is raw UTF-8: NFKC (or NFKD), full case
// folding and the collapsing all happen here, from the tables of unicode_tables.h.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common.h"

namespace mlmix::dedup {

enum class Utf8Errors : int { kReplace = 0, kStrict = 1 };
enum class ShingleMode : int { kAuto = 0, kWord = 1, kChar = 2 };

// `count` documents, either UTF-8 in one buffer -- document i is the bytes data[offsets[i],
// offsets[i+1]), offsets has count + 1 non-decreasing entries starting at 0 -- or, when `views` is
// set, document i is views[i], read in place (a Python str's code units, or UTF-8 bytes). In
// str code units, a lone surrogate is invalid input like invalid UTF-8: errors='replace' reads it
// as the three U+FFFD that its UTF-8 form (surrogatepass) gives, so both inputs agree.
struct TextSpan {
  const uint8_t* data = nullptr;
  const int64_t* offsets = nullptr;
  int64_t count = 0;
  const TextView* views = nullptr;

  TextView doc(int64_t i) const {
    return views ? views[i] : TextView{data + offsets[i], offsets[i + 1] - offsets[i], 0};
  }
};

struct NormalizeOptions {
  bool strip_marks = false;  // drop nonspacing and enclosing marks (Mn, Me): diacritics
  Utf8Errors errors = Utf8Errors::kReplace;
};

struct MinHashOptions {
  int num_perm = 128;
  int ngram = 5;  // words per shingle (word mode) or code points per shingle (char mode)
  ShingleMode mode = ShingleMode::kAuto;
  uint64_t seed = 0;
  NormalizeOptions normalize;
};

// Throws std::invalid_argument when offsets are not a valid partition of the data, or a view is
// malformed (width not 0, 1, 2 or 4, negative length, null data).
void check_texts(const TextSpan& texts);

// Size in bytes of each document's UTF-8 form, as given (not normalised; a lone surrogate of a str
// counts the 3 bytes of its surrogatepass encoding), into out[0..count).
void utf8_sizes(const TextSpan& texts, int64_t* out);

// The Unicode version the class tables were generated from.
const char* unicode_version();

// Normalised UTF-8 of every document: separators (whitespace, punctuation, Sm/Sc/Sk symbols,
// controls) collapse to one U+0020, none leading or trailing; format characters (Cf) are dropped;
// marks (Mn, Me) are dropped when strip_marks. out_offsets gets count + 1 entries.
void normalize_texts(const TextSpan& texts, const NormalizeOptions& opts, int num_threads,
                     std::vector<uint8_t>& out, std::vector<int64_t>& out_offsets);

// 128-bit hash of each normalised document into out[2 * i], out[2 * i + 1].
void exact_hashes(const TextSpan& texts, const NormalizeOptions& opts, int num_threads,
                  uint64_t* out);

// Sorted unique shingle hashes of many documents, stored flat, one buffer per `grain` consecutive
// documents (each filled by one thread, no allocation per document): document i's set is
// blocks[i / grain][start, ends[i]) with start = ends[i - 1] within the same block, else 0.
struct ShingleSets {
  int64_t grain = 16;
  std::vector<std::vector<uint64_t>> blocks;
  std::vector<int64_t> ends;  // one per document; empty when no sets are held

  int64_t count() const { return static_cast<int64_t>(ends.size()); }
  const uint64_t* data(int64_t i) const { return blocks[i / grain].data() + start(i); }
  int64_t size(int64_t i) const { return ends[i] - start(i); }

 private:
  int64_t start(int64_t i) const { return i % grain == 0 ? 0 : ends[i - 1]; }
};

// Outputs of minhash_signatures; every pointer but `signatures` may be null.
struct SignatureOutputs {
  uint32_t* signatures = nullptr;  // count x num_perm, row-major; all 0xFFFFFFFF for no shingles
  uint64_t* hashes = nullptr;      // count x 2: the exact hash of the normalised text
  int64_t* lengths = nullptr;      // normalised length in code points
  uint8_t* char_mode = nullptr;    // 1 where the document was shingled by characters
  // Optional: each document's sorted unique 64-bit shingle hashes (what verification compares),
  // kept while their total stays within shingle_set_budget entries; over it, left empty.
  ShingleSets* shingle_sets = nullptr;
  int64_t shingle_set_budget = 0;
};

void minhash_signatures(const TextSpan& texts, const MinHashOptions& opts, int num_threads,
                        const SignatureOutputs& out);

// Sorted, de-duplicated 64-bit shingle hashes of one document (the set MinHash estimates).
std::vector<uint64_t> shingle_set(const TextView& doc, const MinHashOptions& opts, int64_t doc_index);

// shingle_set of every document, concatenated: document i's sorted unique hashes are
// values[offsets[i], offsets[i + 1]). offsets gets count + 1 entries.
void shingle_sets(const TextSpan& texts, const MinHashOptions& opts, int num_threads,
                  std::vector<uint64_t>& values, std::vector<int64_t>& offsets);

struct LshParams {
  int bands = 0;
  int rows = 0;
};

// Bands x rows (bands * rows <= num_perm) minimising fp_weight * (area of false positives below
// the threshold) + fn_weight * (area of false negatives above it) of the S-curve 1 - (1 - s^r)^b.
LshParams optimal_lsh_params(double threshold, int num_perm, double fp_weight, double fn_weight);

struct ClusterInputs {
  int64_t count = 0;
  int num_perm = 0;
  const uint32_t* signatures = nullptr;  // count x num_perm
  const uint64_t* hashes = nullptr;      // count x 2 or null: equal hashes are merged first
  const int64_t* groups = nullptr;       // or null: documents of different groups never merge
  const double* scores = nullptr;        // or null: each cluster keeps its highest score, ties
                                         // (and null) keep the lowest index
  const TextSpan* texts = nullptr;       // with `minhash`: verify candidates by exact Jaccard
  const MinHashOptions* minhash = nullptr;
  // Or the shingle sets themselves (count entries), from minhash_signatures.
  const ShingleSets* shingle_sets = nullptr;
};

struct ClusterOptions {
  double threshold = 0.8;
  LshParams lsh;
  bool verify = true;  // false: every LSH candidate pair is a duplicate
  int num_threads = 0;
};

struct ClusterResult {
  std::vector<int64_t> cluster;  // per document: index of the kept document of its cluster
  // Duplicate edges (first < second): exact-hash merges (similarity 1) then verified LSH pairs.
  std::vector<int64_t> pair_first, pair_second;
  std::vector<double> pair_similarity;  // exact Jaccard (texts given) or signature agreement
  int64_t candidate_pairs = 0;          // distinct LSH candidate pairs before verification
  int64_t exact_merged = 0;             // documents merged by equal exact hashes
};

// LSH over the signatures, verification, union-find and the keep choice. Without texts and
// verify, a candidate is kept when the fraction of equal signature entries >= threshold.
// Rows of all 0xFFFFFFFF (documents with no shingles) take part in exact merging only.
ClusterResult cluster_signatures(const ClusterInputs& in, const ClusterOptions& opts);

}  // namespace mlmix::dedup
