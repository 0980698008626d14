// pybind11 layer for the 'dedup' kernels (csrc/dedup.h): checks dtypes/shapes, releases the GIL, calls the kernel.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <optional>

#include "bind_convert.h"
#include "bindings.h"
#include "common.h"
#include "dedup.h"

namespace py = pybind11;

namespace mlmix::bind {
namespace {

using namespace mlmix::dedup;

using Bytes = py::array_t<uint8_t, py::array::c_style>;
using I64 = py::array_t<int64_t, py::array::c_style>;
using U32 = py::array_t<uint32_t, py::array::c_style>;
using U64 = py::array_t<uint64_t, py::array::c_style>;
using F64 = py::array_t<double, py::array::c_style>;

// The documents of a call, checked before the GIL goes. Either one UTF-8 buffer (`data`, uint8) with
// count + 1 int64 `offsets`, or (`offsets` None) a sequence of str / bytes read in place
// (bind_convert.h's HeldDocuments: a str's code units as Python stores them, bytes as UTF-8).
class Texts {
 public:
  Texts(const py::object& data, const py::object& offsets) {
    if (offsets.is_none()) {
      docs_.emplace(data, Documents::kStrOrBytes);
      span_ = TextSpan{nullptr, nullptr, docs_->size(), docs_->views().data()};
      check_texts(span_);
      return;
    }
    int64_t n_data = 0, n_offsets = 0;
    const uint8_t* bytes = checked_1d<uint8_t>(as_array(data, "data"), "data", &n_data);
    const int64_t* offs = checked_1d<int64_t>(as_array(offsets, "offsets"), "offsets", &n_offsets);
    MLMIX_CHECK(n_offsets >= 1, "offsets must be 1-D int64 with count + 1 >= 1 entries");
    span_ = TextSpan{bytes, offs, n_offsets - 1};
    check_texts(span_);
    MLMIX_CHECK(span_.count == 0 || offs[span_.count] <= n_data,
                "offsets[-1] = " << offs[span_.count] << " exceeds the data size " << n_data);
  }
  Texts(const Texts&) = delete;
  Texts& operator=(const Texts&) = delete;

  const TextSpan& span() const { return span_; }

 private:
  static py::array as_array(const py::object& a, const char* name) {
    if (!py::isinstance<py::array>(a))
      throw py::type_error(std::string(name) + " must be a numpy array, got " + Py_TYPE(a.ptr())->tp_name);
    return py::reinterpret_borrow<py::array>(a);
  }

  std::optional<HeldDocuments> docs_;
  TextSpan span_;
};

NormalizeOptions normalize_options(bool strip_marks, int errors) {
  MLMIX_CHECK(errors == 0 || errors == 1, "errors must be 0 (replace) or 1 (strict), got " << errors);
  return NormalizeOptions{strip_marks, static_cast<Utf8Errors>(errors)};
}

MinHashOptions minhash_options(int num_perm, int ngram, int mode, uint64_t seed, bool strip_marks,
                               int errors) {
  MLMIX_CHECK(mode >= 0 && mode <= 2, "shingle mode must be 0 (auto), 1 (word) or 2 (char), got " << mode);
  return MinHashOptions{num_perm, ngram, static_cast<ShingleMode>(mode), seed,
                        normalize_options(strip_marks, errors)};
}

}  // namespace

void bind_dedup(py::module_& m) {
  m.attr("DEDUP_UNICODE_VERSION") = unicode_version();

  m.def(
      "_dedup_normalize",
      [](const py::object& data, const py::object& offsets, bool strip_marks, int errors, int num_threads) {
        const Texts texts(data, offsets);
        const TextSpan& t = texts.span();
        const NormalizeOptions o = normalize_options(strip_marks, errors);
        std::vector<uint8_t> out;
        std::vector<int64_t> out_offsets;
        {
          py::gil_scoped_release release;
          normalize_texts(t, o, num_threads, out, out_offsets);
        }
        return py::make_tuple(vector_to_array(std::move(out)), vector_to_array(std::move(out_offsets)));
      },
      py::arg("data"), py::arg("offsets"), py::arg("strip_marks"), py::arg("errors"),
      py::arg("num_threads"),
      "Normalised UTF-8 (uint8 data, int64 offsets) of NFKC+casefolded UTF-8 documents.");

  m.def(
      "_dedup_utf8_sizes",
      [](const py::object& data, const py::object& offsets) {
        const Texts texts(data, offsets);
        I64 out({static_cast<py::ssize_t>(texts.span().count)});
        utf8_sizes(texts.span(), out.mutable_data());
        return out;
      },
      py::arg("data"), py::arg("offsets"), "(n,) int64: each document's size in bytes as UTF-8.");

  m.def(
      "_dedup_exact_hashes",
      [](const py::object& data, const py::object& offsets, bool strip_marks, int errors, int num_threads) {
        const Texts texts(data, offsets);
        const TextSpan& t = texts.span();
        const NormalizeOptions o = normalize_options(strip_marks, errors);
        U64 out({static_cast<py::ssize_t>(t.count), py::ssize_t{2}});
        uint64_t* p = out.mutable_data();
        {
          py::gil_scoped_release release;
          exact_hashes(t, o, num_threads, p);
        }
        return out;
      },
      py::arg("data"), py::arg("offsets"), py::arg("strip_marks"), py::arg("errors"),
      py::arg("num_threads"), "(n, 2) uint64 hash of each normalised document.");

  m.def(
      "_dedup_minhash",
      [](const py::object& data, const py::object& offsets, int num_perm, int ngram, int mode, uint64_t seed,
         bool strip_marks, int errors, int num_threads) {
        const Texts texts(data, offsets);
        const TextSpan& t = texts.span();
        const MinHashOptions o = minhash_options(num_perm, ngram, mode, seed, strip_marks, errors);
        MLMIX_CHECK(num_perm >= 1 && num_perm <= 4096, "num_perm must be in [1, 4096], got " << num_perm);
        const auto n = static_cast<py::ssize_t>(t.count);
        U32 sig({n, static_cast<py::ssize_t>(num_perm)});
        U64 hashes({n, py::ssize_t{2}});
        I64 lengths({n});
        py::array_t<bool> char_mode({n});
        SignatureOutputs out{sig.mutable_data(), hashes.mutable_data(), lengths.mutable_data(),
                             reinterpret_cast<uint8_t*>(char_mode.mutable_data())};
        {
          py::gil_scoped_release release;
          minhash_signatures(t, o, num_threads, out);
        }
        return py::make_tuple(sig, hashes, lengths, char_mode);
      },
      py::arg("data"), py::arg("offsets"), py::arg("num_perm"), py::arg("ngram"), py::arg("mode"),
      py::arg("seed"), py::arg("strip_marks"), py::arg("errors"), py::arg("num_threads"),
      "(signatures (n, num_perm) uint32, hashes (n, 2) uint64, lengths (n,) int64, char_mode (n,) bool).");

  m.def(
      "_dedup_near",
      [](const py::object& data, const py::object& offsets, int num_perm, int ngram, int mode, uint64_t seed,
         bool strip_marks, int errors, std::optional<I64> groups, std::optional<F64> scores,
         double threshold, int bands, int rows, bool verify, int64_t shingle_set_budget, int num_threads) {
        const Texts texts(data, offsets);
        const TextSpan& t = texts.span();
        const MinHashOptions o = minhash_options(num_perm, ngram, mode, seed, strip_marks, errors);
        MLMIX_CHECK(num_perm >= 1 && num_perm <= 4096, "num_perm must be in [1, 4096], got " << num_perm);
        const auto n = static_cast<py::ssize_t>(t.count);
        if (groups) MLMIX_CHECK(groups->ndim() == 1 && groups->shape(0) == n, "groups must be (n,) int64 with n = " << n);
        if (scores) MLMIX_CHECK(scores->ndim() == 1 && scores->shape(0) == n, "scores must be (n,) float64 with n = " << n);
        U32 sig({n, static_cast<py::ssize_t>(num_perm)});
        U64 hashes({n, py::ssize_t{2}});
        py::array_t<bool> char_mode({n});
        ShingleSets sets;
        SignatureOutputs out{sig.mutable_data(), hashes.mutable_data(), nullptr,
                             reinterpret_cast<uint8_t*>(char_mode.mutable_data()),
                             verify ? &sets : nullptr, shingle_set_budget};
        ClusterInputs in;
        in.count = t.count;
        in.num_perm = num_perm;
        in.signatures = sig.data();
        in.hashes = hashes.data();
        in.groups = groups ? groups->data() : nullptr;
        in.scores = scores ? scores->data() : nullptr;
        in.texts = &t;
        in.minhash = &o;
        in.shingle_sets = &sets;
        ClusterResult r;
        {
          py::gil_scoped_release release;
          minhash_signatures(t, o, num_threads, out);
          r = cluster_signatures(in, ClusterOptions{threshold, LshParams{bands, rows}, verify, num_threads});
        }
        py::dict result;
        result["cluster"] = vector_to_array(std::move(r.cluster));
        result["pair_first"] = vector_to_array(std::move(r.pair_first));
        result["pair_second"] = vector_to_array(std::move(r.pair_second));
        result["pair_similarity"] = vector_to_array(std::move(r.pair_similarity));
        result["candidate_pairs"] = r.candidate_pairs;
        result["exact_merged"] = r.exact_merged;
        result["signatures"] = sig;
        result["char_mode"] = char_mode;
        return result;
      },
      py::arg("data"), py::arg("offsets"), py::arg("num_perm"), py::arg("ngram"), py::arg("mode"),
      py::arg("seed"), py::arg("strip_marks"), py::arg("errors"), py::arg("groups"), py::arg("scores"),
      py::arg("threshold"), py::arg("bands"), py::arg("rows"), py::arg("verify"),
      py::arg("shingle_set_budget"), py::arg("num_threads"),
      "Signatures, LSH, verification (shingle sets kept from the signature pass while within the "
      "budget, in entries of 8 bytes; else rebuilt) and clustering in one call.");

  m.def(
      "_dedup_shingle_sets",
      [](const py::object& data, const py::object& offsets, int ngram, int mode, uint64_t seed, bool strip_marks,
         int errors, int num_threads) {
        const Texts texts(data, offsets);
        const TextSpan& t = texts.span();
        const MinHashOptions o = minhash_options(1, ngram, mode, seed, strip_marks, errors);
        std::vector<uint64_t> values;
        std::vector<int64_t> set_offsets;
        {
          py::gil_scoped_release release;
          shingle_sets(t, o, num_threads, values, set_offsets);
        }
        return py::make_tuple(vector_to_array(std::move(values)), vector_to_array(std::move(set_offsets)));
      },
      py::arg("data"), py::arg("offsets"), py::arg("ngram"), py::arg("mode"), py::arg("seed"),
      py::arg("strip_marks"), py::arg("errors"), py::arg("num_threads"),
      "(values uint64, offsets (n + 1,) int64): every document's sorted unique shingle hashes.");

  m.def(
      "_dedup_lsh_params",
      [](double threshold, int num_perm, double fp_weight, double fn_weight) {
        const LshParams p = optimal_lsh_params(threshold, num_perm, fp_weight, fn_weight);
        return py::make_tuple(p.bands, p.rows);
      },
      py::arg("threshold"), py::arg("num_perm"), py::arg("fp_weight"), py::arg("fn_weight"));

  m.def(
      "_dedup_cluster",
      [](const U32& signatures, std::optional<U64> hashes, std::optional<I64> groups,
         std::optional<F64> scores, double threshold, int bands, int rows, bool verify, int num_threads) {
        MLMIX_CHECK(signatures.ndim() == 2, "signatures must be 2-D (n, num_perm) uint32, got "
                                                << signatures.ndim() << " dimensions");
        const int64_t n = signatures.shape(0);
        MLMIX_CHECK(signatures.shape(1) >= 1 && signatures.shape(1) <= 4096,
                    "signatures must have 1..4096 columns, got " << signatures.shape(1));
        ClusterInputs in;
        in.count = n;
        in.num_perm = static_cast<int>(signatures.shape(1));
        in.signatures = signatures.data();
        if (hashes) {
          MLMIX_CHECK(hashes->ndim() == 2 && hashes->shape(0) == n && hashes->shape(1) == 2,
                      "hashes must be (n, 2) uint64 with n = " << n);
          in.hashes = hashes->data();
        }
        if (groups) {
          MLMIX_CHECK(groups->ndim() == 1 && groups->shape(0) == n, "groups must be (n,) int64 with n = " << n);
          in.groups = groups->data();
        }
        if (scores) {
          MLMIX_CHECK(scores->ndim() == 1 && scores->shape(0) == n, "scores must be (n,) float64 with n = " << n);
          in.scores = scores->data();
        }
        ClusterOptions opts{threshold, LshParams{bands, rows}, verify, num_threads};
        ClusterResult r;
        {
          py::gil_scoped_release release;
          r = cluster_signatures(in, opts);
        }
        py::dict out;
        out["cluster"] = vector_to_array(std::move(r.cluster));
        out["pair_first"] = vector_to_array(std::move(r.pair_first));
        out["pair_second"] = vector_to_array(std::move(r.pair_second));
        out["pair_similarity"] = vector_to_array(std::move(r.pair_similarity));
        out["candidate_pairs"] = r.candidate_pairs;
        out["exact_merged"] = r.exact_merged;
        return out;
      },
      py::arg("signatures"), py::arg("hashes"), py::arg("groups"), py::arg("scores"),
      py::arg("threshold"), py::arg("bands"), py::arg("rows"), py::arg("verify"), py::arg("num_threads"),
      "LSH + signature-agreement verification + union-find; returns a dict of int64 cluster, pair arrays and counts.");
}

}  // namespace mlmix::bind
