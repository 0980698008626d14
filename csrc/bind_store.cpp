// pybind11 layer for the 'store' kernels (csrc/store.h): checks dtypes/shapes, releases the GIL, calls the kernel.
#include <pybind11/numpy.h>

#include <string>

#include "bind_convert.h"
#include "bindings.h"
#include "pack.h"
#include "store.h"

namespace py = pybind11;

namespace mlmix::bind {
namespace {

template <typename T>
py::tuple store_rows(const py::array& tokens, const py::object& mask, const py::array& row_offsets,
                     const py::array& seg_offsets, const py::array& seg_lens, const py::array& rows, int64_t seq_len,
                     T pad_id, int threads) {
  CompactRows store{};
  int64_t n_rows1 = 0, n_seg_rows1 = 0, batch = 0;
  const T* tok = checked_1d<T>(tokens, "tokens", &store.num_tokens);
  store.row_offsets = checked_1d<int64_t>(row_offsets, "row_offsets", &n_rows1);
  store.seg_offsets = checked_1d<int64_t>(seg_offsets, "seg_offsets", &n_seg_rows1);
  store.seg_lens = checked_1d<int32_t>(seg_lens, "seg_lens", &store.num_segments);
  const int64_t* rows_p = checked_1d<int64_t>(rows, "rows", &batch);
  if (n_rows1 < 1 || n_seg_rows1 != n_rows1) {
    throw py::value_error("row_offsets and seg_offsets must both have num_rows + 1 >= 1 entries, got " +
                          std::to_string(n_rows1) + " and " + std::to_string(n_seg_rows1));
  }
  store.num_rows = n_rows1 - 1;
  const uint8_t* m = nullptr;
  if (!mask.is_none()) {
    int64_t n_mask = 0;
    m = checked_1d<uint8_t>(py::cast<py::array>(mask), "loss_mask", &n_mask);
    if (n_mask != store.num_tokens) {
      throw py::value_error("loss_mask must have one entry per token: " + std::to_string(store.num_tokens) +
                            ", got " + std::to_string(n_mask));
    }
  }
  if (seq_len < 2 || seq_len > kMaxSeqLen) {
    throw py::value_error("seq_len must be in [2, " + std::to_string(kMaxSeqLen) + "], got " + std::to_string(seq_len));
  }
  py::array_t<T> ids({batch, seq_len});
  py::array_t<int64_t> labels({batch, seq_len});
  py::array_t<int32_t> pos({batch, seq_len});
  T* ids_p = ids.mutable_data();
  int64_t* lab_p = labels.mutable_data();
  int32_t* pos_p = pos.mutable_data();
  {
    py::gil_scoped_release release;
    check_compact_rows(store, rows_p, batch, seq_len);
    materialize_compact_rows<T>(tok, m, store, rows_p, batch, seq_len, pad_id, ids_p, lab_p, pos_p, threads);
  }
  return py::make_tuple(ids, labels, pos);
}

template <typename T>
void def_typed(py::module_& m, const char* suffix) {
  m.def((std::string("_store_rows_") + suffix).c_str(), &store_rows<T>, py::arg("tokens"), py::arg("loss_mask"),
        py::arg("row_offsets"), py::arg("seg_offsets"), py::arg("seg_lens"), py::arg("rows"), py::arg("seq_len"),
        py::arg("pad_id"), py::arg("threads") = 1,
        "Padded rows (input_ids, labels int64, position_ids int32) of a packed store's compact rows.");
}

}  // namespace

void bind_store(py::module_& m) {
  def_typed<uint32_t>(m, "u32");
  def_typed<int32_t>(m, "i32");
  def_typed<int64_t>(m, "i64");
}

}  // namespace mlmix::bind
