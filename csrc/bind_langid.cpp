// pybind11 layer for language identification (csrc/langid.h): a model object that borrows numpy arrays
// (kept alive by it), and one batch call that checks its arguments, releases the GIL and classifies.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <vector>

#include "bind_convert.h"
#include "bindings.h"
#include "common.h"
#include "langid.h"

namespace py = pybind11;

namespace mlmix::bind {
namespace {

using namespace mlmix::langid;

py::array need_array(const py::object& a, const char* name) {
  if (!py::isinstance<py::array>(a))
    throw py::type_error(std::string(name) + " must be a numpy array, got " + Py_TYPE(a.ptr())->tp_name);
  return py::reinterpret_borrow<py::array>(a);
}

// The model's arrays, borrowed from numpy (the arrays are held here, so the pointers stay valid).
class LangidModel {
 public:
  LangidModel(const py::object& nextmove, const py::object& state_row, const py::object& state_feature,
              const py::object& ptc, double ptc_unit, const py::object& pc, const py::object& log1p,
              const py::object& flags,
              const py::object& ccc, const py::object& pairs)
      : held_(py::make_tuple(state_row, state_feature, pc, log1p, flags, ccc, pairs)) {
    int64_t n = 0, rows = 0, cols = 0;
    // ptc is copied and nextmove read into the walk's own table (langid.h LargeBuffer, Dfa): the caller may
    // drop those two arrays
    m_.nextmove = checked_1d<uint32_t>(need_array(nextmove, "nextmove"), "nextmove", &n);
    MLMIX_CHECK(n % 256 == 0, "nextmove must hold 256 entries per row, got " << n);
    m_.num_rows = n / 256;
    m_.state_row = checked_1d<uint32_t>(need_array(state_row, "state_row"), "state_row", &m_.num_states);
    m_.state_feature = checked_1d<int32_t>(need_array(state_feature, "state_feature"), "state_feature", &n);
    MLMIX_CHECK(n == m_.num_states, "state_feature must have one entry per state (" << m_.num_states << "), got " << n);
    const int16_t* table = checked_2d<int16_t>(need_array(ptc, "ptc"), "ptc", &rows, &cols);
    ptc_.emplace(table, static_cast<size_t>(rows * cols) * sizeof(int16_t));
    m_.ptc = static_cast<const int16_t*>(ptc_->data());
    m_.ptc_unit = ptc_unit;
    m_.num_features = rows;
    m_.num_columns = cols;
    m_.pc = checked_1d<float>(need_array(pc, "pc"), "pc", &n);
    MLMIX_CHECK(n == cols, "pc must have one entry per class (" << cols << "), got " << n);
    m_.log1p = checked_1d<float>(need_array(log1p, "log1p"), "log1p", &m_.log1p_size);
    r_.flags = checked_1d<uint8_t>(need_array(flags, "flags"), "flags", &r_.size);
    r_.ccc = checked_1d<uint8_t>(need_array(ccc, "ccc"), "ccc", &n);
    MLMIX_CHECK(n == r_.size, "ccc must have as many entries as flags (" << r_.size << "), got " << n);
    r_.pairs = checked_1d<uint64_t>(need_array(pairs, "pairs"), "pairs", &r_.num_pairs);
    {
      py::gil_scoped_release release;
      dfa_.emplace(m_);  // checks the model
      check_rules(r_);
    }
    m_.nextmove = nullptr;  // not held: the walks read dfa_
  }

  py::tuple classify(const py::object& texts, const py::object& offsets, const py::object& columns,
                     const py::object& labels, int64_t max_chars, bool prepared, int num_threads,
                     bool compact) const {
    int64_t k = 0, kl = 0;
    const int32_t* cols = checked_1d<int32_t>(need_array(columns, "columns"), "columns", &k);
    const int32_t* labs = checked_1d<int32_t>(need_array(labels, "labels"), "labels", &kl);
    MLMIX_CHECK(k == kl, "columns and labels must have the same length, got " << k << " and " << kl);
    // the last selection is kept (a cut table is built once per selection, not per call); held here for
    // the call, as another thread may replace it while this one runs without the GIL
    std::vector<int64_t> key(cols, cols + k);
    key.insert(key.end(), labs, labs + k);
    key.push_back(compact ? 1 : 0);
    if (!selection_ || key != selection_key_) {
      selection_ = std::make_shared<const Selection>(
          make_selection(m_, std::vector<int32_t>(cols, cols + k), labs, compact));
      selection_key_ = std::move(key);
    }
    const std::shared_ptr<const Selection> held = selection_;
    const Selection& sel = *held;

    Texts t;
    std::optional<HeldDocuments> docs;
    if (offsets.is_none()) {
      docs.emplace(texts, Documents::kStrOrBytes);
      t.count = docs->size();
      t.views = docs->views().data();
    } else {
      int64_t n_data = 0, n_off = 0;
      t.data = checked_1d<uint8_t>(need_array(texts, "values"), "values", &n_data);
      t.offsets = checked_1d<int64_t>(need_array(offsets, "offsets"), "offsets", &n_off);
      MLMIX_CHECK(n_off >= 1, "offsets must have count + 1 >= 1 entries");
      t.count = n_off - 1;
      check_offsets(t.offsets, t.count, n_data);
    }
    Options o;
    o.max_chars = max_chars;
    o.prepared = prepared;
    o.num_threads = num_threads;
    py::array_t<int32_t> out_label(static_cast<py::ssize_t>(t.count));
    py::array_t<double> out_prob(static_cast<py::ssize_t>(t.count));
    int32_t* pl = out_label.mutable_data();
    double* pp = out_prob.mutable_data();
    {
      py::gil_scoped_release release;
      mlmix::langid::classify(m_, *dfa_, sel, r_, t, o, pl, pp);
    }
    return py::make_tuple(out_label, out_prob);
  }

  int64_t num_columns() const { return m_.num_columns; }
  int64_t num_features() const { return m_.num_features; }

 private:
  py::tuple held_;
  mutable std::shared_ptr<const Selection> selection_;  // read and replaced with the GIL held
  mutable std::vector<int64_t> selection_key_;
  std::optional<LargeBuffer> ptc_;
  std::optional<Dfa> dfa_;
  Model m_;
  TextRules r_;
};

}  // namespace

void bind_langid(py::module_& m) {
  m.attr("LANGID_EMPTY") = kEmpty;
  m.attr("LANGID_NEEDS_PREP") = kNeedsPrep;
  py::class_<LangidModel>(m, "_LangidModel")
      .def(py::init<const py::object&, const py::object&, const py::object&, const py::object&, double,
                    const py::object&, const py::object&, const py::object&, const py::object&, const py::object&>(),
           py::arg("nextmove"), py::arg("state_row"), py::arg("state_feature"), py::arg("ptc"), py::arg("ptc_unit"),
           py::arg("pc"),
           py::arg("log1p"), py::arg("flags"), py::arg("ccc"), py::arg("pairs"),
           "py3langid's arrays (ptc copied, nextmove read into the walk's table, the rest borrowed; checked once; ptc in fixed "
           "point: value = ptc * ptc_unit) and the "
           "Unicode facts of text preparation.")
      .def("classify", &LangidModel::classify, py::arg("texts"), py::arg("offsets"), py::arg("columns"),
           py::arg("labels"), py::arg("max_chars"), py::arg("prepared"), py::arg("num_threads"),
           py::arg("compact") = true,
           "(labels int32, probs float64) of texts: a sequence of str / UTF-8 bytes (offsets None) or UTF-8 "
           "values (uint8) with int64 offsets. Label -1: empty after strip; -2: prepare with py3langid's "
           "_encode and classify again with prepared=True. compact: a selection of at most half the columns "
           "scores from its own cut of the table (the same results; False for tests).")
      .def_property_readonly("num_columns", &LangidModel::num_columns)
      .def_property_readonly("num_features", &LangidModel::num_features);
}

}  // namespace mlmix::bind
