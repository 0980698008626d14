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
  using Added = std::vector<std::tuple<std::string, uint32_t, bool, bool, bool, bool>>;

  PyEncoder(int pre_tokenizer, bool add_prefix_space, bool ignore_merges, bool nfc, const std::vector<std::string>& vocab_tokens,
            const std::vector<uint32_t>& vocab_ids, const std::vector<std::string>& merges_left,
            const std::vector<std::string>& merges_right, const Added& added, const py::array& prefix_ids,
            const py::array& suffix_ids) {
    bpe::Config cfg = options(pre_tokenizer, add_prefix_space, ignore_merges, nfc, added, prefix_ids, suffix_ids);
    {
      py::gil_scoped_release release;
      bpe::set_byte_level_model(cfg, vocab_tokens, vocab_ids, merges_left, merges_right);
    }
    py::gil_scoped_release release;
    encoder_ = std::make_unique<bpe::Encoder>(cfg);
  }

  // From the model as Config holds it (what _bpe_compile_model returns): no strings to convert or look up.
  PyEncoder(int pre_tokenizer, bool add_prefix_space, bool ignore_merges, bool nfc, const py::array& vocab_bytes,
            const py::array& vocab_offsets, const py::array& vocab_ids, const py::array& merges_left,
            const py::array& merges_right, const Added& added, const py::array& prefix_ids,
            const py::array& suffix_ids) {
    bpe::Config cfg = options(pre_tokenizer, add_prefix_space, ignore_merges, nfc, added, prefix_ids, suffix_ids);
    int64_t n_bytes = 0;
    const uint8_t* bytes = checked_1d<uint8_t>(vocab_bytes, "vocab_bytes", &n_bytes);
    cfg.vocab_bytes.assign(reinterpret_cast<const char*>(bytes), static_cast<size_t>(n_bytes));
    cfg.vocab_offsets = array_to_vector<int64_t>(vocab_offsets, "vocab_offsets");
    cfg.vocab_ids = array_to_vector<uint32_t>(vocab_ids, "vocab_ids");
    cfg.merges_left = array_to_vector<uint32_t>(merges_left, "merges_left");
    cfg.merges_right = array_to_vector<uint32_t>(merges_right, "merges_right");
    const size_t n = cfg.vocab_ids.size();
    MLMIX_CHECK(cfg.vocab_offsets.size() == n + 1 && cfg.vocab_offsets[0] == 0 &&
                    cfg.vocab_offsets[n] == n_bytes,
                "vocab_offsets must have len(vocab_ids) + 1 entries from 0 to len(vocab_bytes)");
    for (size_t i = 0; i < n; ++i) {
      MLMIX_CHECK(cfg.vocab_offsets[i] <= cfg.vocab_offsets[i + 1], "vocab_offsets must not decrease (at " << i + 1 << ")");
    }
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

  static bpe::Config options(int pre_tokenizer, bool add_prefix_space, bool ignore_merges, bool nfc, const Added& added,
                             const py::array& prefix_ids, const py::array& suffix_ids) {
    MLMIX_CHECK(pre_tokenizer >= 0 && pre_tokenizer <= 5, "pre_tokenizer must be 0..5, got " << pre_tokenizer);
    bpe::Config cfg;
    cfg.pre_tokenizer = static_cast<bpe::PreTokenizer>(pre_tokenizer);
    cfg.add_prefix_space = add_prefix_space;
    cfg.ignore_merges = ignore_merges;
    cfg.nfc = nfc;
    for (const auto& [content, id, special, lstrip, rstrip, normalized] : added) {
      cfg.added_tokens.push_back(bpe::AddedToken{to_u32(content), id, special, lstrip, rstrip, normalized});
    }
    cfg.prefix_ids = array_to_vector<uint32_t>(prefix_ids, "prefix_ids");
    cfg.suffix_ids = array_to_vector<uint32_t>(suffix_ids, "suffix_ids");
    return cfg;
  }
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
  m.def(
      "_bpe_encoder_from_model",
      [](int pre_tokenizer, bool add_prefix_space, bool ignore_merges, bool nfc, const py::array& vocab_bytes,
         const py::array& vocab_offsets, const py::array& vocab_ids, const py::array& merges_left,
         const py::array& merges_right, const PyEncoder::Added& added, const py::array& prefix_ids,
         const py::array& suffix_ids) {
        return std::make_unique<PyEncoder>(pre_tokenizer, add_prefix_space, ignore_merges, nfc, vocab_bytes,
                                           vocab_offsets, vocab_ids, merges_left, merges_right, added, prefix_ids,
                                           suffix_ids);
      },
      py::arg("pre_tokenizer"), py::arg("add_prefix_space"), py::arg("ignore_merges"), py::arg("nfc"),
      py::arg("vocab_bytes"), py::arg("vocab_offsets"), py::arg("vocab_ids"), py::arg("merges_left"),
      py::arg("merges_right"), py::arg("added_tokens"), py::arg("prefix_ids"), py::arg("suffix_ids"),
      "A _BpeEncoder from the model as _bpe_compile_model returns it (see mlmix.bpe.compile_spec).");
  m.def(
      "_bpe_compile_model",
      [](const std::vector<std::string>& vocab_tokens, const std::vector<uint32_t>& vocab_ids,
         const std::vector<std::string>& merges_left, const std::vector<std::string>& merges_right) {
        bpe::Config cfg;
        {
          py::gil_scoped_release release;
          bpe::set_byte_level_model(cfg, vocab_tokens, vocab_ids, merges_left, merges_right);
        }
        std::vector<uint8_t> bytes(cfg.vocab_bytes.begin(), cfg.vocab_bytes.end());
        return py::make_tuple(vector_to_array(std::move(bytes)), vector_to_array(std::move(cfg.vocab_offsets)),
                              vector_to_array(std::move(cfg.vocab_ids)), vector_to_array(std::move(cfg.merges_left)),
                              vector_to_array(std::move(cfg.merges_right)));
      },
      py::arg("vocab_tokens"), py::arg("vocab_ids"), py::arg("merges_left"), py::arg("merges_right"),
      "(vocab_bytes uint8, vocab_offsets int64, vocab_ids uint32, merges_left uint32, merges_right uint32): a "
      "tokenizer.json's ByteLevel model as the encoder holds it (see mlmix.bpe.compile_spec).");
  m.attr("BPE_UNICODE_VERSION") = unicode::kUnicodeVersion;
}

}  // namespace mlmix::bind
