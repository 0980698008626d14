// Fused linear cross-entropy kernels: see lce.h. Arithmetic is float32 whatever the storage dtype.
#include "cuda/lce.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

namespace mlmix::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// The dtype switch is uniform across a launch, so the branch costs nothing next to the memory traffic.
__device__ __forceinline__ float load_f32(const void* p, int64_t i, int dtype) {
  switch (dtype) {
    case kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_f32(void* p, int64_t i, int dtype, float v) {
  switch (dtype) {
    case kBFloat16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    case kFloat16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

// tanh(x / cap) in double: the build uses --use_fast_math, which turns tanhf into tanh.approx.f32 (about 2^-11
// relative error), too coarse for float32 logits. Only soft-capped losses pay for the double precision.
__device__ __forceinline__ float cap_tanh(float x, float cap) {
  return static_cast<float>(tanh(static_cast<double>(x) / static_cast<double>(cap)));
}

// Logit after bias and soft-capping (the value the softmax sees).
__device__ __forceinline__ float capped_logit(const LogitsTile& t, int64_t row, int64_t j) {
  float x = load_f32(t.logits, row * t.ld + j, t.logits_dtype);
  if (t.bias != nullptr) x += load_f32(t.bias, t.v0 + j, t.bias_dtype);
  if (t.softcap > 0.0f) x = t.softcap * cap_tanh(x, t.softcap);
  return x;
}

// Online log-sum-exp state (max m, sum of exp(x - m)). A side that has seen no finite logit has m = -inf and
// s = 0 (or NaN if it saw a NaN logit, which must survive the merge); exp(-inf - -inf) would be NaN, so such a
// side contributes its s * 0 explicitly.
struct MaxSum {
  float m;
  float s;
};

__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  if (isnan(a.m) || isnan(b.m)) return {NAN, NAN};  // fmaxf would drop a NaN operand
  const float m = fmaxf(a.m, b.m);
  const float sa = a.m == -INFINITY ? (isnan(a.s) ? NAN : 0.0f) : a.s * __expf(a.m - m);
  const float sb = b.m == -INFINITY ? (isnan(b.s) ? NAN : 0.0f) : b.s * __expf(b.m - m);
  return {m, sa + sb};
}

__device__ __forceinline__ MaxSum warp_merge(MaxSum v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    MaxSum o{__shfl_xor_sync(0xffffffffu, v.m, offset), __shfl_xor_sync(0xffffffffu, v.s, offset)};
    v = merge(v, o);
  }
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// One thread block per row of the tile.
__global__ void __launch_bounds__(kThreads) lse_tile_kernel(LogitsTile t, float* __restrict__ run_max,
                                                            float* __restrict__ run_sum, float* __restrict__ target,
                                                            float* __restrict__ logit_sum) {
  const int64_t row = blockIdx.x;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t label_col = t.labels[row] - t.v0;  // outside [0, cols) when the label is in another tile

  MaxSum st{-INFINITY, 0.0f};
  float sum = 0.0f;
  for (int64_t j = threadIdx.x; j < t.cols; j += kThreads) {
    const float x = capped_logit(t, row, j);
    if (x > st.m) {
      st.s = st.s * __expf(st.m - x) + 1.0f;  // st.m = -inf on the first element: 0 * 0 + 1
      st.m = x;
    } else {
      st.s += __expf(x - st.m);  // NaN x lands here (comparisons with NaN are false) and poisons the sum
    }
    sum += x;
    if (j == label_col) target[row] += x;  // exactly one thread of one tile owns the label column
  }

  __shared__ float sh_m[kWarps], sh_s[kWarps], sh_sum[kWarps];
  st = warp_merge(st);
  sum = warp_sum(sum);
  if (lane == 0) {
    sh_m[warp] = st.m;
    sh_s[warp] = st.s;
    sh_sum[warp] = sum;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    MaxSum total{run_max[row], run_sum[row]};
    float tile_sum = 0.0f;
    for (int w = 0; w < kWarps; ++w) {  // fixed order: deterministic
      total = merge(total, MaxSum{sh_m[w], sh_s[w]});
      tile_sum += sh_sum[w];
    }
    run_max[row] = total.m;
    run_sum[row] = total.s;
    if (logit_sum != nullptr) logit_sum[row] += tile_sum;
  }
}

__global__ void __launch_bounds__(kThreads) grad_tile_kernel(LogitsTile t, const float* __restrict__ lse,
                                                             const float* __restrict__ coef_p,
                                                             const float* __restrict__ coef_y,
                                                             const float* __restrict__ coef_u, void* out,
                                                             int out_dtype, int64_t out_ld) {
  const int64_t row = blockIdx.x;
  const int64_t label_col = t.labels[row] - t.v0;
  const float row_lse = lse[row];
  const float cp = coef_p[row];
  const float cy = coef_y[row];
  const float cu = coef_u[row];
  for (int64_t j = threadIdx.x; j < t.cols; j += kThreads) {
    float x = load_f32(t.logits, row * t.ld + j, t.logits_dtype);
    if (t.bias != nullptr) x += load_f32(t.bias, t.v0 + j, t.bias_dtype);
    float dcap = 1.0f;
    if (t.softcap > 0.0f) {
      const float th = cap_tanh(x, t.softcap);
      x = t.softcap * th;
      dcap = 1.0f - th * th;
    }
    float d = cp * __expf(x - row_lse) - cu;
    if (j == label_col) d -= cy;
    store_f32(out, row * out_ld + j, out_dtype, d * dcap);
  }
}

}  // namespace

int lce_lse_tile(const LogitsTile& tile, float* run_max, float* run_sum, float* target, float* logit_sum,
                 void* stream) {
  if (tile.rows <= 0 || tile.cols <= 0) return 0;
  lse_tile_kernel<<<static_cast<unsigned>(tile.rows), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      tile, run_max, run_sum, target, logit_sum);
  return static_cast<int>(cudaGetLastError());
}

int lce_grad_tile(const LogitsTile& tile, const float* lse, const float* coef_p, const float* coef_y,
                  const float* coef_u, void* out, int out_dtype, int64_t out_ld, void* stream) {
  if (tile.rows <= 0 || tile.cols <= 0) return 0;
  grad_tile_kernel<<<static_cast<unsigned>(tile.rows), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      tile, lse, coef_p, coef_y, coef_u, out, out_dtype, out_ld);
  return static_cast<int>(cudaGetLastError());
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  return n;
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace mlmix::cuda
