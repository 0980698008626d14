// pybind11 layer for the byte-level BPE encoder (csrc/bpe.h): converts the tokenizer's arrays, reads Python
// strings in place (PEP 393 code units, no UTF-8 copy), releases the GIL, returns arrays without a copy.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <memory>

#include "bind_convert.h"
#include "bindings.h"
#include "bpe.h"
#include "common.h"

namespace py = pybind11;

namespace mlmix::bind {
namespace {

template <typename T>
std::vector<T> array_to_vector(const py::array& a, const char* name) {
  MLMIX_CHECK(a.ndim() == 1, name << " must be 1-D, got " << a.ndim() << " dimensions");
  auto c = py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(a);
  MLMIX_CHECK(c, name << " must be convertible to " << py::str(py::dtype::of<T>()).cast<std::string>());
  return std::vector<T>(c.data(), c.data() + c.size());
}

std::u32string to_u32(const std::string& utf8) {
  std::u32string out;
  py::str s = py::reinterpret_steal<py::str>(PyUnicode_DecodeUTF8(utf8.data(), static_cast<py::ssize_t>(utf8.size()), "strict"));
  if (!s) throw py::error_already_set();
  const Py_ssize_t n = PyUnicode_GET_LENGTH(s.ptr());
  for (Py_ssize_t i = 0; i < n; ++i) out.push_back(static_cast<char32_t>(PyUnicode_READ_CHAR(s.ptr(), i)));
  return out;
}

class PyEncoder {
 public:
  // The model comes as tokenizer.json has it: ByteLevel token strings, their ids, merges as string pairs.
  PyEncoder(int pre_tokenizer, bool add_prefix_space, bool ignore_merges, bool nfc, const std::vector<std::string>& vocab_tokens,
            const std::vector<uint32_t>& vocab_ids, const std::vector<std::string>& merges_left,
            const std::vector<std::string>& merges_right,
            const std::vector<std::tuple<std::string, uint32_t, bool, bool, bool, bool>>& added,
            const py::array& prefix_ids, const py::array& suffix_ids) {
    MLMIX_CHECK(pre_tokenizer >= 0 && pre_tokenizer <= 5, "pre_tokenizer must be 0..5, got " << pre_tokenizer);
    bpe::Config cfg;
    cfg.pre_tokenizer = static_cast<bpe::PreTokenizer>(pre_tokenizer);
    cfg.add_prefix_space = add_prefix_space;
    cfg.ignore_merges = ignore_merges;
    cfg.nfc = nfc;
    {
      py::gil_scoped_release release;
      bpe::set_byte_level_model(cfg, vocab_tokens, vocab_ids, merges_left, merges_right);
    }
    for (const auto& [content, id, special, lstrip, rstrip, normalized] : added) {
      cfg.added_tokens.push_back(bpe::AddedToken{to_u32(content), id, special, lstrip, rstrip, normalized});
    }
    cfg.prefix_ids = array_to_vector<uint32_t>(prefix_ids, "prefix_ids");
    cfg.suffix_ids = array_to_vector<uint32_t>(suffix_ids, "suffix_ids");
    py::gil_scoped_release release;
    encoder_ = std::make_unique<bpe::Encoder>(cfg);
  }

  py::tuple encode_batch(const py::sequence& texts, bool add_special_tokens, bool split_special_tokens, int num_threads) {
    MLMIX_CHECK(num_threads >= 0, "num_threads must be >= 0 (0: all cores), got " << num_threads);
    // Held (and read in place) for as long as the GIL is released.
    const HeldDocuments docs(texts, Documents::kStr);
    bpe::EncodeOptions options;
    options.add_special_tokens = add_special_tokens;
    options.split_special_tokens = split_special_tokens;
    options.num_threads = num_threads;
    bpe::EncodeResult result;
    {
      py::gil_scoped_release release;
      result = encoder_->encode_batch(docs.views(), options);
    }
    return py::make_tuple(vector_to_array(std::move(result.values)), vector_to_array(std::move(result.offsets)),
                          vector_to_array(std::move(result.unencoded)));
  }

  size_t vocab_size() const { return encoder_->vocab_size(); }
  size_t num_merges() const { return encoder_->num_merges(); }
  const bpe::Encoder& encoder() const { return *encoder_; }

 private:
  std::unique_ptr<bpe::Encoder> encoder_;
};

}  // namespace

const bpe::Encoder& bpe_encoder_of(py::handle encoder) { return py::cast<const PyEncoder&>(encoder).encoder(); }

void bind_bpe(py::module_& m) {
  py::class_<PyEncoder>(m, "_BpeEncoder", "Byte-level BPE encoder (private; use mlmix.bpe.NativeBPE)")
      .def(py::init<int, bool, bool, bool, const std::vector<std::string>&, const std::vector<uint32_t>&,
                    const std::vector<std::string>&, const std::vector<std::string>&,
                    const std::vector<std::tuple<std::string, uint32_t, bool, bool, bool, bool>>&,
                    const py::array&, const py::array&>(),
           py::arg("pre_tokenizer"), py::arg("add_prefix_space"), py::arg("ignore_merges"), py::arg("nfc"), py::arg("vocab_tokens"),
           py::arg("vocab_ids"), py::arg("merges_left"), py::arg("merges_right"),
           py::arg("added_tokens"), py::arg("prefix_ids"), py::arg("suffix_ids"))
      .def("encode_batch", &PyEncoder::encode_batch, py::arg("texts"), py::arg("add_special_tokens"),
           py::arg("split_special_tokens"), py::arg("num_threads"),
           "-> (values uint32, offsets int64, unencoded int64 indices); strings are read in place, GIL released")
      .def_property_readonly("vocab_size", &PyEncoder::vocab_size)
      .def_property_readonly("num_merges", &PyEncoder::num_merges);
  m.attr("BPE_UNICODE_VERSION") = unicode::kUnicodeVersion;
}

}  // namespace mlmix::bind
