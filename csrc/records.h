// Canonical records (python/mlmix/readers.py's to_record) read from JSON lines straight into the columns of
// mlmix.recblock.RecordBlock, without a Python object per record. No Python here.
//
// The reader is a second implementation of `to_record(json.loads(line), ...)`, so it only keeps a line when it
// is sure to give exactly what the Python path gives: anything else (invalid UTF-8, JSON that Python's json
// accepts but RFC 8259 does not, such as NaN, lone surrogate escapes, ids that are not strings or ints, any
// row that makes to_record raise, ...) is "handed back": the reader reports the line's number and byte range
// and the caller runs the Python path on it, which raises the error Python raises, with its message.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace mlmix::records {

// A source's `records` setting.
enum class RecordFormat : uint8_t { kAuto, kMessages, kAlpaca, kPromptResponse, kText };

// RecordBlock's kind column.
inline constexpr uint8_t kText = 0;
inline constexpr uint8_t kChat = 1;

// The nesting the reader handles itself: readers.py refuses lines nested deeper than 512 levels.
inline constexpr int kMaxDepth = 512;

// One term of a source's `where` filter: the row's field `key` must equal (Python's ==) a value that is None, a
// str (`text`, UTF-8), an int (`text`: its decimal digits as Python's str() writes them) or a bool (`flag`).
// Values of other types (floats, lists, dicts) have no native test: the caller reads such sources in Python.
struct WhereTerm {
  enum class Kind : uint8_t { kNone, kString, kInt, kBool };
  std::string key;
  Kind kind = Kind::kNone;
  std::string text;
  bool flag = false;
};

// How a source's rows become records (to_record's `src`), with Python's defaults.
struct RecordOptions {
  RecordFormat format = RecordFormat::kAuto;
  // src["fields"]: canonical field -> the row's field name; absent keys are nullopt.
  std::optional<std::string> field_messages, field_role, field_content, field_system, field_instruction,
      field_input, field_output, field_prompt, field_response, field_text;
  // {**_DEFAULT_ROLES, **src["roles"]}: a message's role as written -> the canonical role.
  std::vector<std::pair<std::string, std::string>> roles;
  std::string id_field = "id";
  // Where the language comes from: the row's field `lang_field` (lang_from_field), else the fixed `lang`
  // (src["lang"]; nullopt for None).
  bool lang_from_field = true;
  std::string lang_field = "lang";
  std::optional<std::string> lang;
  // A row without an id gets id_prefix + its line number (readers.fallback_id); every record's `where` is
  // where_prefix + its line number ("path:" for "path:17").
  std::string id_prefix;
  std::string where_prefix;
  // The source's filter (readers.iter_source's _matches): a row failing a term is skipped as a blank line is (it
  // gives no record and is not handed back); a row where a term needs Python to decide (a float field compared
  // with an int or a bool) is handed back, and the caller applies the filter to it.
  std::vector<WhereTerm> where;
  // Lines nested deeper than this are handed back (at most kMaxDepth; the caller lowers it where Python's
  // recursion limit would stop json.loads first).
  int max_depth = kMaxDepth;
  // Worker threads: 0 = resolve_threads(0) (MLMIX_NUM_THREADS, else the hardware's). The output does not
  // depend on it.
  int num_threads = 0;
};

// A column of strings: UTF-8 bytes and count + 1 offsets (the first 0).
struct StringColumn {
  std::vector<uint8_t> values;
  std::vector<int64_t> offsets{0};
  size_t size() const { return offsets.size() - 1; }
};

// RecordBlock's columns for the lines the reader kept, in line order, plus the lines it handed back.
struct RecordColumns {
  std::vector<uint8_t> kind;
  std::vector<uint8_t> has_lang;
  std::vector<int64_t> turn_offsets{0};
  StringColumn id, lang, where, role, content;
  std::vector<int64_t> line;  // each record's line number
  // The lines handed back, in order: line number and byte range [begin, end) in the buffer (with its "\n").
  std::vector<int64_t> handback_line, handback_begin, handback_end;
  int64_t lines = 0;  // lines read (blank and handed back ones included)
  size_t size() const { return kind.size(); }
};

// Reads `size` bytes of whole JSON lines (split at "\n" only, as Python's binary line iteration does; the last
// line may lack its "\n"); the first line has number `first_line`. Blank lines (only whitespace that Python's
// str.strip() removes, ASCII) and rows the `where` filter drops give nothing; every other line gives one record
// or is handed back.
RecordColumns read_json_lines(const uint8_t* data, size_t size, int64_t first_line, const RecordOptions& options);

// The text of each record of a RecordBlock (readers.record_text): a text record's one turn, a chat record's
// non-system contents joined by "\n". Throws std::invalid_argument on inconsistent columns.
struct RecordTextsInput {
  int64_t count = 0;  // records
  const uint8_t* kind = nullptr;
  const int64_t* turn_offsets = nullptr;  // count + 1
  int64_t turns = 0;
  const uint8_t* role_values = nullptr;
  int64_t role_bytes = 0;
  const int64_t* role_offsets = nullptr;  // turns + 1
  const uint8_t* content_values = nullptr;
  int64_t content_bytes = 0;
  const int64_t* content_offsets = nullptr;  // turns + 1
};
StringColumn record_texts(const RecordTextsInput& in, int num_threads = 0);

// The strings at `rows` (in that order) of a string column (values, offsets: `count` + 1 entries): what
// RecordBlock.take does to every string column. Throws std::invalid_argument on bad offsets or a row out of range.
StringColumn take_strings(const uint8_t* values, int64_t value_bytes, const int64_t* offsets, int64_t count,
                          const int64_t* rows, int64_t n_rows, int64_t itemsize = 1);

// take_strings of a column whose values are in a file (`fd`, from byte `base`, `file_items` items of `itemsize`
// bytes) instead of memory: one pread per run of consecutive rows, so nothing is mapped or faulted in.
// Throws std::invalid_argument on bad offsets or rows, std::runtime_error when a read fails or the file ends early.
StringColumn read_strings(int fd, int64_t base, int64_t file_items, const int64_t* offsets, int64_t count,
                          const int64_t* rows, int64_t n_rows, int64_t itemsize);

// The items [starts[k], starts[k] + lengths[k]) of each span k, end to end, of a file of `file_items` items of
// `itemsize` bytes in the open file fd from byte `base` (spans in any order, each checked to lie in the file),
// read with pread: one read per run of spans that follow each other in the file. Throws std::out_of_range on a
// bad span or size, std::runtime_error when a read fails.
std::vector<uint8_t> read_spans(int fd, int64_t base, int64_t file_items, const int64_t* starts,
                                const int64_t* lengths, int64_t n_spans, int64_t itemsize);

}  // namespace mlmix::records
