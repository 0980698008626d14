// The one compiled extension, mlmix._core: build facts plus the per-operation bindings.
#include "bindings.h"

#include <pybind11/stl.h>

#include "bind_convert.h"

namespace py = pybind11;

PYBIND11_MODULE(_core, m) {
  m.doc() = "mlmix compiled core (private; use the mlmix package API)";

  py::dict info;
  info["version"] = MLMIX_VERSION;
  info["compiler"] = MLMIX_COMPILER;
  info["cxx_flags"] = MLMIX_CXX_FLAGS;
  info["build_type"] = MLMIX_BUILD_TYPE;
#ifdef MLMIX_WITH_CUDA
  info["backends"] = py::make_tuple("cpu", "cuda");
  info["cuda_architectures"] = MLMIX_CUDA_ARCHS;
#else
  info["backends"] = py::make_tuple("cpu");
  info["cuda_architectures"] = "";
#endif
#if defined(__SANITIZE_ADDRESS__)
  info["sanitizers"] = "address,undefined";
#else
  info["sanitizers"] = "";
#endif
  m.attr("BUILD_INFO") = info;

  // A document of the wrong type (bind_convert.h): a TypeError, and a ValueError as dedup raised before.
  py::register_exception<mlmix::bind::DocumentTypeError>(
      m, "DocumentTypeError", py::make_tuple(py::handle(PyExc_TypeError), py::handle(PyExc_ValueError)));

  mlmix::bind::bind_pack(m);
  mlmix::bind::bind_store(m);
  mlmix::bind::bind_sample(m);
  mlmix::bind::bind_dedup(m);
  mlmix::bind::bind_bpe(m);
  mlmix::bind::bind_loss(m);
  mlmix::bind::bind_records(m);
  mlmix::bind::bind_langid(m);
  mlmix::bind::bind_chat(m);
}
