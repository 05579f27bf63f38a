// Shared device helpers for the kernels in csrc/: dtype codes, element
// conversions (bf16 / fp16 / fp32 / float8), block reductions and the
// launch preamble that turns CUDA errors into C++ exceptions (pybind11
// re-raises those as Python RuntimeError).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include "kernels_api.h"

namespace kx {

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

[[noreturn]] inline void throw_cuda(cudaError_t err, const char* what) {
  throw std::runtime_error(std::string("kernels._C: ") + what + " failed: " +
                           cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

#define KX_CUDA_CHECK(expr)                         \
  do {                                              \
    cudaError_t kx_err_ = (expr);                   \
    if (kx_err_ != cudaSuccess) {                   \
      ::kx::throw_cuda(kx_err_, #expr);             \
    }                                               \
  } while (0)

// Checks the launch that was just issued. Errors of earlier asynchronous work
// (an illegal address in a previous kernel) also surface here, which is the
// earliest point this runtime can see them.
inline void check_launch(const char* kernel_name) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw_cuda(err, kernel_name);
}

// Every entry point starts here: it makes sure a device exists (a CPU-only
// machine gets a clear message rather than a launch error) and selects the
// device the caller's tensors live on. cudart is linked statically, so its
// notion of the "current device" is separate from torch's and must be set on
// every call.
void prepare_device(int device);

inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// Raises the dynamic shared-memory limit of a kernel once per (kernel, device).
void ensure_smem_limit(const void* kernel, int device, int bytes);

int sm_count(int device);

// ---------------------------------------------------------------------------
// Element types
// ---------------------------------------------------------------------------

// Tag types for the two float8 formats, stored as raw bytes so that no
// arithmetic on them happens by accident.
struct e4m3 { std::uint8_t bits; };
struct e5m2 { std::uint8_t bits; };

// Bytes per element of a dtype code from kernels_api.h; 0 for an unknown code.
inline int elem_size(int dtype) {
  switch (dtype) {
    case kFloat32: return 4;
    case kFloat16:
    case kBFloat16: return 2;
    case kFloat8E4M3:
    case kFloat8E5M2: return 1;
  }
  return 0;
}

template <typename T> struct FloatLimit;
template <> struct FloatLimit<e4m3> { static constexpr float max = 448.0f; };
template <> struct FloatLimit<e5m2> { static constexpr float max = 57344.0f; };

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(e4m3 v) {
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(v.bits, __NV_E4M3)));
}
__device__ __forceinline__ float to_float(e5m2 v) {
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(v.bits, __NV_E5M2)));
}

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
// float8: finite values saturate to the format's largest finite value;
// non-finite values (inf and NaN) become NaN, which is 0x7F in both formats.
// The satfinite conversion alone would turn inf into the largest value.
template <> __device__ __forceinline__ e4m3 from_float<e4m3>(float v) {
  e4m3 r;
  r.bits = isfinite(v) ? static_cast<std::uint8_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3))
                       : std::uint8_t(0x7F);
  return r;
}
template <> __device__ __forceinline__ e5m2 from_float<e5m2>(float v) {
  e5m2 r;
  r.bits = isfinite(v) ? static_cast<std::uint8_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E5M2))
                       : std::uint8_t(0x7F);
  return r;
}

// A group of N elements moved as one aligned access (N * sizeof(T) must be
// 1, 2, 4, 8 or 16 bytes).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// ---------------------------------------------------------------------------
// Reductions
// ---------------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ unsigned warp_max_u32(unsigned v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// Combines two partial log-sum-exp states (m, s) meaning s * 2^m, both in
// base 2. m == -inf marks an empty state; it must not produce inf - inf.
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
  float mn = fmaxf(m, m2);
  if (mn == -INFINITY) {
    s = s + s2;  // both empty (0), or a NaN that must survive
    return;
  }
  s = s * exp2f(m - mn) + s2 * exp2f(m2 - mn);
  m = mn;
}

__device__ __forceinline__ void warp_lse(float& m, float& s) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    float m2 = __shfl_xor_sync(0xffffffffu, m, off);
    float s2 = __shfl_xor_sync(0xffffffffu, s, off);
    lse_merge(m, s, m2, s2);
  }
}

}  // namespace kx
