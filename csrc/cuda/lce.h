// Fused linear cross-entropy: the per-block CUDA kernels (softmax statistics, loss terms, logit gradients).
//
// The GEMMs (hidden x weight^T, and the two gradient products) run on cuBLAS through torch; these kernels do
// everything between them on one (token block x vocab block) tile of logits, so no (tokens x vocab) tensor exists.
// Plain C++ interface (no CUDA types): pointers are device pointers, the stream is a cudaStream_t passed as void*.
#pragma once

#include <cstdint>

namespace mlmix::cuda {

// Element types of the tensors these kernels read or write (codes shared with python/mlmix/torch/loss.py).
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// One tile of logits: rows = tokens of the block, cols = vocabulary entries v0 .. v0 + cols - 1.
struct LogitsTile {
  const void* logits = nullptr;   // (rows, cols), row stride ld elements, dtype logits_dtype: hidden @ W_v^T
  int logits_dtype = kFloat32;
  int64_t ld = 0;
  int64_t rows = 0;
  int64_t cols = 0;
  const void* bias = nullptr;     // (vocab,) or nullptr; element v0 + j is added to column j
  int bias_dtype = kFloat32;
  int64_t v0 = 0;
  const int64_t* labels = nullptr;  // (rows,) target ids (already known to be in [0, vocab))
  float softcap = 0.0f;           // > 0: s = softcap * tanh(x / softcap); 0: s = x
};

// Merge the tile into per-row running statistics (float32, (rows,) each):
//   run_max, run_sum: online log-sum-exp state, lse = run_max + log(run_sum);
//   target += s[label - v0] when the label falls in this tile;
//   logit_sum += sum_j s_j (skipped when logit_sum is nullptr).
// Rows are processed by one thread block each, in a fixed order: results are deterministic.
// Returns a cudaError_t value (0 on success).
int lce_lse_tile(const LogitsTile& tile, float* run_max, float* run_sum, float* target, float* logit_sum,
                 void* stream);

// d loss / d x for the tile, written to out ((rows, cols), row stride out_ld, dtype out_dtype):
//   d = coef_p[r] * exp(s - lse[r]) - coef_u[r] - coef_y[r] * [v0 + j == label[r]],  times (1 - tanh^2) with softcap.
// Returns a cudaError_t value (0 on success).
int lce_grad_tile(const LogitsTile& tile, const float* lse, const float* coef_p, const float* coef_y,
                  const float* coef_u, void* out, int out_dtype, int64_t out_ld, void* stream);

// Number of CUDA devices; 0 when there is no driver or no device (never throws).
int device_count();

// Text of a cudaError_t value.
const char* error_string(int code);

}  // namespace mlmix::cuda
