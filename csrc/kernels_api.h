// Host entry points of the CUDA kernels, as plain C++ (no CUDA types) so that
// bindings.cpp compiles with the host compiler alone. Tensors arrive as raw
// device addresses with their sizes, strides (in elements) and dtype codes;
// streams as the integer value of a cudaStream_t. Every function throws
// std::runtime_error carrying the CUDA error string when a CUDA call fails,
// and when no CUDA device is present.
#pragma once

#include <cstdint>
#include <string>

namespace kx {

// Dtype codes shared with kernels/cuda_impl/ops.py (DTYPE_CODES there).
enum DType : int {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
  kFloat8E4M3 = 3,
  kFloat8E5M2 = 4,
};

using ptr_t = std::uintptr_t;

// Number of visible devices; 0 (never an error) when there is no driver or
// no device.
int device_count();
// One line about the runtime: version, device count or the reason for none.
std::string runtime_info();

// Softcapped cross-entropy over rows of logits, one block per row.
//   z = softcap * tanh(logit_scale * logits / softcap); lse = logsumexp(z)
//   loss = lse - z[target] (0 at ignored rows)
//   dlogits = g * (softmax(z) - onehot) * logit_scale * (1 - tanh^2) / dl_scale
// with g = grad[row * grad_stride] * grad_mult (grad may be 0: g = grad_mult),
// zero at ignored rows, NaN at rows whose target is outside [0, cols) and not
// ignore_index. When lse_in is given, the log-sum-exp pass is skipped
// (backward from a saved lse). Any of loss / lse_out / dlogits may be 0.
// dl_scale_ptr, when non-zero, points to a device float used instead of
// dl_scale. round_bf16: the gradient is rounded to bf16 before the division by
// the scale (the record's bf16 logits' gradient).
struct SoftcapCEArgs {
  ptr_t logits = 0;
  int logits_dtype = kBFloat16;
  std::int64_t ld_logits = 0;
  ptr_t targets = 0;  // int64 [rows]
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  float softcap = 15.0f;
  float logit_scale = 1.0f;
  std::int64_t ignore_index = -100;
  ptr_t loss = 0;     // fp32 [rows]
  ptr_t lse_out = 0;  // fp32 [rows]
  ptr_t lse_in = 0;   // fp32 [rows]
  ptr_t grad = 0;     // fp32
  std::int64_t grad_stride = 0;
  float grad_mult = 1.0f;
  ptr_t dlogits = 0;
  int dlogits_dtype = kBFloat16;
  std::int64_t ld_dlogits = 0;
  ptr_t dl_scale_ptr = 0;
  float dl_scale = 1.0f;
  bool fast_tanh = false;  // pass 1 with tanh.approx.f32 (relative error 2^-11) instead of the ~1e-7 exp2 form
  bool round_bf16 = false;
};
void softcap_ce(int device, ptr_t stream, const SoftcapCEArgs& a);

// amax = max |x| over n contiguous elements into a device float (NaN when
// any element is NaN). The float is overwritten, not accumulated into.
void fp8_amax(int device, ptr_t stream, ptr_t x, int dtype, std::int64_t n, ptr_t amax);

// q = x / scale as float8 (out_dtype kFloat8E4M3 / kFloat8E5M2), finite values
// saturated, non-finite values NaN. x is [rows, cols] with row stride ld_x.
// out (ld_out) gets q, out_t (ld_out_t) gets q transposed ([cols, rows]); either
// may be 0. The scale is, in order of precedence: *amax_ptr turned into
// amax / max_finite(out_dtype) (1 unless amax > 0, NaN included), *scale_ptr, or scale.
// scale_out, when non-zero, receives the scale used (device float).
// round_bf16: q is rounded to bf16 before the float8 cast (x / scale divided "in bf16").
struct Fp8CastArgs {
  ptr_t x = 0;
  int x_dtype = kBFloat16;
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  std::int64_t ld_x = 0;
  ptr_t out = 0;
  std::int64_t ld_out = 0;
  ptr_t out_t = 0;
  std::int64_t ld_out_t = 0;
  int out_dtype = kFloat8E4M3;
  float scale = 1.0f;
  ptr_t scale_ptr = 0;
  ptr_t amax_ptr = 0;
  ptr_t scale_out = 0;
  bool round_bf16 = false;
};
void fp8_cast(int device, ptr_t stream, const Fp8CastArgs& a);

// relu^2 over n contiguous elements of dtype (fp32 / fp16 / bf16).
//   forward:  post = relu(pre)^2
//   backward: dpre = dpost * 2 * sqrt(post)
// The result goes to `out` (same dtype, may be 0) and, when f8_out is given,
// also as float8 (f8_dtype) of result / scale (scale_ptr overrides scale).
void relu2_forward(int device, ptr_t stream, ptr_t pre, int dtype, std::int64_t n, ptr_t out,
                   ptr_t f8_out, int f8_dtype, float scale, ptr_t scale_ptr);
void relu2_backward(int device, ptr_t stream, ptr_t dpost, ptr_t post, int dtype, std::int64_t n,
                    ptr_t out, ptr_t f8_out, int f8_dtype, float scale, ptr_t scale_ptr);

// out[b] = x[b] @ x[b]^T for bf16 x [batch, m, k] (row stride ldx, batch
// stride sbx; rows 16-byte aligned: k and ldx multiples of 8), fp32
// accumulation, out [batch, m, m] (row stride ldo, batch stride sbo) in
// out_dtype (bf16 or fp32). Only tiles on or above the diagonal are
// computed; each is written to both of its mirror positions. tile = 128 or
// 64, or 0 to choose from the problem size.
void sym_xxt(int device, ptr_t stream, ptr_t x, std::int64_t batch, std::int64_t m, std::int64_t k,
             std::int64_t sbx, std::int64_t ldx, ptr_t out, int out_dtype, std::int64_t sbo,
             std::int64_t ldo, int tile);

}  // namespace kx
