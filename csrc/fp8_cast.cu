// Per-tensor float8 quantisation: an amax reduction, then q = x / scale cast
// to e4m3 / e5m2 (finite values saturated, non-finite values NaN), either as a
// flat streaming pass or as a tiled pass that also writes the transpose.
//
// The scale may come from the host, from a device float, or from the device
// amax written by fp8_amax (scale = amax / max_finite, 1 unless amax > 0), so
// dynamic scaling never synchronises with the host.
#include <algorithm>

#include "common.cuh"

namespace kx {
namespace {

constexpr int kAmaxThreads = 512;
constexpr int kFlatThreads = 256;
constexpr int kTile = 64;  // transposed cast: kTile x kTile elements per block
constexpr int kTileThreads = 256;
constexpr int kTileVec = 4;  // consecutive elements per access in the tiled cast
// Byte tile row stride: 68 bytes = 17 words, so the column-wise reads of the
// store phase spread over the banks.
constexpr int kTileStride = kTile + 4;

struct ScaleSource {
  float scale;
  const float* scale_ptr;
  const float* amax_ptr;
  float max_finite;
  float* scale_out;
  bool round_bf16;  // round x / scale to bf16 before the cast (the record's bf16 division)
};

__device__ __forceinline__ float resolve_scale(const ScaleSource& s) {
  if (s.amax_ptr) {
    float amax = *s.amax_ptr;
    // As the reference's where(amax > 0, amax / max, 1): a NaN amax gives 1.
    return amax > 0.0f ? amax / s.max_finite : 1.0f;
  }
  return s.scale_ptr ? *s.scale_ptr : s.scale;
}

// The division is the reference's `x / scale` in fp32 (IEEE, not a
// reciprocal multiply), so the float8 values match it bit for bit.
template <typename Tout>
__device__ __forceinline__ Tout quantise(float v, float scale, bool round_bf16) {
  float q = v / scale;
  if (round_bf16) q = __bfloat162float(__float2bfloat16_rn(q));
  return from_float<Tout>(q);
}

// --------------------------------------------------------------------- amax

template <typename T>
__global__ void __launch_bounds__(kAmaxThreads) amax_kernel(const T* __restrict__ x, std::int64_t n, bool vec,
                                                            unsigned* __restrict__ amax_bits) {
  constexpr int VEC = 16 / sizeof(T);
  using P = Pack<T, VEC>;
  // |x| as an unsigned bit pattern orders like the float, and every NaN
  // (sign cleared) sorts above +inf, so NaN wins as in torch.amax.
  unsigned best = 0;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  const std::int64_t gtid = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  std::int64_t nchunk = vec ? n / VEC : 0;
  const P* xv = reinterpret_cast<const P*>(x);
  for (std::int64_t c = gtid; c < nchunk; c += stride) {
    P v = xv[c];
#pragma unroll
    for (int j = 0; j < VEC; ++j) best = max(best, __float_as_uint(fabsf(to_float(v.v[j]))));
  }
  for (std::int64_t i = nchunk * VEC + gtid; i < n; i += stride) {
    best = max(best, __float_as_uint(fabsf(to_float(x[i]))));
  }
  __shared__ unsigned red[32];
  best = warp_max_u32(best);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) red[warp] = best;
  __syncthreads();
  if (warp == 0) {
    best = lane < static_cast<int>(blockDim.x >> 5) ? red[lane] : 0u;
    best = warp_max_u32(best);
    if (lane == 0) atomicMax(amax_bits, best);
  }
}

// --------------------------------------------------------------- flat cast

template <typename Tin, typename Tout>
__global__ void __launch_bounds__(kFlatThreads) cast_flat_kernel(const Tin* __restrict__ x, Tout* __restrict__ out,
                                                                 std::int64_t n, bool vec, ScaleSource src) {
  constexpr int VEC = 16 / sizeof(Tin);
  using InPack = Pack<Tin, VEC>;
  using OutPack = Pack<Tout, VEC>;
  const float scale = resolve_scale(src);
  if (src.scale_out && blockIdx.x == 0 && threadIdx.x == 0) *src.scale_out = scale;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  const std::int64_t gtid = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  std::int64_t nchunk = vec ? n / VEC : 0;
  const InPack* xv = reinterpret_cast<const InPack*>(x);
  OutPack* ov = reinterpret_cast<OutPack*>(out);
  for (std::int64_t c = gtid; c < nchunk; c += stride) {
    InPack v = xv[c];
    OutPack o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) o.v[j] = quantise<Tout>(to_float(v.v[j]), scale, src.round_bf16);
    ov[c] = o;
  }
  for (std::int64_t i = nchunk * VEC + gtid; i < n; i += stride) {
    out[i] = quantise<Tout>(to_float(x[i]), scale, src.round_bf16);
  }
}

// ---------------------------------------------------------- transposed cast

// One kTile x kTile tile per block. Load phase: each thread quantises
// kTileVec consecutive elements of a row (coalesced along the row), writes
// them to `out` when requested and parks the bytes in shared memory. Store
// phase: each thread gathers kTileVec consecutive rows of one column and
// writes them as one 4-byte word of out_t (coalesced along out_t's row).
template <typename Tin, typename Tout>
__global__ void __launch_bounds__(kTileThreads) cast_transpose_kernel(
    const Tin* __restrict__ x, std::int64_t rows, std::int64_t cols, std::int64_t ld_x,
    Tout* __restrict__ out, std::int64_t ld_out, Tout* __restrict__ out_t, std::int64_t ld_out_t,
    bool vec_in, bool vec_out, bool vec_out_t, ScaleSource src) {
  static_assert(sizeof(Tout) == 1, "the tile holds bytes");
  __shared__ __align__(16) std::uint8_t tile[kTile * kTileStride];
  const float scale = resolve_scale(src);
  if (src.scale_out && blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) *src.scale_out = scale;

  const std::int64_t r0 = static_cast<std::int64_t>(blockIdx.x) * kTile;
  const std::int64_t c0 = static_cast<std::int64_t>(blockIdx.y) * kTile;
  constexpr int kGroups = kTile / kTileVec;  // groups of kTileVec per tile row
  constexpr int kIters = kTile * kGroups / kTileThreads;
  static_assert(kTile * kGroups % kTileThreads == 0, "tile must split evenly over the block");

#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int i = threadIdx.x + it * kTileThreads;
    const int r = i / kGroups;
    const int c = (i % kGroups) * kTileVec;
    const std::int64_t gr = r0 + r, gc = c0 + c;
    if (gr >= rows) continue;
    Pack<Tout, kTileVec> q;
    if (vec_in && gc + kTileVec <= cols) {
      Pack<Tin, kTileVec> v = *reinterpret_cast<const Pack<Tin, kTileVec>*>(x + gr * ld_x + gc);
#pragma unroll
      for (int j = 0; j < kTileVec; ++j) q.v[j] = quantise<Tout>(to_float(v.v[j]), scale, src.round_bf16);
    } else {
#pragma unroll
      for (int j = 0; j < kTileVec; ++j) {
        q.v[j] = gc + j < cols ? quantise<Tout>(to_float(x[gr * ld_x + gc + j]), scale, src.round_bf16) : Tout{0};
      }
    }
    *reinterpret_cast<Pack<Tout, kTileVec>*>(&tile[r * kTileStride + c]) = q;
    if (out) {
      if (vec_out && gc + kTileVec <= cols) {
        *reinterpret_cast<Pack<Tout, kTileVec>*>(out + gr * ld_out + gc) = q;
      } else {
#pragma unroll
        for (int j = 0; j < kTileVec; ++j)
          if (gc + j < cols) out[gr * ld_out + gc + j] = q.v[j];
      }
    }
  }
  if (out_t == nullptr) return;  // uniform across the block: no barrier is skipped by some threads only
  __syncthreads();

#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int i = threadIdx.x + it * kTileThreads;
    const int c = i / kGroups;
    const int r = (i % kGroups) * kTileVec;
    const std::int64_t gc = c0 + c, gr = r0 + r;
    if (gc >= cols) continue;
    Pack<Tout, kTileVec> q;
#pragma unroll
    for (int j = 0; j < kTileVec; ++j) q.v[j].bits = tile[(r + j) * kTileStride + c];
    if (vec_out_t && gr + kTileVec <= rows) {
      *reinterpret_cast<Pack<Tout, kTileVec>*>(out_t + gc * ld_out_t + gr) = q;
    } else {
#pragma unroll
      for (int j = 0; j < kTileVec; ++j)
        if (gr + j < rows) out_t[gc * ld_out_t + gr + j] = q.v[j];
    }
  }
}

template <typename T>
void launch_amax(int device, cudaStream_t stream, ptr_t x, std::int64_t n, ptr_t amax) {
  constexpr int VEC = 16 / sizeof(T);
  bool vec = x % 16 == 0;
  std::int64_t work = vec ? n / VEC + VEC : n;
  std::int64_t blocks = std::min<std::int64_t>((work + kAmaxThreads - 1) / kAmaxThreads,
                                               static_cast<std::int64_t>(sm_count(device)) * 4);
  blocks = std::max<std::int64_t>(blocks, 1);
  amax_kernel<T><<<static_cast<unsigned>(blocks), kAmaxThreads, 0, stream>>>(
      reinterpret_cast<const T*>(x), n, vec, reinterpret_cast<unsigned*>(amax));
  check_launch("amax_kernel");
}

template <typename Tin, typename Tout>
void launch_cast(int device, cudaStream_t stream, const Fp8CastArgs& a, const ScaleSource& src) {
  const Tin* x = reinterpret_cast<const Tin*>(a.x);
  Tout* out = reinterpret_cast<Tout*>(a.out);
  Tout* out_t = reinterpret_cast<Tout*>(a.out_t);
  // Only the scale was asked for: the flat kernel with nothing to convert.
  const std::int64_t n = out ? a.rows * a.cols : 0;
  const bool flat = out_t == nullptr && (out == nullptr || a.rows <= 1 || (a.ld_x == a.cols && a.ld_out == a.cols));
  if (flat) {
    constexpr int VEC = 16 / sizeof(Tin);
    bool vec = a.x % 16 == 0 && a.out % (VEC * sizeof(Tout)) == 0;
    std::int64_t work = vec ? n / VEC + VEC : n;
    std::int64_t blocks = std::min<std::int64_t>((work + kFlatThreads - 1) / kFlatThreads,
                                                 static_cast<std::int64_t>(sm_count(device)) * 8);
    blocks = std::max<std::int64_t>(blocks, 1);
    cast_flat_kernel<Tin, Tout><<<static_cast<unsigned>(blocks), kFlatThreads, 0, stream>>>(x, out, n, vec, src);
    check_launch("cast_flat_kernel");
    return;
  }
  std::int64_t row_tiles = std::max<std::int64_t>((a.rows + kTile - 1) / kTile, 1);
  std::int64_t col_tiles = std::max<std::int64_t>((a.cols + kTile - 1) / kTile, 1);
  if (row_tiles > 0x7fffffffLL || col_tiles > 65535) {
    throw std::invalid_argument("fp8_cast: too many columns for the transposed cast (cols > 4194240)");
  }
  const std::int64_t in_chunk = kTileVec * sizeof(Tin);
  bool vec_in = a.x % in_chunk == 0 && (a.ld_x * static_cast<std::int64_t>(sizeof(Tin))) % in_chunk == 0;
  bool vec_out = a.out % kTileVec == 0 && a.ld_out % kTileVec == 0;
  bool vec_out_t = a.out_t % kTileVec == 0 && a.ld_out_t % kTileVec == 0;
  dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(col_tiles));
  cast_transpose_kernel<Tin, Tout><<<grid, kTileThreads, 0, stream>>>(
      x, a.rows, a.cols, a.ld_x, out, a.ld_out, out_t, a.ld_out_t, vec_in, vec_out, vec_out_t, src);
  check_launch("cast_transpose_kernel");
}

template <typename Tout>
void dispatch_in(int device, cudaStream_t stream, const Fp8CastArgs& a, const ScaleSource& src) {
  switch (a.x_dtype) {
    case kFloat32: return launch_cast<float, Tout>(device, stream, a, src);
    case kFloat16: return launch_cast<__half, Tout>(device, stream, a, src);
    case kBFloat16: return launch_cast<__nv_bfloat16, Tout>(device, stream, a, src);
    case kFloat8E4M3: return launch_cast<e4m3, Tout>(device, stream, a, src);
    case kFloat8E5M2: return launch_cast<e5m2, Tout>(device, stream, a, src);
  }
  throw std::invalid_argument("fp8_cast: unsupported input dtype code " + std::to_string(a.x_dtype));
}

}  // namespace

void fp8_amax(int device, ptr_t stream_handle, ptr_t x, int dtype, std::int64_t n, ptr_t amax) {
  if (n < 0) throw std::invalid_argument("fp8_amax: n < 0");
  if (amax == 0 || amax % 4 != 0) throw std::invalid_argument("fp8_amax: amax must be a 4-byte aligned device float");
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16) {
    throw std::invalid_argument("fp8_amax: x must be fp32, fp16 or bf16");
  }
  prepare_device(device);
  cudaStream_t stream = as_stream(stream_handle);
  KX_CUDA_CHECK(cudaMemsetAsync(reinterpret_cast<void*>(amax), 0, sizeof(float), stream));
  if (n == 0) return;
  switch (dtype) {
    case kFloat32: return launch_amax<float>(device, stream, x, n, amax);
    case kFloat16: return launch_amax<__half>(device, stream, x, n, amax);
    case kBFloat16: return launch_amax<__nv_bfloat16>(device, stream, x, n, amax);
  }
}

void fp8_cast(int device, ptr_t stream_handle, const Fp8CastArgs& a) {
  if (a.rows < 0 || a.cols < 0) throw std::invalid_argument("fp8_cast: negative size");
  if (a.rows > 0 && a.ld_x < a.cols) throw std::invalid_argument("fp8_cast: ld_x < cols");
  if (a.out && a.rows > 0 && a.ld_out < a.cols) throw std::invalid_argument("fp8_cast: ld_out < cols");
  if (a.out_t && a.cols > 0 && a.ld_out_t < a.rows) throw std::invalid_argument("fp8_cast: ld_out_t < rows");
  if (elem_size(a.x_dtype) == 0) throw std::invalid_argument("fp8_cast: unsupported input dtype");
  if (a.out_dtype != kFloat8E4M3 && a.out_dtype != kFloat8E5M2) {
    throw std::invalid_argument("fp8_cast: out_dtype must be float8 e4m3 or e5m2");
  }
  if (a.out == 0 && a.out_t == 0 && a.scale_out == 0) return;
  prepare_device(device);
  ScaleSource src;
  src.scale = a.scale;
  src.scale_ptr = reinterpret_cast<const float*>(a.scale_ptr);
  src.amax_ptr = reinterpret_cast<const float*>(a.amax_ptr);
  src.max_finite = a.out_dtype == kFloat8E4M3 ? FloatLimit<e4m3>::max : FloatLimit<e5m2>::max;
  src.scale_out = reinterpret_cast<float*>(a.scale_out);
  src.round_bf16 = a.round_bf16;
  cudaStream_t stream = as_stream(stream_handle);
  if (a.out_dtype == kFloat8E4M3) {
    dispatch_in<e4m3>(device, stream, a, src);
  } else {
    dispatch_in<e5m2>(device, stream, a, src);
  }
}

}  // namespace kx
