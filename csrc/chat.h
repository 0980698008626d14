// Chat assembly over a whole block of canonical records (python/mlmix/recblock.py): the pieces of the fast
// chat templates (python/mlmix/chat.py: ChatML with an optional default system prompt, Llama-3 with an
// optional BOS), their TEXT pieces tokenised in one bpe::Encoder::encode_batch call, and tokens + loss masks
// assembled per record, byte-identical to Tokenizer.encode_records on the same records. No Python here.
//
// The work is split in steps so that the caller (csrc/bind_chat.cpp) can fill in, between them, what only
// the reference implementation knows: documents the encoder left unencoded (an NFC normalizer) and the
// untrained header's token count where a token straddles header and content and byte lengths cannot say.
//   1. plan():           validate the block and lay out every record's pieces (parallel over records);
//   2. encode():         Encoder::encode_batch over the plan's text pieces (parallel, deterministic);
//   3. header_counts():  per assistant (SPLIT) piece, how many tokens the untrained header holds, or -1;
//   4. assemble():       tokens and masks per record (parallel over records).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "bpe.h"

namespace mlmix::chat {

enum class Style : uint8_t { kChatML = 0, kLlama3 = 1 };
enum class TrainOn : uint8_t { kAllAssistant = 0, kLastAssistant = 1, kAll = 2 };
enum class TrainGlue : uint8_t { kNone = 0, kAfterTurn = 1, kAroundTurn = 2 };

// The fixed (pre-tokenised) pieces a template uses; each slot holds the ids of its string.
enum Slot : int {
  kImStart = 0,     // "<|im_start|>"
  kImEnd,           // "<|im_end|>"
  kNewline,         // "\n" after <|im_end|>
  kBos,             // Llama-3's bos string (empty slot: no BOS)
  kStartHeader,     // "<|start_header_id|>"
  kEndHeader,       // "<|end_header_id|>"
  kEot,             // "<|eot_id|>"
  kRoleSystem,      // "system", "user", "assistant" as Llama-3's fixed role pieces
  kRoleUser,
  kRoleAssistant,
  kEos,             // the id appended to text records (empty slot: none)
  kNumSlots
};

struct Spec {
  Style style = Style::kChatML;
  bool has_default_system = false;  // ChatML: a system prompt inserted when the first turn is not one
  std::string default_system;
  bool has_bos = false;             // Llama-3: the bos piece before the first turn
  std::vector<uint32_t> fixed[kNumSlots];
  std::string header;               // the untrained start of an assistant TEXT piece (ASCII)
  std::vector<uint32_t> header_ids; // its own tokens
  TrainOn train_on = TrainOn::kAllAssistant;
  TrainGlue train_glue = TrainGlue::kNone;
  int num_threads = 0;
};

// A RecordBlock's columns, read in place.
struct Block {
  int64_t n = 0;  // records
  const uint8_t* kind = nullptr;           // n: 0 text, else chat
  const int64_t* turn_offsets = nullptr;   // n + 1
  int64_t n_turns = 0;
  const uint8_t* role_values = nullptr;
  int64_t role_bytes = 0;
  const int64_t* role_offsets = nullptr;   // n_turns + 1
  const uint8_t* content_values = nullptr;
  int64_t content_bytes = 0;
  const int64_t* content_offsets = nullptr;  // n_turns + 1
};

// Why a block is left to the Python path (which then raises or skips exactly as it always did).
enum class Reject : int {
  kNone = 0,
  kBadShape,           // offsets out of order or out of range, a text record without exactly one turn
  kInvalidUtf8,        // a role or content that is not valid UTF-8 (to_records() would fail to decode it)
  kEmptyText,          // a text record with empty text
  kEmptyConversation,  // a chat record without turns
  kUnknownRole,        // a role other than system / user / assistant
  kNoAssistant,        // train_on != all and a conversation without an assistant turn
};
const char* reject_name(Reject r);

// Mask codes of a piece, as in python/mlmix/chat.py.
enum Code : uint8_t { kUntrained = 0, kTrained = 1, kSplit = 2, kGlue = 3 };

struct Piece {
  int64_t src;   // >= 0: index of a text piece; < 0: fixed slot -1 - src
  uint8_t code;  // Code
};

// Bytes left uninitialised when allocated (a plan fills every byte right after, in parallel: no serial
// zero-fill of a block's worth of text first).
class Bytes {
 public:
  void allocate(size_t n) {
    p_.reset(new char[n]);
    advise_huge_pages(p_.get(), n);
    n_ = n;
  }
  char* data() { return p_.get(); }
  const char* data() const { return p_.get(); }
  size_t size() const { return n_; }
  char operator[](size_t i) const { return p_[i]; }
  std::string substr(size_t pos, size_t len) const { return std::string(p_.get() + pos, len); }

 private:
  std::unique_ptr<char[]> p_;
  size_t n_ = 0;
};

struct Plan {
  Reject reject = Reject::kNone;
  int64_t reject_record = -1;          // the first record rejected (by position)
  Bytes arena;                         // the text pieces' bytes
  std::vector<int64_t> text_offsets;   // n_texts + 1 into arena
  FillVector<Piece> pieces;  // sized, then filled on the workers
  std::vector<int64_t> record_pieces;  // n + 1 into pieces
  int64_t n_texts() const { return static_cast<int64_t>(text_offsets.size()) - 1; }
};

// Index of the first string of a (values, offsets) column that is not valid UTF-8, -1 if none; -2 if the
// offsets are malformed.
int64_t first_invalid_utf8(const uint8_t* values, int64_t n_values, const int64_t* offsets, int64_t n_strings);

Plan plan(const Block& block, const Spec& spec);

// Encodes the plan's text pieces (no special tokens added around them), read in place from the arena: an
// ASCII piece as Latin-1 code units, any other as UTF-8, which the encoder checks and decodes as it goes
// and whose pieces' bytes it reads in place. Where the plan left the texts' UTF-8 to be checked here
// (ChatML, whose texts hold every content byte), a text that is not valid UTF-8 sets plan.reject to
// kInvalidUtf8 and nothing is encoded.
bpe::EncodeResult encode(const bpe::Encoder& encoder, Plan& plan, const Spec& spec);

// Replaces the tokens of documents `which` (ascending) by `values`/`offsets` (one run per document).
void replace_documents(bpe::EncodeResult& result, const std::vector<int64_t>& which, const uint32_t* values,
                       const int64_t* offsets);

// Per piece: for a SPLIT piece, the number of its tokens inside spec.header: the header's own ids when the
// tokens begin with them, else counted with `token_bytes` (byte length of each id) when given and the
// document is not in `inexact` (sorted indices of texts whose tokens do not spell their bytes), else -1
// (the caller counts them). 0 for other pieces.
std::vector<int64_t> header_counts(const Plan& plan, const bpe::EncodeResult& enc, const Spec& spec,
                                   const uint32_t* token_bytes, int64_t n_token_bytes,
                                   const std::vector<int64_t>& inexact);

struct Output {
  FillVector<uint32_t> tokens;  // sized, then filled on the workers
  FillVector<uint8_t> mask;
  std::vector<int64_t> offsets;  // n + 1
};

Output assemble(const Plan& plan, const bpe::EncodeResult& enc, const Spec& spec,
                const std::vector<int64_t>& head_counts);

}  // namespace mlmix::chat
