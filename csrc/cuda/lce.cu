// Fused linear cross-entropy kernels: see lce.h. Arithmetic is float32 whatever the storage dtype.
#include "cuda/lce.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

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

// Bias and soft-capping applied to one raw logit x of column j (the value the softmax sees).
__device__ __forceinline__ float capped(const LogitsTile& t, float x, int64_t j) {
  if (t.bias != nullptr) x += load_f32(t.bias, t.v0 + j, t.bias_dtype);
  if (t.softcap > 0.0f) x = t.softcap * cap_tanh(x, t.softcap);
  return x;
}

// Four consecutive elements as float32: one 16-byte load for float32, one 8-byte load for 16-bit types. The
// caller guarantees the alignment (checked on the host: base pointer, row stride and column offset).
__device__ __forceinline__ void load4(const float* p, float (&x)[4]) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  x[0] = v.x; x[1] = v.y; x[2] = v.z; x[3] = v.w;
}
__device__ __forceinline__ void load4(const __nv_bfloat16* p, float (&x)[4]) {
  const uint2 u = *reinterpret_cast<const uint2*>(p);
  const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.x));
  const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.y));
  x[0] = a.x; x[1] = a.y; x[2] = b.x; x[3] = b.y;
}
__device__ __forceinline__ void load4(const __half* p, float (&x)[4]) {
  const uint2 u = *reinterpret_cast<const uint2*>(p);
  const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&u.x));
  const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&u.y));
  x[0] = a.x; x[1] = a.y; x[2] = b.x; x[3] = b.y;
}

__device__ __forceinline__ void store4(float* p, const float (&d)[4]) {
  *reinterpret_cast<float4*>(p) = make_float4(d[0], d[1], d[2], d[3]);
}
__device__ __forceinline__ void store4(__nv_bfloat16* p, const float (&d)[4]) {
  uint2 u;
  *reinterpret_cast<__nv_bfloat162*>(&u.x) = __floats2bfloat162_rn(d[0], d[1]);
  *reinterpret_cast<__nv_bfloat162*>(&u.y) = __floats2bfloat162_rn(d[2], d[3]);
  *reinterpret_cast<uint2*>(p) = u;
}
__device__ __forceinline__ void store4(__half* p, const float (&d)[4]) {
  uint2 u;
  *reinterpret_cast<__half2*>(&u.x) = __floats2half2_rn(d[0], d[1]);
  *reinterpret_cast<__half2*>(&u.y) = __floats2half2_rn(d[2], d[3]);
  *reinterpret_cast<uint2*>(p) = u;
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

// Adds one logit to the thread's state.
__device__ __forceinline__ void add_one(MaxSum& st, float x) {
  if (x > st.m) {
    st.s = st.s * __expf(st.m - x) + 1.0f;  // st.m = -inf on the first element: 0 * 0 + 1
    st.m = x;
  } else {
    st.s += __expf(x - st.m);  // NaN x lands here (comparisons with NaN are false) and poisons the sum
  }
}

// Adds four logits with one rescale at most: the new maximum first, then four exponentials.
__device__ __forceinline__ void add_four(MaxSum& st, const float (&x)[4]) {
  const float m4 = fmaxf(fmaxf(x[0], x[1]), fmaxf(x[2], x[3]));  // drops NaNs; they still poison the sum below
  if (m4 > st.m) {
    st.s *= __expf(st.m - m4);  // 0 when st.m = -inf
    st.m = m4;
  }
  st.s += (__expf(x[0] - st.m) + __expf(x[1] - st.m)) + (__expf(x[2] - st.m) + __expf(x[3] - st.m));
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

// One thread block per row of the tile. With vec, columns [0, 4 * (cols / 4)) are read four at a time (the
// host checked the alignment); the rest one at a time.
template <typename T>
__global__ void __launch_bounds__(kThreads) lse_tile_kernel(LogitsTile t, bool vec, float* __restrict__ run_max,
                                                            float* __restrict__ run_sum, float* __restrict__ target,
                                                            float* __restrict__ logit_sum) {
  const int64_t row = blockIdx.x;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t label_col = t.labels[row] - t.v0;  // outside [0, cols) when the label is in another tile
  const T* rowp = static_cast<const T*>(t.logits) + row * t.ld;

  MaxSum st{-INFINITY, 0.0f};
  float sum = 0.0f;
  const int64_t vec_cols = vec ? t.cols / 4 * 4 : 0;
  for (int64_t j0 = 4 * static_cast<int64_t>(threadIdx.x); j0 < vec_cols; j0 += 4 * kThreads) {
    float x[4];
    load4(rowp + j0, x);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      x[k] = capped(t, x[k], j0 + k);
      sum += x[k];
      if (j0 + k == label_col) target[row] += x[k];  // exactly one thread of one tile owns the label column
    }
    add_four(st, x);
  }
  for (int64_t j = vec_cols + threadIdx.x; j < t.cols; j += kThreads) {
    const float x = capped(t, load_f32(rowp, j, t.logits_dtype), j);
    add_one(st, x);
    sum += x;
    if (j == label_col) target[row] += x;
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

// d loss / d x of one logit (see lce.h).
__device__ __forceinline__ float grad_one(const LogitsTile& t, float x, int64_t j, int64_t label_col, float row_lse,
                                          float cp, float cy, float cu) {
  if (t.bias != nullptr) x += load_f32(t.bias, t.v0 + j, t.bias_dtype);
  float dcap = 1.0f;
  if (t.softcap > 0.0f) {
    const float th = cap_tanh(x, t.softcap);
    x = t.softcap * th;
    dcap = 1.0f - th * th;
  }
  float d = cp * __expf(x - row_lse) - cu;
  if (j == label_col) d -= cy;
  return d * dcap;
}

template <typename T, typename O>
__global__ void __launch_bounds__(kThreads) grad_tile_kernel(LogitsTile t, bool vec, const float* __restrict__ lse,
                                                             const float* __restrict__ coef_p,
                                                             const float* __restrict__ coef_y,
                                                             const float* __restrict__ coef_u, O* __restrict__ out,
                                                             int out_dtype, int64_t out_ld) {
  const int64_t row = blockIdx.x;
  const int64_t label_col = t.labels[row] - t.v0;
  const float row_lse = lse[row];
  const float cp = coef_p[row];
  const float cy = coef_y[row];
  const float cu = coef_u[row];
  const T* rowp = static_cast<const T*>(t.logits) + row * t.ld;
  O* outp = out + row * out_ld;
  const int64_t vec_cols = vec ? t.cols / 4 * 4 : 0;
  for (int64_t j0 = 4 * static_cast<int64_t>(threadIdx.x); j0 < vec_cols; j0 += 4 * kThreads) {
    float x[4];
    load4(rowp + j0, x);
#pragma unroll
    for (int k = 0; k < 4; ++k) x[k] = grad_one(t, x[k], j0 + k, label_col, row_lse, cp, cy, cu);
    store4(outp + j0, x);
  }
  for (int64_t j = vec_cols + threadIdx.x; j < t.cols; j += kThreads) {
    const float d = grad_one(t, load_f32(rowp, j, t.logits_dtype), j, label_col, row_lse, cp, cy, cu);
    store_f32(out, row * out_ld + j, out_dtype, d);
  }
}

int elem_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }

// Whether rows of a (rows, cols) array at p with row stride ld can be read four elements at a time.
bool vec_ok(const void* p, int64_t ld, int dtype) {
  const int64_t align = 4 * elem_size(dtype);
  return reinterpret_cast<std::uintptr_t>(p) % align == 0 && ld % 4 == 0;
}

template <typename T>
void launch_lse(const LogitsTile& tile, float* run_max, float* run_sum, float* target, float* logit_sum,
                cudaStream_t stream) {
  const bool vec = vec_ok(tile.logits, tile.ld, tile.logits_dtype);
  lse_tile_kernel<T><<<static_cast<unsigned>(tile.rows), kThreads, 0, stream>>>(tile, vec, run_max, run_sum, target,
                                                                                 logit_sum);
}

template <typename T, typename O>
void launch_grad(const LogitsTile& tile, const float* lse, const float* coef_p, const float* coef_y,
                 const float* coef_u, void* out, int out_dtype, int64_t out_ld, cudaStream_t stream) {
  const bool vec = vec_ok(tile.logits, tile.ld, tile.logits_dtype) && vec_ok(out, out_ld, out_dtype);
  grad_tile_kernel<T, O><<<static_cast<unsigned>(tile.rows), kThreads, 0, stream>>>(
      tile, vec, lse, coef_p, coef_y, coef_u, static_cast<O*>(out), out_dtype, out_ld);
}

template <typename T>
void launch_grad_out(const LogitsTile& tile, const float* lse, const float* coef_p, const float* coef_y,
                     const float* coef_u, void* out, int out_dtype, int64_t out_ld, cudaStream_t stream) {
  switch (out_dtype) {
    case kBFloat16: launch_grad<T, __nv_bfloat16>(tile, lse, coef_p, coef_y, coef_u, out, out_dtype, out_ld, stream);
      break;
    case kFloat16: launch_grad<T, __half>(tile, lse, coef_p, coef_y, coef_u, out, out_dtype, out_ld, stream); break;
    default: launch_grad<T, float>(tile, lse, coef_p, coef_y, coef_u, out, out_dtype, out_ld, stream);
  }
}

}  // namespace

int lce_lse_tile(const LogitsTile& tile, float* run_max, float* run_sum, float* target, float* logit_sum,
                 void* stream) {
  if (tile.rows <= 0 || tile.cols <= 0) return 0;
  const auto s = static_cast<cudaStream_t>(stream);
  switch (tile.logits_dtype) {
    case kBFloat16: launch_lse<__nv_bfloat16>(tile, run_max, run_sum, target, logit_sum, s); break;
    case kFloat16: launch_lse<__half>(tile, run_max, run_sum, target, logit_sum, s); break;
    default: launch_lse<float>(tile, run_max, run_sum, target, logit_sum, s);
  }
  return static_cast<int>(cudaGetLastError());
}

int lce_grad_tile(const LogitsTile& tile, const float* lse, const float* coef_p, const float* coef_y,
                  const float* coef_u, void* out, int out_dtype, int64_t out_ld, void* stream) {
  if (tile.rows <= 0 || tile.cols <= 0) return 0;
  const auto s = static_cast<cudaStream_t>(stream);
  switch (tile.logits_dtype) {
    case kBFloat16: launch_grad_out<__nv_bfloat16>(tile, lse, coef_p, coef_y, coef_u, out, out_dtype, out_ld, s); break;
    case kFloat16: launch_grad_out<__half>(tile, lse, coef_p, coef_y, coef_u, out, out_dtype, out_ld, s); break;
    default: launch_grad_out<float>(tile, lse, coef_p, coef_y, coef_u, out, out_dtype, out_ld, s);
  }
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
