// relu^2 activation of the MLP, forward and backward, elementwise over a flat
// contiguous tensor, with an optional float8 copy of the result.
//   forward:  post = relu(pre)^2
//   backward: dpre = dpost * (2 * sqrt(post))   (post is the only saved activation)
// The float8 copy quantises the value as stored in the output dtype, so it
// equals a separate cast of the returned tensor.
#include <algorithm>

#include "common.cuh"

namespace kx {
namespace {

constexpr int kThreads = 256;

template <typename T, typename F8, bool kBackward>
__global__ void __launch_bounds__(kThreads) relu2_kernel(const T* __restrict__ a, const T* __restrict__ b,
                                                         std::int64_t n, bool vec, T* __restrict__ out,
                                                         F8* __restrict__ f8_out, float scale,
                                                         const float* __restrict__ scale_ptr) {
  constexpr int VEC = 16 / sizeof(T);
  using P = Pack<T, VEC>;
  using P8 = Pack<F8, VEC>;
  const float s = scale_ptr ? *scale_ptr : scale;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  const std::int64_t gtid = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;

  // relu keeps NaN (torch.relu does): NaN < 0 is false. The backward rounds
  // sqrt(post) to T before the product, as the reference's
  // `dpost * (2 * post.sqrt())` does in T; products of two T values are exact
  // in fp32, so both round the same value once more.
  auto op = [](float x, float y) -> float {
    if (kBackward) return x * (2.0f * to_float(from_float<T>(sqrtf(y))));
    float r = x < 0.0f ? 0.0f : x;
    return r * r;
  };

  const std::int64_t nchunk = vec ? n / VEC : 0;
  for (std::int64_t c = gtid; c < nchunk; c += stride) {
    P va = reinterpret_cast<const P*>(a)[c];
    P vb;
    if (kBackward) vb = reinterpret_cast<const P*>(b)[c];
    P o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) o.v[j] = from_float<T>(op(to_float(va.v[j]), kBackward ? to_float(vb.v[j]) : 0.0f));
    if (out) reinterpret_cast<P*>(out)[c] = o;
    if (f8_out) {
      P8 q;
#pragma unroll
      for (int j = 0; j < VEC; ++j) q.v[j] = from_float<F8>(to_float(o.v[j]) / s);
      reinterpret_cast<P8*>(f8_out)[c] = q;
    }
  }
  for (std::int64_t i = nchunk * VEC + gtid; i < n; i += stride) {
    T o = from_float<T>(op(to_float(a[i]), kBackward ? to_float(b[i]) : 0.0f));
    if (out) out[i] = o;
    if (f8_out) f8_out[i] = from_float<F8>(to_float(o) / s);
  }
}

template <typename T, typename F8, bool kBackward>
void launch(int device, cudaStream_t stream, ptr_t a, ptr_t b, std::int64_t n, ptr_t out, ptr_t f8_out,
            float scale, ptr_t scale_ptr) {
  constexpr int VEC = 16 / sizeof(T);
  bool vec = a % 16 == 0 && (!kBackward || b % 16 == 0) && out % 16 == 0 && f8_out % VEC == 0;
  std::int64_t work = vec ? n / VEC + VEC : n;
  std::int64_t blocks = std::min<std::int64_t>((work + kThreads - 1) / kThreads,
                                               static_cast<std::int64_t>(sm_count(device)) * 8);
  blocks = std::max<std::int64_t>(blocks, 1);
  relu2_kernel<T, F8, kBackward><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      reinterpret_cast<const T*>(a), reinterpret_cast<const T*>(b), n, vec, reinterpret_cast<T*>(out),
      reinterpret_cast<F8*>(f8_out), scale, reinterpret_cast<const float*>(scale_ptr));
  check_launch(kBackward ? "relu2_backward_kernel" : "relu2_forward_kernel");
}

template <bool kBackward>
void dispatch(int device, ptr_t stream_handle, ptr_t a, ptr_t b, int dtype, std::int64_t n, ptr_t out,
              ptr_t f8_out, int f8_dtype, float scale, ptr_t scale_ptr) {
  const char* name = kBackward ? "relu2_backward" : "relu2_forward";
  if (n < 0) throw std::invalid_argument(std::string(name) + ": n < 0");
  if (f8_out && f8_dtype != kFloat8E4M3 && f8_dtype != kFloat8E5M2) {
    throw std::invalid_argument(std::string(name) + ": f8_dtype must be float8 e4m3 or e5m2");
  }
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16) {
    throw std::invalid_argument(std::string(name) + ": dtype must be fp32, fp16 or bf16");
  }
  prepare_device(device);
  if (n == 0 || (out == 0 && f8_out == 0)) return;
  cudaStream_t stream = as_stream(stream_handle);
  const bool e5 = f8_dtype == kFloat8E5M2;
#define KX_RELU2_CASE(code, T)                                                                 \
  case code:                                                                                   \
    if (e5) return launch<T, e5m2, kBackward>(device, stream, a, b, n, out, f8_out, scale, scale_ptr); \
    return launch<T, e4m3, kBackward>(device, stream, a, b, n, out, f8_out, scale, scale_ptr);
  switch (dtype) {
    KX_RELU2_CASE(kFloat32, float)
    KX_RELU2_CASE(kFloat16, __half)
    KX_RELU2_CASE(kBFloat16, __nv_bfloat16)
  }
#undef KX_RELU2_CASE
}

}  // namespace

void relu2_forward(int device, ptr_t stream, ptr_t pre, int dtype, std::int64_t n, ptr_t out, ptr_t f8_out,
                   int f8_dtype, float scale, ptr_t scale_ptr) {
  dispatch<false>(device, stream, pre, 0, dtype, n, out, f8_out, f8_dtype, scale, scale_ptr);
}

void relu2_backward(int device, ptr_t stream, ptr_t dpost, ptr_t post, int dtype, std::int64_t n, ptr_t out,
                    ptr_t f8_out, int f8_dtype, float scale, ptr_t scale_ptr) {
  dispatch<true>(device, stream, dpost, post, dtype, n, out, f8_out, f8_dtype, scale, scale_ptr);
}

}  // namespace kx
