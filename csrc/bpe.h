// Byte-level BPE encoding with HF tokenizers' exact semantics, parallel over documents. No Python here.
//
// The pipeline for one document (each step mirrors tokenizers 0.23):
//   1. added tokens are split out of the raw text: first those with normalized=false, then, in the gaps,
//      those with normalized=true (there is no normalizer); leftmost-longest matching, lstrip/rstrip
//      widen a match over White_Space, `split_special_tokens` leaves special=true tokens in the text;
//   2. each remaining segment is cut by the pre-tokenizer scanner (csrc/pretokenize.h), after a leading
//      space is prepended when ByteLevel(add_prefix_space=true) asks for it;
//   3. each piece (its UTF-8 bytes) becomes ids: with ignore_merges a piece that is itself in the vocabulary
//      is one token, otherwise merges apply lowest rank first, leftmost among equal ranks;
//   4. the post-processor's fixed ids (e.g. a BOS) go before and after when add_special_tokens is set.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common.h"

#include "pretokenize.h"

namespace mlmix::bpe {

struct AddedToken {
  std::u32string content;  // code points
  uint32_t id = 0;
  bool special = false;
  bool lstrip = false;
  bool rstrip = false;
  bool normalized = false;
};

struct Config {
  PreTokenizer pre_tokenizer = PreTokenizer::kGpt2;
  bool add_prefix_space = false;  // ByteLevel(add_prefix_space=true)
  bool ignore_merges = false;     // model.ignore_merges
  // normalizer NFC: documents that the NFC quick check cannot prove normalized are not encoded but listed
  // in EncodeResult::unencoded, for the caller to encode with the reference implementation
  bool nfc = false;
  // Model vocabulary as raw bytes (byte-level characters already mapped back): token i is
  // vocab_bytes[vocab_offsets[i]:vocab_offsets[i + 1]] with id vocab_ids[i].
  std::string vocab_bytes;
  std::vector<int64_t> vocab_offsets;
  std::vector<uint32_t> vocab_ids;
  // Merges in rank order as (left id, right id); the merged token is the concatenation's id.
  std::vector<uint32_t> merges_left, merges_right;
  std::vector<AddedToken> added_tokens;
  std::vector<uint32_t> prefix_ids, suffix_ids;  // post-processor ids around each document
};

// Builds the model part of a Config from a tokenizer.json's ByteLevel strings (GPT-2's printable stand-ins
// for bytes): tokens that are not byte-level strings are left out (no merge of bytes can make them), as are
// merges that use them; a merge naming a token absent from the vocabulary throws std::invalid_argument.
void set_byte_level_model(Config& config, const std::vector<std::string>& vocab_tokens,
                          const std::vector<uint32_t>& vocab_ids, const std::vector<std::string>& merges_left,
                          const std::vector<std::string>& merges_right);

// One document: `len` code units of width 1 (Latin-1), 2 (UCS-2), 4 (UCS-4) or 0 (UTF-8 bytes).
using mlmix::TextView;

struct EncodeOptions {
  bool add_special_tokens = true;
  bool split_special_tokens = false;
  int num_threads = 0;  // 0: all cores (common.h resolve_threads)
  // a document that is not valid Unicode sets EncodeResult::first_invalid instead of throwing
  bool report_invalid = false;
};

// Token ids of all documents, flat, and int64 offsets (n + 1).
struct EncodeResult {
  FillVector<uint32_t> values;  // sized, then filled on the workers
  std::vector<int64_t> offsets;
  std::vector<int64_t> unencoded;  // ascending indices of documents left empty (Config::nfc), else empty
  int64_t first_invalid = -1;      // with EncodeOptions::report_invalid: the first document that is not valid
                                   // Unicode (the rest of the result is then not to be used), else -1
};

class Encoder {
 public:
  explicit Encoder(const Config& config);  // throws std::invalid_argument on an inconsistent vocabulary
  ~Encoder();
  Encoder(const Encoder&) = delete;
  Encoder& operator=(const Encoder&) = delete;

  // Encode documents in parallel. Throws std::invalid_argument naming the first bad document
  // (invalid UTF-8, a lone surrogate); the result does not depend on the number of threads.
  EncodeResult encode_batch(const std::vector<TextView>& docs, const EncodeOptions& options) const;

  size_t vocab_size() const;
  size_t num_merges() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace mlmix::bpe
