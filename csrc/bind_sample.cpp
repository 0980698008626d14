// pybind11 layer for the 'sample' kernels (csrc/sample.h): checks dtypes/shapes, releases the GIL, calls the kernel.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <cstring>
#include <mutex>

#include "bindings.h"
#include "common.h"
#include "sample.h"

namespace py = pybind11;
using mlmix::sample::Entry;
using mlmix::sample::StratifiedReservoir;

namespace mlmix::bind {
namespace {

// The reservoir as Python holds it: the kernel state plus a lock, because its methods run with the
// GIL released and two Python threads may call them on one object at the same time.
struct PyReservoir {
  PyReservoir(uint64_t seed, std::vector<uint64_t> codes, std::vector<int64_t> capacities)
      : r(seed, std::move(codes), std::move(capacities)) {}
  StratifiedReservoir r;
  std::mutex mutex;
};

void check_vector(const py::array& a, const char* name, char kind_a, char kind_b, py::ssize_t itemsize) {
  MLMIX_CHECK(a.ndim() == 1, name << " must be a 1-D array, got " << a.ndim() << " dimensions");
  const char kind = a.dtype().kind();
  MLMIX_CHECK((kind == kind_a || kind == kind_b) && (itemsize == 0 || a.itemsize() == itemsize),
              name << " has dtype " << std::string(py::str(a.dtype())) << ", which is not accepted here");
  MLMIX_CHECK(a.flags() & py::array::c_style, name << " must be C-contiguous");
}

template <class S>
void add_typed(PyReservoir& pr, const py::array& strata, const int32_t* lut, std::size_t lut_size,
               const uint64_t* ids, const double* weights, int threads) {
  const S* s = static_cast<const S*>(strata.data());
  const std::size_t n = static_cast<std::size_t>(strata.shape(0));
  py::gil_scoped_release release;
  std::lock_guard<std::mutex> lock(pr.mutex);
  pr.r.add<S>(s, n, lut, lut_size, ids, weights, threads);
}

void reservoir_add(PyReservoir& r, const py::array& strata, const py::array& lut, const py::array& ids,
                   const py::object& weights, int threads) {
  check_vector(strata, "strata", 'i', 'u', 0);
  check_vector(lut, "lut", 'i', 'i', 4);
  check_vector(ids, "ids", 'u', 'i', 8);
  MLMIX_CHECK(ids.shape(0) == strata.shape(0),
              "ids and strata must have the same length, got " << ids.shape(0) << " and " << strata.shape(0));
  const double* w = nullptr;
  py::array warr;
  if (!weights.is_none()) {
    warr = py::reinterpret_borrow<py::array>(weights);
    check_vector(warr, "weights", 'f', 'f', 8);
    MLMIX_CHECK(warr.shape(0) == strata.shape(0),
                "weights and strata must have the same length, got " << warr.shape(0) << " and " << strata.shape(0));
    w = static_cast<const double*>(warr.data());
  }
  const auto* lut_ptr = static_cast<const int32_t*>(lut.data());
  const auto lut_size = static_cast<std::size_t>(lut.shape(0));
  const auto* id_ptr = static_cast<const uint64_t*>(ids.data());
  const bool is_signed = strata.dtype().kind() == 'i';
  switch (strata.itemsize()) {
    case 1:
      return is_signed ? add_typed<int8_t>(r, strata, lut_ptr, lut_size, id_ptr, w, threads)
                       : add_typed<uint8_t>(r, strata, lut_ptr, lut_size, id_ptr, w, threads);
    case 2:
      return is_signed ? add_typed<int16_t>(r, strata, lut_ptr, lut_size, id_ptr, w, threads)
                       : add_typed<uint16_t>(r, strata, lut_ptr, lut_size, id_ptr, w, threads);
    case 4:
      return is_signed ? add_typed<int32_t>(r, strata, lut_ptr, lut_size, id_ptr, w, threads)
                       : add_typed<uint32_t>(r, strata, lut_ptr, lut_size, id_ptr, w, threads);
    case 8:
      return is_signed ? add_typed<int64_t>(r, strata, lut_ptr, lut_size, id_ptr, w, threads)
                       : add_typed<uint64_t>(r, strata, lut_ptr, lut_size, id_ptr, w, threads);
    default:
      MLMIX_CHECK(false, "strata has an unsupported integer size " << strata.itemsize());
  }
}

// The sample of stratum s as three arrays (keys float64, hashes uint64, ids uint64), best first.
py::tuple reservoir_sample(PyReservoir& pr, std::size_t s) {
  std::vector<Entry> entries;
  {
    py::gil_scoped_release release;
    std::lock_guard<std::mutex> lock(pr.mutex);
    entries = pr.r.sample(s);
  }
  const auto n = static_cast<py::ssize_t>(entries.size());
  py::array_t<double> keys(n);
  py::array_t<uint64_t> hashes(n);
  py::array_t<uint64_t> ids(n);
  double* k = keys.mutable_data();
  uint64_t* h = hashes.mutable_data();
  uint64_t* d = ids.mutable_data();
  for (py::ssize_t i = 0; i < n; ++i) {
    k[i] = entries[static_cast<std::size_t>(i)].key;
    h[i] = entries[static_cast<std::size_t>(i)].hash;
    d[i] = entries[static_cast<std::size_t>(i)].id;
  }
  return py::make_tuple(keys, hashes, ids);
}

void reservoir_load(PyReservoir& pr, std::size_t s, const py::array_t<double, py::array::c_style>& keys,
                    const py::array_t<uint64_t, py::array::c_style>& hashes,
                    const py::array_t<uint64_t, py::array::c_style>& ids, uint64_t seen) {
  MLMIX_CHECK(keys.ndim() == 1 && hashes.ndim() == 1 && ids.ndim() == 1, "saved entries must be 1-D arrays");
  const auto n = static_cast<std::size_t>(keys.shape(0));
  MLMIX_CHECK(static_cast<std::size_t>(hashes.shape(0)) == n && static_cast<std::size_t>(ids.shape(0)) == n,
              "saved keys, hashes and ids must have the same length");
  std::vector<Entry> entries(n);
  for (std::size_t i = 0; i < n; ++i) entries[i] = Entry{keys.data()[i], hashes.data()[i], ids.data()[i]};
  py::gil_scoped_release release;
  std::lock_guard<std::mutex> lock(pr.mutex);
  pr.r.load(s, entries.data(), n, seen);
}

py::array_t<uint64_t> hash_ids(uint64_t seed, uint64_t code, const py::array& ids) {
  check_vector(ids, "ids", 'u', 'i', 8);
  const auto n = ids.shape(0);
  py::array_t<uint64_t> out(n);
  const auto* in = static_cast<const uint64_t*>(ids.data());
  uint64_t* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    mlmix::sample::hash_ids(seed, code, in, static_cast<std::size_t>(n), o);
  }
  return out;
}

py::array_t<uint64_t> blake2b64_strings(const py::bytes& key, const py::bytes& prefix, const py::array& values,
                                        const py::array& offsets) {
  const std::string k = key, pre = prefix;
  MLMIX_CHECK(k.size() == 8, "key must be 8 bytes, got " << k.size());
  check_vector(values, "values", 'u', 'u', 1);
  check_vector(offsets, "offsets", 'i', 'i', 8);
  const auto n_off = offsets.shape(0);
  MLMIX_CHECK(n_off >= 1, "offsets must hold at least one entry (0 for no strings)");
  const auto* off = static_cast<const int64_t*>(offsets.data());
  const int64_t n_values = values.shape(0);
  MLMIX_CHECK(off[0] >= 0 && off[n_off - 1] <= n_values,
              "offsets must lie in [0, len(values)] = [0, " << n_values << "], got " << off[0] << " .. "
                                                              << off[n_off - 1]);
  for (py::ssize_t i = 0; i + 1 < n_off; ++i) {
    MLMIX_CHECK(off[i] <= off[i + 1], "offsets must be nondecreasing, got offsets[" << i << "] = " << off[i]
                                                                                      << " > offsets[" << i + 1
                                                                                      << "] = " << off[i + 1]);
  }
  const auto n = static_cast<std::size_t>(n_off - 1);
  py::array_t<uint64_t> out(static_cast<py::ssize_t>(n));
  uint64_t* o = out.mutable_data();
  const auto* v = static_cast<const uint8_t*>(values.data());
  {
    py::gil_scoped_release release;
    mlmix::sample::blake2b64_strings(reinterpret_cast<const uint8_t*>(k.data()),
                                     reinterpret_cast<const uint8_t*>(pre.data()), pre.size(), v, off, n, o);
  }
  return out;
}

}  // namespace

void bind_sample(py::module_& m) {
  py::class_<PyReservoir>(m, "_StratifiedReservoir")
      .def(py::init<uint64_t, std::vector<uint64_t>, std::vector<int64_t>>(), py::arg("seed"), py::arg("codes"),
           py::arg("capacities"))
      .def("add", &reservoir_add, py::arg("strata"), py::arg("lut"), py::arg("ids"), py::arg("weights"),
           py::arg("threads"))
      .def(
          "merge",
          [](PyReservoir& self, PyReservoir& other) {
            py::gil_scoped_release release;
            if (&self == &other) {
              std::lock_guard<std::mutex> lock(self.mutex);
              self.r.merge(other.r);
            } else {
              std::scoped_lock lock(self.mutex, other.mutex);  // deadlock-free for a.merge(b) || b.merge(a)
              self.r.merge(other.r);
            }
          },
          py::arg("other"))
      .def("sample", &reservoir_sample, py::arg("stratum"))
      .def("load", &reservoir_load, py::arg("stratum"), py::arg("keys"), py::arg("hashes"), py::arg("ids"),
           py::arg("seen"))
      .def("seen", [](PyReservoir& pr, std::size_t s) {
        std::lock_guard<std::mutex> lock(pr.mutex);
        MLMIX_CHECK_INDEX(s < pr.r.num_strata(), "stratum index " << s << " out of range");
        return pr.r.seen(s);
      });
  m.def("_sample_hash_ids", &hash_ids, py::arg("seed"), py::arg("code"), py::arg("ids"),
        "hash of each uint64/int64 id under (seed, stratum code), as used for reservoir keys");
  m.def("_sample_exp_key", &mlmix::sample::exp_key, py::arg("hash"));
  m.def("_sample_blake2b64", &blake2b64_strings, py::arg("key"), py::arg("prefix"), py::arg("values"),
        py::arg("offsets"),
        "int.from_bytes(blake2b(prefix + values[offsets[i]:offsets[i+1]], digest_size=8, key=key).digest(), "
        "'little') of each string");
}

}  // namespace mlmix::bind
