// Exact and near-duplicate detection over UTF-8 documents: normalisation (Unicode class tables,
// whitespace/punctuation collapsing, optional mark stripping), 128-bit exact hashes, MinHash
// signatures over word or character shingles, then the clustering phases -- exact-hash pairs, LSH
// band keys, bucket pairs, verification, connected components -- each callable alone (so that an
// executor can run them in separate blocks or processes) and composed by cluster_signatures.
// Plain C++ over pointers; no Python here. The input is raw UTF-8: NFKC (or NFKD), full case
// folding and the collapsing all happen here, from the tables of unicode_tables.h.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
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

// ---------------------------------------------------------------------------------------------
// Clustering phases. Documents are named by 64-bit ids (any int64, not necessarily 0..n-1) and a
// 64-bit group code (documents of different groups are never duplicates; e.g. a hash of the language
// when deduplicating per language, 0 for all). What a phase computes for a document depends only on
// that document's own data (signature row, hash, group, id), never on its position or on the batch it
// is computed in, so blocks computed apart can be concatenated and passed on together.

using DocPair = std::pair<int64_t, int64_t>;  // (first, second) document ids, first < second
using KeyedDoc = std::pair<uint64_t, int64_t>;  // (band key, document id): a row of the LSH table

// Buckets larger than this get a linear number of candidate pairs (each member with the bucket's
// first member and with its predecessor) instead of all pairs, so that a popular band value cannot
// make the candidate list quadratic.
inline constexpr int64_t kMaxBucketAllPairs = 128;

// Exact duplicates: documents with equal (group, hash). Ordered by (group as int64, hash[0], hash[1],
// id), each document after the first of a run of equal (group, hash) is paired with the one before it
// (a chain), in that order. hashes: count x 2; groups, ids: count entries or null (all 0; 0..count-1).
// Ids must be distinct (not checked here: cluster_signatures passes indices).
std::vector<DocPair> exact_pairs(const uint64_t* hashes, const int64_t* groups, const int64_t* ids, int64_t count);

// True unless the signature row is all 0xFFFFFFFF (a document without shingles).
bool has_shingles(const uint32_t* signature, int num_perm);

// The LSH key of band `band` of one signature row: a 64-bit hash of the band index, the group code and
// the row's values signature[band * rows, (band + 1) * rows). Keys of different bands or groups are
// different except by a 64-bit hash collision; bucket_pairs' groups make even those harmless.
uint64_t band_key(const uint32_t* signature, int band, int rows, uint64_t group);

// band_key of every band of `count` signature rows (count x num_perm): keys[i * bands + b]. A row
// without shingles gets has_keys[i] = 0 and keys 0, which mean nothing and must not be bucketed; other
// rows has_keys[i] = 1. groups: count codes or null (all 0). Needs bands * rows <= num_perm.
void band_keys(const uint32_t* signatures, int64_t count, int num_perm, const LshParams& lsh,
               const uint64_t* groups, int num_threads, uint64_t* keys, uint8_t* has_keys);

// Candidate pairs of LSH buckets. Sorts `rows` by (key, id) and drops repeated rows; rows of equal key
// form a bucket, whose members are ordered by id. A bucket of up to kMaxBucketAllPairs members gives all
// its pairs, a larger one each member with the first and with its predecessor. Pairs (first < second)
// are appended to `out`, bucket by bucket, possibly repeated across buckets.
void bucket_pairs(std::vector<KeyedDoc>& rows, std::vector<DocPair>& out);

// Sorts pairs and removes repeats.
void sort_unique_pairs(std::vector<DocPair>& pairs);

// bucket_pairs of `count` (keys[k], ids[k]) rows in any order, from any number of bands and buckets,
// sorted and unique. With `groups` (one code per row), a pair whose two documents' groups differ is
// dropped; a document given two different groups is an error (std::invalid_argument).
std::vector<DocPair> candidate_pairs(const uint64_t* keys, const int64_t* ids, const uint64_t* groups, int64_t count);

// Exact Jaccard similarity of two sorted, de-duplicated sets (0 when both are empty).
double jaccard(const uint64_t* x, int64_t nx, const uint64_t* y, int64_t ny);

// The fraction of equal entries of two signature rows: MinHash's estimate of their Jaccard similarity.
double signature_agreement(const uint32_t* x, const uint32_t* y, int num_perm);

// Document ids -> rows 0..count-1 of the arrays that describe them (ids[r] is row r's id; null ids:
// row r is document r). Throws std::invalid_argument, naming `what`, when an id repeats. The index
// keeps `ids` (not a copy): they must outlive it.
class DocIndex {
 public:
  DocIndex(const int64_t* ids, int64_t count, const char* what = "ids");
  int64_t count() const { return count_; }
  bool identity() const { return ids_ == nullptr; }  // row r is document r
  int64_t id(int64_t row) const { return ids_ ? ids_[row] : row; }
  // The row of document `id`, or -1.
  int64_t row(int64_t id) const;
  // The rows in ascending order of their ids.
  std::vector<int64_t> rows_by_id() const;

 private:
  const int64_t* ids_ = nullptr;
  int64_t count_ = 0;
  std::vector<std::pair<int64_t, int64_t>> sorted_;  // (id, row) by id; empty without ids
};

// Checks that `count` sets stored as values[offsets[r], offsets[r + 1]) (count + 1 offsets) are a valid
// partition of n_values values and that each set is sorted strictly ascending, as shingle_sets gives
// them (jaccard's merge relies on it); throws std::invalid_argument naming `what` and the first bad row.
void check_sets(const uint64_t* values, int64_t n_values, const int64_t* offsets, int64_t count, const char* what);

// Similarity of each pair (ids of `index`; a pair naming another id is an std::invalid_argument that
// names `what`): the exact Jaccard of the two rows' sets (row r's sorted unique values are
// values[offsets[r], offsets[r + 1]); call check_sets first) ...
void verify_pairs_by_sets(const DocPair* pairs, int64_t count, const DocIndex& index, const uint64_t* values,
                          const int64_t* offsets, int num_threads, double* similarity, const char* what = "pairs");
// ... or the agreement of their signature rows (index.count() x num_perm).
void verify_pairs_by_signatures(const DocPair* pairs, int64_t count, const DocIndex& index,
                                const uint32_t* signatures, int num_perm, int num_threads, double* similarity,
                                const char* what = "pairs");

// Connected components of the documents of `index` linked by `pairs` (ids of the index), and the
// document kept for each: the one with the highest score (scores: one per row, finite, or null),
// ties to the smallest id. Returns, per row, the id of its component's kept document.
std::vector<int64_t> connected_components(const DocIndex& index, const DocPair* pairs, int64_t count,
                                          const double* scores, const char* what = "pairs");

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

// The phases above composed over documents 0..count-1: exact_pairs (with hashes), band keys of the
// documents that are neither exact duplicates of an earlier one nor without shingles, bucket pairs
// band by band, the group filter, verification (exact Jaccard with texts or shingle sets, else the
// signature agreement; with verify=false every candidate is kept with similarity 1), connected
// components of exact and kept pairs, and the keep choice. Rows of all 0xFFFFFFFF (documents with no
// shingles) take part in exact merging only.
ClusterResult cluster_signatures(const ClusterInputs& in, const ClusterOptions& opts);

}  // namespace mlmix::dedup
