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

// A (m, 2) int64 array of document-id pairs, copied into DocPairs.
std::vector<DocPair> pairs_from_array(const py::array& a, const char* name) {
  int64_t m = 0, cols = 0;
  const int64_t* p = checked_2d<int64_t>(a, name, &m, &cols);
  if (cols != 2) throw py::value_error(std::string(name) + " must have shape (m, 2), got (" + std::to_string(m) +
                                       ", " + std::to_string(cols) + ")");
  std::vector<DocPair> pairs(static_cast<size_t>(m));
  for (int64_t k = 0; k < m; ++k) pairs[k] = {p[2 * k], p[2 * k + 1]};
  return pairs;
}

// DocPairs as a (m, 2) int64 array, without a copy.
py::array_t<int64_t> pairs_to_array(std::vector<DocPair>&& pairs) {
  static_assert(sizeof(DocPair) == 2 * sizeof(int64_t), "DocPair must be two packed int64");
  auto* owned = new std::vector<DocPair>(std::move(pairs));
  py::capsule owner(owned, [](void* p) { delete static_cast<std::vector<DocPair>*>(p); });
  const auto m = static_cast<py::ssize_t>(owned->size());
  const auto row = static_cast<py::ssize_t>(sizeof(DocPair)), item = static_cast<py::ssize_t>(sizeof(int64_t));
  return py::array_t<int64_t>({m, py::ssize_t{2}}, {row, item}, reinterpret_cast<const int64_t*>(owned->data()), owner);
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

  // --- the clustering phases, each alone (dedup.h) ---------------------------------------------

  m.def(
      "_dedup_exact_pairs",
      [](const py::array& hashes, std::optional<py::array> groups, std::optional<py::array> docs) {
        int64_t n = 0, cols = 0;
        const uint64_t* h = checked_2d<uint64_t>(hashes, "hashes", &n, &cols);
        if (cols != 2)
          throw py::value_error("hashes must have shape (n, 2), got (" + std::to_string(n) + ", " +
                                std::to_string(cols) + ")");
        const int64_t* g = groups ? checked_optional_1d<int64_t>(*groups, "groups", n) : nullptr;
        const int64_t* ids = docs ? checked_optional_1d<int64_t>(*docs, "docs", n) : nullptr;
        std::vector<DocPair> pairs;
        {
          py::gil_scoped_release release;
          const DocIndex distinct(ids, n, "docs");  // repeated ids are an error naming them
          pairs = exact_pairs(h, g, ids, n);
        }
        return pairs_to_array(std::move(pairs));
      },
      py::arg("hashes"), py::arg("groups"), py::arg("docs"),
      "(m, 2) int64 pairs of documents with equal (group, hash): see mlmix.dedup.exact_pairs.");

  m.def(
      "_dedup_band_keys",
      [](const py::array& signatures, int bands, int rows, std::optional<py::array> groups, int num_threads) {
        int64_t n = 0, num_perm = 0;
        const uint32_t* sig = checked_2d<uint32_t>(signatures, "signatures", &n, &num_perm);
        MLMIX_CHECK(num_perm >= 1 && num_perm <= 4096, "signatures must have 1..4096 columns, got " << num_perm);
        MLMIX_CHECK(bands >= 1 && rows >= 1 && static_cast<int64_t>(bands) * rows == num_perm,
                    "bands * rows must equal the signature width " << num_perm << ", got bands=" << bands
                                                                   << " rows=" << rows);
        const uint64_t* g = groups ? checked_optional_1d<uint64_t>(*groups, "groups", n) : nullptr;
        py::array_t<uint64_t> keys({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(bands)});
        py::array_t<bool> has_keys({static_cast<py::ssize_t>(n)});
        uint64_t* k = keys.mutable_data();
        auto* hk = reinterpret_cast<uint8_t*>(has_keys.mutable_data());
        {
          py::gil_scoped_release release;
          band_keys(sig, n, static_cast<int>(num_perm), LshParams{bands, rows}, g, num_threads, k, hk);
        }
        return py::make_tuple(keys, has_keys);
      },
      py::arg("signatures"), py::arg("bands"), py::arg("rows"), py::arg("groups"), py::arg("num_threads"),
      "(keys (n, bands) uint64, has_keys (n,) bool): see mlmix.dedup.band_keys.");

  m.def(
      "_dedup_bucket_pairs",
      [](const py::array& keys, const py::array& docs, std::optional<py::array> groups) {
        int64_t m = 0, n_docs = 0;
        const uint64_t* k = checked_1d<uint64_t>(keys, "keys", &m);
        const int64_t* d = checked_1d<int64_t>(docs, "docs", &n_docs);
        if (n_docs != m)
          throw py::value_error("keys and docs must have one length (one row each), got " + std::to_string(m) +
                                " and " + std::to_string(n_docs));
        const uint64_t* g = groups ? checked_optional_1d<uint64_t>(*groups, "groups", m) : nullptr;
        std::vector<DocPair> pairs;
        {
          py::gil_scoped_release release;
          pairs = candidate_pairs(k, d, g, m);
        }
        return pairs_to_array(std::move(pairs));
      },
      py::arg("keys"), py::arg("docs"), py::arg("groups"),
      "(m, 2) int64 candidate pairs of LSH buckets, sorted and unique: see mlmix.dedup.bucket_pairs.");

  m.def(
      "_dedup_verify_pairs",
      [](const py::array& pairs, std::optional<py::array> docs, std::optional<py::array> signatures,
         std::optional<py::array> set_values, std::optional<py::array> set_offsets, int num_threads) {
        const std::vector<DocPair> p = pairs_from_array(pairs, "pairs");
        MLMIX_CHECK(signatures.has_value() != (set_values.has_value() || set_offsets.has_value()),
                    "give either signatures or the shingle sets (values and offsets), not both or neither");
        MLMIX_CHECK(set_values.has_value() == set_offsets.has_value(), "shingle sets need both values and offsets");
        int64_t n = 0, num_perm = 0, n_values = 0;
        const uint32_t* sig = nullptr;
        const uint64_t* values = nullptr;
        const int64_t* offsets = nullptr;
        if (signatures) {
          sig = checked_2d<uint32_t>(*signatures, "signatures", &n, &num_perm);
          MLMIX_CHECK(num_perm >= 1, "signatures must have at least one column, got " << num_perm);
        } else {
          values = checked_1d<uint64_t>(*set_values, "shingle_sets values", &n_values);
          int64_t n_offsets = 0;
          offsets = checked_1d<int64_t>(*set_offsets, "shingle_sets offsets", &n_offsets);
          MLMIX_CHECK(n_offsets >= 1, "shingle_sets offsets must have n + 1 >= 1 entries, got " << n_offsets);
          n = n_offsets - 1;
        }
        const int64_t* ids = docs ? checked_optional_1d<int64_t>(*docs, "docs", n) : nullptr;
        py::array_t<double> similarity({static_cast<py::ssize_t>(p.size())});
        double* out = similarity.mutable_data();
        {
          py::gil_scoped_release release;
          const DocIndex index(ids, n, "docs");
          if (sig) {
            verify_pairs_by_signatures(p.data(), static_cast<int64_t>(p.size()), index, sig, static_cast<int>(num_perm),
                                       num_threads, out);
          } else {
            check_sets(values, n_values, offsets, n, "shingle_sets");
            verify_pairs_by_sets(p.data(), static_cast<int64_t>(p.size()), index, values, offsets, num_threads, out);
          }
        }
        return similarity;
      },
      py::arg("pairs"), py::arg("docs"), py::arg("signatures"), py::arg("set_values"), py::arg("set_offsets"),
      py::arg("num_threads"), "(m,) float64 similarity of each pair: see mlmix.dedup.verify_pairs.");

  m.def(
      "_dedup_connected_components",
      [](std::optional<py::array> docs, int64_t count, const py::array& pairs, std::optional<py::array> scores) {
        const std::vector<DocPair> p = pairs_from_array(pairs, "pairs");
        const int64_t* ids = nullptr;
        if (docs) {
          ids = checked_1d<int64_t>(*docs, "docs", &count);
        } else {
          MLMIX_CHECK(count >= 0, "the number of documents must be >= 0, got " << count);
        }
        const double* sc = scores ? checked_optional_1d<double>(*scores, "scores", count) : nullptr;
        std::vector<int64_t> kept;
        {
          py::gil_scoped_release release;
          const DocIndex index(ids, count, "docs");
          kept = connected_components(index, p.data(), static_cast<int64_t>(p.size()), sc);
        }
        return vector_to_array(std::move(kept));
      },
      py::arg("docs"), py::arg("count"), py::arg("pairs"), py::arg("scores"),
      "(n,) int64: the kept document id of each document's component: see mlmix.dedup.connected_components.");

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
