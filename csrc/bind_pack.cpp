// pybind11 layer for the 'pack' kernels (csrc/pack.h): checks dtypes/shapes, releases the GIL, calls the kernel.
#include <pybind11/numpy.h>

#include <string>

#include "bind_convert.h"
#include "bindings.h"
#include "pack.h"

namespace py = pybind11;

namespace mlmix::bind {
namespace {

PackStrategy parse_strategy(const std::string& s) {
  if (s == "bfd") return PackStrategy::kBestFitDecreasing;
  if (s == "ffd") return PackStrategy::kFirstFitDecreasing;
  if (s == "wrapped") return PackStrategy::kWrapped;
  throw py::value_error("strategy must be 'bfd', 'ffd' or 'wrapped', got '" + s + "'");
}

OverlongPolicy parse_overlong(const std::string& s) {
  if (s == "error") return OverlongPolicy::kError;
  if (s == "truncate") return OverlongPolicy::kTruncate;
  if (s == "split") return OverlongPolicy::kSplit;
  if (s == "drop") return OverlongPolicy::kDrop;
  throw py::value_error("overlong must be 'error', 'truncate', 'split' or 'drop', got '" + s + "'");
}

struct SegmentArrays {
  SegmentView view{};
  int64_t num_segments = 0;
};

// Checks the segment-table arrays of a plan and that they agree with each other.
SegmentArrays checked_segments(const py::array& seg_example, const py::array& seg_start, const py::array& seg_len,
                               const py::array& row_offsets) {
  SegmentArrays s;
  int64_t n_start = 0, n_len = 0, n_rows1 = 0;
  s.view.seg_example = checked_1d<int64_t>(seg_example, "seg_example", &s.num_segments);
  s.view.seg_start = checked_1d<int32_t>(seg_start, "seg_start", &n_start);
  s.view.seg_len = checked_1d<int32_t>(seg_len, "seg_len", &n_len);
  s.view.row_offsets = checked_1d<int64_t>(row_offsets, "row_offsets", &n_rows1);
  if (n_start != s.num_segments || n_len != s.num_segments) {
    throw py::value_error("seg_example, seg_start and seg_len must have one length, got " +
                          std::to_string(s.num_segments) + ", " + std::to_string(n_start) + ", " +
                          std::to_string(n_len));
  }
  if (n_rows1 < 1) throw py::value_error("row_offsets must have at least one element");
  s.view.num_rows = n_rows1 - 1;
  if (s.view.row_offsets[s.view.num_rows] > s.num_segments || s.view.row_offsets[0] < 0) {
    throw py::value_error("row_offsets must lie in [0, " + std::to_string(s.num_segments) + "]");
  }
  return s;
}

// Checks a Ragged's (values, offsets): offsets start at 0, never decrease, end at len(values).
const int64_t* checked_offsets(const py::array& offsets, int64_t n_values, int64_t* n_examples) {
  int64_t n1 = 0;
  const int64_t* o = checked_1d<int64_t>(offsets, "offsets", &n1);
  if (n1 < 1) throw py::value_error("offsets must have at least one element");
  if (o[0] != 0) throw py::value_error("offsets[0] must be 0, got " + std::to_string(o[0]));
  for (int64_t i = 0; i + 1 < n1; ++i) {
    if (o[i + 1] < o[i]) {
      throw py::value_error("offsets must be non-decreasing, got offsets[" + std::to_string(i) +
                            "] = " + std::to_string(o[i]) + " > offsets[" + std::to_string(i + 1) +
                            "] = " + std::to_string(o[i + 1]));
    }
  }
  if (o[n1 - 1] != n_values) {
    throw py::value_error("offsets[-1] must equal len(values) = " + std::to_string(n_values) + ", got " +
                          std::to_string(o[n1 - 1]));
  }
  *n_examples = n1 - 1;
  return o;
}

template <typename T>
py::tuple materialize(const py::array& values, const py::array& offsets, const py::object& mask,
                      const py::array& seg_example, const py::array& seg_start, const py::array& seg_len,
                      const py::array& row_offsets, int64_t seq_len, T pad_id, int threads) {
  int64_t n_values = 0, n_examples = 0;
  const T* v = checked_1d<T>(values, "values", &n_values);
  const int64_t* o = checked_offsets(offsets, n_values, &n_examples);
  const uint8_t* m = nullptr;
  if (!mask.is_none()) {
    int64_t n_mask = 0;
    m = checked_1d<uint8_t>(py::cast<py::array>(mask), "loss_mask", &n_mask);
    if (n_mask != n_values) {
      throw py::value_error("loss_mask must have one entry per token: " + std::to_string(n_values) + ", got " +
                            std::to_string(n_mask));
    }
  }
  if (seq_len < 2 || seq_len > kMaxSeqLen) {
    throw py::value_error("seq_len must be in [2, " + std::to_string(kMaxSeqLen) + "], got " + std::to_string(seq_len));
  }
  SegmentArrays s = checked_segments(seg_example, seg_start, seg_len, row_offsets);
  const int64_t rows = s.view.num_rows;
  py::array_t<T> ids({rows, seq_len});
  py::array_t<int64_t> labels({rows, seq_len});
  py::array_t<int32_t> pos({rows, seq_len});
  T* ids_p = ids.mutable_data();
  int64_t* lab_p = labels.mutable_data();
  int32_t* pos_p = pos.mutable_data();
  {
    py::gil_scoped_release release;
    check_segments(o, n_examples, s.view, seq_len);
    materialize_rows<T>(v, o, m, s.view, seq_len, pad_id, ids_p, lab_p, pos_p, threads);
  }
  return py::make_tuple(ids, labels, pos);
}

template <typename T>
py::array gather(const py::array& values, const py::array& offsets, const py::array& seg_example,
                 const py::array& seg_start, const py::array& seg_len, const py::array& row_offsets) {
  int64_t n_values = 0, n_examples = 0;
  const T* v = checked_1d<T>(values, "values", &n_values);
  const int64_t* o = checked_offsets(offsets, n_values, &n_examples);
  SegmentArrays s = checked_segments(seg_example, seg_start, seg_len, row_offsets);
  int64_t total = 0;
  for (int64_t i = s.view.row_offsets[0]; i < s.view.row_offsets[s.view.num_rows]; ++i) {
    total += s.view.seg_len[i] > 0 ? s.view.seg_len[i] : 0;
  }
  py::array_t<T> out(total);
  T* out_p = out.mutable_data();
  {
    py::gil_scoped_release release;
    check_segments(o, n_examples, s.view, INT64_MAX);
    gather_segments<T>(v, o, s.view, out_p);
  }
  return out;
}

template <typename T>
void def_typed(py::module_& m, const char* suffix) {
  m.def((std::string("_materialize_") + suffix).c_str(), &materialize<T>, py::arg("values"), py::arg("offsets"),
        py::arg("loss_mask"), py::arg("seg_example"), py::arg("seg_start"), py::arg("seg_len"),
        py::arg("row_offsets"), py::arg("seq_len"), py::arg("pad_id"), py::arg("threads") = 0,
        "Padded rows (input_ids, labels int64, position_ids int32) of a plan; see mlmix.pack.");
  m.def((std::string("_gather_") + suffix).c_str(), &gather<T>, py::arg("values"), py::arg("offsets"),
        py::arg("seg_example"), py::arg("seg_start"), py::arg("seg_len"), py::arg("row_offsets"),
        "The real tokens of a plan's rows, in packed order, without padding.");
}

}  // namespace

void bind_pack(py::module_& m) {
  m.attr("PACK_MAX_SEQ_LEN") = kMaxSeqLen;
  m.def(
      "_plan_pack",
      [](const py::array& lengths, int64_t seq_len, const std::string& strategy, const std::string& overlong,
         bool shuffle, uint64_t seed) {
        int64_t n = 0;
        const int64_t* len = checked_1d<int64_t>(lengths, "lengths", &n);
        PackStrategy strat = parse_strategy(strategy);
        OverlongPolicy pol = parse_overlong(overlong);
        PackPlanData plan;
        {
          py::gil_scoped_release release;
          plan = plan_pack(len, n, seq_len, strat, pol, shuffle, seed);
        }
        py::dict out;
        out["seg_example"] = vector_to_array(std::move(plan.seg_example));
        out["seg_start"] = vector_to_array(std::move(plan.seg_start));
        out["seg_len"] = vector_to_array(std::move(plan.seg_len));
        out["row_offsets"] = vector_to_array(std::move(plan.row_offsets));
        out["assignment"] = vector_to_array(std::move(plan.assignment));
        out["num_truncated"] = plan.num_truncated;
        out["num_split"] = plan.num_split;
        out["num_dropped"] = plan.num_dropped;
        out["tokens_dropped"] = plan.tokens_dropped;
        out["tokens_packed"] = plan.tokens_packed;
        return out;
      },
      py::arg("lengths"), py::arg("seq_len"), py::arg("strategy"), py::arg("overlong"), py::arg("shuffle"),
      py::arg("seed"), "Plan a packing from int64 lengths; see mlmix.pack.");
  def_typed<uint32_t>(m, "u32");
  def_typed<int32_t>(m, "i32");
  def_typed<int64_t>(m, "i64");
  m.def("_gather_u8", &gather<uint8_t>, py::arg("values"), py::arg("offsets"), py::arg("seg_example"),
        py::arg("seg_start"), py::arg("seg_len"), py::arg("row_offsets"));
  m.def("_gather_u16", &gather<uint16_t>, py::arg("values"), py::arg("offsets"), py::arg("seg_example"),
        py::arg("seg_start"), py::arg("seg_len"), py::arg("row_offsets"));
}

}  // namespace mlmix::bind
