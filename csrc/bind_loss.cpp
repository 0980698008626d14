// pybind11 layer for the fused linear cross-entropy kernels (csrc/cuda/lce.h).
//
// The kernels take raw device pointers (Python passes tensor.data_ptr() as int) and the CUDA stream handle
// (torch.cuda.current_stream().cuda_stream), so the extension never links against torch's C++ ABI. The torch side
// (python/mlmix/torch/loss.py) owns every allocation; this layer checks what it can about the arguments, releases
// the GIL and launches.
#include "bindings.h"

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.h"
#ifdef MLMIX_WITH_CUDA
#include "cuda/lce.h"
#endif

namespace py = pybind11;

namespace mlmix::bind {

#ifdef MLMIX_WITH_CUDA
namespace {

void check_dtype(int code, const char* name) {
  MLMIX_CHECK(code == cuda::kFloat32 || code == cuda::kBFloat16 || code == cuda::kFloat16,
              name << " must be a dtype code 0 (float32), 1 (bfloat16) or 2 (float16), got " << code);
}

template <typename T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

cuda::LogitsTile make_tile(std::uintptr_t logits, int logits_dtype, int64_t ld, int64_t rows, int64_t cols,
                           std::uintptr_t bias, int bias_dtype, int64_t v0, std::uintptr_t labels, double softcap) {
  MLMIX_CHECK(logits != 0, "logits must be a non-null device pointer");
  MLMIX_CHECK(labels != 0, "labels must be a non-null device pointer");
  MLMIX_CHECK(rows >= 0 && rows <= INT32_MAX, "rows must be in [0, 2^31), got " << rows);
  MLMIX_CHECK(cols >= 0, "cols must be >= 0, got " << cols);
  MLMIX_CHECK(ld >= cols, "ld (row stride of logits) must be >= cols = " << cols << ", got " << ld);
  MLMIX_CHECK(v0 >= 0, "v0 must be >= 0, got " << v0);
  MLMIX_CHECK(softcap >= 0.0, "softcap must be >= 0 (0 = none), got " << softcap);
  check_dtype(logits_dtype, "logits_dtype");
  check_dtype(bias_dtype, "bias_dtype");
  cuda::LogitsTile t;
  t.logits = ptr<const void>(logits);
  t.logits_dtype = logits_dtype;
  t.ld = ld;
  t.rows = rows;
  t.cols = cols;
  t.bias = bias == 0 ? nullptr : ptr<const void>(bias);
  t.bias_dtype = bias_dtype;
  t.v0 = v0;
  t.labels = ptr<const int64_t>(labels);
  t.softcap = static_cast<float>(softcap);
  return t;
}

void raise_on_error(int code, const char* what) {
  if (code != 0) throw std::runtime_error(std::string(what) + " failed: " + cuda::error_string(code));
}

}  // namespace
#endif

void bind_loss(py::module_& m) {
  m.def(
      "cuda_device_count",
      []() {
#ifdef MLMIX_WITH_CUDA
        return cuda::device_count();
#else
        return 0;
#endif
      },
      "Number of CUDA devices visible to mlmix's kernels (0 without a driver, a device or CUDA support).");

#ifdef MLMIX_WITH_CUDA
  m.def(
      "lce_lse_block",
      [](std::uintptr_t logits, int logits_dtype, int64_t ld, int64_t rows, int64_t cols, std::uintptr_t bias,
         int bias_dtype, int64_t v0, std::uintptr_t labels, double softcap, std::uintptr_t run_max,
         std::uintptr_t run_sum, std::uintptr_t target, std::uintptr_t logit_sum, std::uintptr_t stream) {
        const cuda::LogitsTile t = make_tile(logits, logits_dtype, ld, rows, cols, bias, bias_dtype, v0, labels,
                                             softcap);
        MLMIX_CHECK(run_max != 0 && run_sum != 0 && target != 0,
                    "run_max, run_sum and target must be non-null device pointers");
        int code;
        {
          py::gil_scoped_release release;
          code = cuda::lce_lse_tile(t, ptr<float>(run_max), ptr<float>(run_sum), ptr<float>(target),
                                    logit_sum == 0 ? nullptr : ptr<float>(logit_sum), ptr<void>(stream));
        }
        raise_on_error(code, "lce_lse_block");
      },
      py::arg("logits"), py::arg("logits_dtype"), py::arg("ld"), py::arg("rows"), py::arg("cols"), py::arg("bias"),
      py::arg("bias_dtype"), py::arg("v0"), py::arg("labels"), py::arg("softcap"), py::arg("run_max"),
      py::arg("run_sum"), py::arg("target"), py::arg("logit_sum"), py::arg("stream"),
      "Merge a (rows, cols) logits tile into per-row float32 log-sum-exp state, target logit and logit sum "
      "(device pointers as ints; stream = cudaStream_t as int). Asynchronous on the stream.");

  m.def(
      "lce_grad_block",
      [](std::uintptr_t logits, int logits_dtype, int64_t ld, int64_t rows, int64_t cols, std::uintptr_t bias,
         int bias_dtype, int64_t v0, std::uintptr_t labels, double softcap, std::uintptr_t lse,
         std::uintptr_t coef_p, std::uintptr_t coef_y, std::uintptr_t coef_u, std::uintptr_t out, int out_dtype,
         int64_t out_ld, std::uintptr_t stream) {
        const cuda::LogitsTile t = make_tile(logits, logits_dtype, ld, rows, cols, bias, bias_dtype, v0, labels,
                                             softcap);
        MLMIX_CHECK(lse != 0 && coef_p != 0 && coef_y != 0 && coef_u != 0 && out != 0,
                    "lse, coef_p, coef_y, coef_u and out must be non-null device pointers");
        MLMIX_CHECK(out_ld >= cols, "out_ld must be >= cols = " << cols << ", got " << out_ld);
        check_dtype(out_dtype, "out_dtype");
        int code;
        {
          py::gil_scoped_release release;
          code = cuda::lce_grad_tile(t, ptr<const float>(lse), ptr<const float>(coef_p), ptr<const float>(coef_y),
                                     ptr<const float>(coef_u), ptr<void>(out), out_dtype, out_ld,
                                     ptr<void>(stream));
        }
        raise_on_error(code, "lce_grad_block");
      },
      py::arg("logits"), py::arg("logits_dtype"), py::arg("ld"), py::arg("rows"), py::arg("cols"), py::arg("bias"),
      py::arg("bias_dtype"), py::arg("v0"), py::arg("labels"), py::arg("softcap"), py::arg("lse"),
      py::arg("coef_p"), py::arg("coef_y"), py::arg("coef_u"), py::arg("out"), py::arg("out_dtype"),
      py::arg("out_ld"), py::arg("stream"),
      "Write d loss / d logits for a (rows, cols) tile (device pointers as ints). Asynchronous on the stream.");
#endif
}

}  // namespace mlmix::bind
