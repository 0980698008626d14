// Conversions shared by the bindings (csrc/bind_*.cpp): arrays in (dtype, rank and contiguity checked,
// never silently converted), arrays out (a vector's buffer handed to numpy without a copy), and
// documents in (a sequence of str / bytes read in place, as the kernels' TextView).
//
// One error policy for every binding: an argument of the wrong type or dtype is a TypeError, one of the
// right type with a wrong value (rank, shape, length, contiguity, range) a ValueError. Messages name the
// argument, say what came and what is accepted. A document of the wrong type raises DocumentTypeError,
// a TypeError that is also a ValueError: dedup raised ValueError for it before the rule was shared, and
// code catching either keeps working (numpy's AxisError, a ValueError and an IndexError, is the model).
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"

namespace mlmix::bind {

namespace py = pybind11;

// ---------------------------------------------------------------------------------------------
// Arrays in

// True when `a` holds exactly T in native byte order (compared by kind and width: numpy has several
// type objects for one C type, e.g. 'l' and 'q').
template <typename T>
bool has_dtype(const py::array& a) {
  const py::dtype want = py::dtype::of<T>();
  return a.dtype().kind() == want.kind() && a.dtype().itemsize() == want.itemsize() && a.dtype().byteorder() != '>';
}

template <typename T>
void check_dtype(const py::array& a, const char* name) {
  if (!has_dtype<T>(a)) {
    throw py::type_error(std::string(name) + " must have dtype " + std::string(py::str(py::dtype::of<T>())) +
                         ", got " + std::string(py::str(a.dtype())));
  }
}

inline void check_contiguous(const py::array& a, const char* name) {
  if (!(a.flags() & py::array::c_style)) {
    throw py::value_error(std::string(name) + " must be C-contiguous (use numpy.ascontiguousarray)");
  }
}

// The data pointer of a 1-D C-contiguous array of exactly dtype T; its length into *size.
template <typename T>
const T* checked_1d(const py::array& a, const char* name, int64_t* size) {
  check_dtype<T>(a, name);
  if (a.ndim() != 1) {
    throw py::value_error(std::string(name) + " must be 1-D, got " + std::to_string(a.ndim()) + " dimensions");
  }
  check_contiguous(a, name);
  *size = a.shape(0);
  return static_cast<const T*>(a.data());
}

// The data pointer of a 2-D C-contiguous array of exactly dtype T; its shape into *rows, *cols.
template <typename T>
const T* checked_2d(const py::array& a, const char* name, int64_t* rows, int64_t* cols) {
  check_dtype<T>(a, name);
  if (a.ndim() != 2) {
    throw py::value_error(std::string(name) + " must be 2-D, got " + std::to_string(a.ndim()) + " dimensions");
  }
  check_contiguous(a, name);
  *rows = a.shape(0);
  *cols = a.shape(1);
  return static_cast<const T*>(a.data());
}

// checked_1d of an optional argument (None gives null), which must have `expected` entries.
template <typename T>
const T* checked_optional_1d(const py::object& a, const char* name, int64_t expected) {
  if (a.is_none()) return nullptr;
  if (!py::isinstance<py::array>(a)) {
    throw py::type_error(std::string(name) + " must be None or a numpy array of dtype " +
                         std::string(py::str(py::dtype::of<T>())) + ", got " + Py_TYPE(a.ptr())->tp_name);
  }
  int64_t size = 0;
  const T* p = checked_1d<T>(py::reinterpret_borrow<py::array>(a), name, &size);
  if (size != expected) {
    throw py::value_error(std::string(name) + " must have one entry per document (" + std::to_string(expected) +
                          "), got " + std::to_string(size));
  }
  return p;
}

// ---------------------------------------------------------------------------------------------
// Arrays out

// Hands a vector's buffer to numpy without copying; the capsule frees it with the array.
template <typename T, typename A>
py::array_t<T> vector_to_array(std::vector<T, A>&& v) {
  auto* owned = new std::vector<T, A>(std::move(v));
  py::capsule owner(owned, [](void* p) { delete static_cast<std::vector<T, A>*>(p); });
  return py::array_t<T>({static_cast<py::ssize_t>(owned->size())}, {static_cast<py::ssize_t>(sizeof(T))},
                        owned->data(), owner);
}

// ---------------------------------------------------------------------------------------------
// Documents in

// A document of the wrong type, or a single document where a sequence of them was expected.
// Registered in bindings.cpp as mlmix._core.DocumentTypeError(TypeError, ValueError).
class DocumentTypeError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Which documents a kernel reads: str only (code units as Python stores them), or str and bytes (bytes
// as UTF-8; bytearray and memoryview are copied to bytes first, since they could change meanwhile).
enum class Documents { kStr, kStrOrBytes };

// A str read in place: its code units, 1 (Latin-1), 2 (UCS-2) or 4 (UCS-4) bytes wide. Lone surrogates
// are possible; each kernel says what it does with them.
inline TextView str_view(PyObject* s) {
#if PY_VERSION_HEX < 0x030C0000
  if (PyUnicode_READY(s) != 0) throw py::error_already_set();
#endif
  return TextView{PyUnicode_DATA(s), static_cast<int64_t>(PyUnicode_GET_LENGTH(s)),
                  static_cast<int>(PyUnicode_KIND(s))};
}

// The documents of a Python sequence (any iterable but a single str or bytes), read in place: nothing is
// encoded or copied but bytearray / memoryview documents. A tuple holds a reference to every document,
// so the views stay valid while the GIL is released, whatever happens to the caller's list meanwhile.
// Built with the GIL held.
class HeldDocuments {
 public:
  HeldDocuments(py::handle seq, Documents accept, const char* name = "texts") {
    const char* accepted = accept == Documents::kStr ? "a str" : "str or UTF-8 bytes";
    if (PyUnicode_Check(seq.ptr()) || PyBytes_Check(seq.ptr())) {
      throw DocumentTypeError(std::string(name) + " must be a sequence of documents, not a single " +
                              Py_TYPE(seq.ptr())->tp_name);
    }
    held_ = py::reinterpret_steal<py::tuple>(PySequence_Tuple(seq.ptr()));
    if (!held_) throw py::error_already_set();
    const auto n = static_cast<int64_t>(PyTuple_GET_SIZE(held_.ptr()));
    views_.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      PyObject* o = PyTuple_GET_ITEM(held_.ptr(), static_cast<Py_ssize_t>(i));
      const std::string item = std::string(name) + "[" + std::to_string(i) + "]";
      if (PyUnicode_Check(o)) {
        views_[i] = str_view(o);
        continue;
      }
      if (o == Py_None) throw DocumentTypeError(item + " is None; documents must be " + accepted);
      const bool bytes_like = PyBytes_Check(o) || PyByteArray_Check(o) || PyMemoryView_Check(o);
      if (accept == Documents::kStr || !bytes_like) {
        throw DocumentTypeError(item + " must be " + accepted + ", got " + Py_TYPE(o)->tp_name);
      }
      if (!PyBytes_Check(o)) {
        o = PyBytes_FromObject(o);
        if (!o) throw py::error_already_set();
        copies_.append(py::reinterpret_steal<py::object>(o));
      }
      views_[i] = TextView{PyBytes_AS_STRING(o), static_cast<int64_t>(PyBytes_GET_SIZE(o)), 0};
    }
  }
  HeldDocuments(const HeldDocuments&) = delete;
  HeldDocuments& operator=(const HeldDocuments&) = delete;

  const std::vector<TextView>& views() const { return views_; }
  int64_t size() const { return static_cast<int64_t>(views_.size()); }

 private:
  py::tuple held_;
  py::list copies_;
  std::vector<TextView> views_;
};

}  // namespace mlmix::bind
