// pybind11 layer of the block chat encoder (csrc/chat.h): a RecordBlock's columns in place, the template's
// fixed pieces as ids computed in Python, the GIL released around each step. Between the steps, with the
// GIL held, two Python callbacks fill in what the C++ side cannot know: the ids of documents the encoder
// left to the reference implementation (NFC), and header token counts byte lengths cannot decide.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "bind_convert.h"
#include "bindings.h"
#include "chat.h"

namespace py = pybind11;

namespace mlmix::bind {
namespace {

template <typename T>
const T* column(const py::array& a, const char* name, int64_t* size) {
  return checked_1d<T>(a, name, size);
}

py::str text_of(const chat::Plan& plan, int64_t t) {
  const char* p = plan.arena.data() + plan.text_offsets[t];
  PyObject* s = PyUnicode_DecodeUTF8(p, static_cast<Py_ssize_t>(plan.text_offsets[t + 1] - plan.text_offsets[t]), "strict");
  if (!s) throw py::error_already_set();
  return py::reinterpret_steal<py::str>(s);
}

py::tuple encode_block(py::handle encoder, const py::array& kind, const py::array& turn_offsets,
                       const py::array& role_values, const py::array& role_offsets, const py::array& content_values,
                       const py::array& content_offsets, int style, const py::object& default_system, bool has_bos,
                       const std::vector<py::array>& fixed, const std::string& header, const py::array& header_ids,
                       int train_on, int train_glue, const py::object& token_bytes, const py::object& reencode,
                       const py::object& count_header, int num_threads) {
  const bpe::Encoder& enc = bpe_encoder_of(encoder);
  MLMIX_CHECK(style == 0 || style == 1, "style must be 0 (chatml) or 1 (llama3), got " << style);
  MLMIX_CHECK(train_on >= 0 && train_on <= 2, "train_on must be 0..2, got " << train_on);
  MLMIX_CHECK(train_glue >= 0 && train_glue <= 2, "train_glue must be 0..2, got " << train_glue);
  MLMIX_CHECK(num_threads >= 0, "num_threads must be >= 0 (0: all cores), got " << num_threads);
  MLMIX_CHECK(static_cast<int>(fixed.size()) == chat::kNumSlots,
              "fixed must hold " << chat::kNumSlots << " id arrays, got " << fixed.size());

  chat::Spec spec;
  spec.style = static_cast<chat::Style>(style);
  spec.has_default_system = !default_system.is_none();
  if (spec.has_default_system) spec.default_system = default_system.cast<std::string>();
  spec.has_bos = has_bos;
  for (int s = 0; s < chat::kNumSlots; ++s) {
    int64_t len = 0;
    const uint32_t* ids = column<uint32_t>(fixed[s], "fixed[i]", &len);
    spec.fixed[s].assign(ids, ids + len);
  }
  spec.header = header;
  {
    int64_t len = 0;
    const uint32_t* ids = column<uint32_t>(header_ids, "header_ids", &len);
    spec.header_ids.assign(ids, ids + len);
  }
  spec.train_on = static_cast<chat::TrainOn>(train_on);
  spec.train_glue = static_cast<chat::TrainGlue>(train_glue);
  spec.num_threads = num_threads;

  chat::Block b;
  int64_t n_to = 0, n_ro = 0, n_co = 0;
  b.kind = column<uint8_t>(kind, "kind", &b.n);
  b.turn_offsets = column<int64_t>(turn_offsets, "turn_offsets", &n_to);
  b.role_values = column<uint8_t>(role_values, "role_values", &b.role_bytes);
  b.role_offsets = column<int64_t>(role_offsets, "role_offsets", &n_ro);
  b.content_values = column<uint8_t>(content_values, "content_values", &b.content_bytes);
  b.content_offsets = column<int64_t>(content_offsets, "content_offsets", &n_co);
  if (n_to != b.n + 1 || n_ro < 1 || n_ro != n_co) {
    return py::make_tuple("reject", chat::reject_name(chat::Reject::kBadShape), -1);
  }
  b.n_turns = n_ro - 1;

  const uint32_t* tb = nullptr;
  int64_t n_tb = 0;
  py::array tb_array;
  if (!token_bytes.is_none()) {
    tb_array = py::reinterpret_borrow<py::array>(token_bytes);
    tb = column<uint32_t>(tb_array, "token_bytes", &n_tb);
  }

  chat::Plan plan;
  bpe::EncodeResult result;
  {
    py::gil_scoped_release release;
    plan = chat::plan(b, spec);
    if (plan.reject == chat::Reject::kNone) result = chat::encode(enc, plan, spec);
  }
  if (plan.reject != chat::Reject::kNone) {
    return py::make_tuple("reject", chat::reject_name(plan.reject), plan.reject_record);
  }
  // documents the native encoder left to the reference implementation
  if (!result.unencoded.empty()) {
    MLMIX_CHECK(!reencode.is_none(), "the encoder left documents unencoded and no reencode callback was given");
    py::list texts;
    for (int64_t t : result.unencoded) texts.append(text_of(plan, t));
    py::tuple got = reencode(texts);
    int64_t nv = 0, no = 0;
    py::array vals = got[0], offs = got[1];
    const uint32_t* v = column<uint32_t>(vals, "reencode values", &nv);
    const int64_t* o = column<int64_t>(offs, "reencode offsets", &no);
    MLMIX_CHECK(no == static_cast<int64_t>(result.unencoded.size()) + 1 && o[0] == 0 && o[no - 1] == nv,
                "reencode must return (values, offsets) with one run per text");
    py::gil_scoped_release release;
    chat::replace_documents(result, result.unencoded, v, o);
  }
  std::vector<int64_t> heads;
  {
    py::gil_scoped_release release;
    heads = chat::header_counts(plan, result, spec, tb, n_tb, result.unencoded);
  }
  std::vector<int64_t> unknown;
  for (size_t p = 0; p < heads.size(); ++p) {
    if (heads[p] < 0) unknown.push_back(static_cast<int64_t>(p));
  }
  if (!unknown.empty()) {
    py::list texts;
    for (int64_t p : unknown) texts.append(text_of(plan, plan.pieces[p].src));
    py::sequence counts = count_header(texts);
    MLMIX_CHECK(static_cast<size_t>(py::len(counts)) == unknown.size(), "count_header must return one count per text");
    for (size_t k = 0; k < unknown.size(); ++k) heads[unknown[k]] = counts[k].cast<int64_t>();
  }
  chat::Output out;
  {
    py::gil_scoped_release release;
    out = chat::assemble(plan, result, spec, heads);
  }
  return py::make_tuple("ok", vector_to_array(std::move(out.tokens)), vector_to_array(std::move(out.mask)),
                        vector_to_array(std::move(out.offsets)));
}

int64_t first_invalid_utf8(const py::array& values, const py::array& offsets) {
  int64_t nv = 0, no = 0;
  const uint8_t* v = column<uint8_t>(values, "values", &nv);
  const int64_t* o = column<int64_t>(offsets, "offsets", &no);
  if (no < 1) return -2;
  py::gil_scoped_release release;
  return chat::first_invalid_utf8(v, nv, o, no - 1);
}

}  // namespace

void bind_chat(py::module_& m) {
  m.def("_chat_encode_block", &encode_block, py::arg("encoder"), py::arg("kind"), py::arg("turn_offsets"),
        py::arg("role_values"), py::arg("role_offsets"), py::arg("content_values"), py::arg("content_offsets"),
        py::arg("style"), py::arg("default_system"), py::arg("has_bos"), py::arg("fixed"), py::arg("header"),
        py::arg("header_ids"), py::arg("train_on"), py::arg("train_glue"), py::arg("token_bytes"),
        py::arg("reencode"), py::arg("count_header"), py::arg("num_threads"),
        "Chat/text records of a RecordBlock -> ('ok', tokens uint32, mask uint8, offsets int64) or "
        "('reject', reason, record) (private; use Tokenizer.encode_block)");
  m.def("_chat_first_invalid_utf8", &first_invalid_utf8, py::arg("values"), py::arg("offsets"),
        "index of the first string that is not valid UTF-8; -1 none, -2 malformed offsets (private)");
}

}  // namespace mlmix::bind
