// pybind11 layer for the records reader (csrc/records.h): converts a source's settings, releases the GIL, calls
// the reader, hands the columns to numpy without copying.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <string>

#include "bind_convert.h"
#include "bindings.h"
#include "common.h"
#include "records.h"

namespace py = pybind11;

namespace mlmix::bind {
namespace {

using namespace mlmix::records;

RecordFormat format_of(const std::string& name) {
  if (name == "auto") return RecordFormat::kAuto;
  if (name == "messages") return RecordFormat::kMessages;
  if (name == "alpaca") return RecordFormat::kAlpaca;
  if (name == "prompt_response") return RecordFormat::kPromptResponse;
  if (name == "text") return RecordFormat::kText;
  throw py::value_error("records must be one of 'auto', 'messages', 'alpaca', 'prompt_response', 'text'; got '" +
                        name + "'");
}

std::string str_of(py::handle h, const std::string& what) {
  if (!PyUnicode_Check(h.ptr())) throw py::type_error(what + " must be a str, got " + Py_TYPE(h.ptr())->tp_name);
  return h.cast<std::string>();  // UnicodeEncodeError for a lone surrogate
}

void set_fields(RecordOptions& opt, const py::dict& fields) {
  struct Slot {
    const char* name;
    std::optional<std::string> RecordOptions::*member;
  };
  static const Slot slots[] = {
      {"messages", &RecordOptions::field_messages}, {"role", &RecordOptions::field_role},
      {"content", &RecordOptions::field_content},   {"system", &RecordOptions::field_system},
      {"instruction", &RecordOptions::field_instruction}, {"input", &RecordOptions::field_input},
      {"output", &RecordOptions::field_output},     {"prompt", &RecordOptions::field_prompt},
      {"response", &RecordOptions::field_response}, {"text", &RecordOptions::field_text},
  };
  for (const Slot& s : slots) {
    if (fields.contains(s.name)) opt.*(s.member) = str_of(fields[s.name], std::string("fields['") + s.name + "']");
  }
  // to_record reads role and content with fields.get(...) or a default: an empty name means the default
  if (opt.field_role && opt.field_role->empty()) opt.field_role.reset();
  if (opt.field_content && opt.field_content->empty()) opt.field_content.reset();
}

// A caller's bytes-like object (bytes, bytearray, memoryview), held as a buffer for the call: a bytearray
// cannot be resized meanwhile.
class HeldBuffer {
 public:
  explicit HeldBuffer(const py::object& obj) {
    if (PyObject_GetBuffer(obj.ptr(), &view_, PyBUF_SIMPLE) != 0) throw py::error_already_set();
  }
  ~HeldBuffer() { PyBuffer_Release(&view_); }
  HeldBuffer(const HeldBuffer&) = delete;
  HeldBuffer& operator=(const HeldBuffer&) = delete;
  const uint8_t* data() const { return static_cast<const uint8_t*>(view_.buf); }
  size_t size() const { return static_cast<size_t>(view_.len); }

 private:
  Py_buffer view_{};
};

py::dict records_from_jsonl(const py::object& data, int64_t first_line, const std::string& records,
                            const py::dict& fields, const py::dict& roles, const std::string& id_field,
                            const py::object& lang_field, const py::object& lang, const std::string& id_prefix,
                            const std::string& where_prefix, const py::list& where, int max_depth,
                            int num_threads) {
  RecordOptions opt;
  opt.format = format_of(records);
  set_fields(opt, fields);
  for (auto item : roles) opt.roles.emplace_back(str_of(item.first, "a role"), str_of(item.second, "a role's mapping"));
  opt.id_field = id_field;
  if (lang_field.is_none()) {
    opt.lang_from_field = false;
    if (!lang.is_none()) opt.lang = str_of(lang, "lang");
  } else {
    MLMIX_CHECK(lang.is_none(), "give lang_field or lang, not both");
    opt.lang_field = str_of(lang_field, "lang_field");
  }
  opt.id_prefix = id_prefix;
  opt.where_prefix = where_prefix;
  for (auto item : where) {
    // (key, kind, value): kind "none", "str" (value the str), "int" (value str(int)) or "bool" (value "1" / "0")
    const auto term = item.cast<py::tuple>();
    MLMIX_CHECK(term.size() == 3, "where terms must be (key, kind, value) tuples, got " << term.size() << " items");
    WhereTerm w;
    w.key = str_of(term[0], "a where key");
    const std::string kind = str_of(term[1], "a where kind");
    w.text = str_of(term[2], "a where value");
    if (kind == "none") {
      w.kind = WhereTerm::Kind::kNone;
    } else if (kind == "str") {
      w.kind = WhereTerm::Kind::kString;
    } else if (kind == "int") {
      w.kind = WhereTerm::Kind::kInt;
      bool ok = !w.text.empty() && w.text != "-";
      for (size_t i = w.text[0] == '-' ? 1 : 0; ok && i < w.text.size(); ++i) ok = w.text[i] >= '0' && w.text[i] <= '9';
      ok = ok && (w.text == "0" || (w.text[w.text[0] == '-' ? 1 : 0] != '0')) && w.text != "-0";
      MLMIX_CHECK(ok, "a where int must be written as str(int) writes it, got '" << w.text << "'");
    } else if (kind == "bool") {
      MLMIX_CHECK(w.text == "1" || w.text == "0", "a where bool must be '1' or '0', got '" << w.text << "'");
      w.kind = WhereTerm::Kind::kBool;
      w.flag = w.text == "1";
    } else {
      throw py::value_error("a where kind must be 'none', 'str', 'int' or 'bool', got '" + kind + "'");
    }
    opt.where.push_back(std::move(w));
  }
  opt.max_depth = max_depth;
  opt.num_threads = num_threads;

  const HeldBuffer buf(data);
  RecordColumns cols;
  {
    py::gil_scoped_release release;
    cols = read_json_lines(buf.data(), buf.size(), first_line, opt);
  }
  py::dict out;
  out["kind"] = vector_to_array(std::move(cols.kind));
  out["has_lang"] = vector_to_array(std::move(cols.has_lang));
  out["turn_offsets"] = vector_to_array(std::move(cols.turn_offsets));
  for (auto [name, col] : {std::pair<const char*, StringColumn*>{"id", &cols.id}, {"lang", &cols.lang},
                           {"where", &cols.where}, {"role", &cols.role}, {"content", &cols.content}}) {
    out[py::str(std::string(name) + "_values")] = vector_to_array(std::move(col->values));
    out[py::str(std::string(name) + "_offsets")] = vector_to_array(std::move(col->offsets));
  }
  out["line"] = vector_to_array(std::move(cols.line));
  out["handback_line"] = vector_to_array(std::move(cols.handback_line));
  out["handback_begin"] = vector_to_array(std::move(cols.handback_begin));
  out["handback_end"] = vector_to_array(std::move(cols.handback_end));
  out["lines"] = cols.lines;
  return out;
}

py::tuple record_texts_py(const py::array& kind, const py::array& turn_offsets, const py::array& role_values,
                          const py::array& role_offsets, const py::array& content_values,
                          const py::array& content_offsets, int num_threads) {
  RecordTextsInput in;
  int64_t n_turn_offsets = 0, n_role_offsets = 0, n_content_offsets = 0;
  in.kind = checked_1d<uint8_t>(kind, "kind", &in.count);
  in.turn_offsets = checked_1d<int64_t>(turn_offsets, "turn_offsets", &n_turn_offsets);
  in.role_values = checked_1d<uint8_t>(role_values, "role_values", &in.role_bytes);
  in.role_offsets = checked_1d<int64_t>(role_offsets, "role_offsets", &n_role_offsets);
  in.content_values = checked_1d<uint8_t>(content_values, "content_values", &in.content_bytes);
  in.content_offsets = checked_1d<int64_t>(content_offsets, "content_offsets", &n_content_offsets);
  MLMIX_CHECK(n_turn_offsets == in.count + 1, "turn_offsets must have len(kind) + 1 = " << in.count + 1
                                                  << " entries, got " << n_turn_offsets);
  MLMIX_CHECK(n_role_offsets >= 1, "role_offsets must have at least one entry");
  MLMIX_CHECK(n_content_offsets == n_role_offsets, "role_offsets and content_offsets must have the same length, got "
                                                       << n_role_offsets << " and " << n_content_offsets);
  in.turns = n_role_offsets - 1;
  StringColumn texts;
  {
    py::gil_scoped_release release;
    texts = record_texts(in, num_threads);
  }
  return py::make_tuple(vector_to_array(std::move(texts.values)), vector_to_array(std::move(texts.offsets)));
}

py::tuple take_strings_py(const py::array& values, const py::array& offsets, const py::array& rows, int64_t itemsize) {
  int64_t value_bytes = 0, n_offsets = 0, n_rows = 0;
  const uint8_t* v = checked_1d<uint8_t>(values, "values", &value_bytes);
  const int64_t* o = checked_1d<int64_t>(offsets, "offsets", &n_offsets);
  const int64_t* r = checked_1d<int64_t>(rows, "rows", &n_rows);
  MLMIX_CHECK(n_offsets >= 1, "offsets must have at least one entry");
  StringColumn out;
  {
    py::gil_scoped_release release;
    out = take_strings(v, value_bytes, o, n_offsets - 1, r, n_rows, itemsize);
  }
  return py::make_tuple(vector_to_array(std::move(out.values)), vector_to_array(std::move(out.offsets)));
}

py::tuple read_strings_py(int fd, int64_t base, int64_t file_items, const py::array& offsets, const py::array& rows,
                          int64_t itemsize) {
  int64_t n_offsets = 0, n_rows = 0;
  const int64_t* o = checked_1d<int64_t>(offsets, "offsets", &n_offsets);
  const int64_t* r = checked_1d<int64_t>(rows, "rows", &n_rows);
  MLMIX_CHECK(n_offsets >= 1, "offsets must have at least one entry");
  StringColumn out;
  {
    py::gil_scoped_release release;
    out = read_strings(fd, base, file_items, o, n_offsets - 1, r, n_rows, itemsize);
  }
  return py::make_tuple(vector_to_array(std::move(out.values)), vector_to_array(std::move(out.offsets)));
}

py::array read_spans_py(int fd, int64_t base, int64_t file_items, const py::array& starts, const py::array& lengths,
                        int64_t itemsize) {
  int64_t n_starts = 0, n_lengths = 0;
  const int64_t* s = checked_1d<int64_t>(starts, "starts", &n_starts);
  const int64_t* l = checked_1d<int64_t>(lengths, "lengths", &n_lengths);
  MLMIX_CHECK(n_starts == n_lengths, "starts and lengths differ in length: " << n_starts << " vs " << n_lengths);
  std::vector<uint8_t> out;
  {
    py::gil_scoped_release release;
    out = read_spans(fd, base, file_items, s, l, n_starts, itemsize);
  }
  return vector_to_array(std::move(out));
}

}  // namespace

void bind_records(py::module_& m) {
  m.def("_records_from_jsonl", &records_from_jsonl, py::arg("data"), py::arg("first_line"), py::arg("records"),
        py::arg("fields"), py::arg("roles"), py::arg("id_field"), py::arg("lang_field"), py::arg("lang"),
        py::arg("id_prefix"), py::arg("where_prefix"), py::arg("where") = py::list(),
        py::arg("max_depth") = kMaxDepth, py::arg("num_threads") = 0,
        "RecordBlock columns (dict of arrays, plus 'line' per record, the hand-backs 'handback_line', "
        "'handback_begin', 'handback_end' and the number of 'lines' read) of whole JSON lines (a bytes-like "
        "object that must not change during the call), rows failing the where terms (key, kind, value) left out: "
        "see mlmix.readers.iter_blocks.");
  m.def("_record_texts", &record_texts_py, py::arg("kind"), py::arg("turn_offsets"), py::arg("role_values"),
        py::arg("role_offsets"), py::arg("content_values"), py::arg("content_offsets"), py::arg("num_threads") = 0,
        "(values uint8, offsets int64): each record's text: see mlmix.recblock.RecordBlock.text_column.");
  m.def("_take_strings", &take_strings_py, py::arg("values"), py::arg("offsets"), py::arg("rows"),
        py::arg("itemsize") = 1,
        "(values uint8, offsets int64): the sequences at rows of a ragged column whose values are the bytes of "
        "itemsize-byte items (offsets count items): see mlmix.recblock.RecordBlock.take and mlmix.Ragged.take.");
  m.def("_read_strings", &read_strings_py, py::arg("fd"), py::arg("base"), py::arg("file_items"), py::arg("offsets"),
        py::arg("rows"), py::arg("itemsize"),
        "(values uint8, offsets int64): _take_strings of a column whose file_items values of itemsize bytes are in "
        "the open file fd from byte base, read with pread: see mlmix.ragged.take_spans.");
  m.def("_read_spans", &read_spans_py, py::arg("fd"), py::arg("base"), py::arg("file_items"), py::arg("starts"),
        py::arg("lengths"), py::arg("itemsize"),
        "values uint8: the items [starts[k], starts[k] + lengths[k]) of each span, end to end, of the file_items "
        "items of itemsize bytes in the open file fd from byte base, read with pread: see mlmix.ragged.read_spans.");
}

}  // namespace mlmix::bind
