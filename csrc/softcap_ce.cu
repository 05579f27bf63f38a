// Softcapped cross-entropy, forward and backward in one kernel, one block per
// row of logits.
//
// Pass 1 streams the row once: t = tanh(u), u = logit * logit_scale / softcap,
// z = softcap * t, and the sum of 2^((z - softcap) * log2e). |z| <= softcap, so
// for softcap <= 40 that sum neither overflows nor loses its largest terms and
// no running max is needed; above 40 an online (max, sum) pair is kept. When the
// row fits in shared memory (a 50304-wide row is 98 KiB as fp16, two blocks per
// SM), t is parked there as fp16, so pass 2 reads neither device memory nor
// recomputes the tanh. Pass 2 writes dlogits. With a saved lse (lse_in) pass 1
// is skipped and pass 2 reads the logits.
//
// Special-function (MUFU) operations per element, at 16 per clock per SM:
//   pass 1: tanh as 1 - 2 / (1 + 2^(2u log2e)) written stably as
//           (1 - e) / (1 + e), e = 2^(-2|u| log2e): ex2 + rcp; then ex2.  3
//   pass 2: t from the cache, ex2 (tanh.approx first when there is no cache). 1 (2)
// 4 in all (6 in the previous version, which recomputed the exact tanh in
// pass 2). fast_tanh makes pass 1 use tanh.approx.f32 too (3 in all), at a
// relative error of 2^-11 on t, up to 7e-3 on z at softcap 15. The cached fp16
// t carries a relative error of at most 2^-12 into the gradient, which is then
// rounded to its output format (e5m2 keeps 2 mantissa bits).
// A non-finite logit makes its row's lse, loss and gradient NaN (tanh would
// saturate it to a finite z); so does a target outside [0, cols) that is not
// ignore_index.
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "common.cuh"

namespace kx {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kMaxThreads = 512;
// Unrolled independent 16-byte loads per thread: 2 x 16 B x 1024 threads = 32 KB
// in flight per SM at two blocks per SM, above the ~25 KB that 3.35 TB/s needs at
// ~1 us of latency; 4 spilled registers under the 64-register bound.
constexpr int kUnroll = 2;
// Rows whose fp16 t fits in this many bytes are cached in shared memory
// between the passes; two such blocks still fit in one SM's 228 KiB.
constexpr int kMaxCacheBytes = 110 * 1024;
// Above this softcap, 2^((z - softcap) log2e) could underflow for every
// element of a row: keep a running max instead.
constexpr float kMaxFixedShiftSoftcap = 40.0f;

struct CeParams {
  const void* logits;
  std::int64_t ld;
  const std::int64_t* targets;
  std::int64_t cols;
  float softcap;
  float u_scale;  // logit_scale / softcap: u = logit * u_scale, z = softcap * tanh(u)
  float logit_scale;
  std::int64_t ignore_index;
  float* loss;
  float* lse_out;
  const float* lse_in;
  const float* grad;
  std::int64_t grad_stride;
  float grad_mult;
  void* dl;
  std::int64_t ld_dl;
  const float* dl_scale_ptr;
  float dl_scale;
  bool vec;         // 16-byte input chunks (and matching output chunks) are aligned
  bool cache;       // park t in shared memory between the passes
  bool fast_tanh;   // pass 1 with tanh.approx.f32 instead of the exp2 form
  bool fixed_shift; // softcap <= kMaxFixedShiftSoftcap
  bool round_bf16;  // round the gradient to bf16 before dividing by dl_scale (the record's rounding)
};

__device__ __forceinline__ float tanh_approx(float u) {
  float t;
  asm("tanh.approx.f32 %0, %1;" : "=f"(t) : "f"(u));
  return t;
}

// t = tanh(logit * u_scale); NaN for a non-finite logit.
__device__ __forceinline__ float softcap_t(float logit, float u_scale, bool fast) {
  float u = logit * u_scale;
  float t;
  if (fast) {
    t = tanh_approx(u);
  } else {
    float e = exp2f(fabsf(u) * (-2.0f * kLog2e));  // in (0, 1]: never overflows
    t = copysignf((1.0f - e) * __fdividef(1.0f, 1.0f + e), u);
  }
  return isfinite(logit) ? t : NAN;
}

// Online log-sum-exp update with y = z * log2e. A NaN never wins the
// comparison, so m stays a number and the NaN flows into s.
__device__ __forceinline__ void lse_push(float& m, float& s, float y) {
  if (y > m) {
    s = s * exp2f(m - y) + 1.0f;
    m = y;
  } else {
    s += exp2f(y - m);
  }
}

struct Pass1 {
  float m, s;  // fixed shift: m unused (the shift is softcap * log2e), s the sum
  __device__ __forceinline__ void push(const CeParams& p, float t, float sc2) {
    float y = t * sc2;
    if (p.fixed_shift) {
      s += exp2f(y - sc2);
    } else {
      lse_push(m, s, y);
    }
  }
};

__device__ __forceinline__ float grad_value(float t, float sc2, float lse2, bool is_target, float coef,
                                            float inv_scale, bool round_bf16) {
  float p = exp2f(t * sc2 - lse2);
  float d = (p - (is_target ? 1.0f : 0.0f)) * ((1.0f - t * t) * coef);
  if (round_bf16) d = __bfloat162float(__float2bfloat16_rn(d)) * inv_scale;
  return d;
}

template <typename Tin, typename Tout>
__global__ void __launch_bounds__(kMaxThreads, 2) softcap_ce_kernel(CeParams p) {
  constexpr int VEC = 16 / sizeof(Tin);
  using InPack = Pack<Tin, VEC>;
  using OutPack = Pack<Tout, VEC>;
  using HalfPack = Pack<__half, VEC>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ float red_m[32];
  __shared__ float red_s[32];
  __shared__ float bcast_lse;

  const std::int64_t row = blockIdx.x;
  const int tid = threadIdx.x;
  const int nthreads = blockDim.x;
  const std::int64_t cols = p.cols;
  const Tin* in = static_cast<const Tin*>(p.logits) + row * p.ld;
  __half* cache = reinterpret_cast<__half*>(smem_raw);
  const std::int64_t tgt = p.targets[row];
  const bool ignored = (tgt == p.ignore_index);
  const bool tgt_ok = !ignored && tgt >= 0 && tgt < cols;
  const std::int64_t nchunk = p.vec ? cols / VEC : 0;
  const std::int64_t tail_start = nchunk * VEC;
  const float sc2 = p.softcap * kLog2e;

  // ---------------------------------------------------------------- pass 1
  float lse2;  // log2(sum 2^(z*log2e)) = lse * log2e
  if (p.lse_in != nullptr) {
    lse2 = p.lse_in[row] * kLog2e;
  } else {
    Pass1 acc{p.fixed_shift ? 0.0f : -INFINITY, 0.0f};
    const InPack* in_v = reinterpret_cast<const InPack*>(in);
    HalfPack* cache_v = reinterpret_cast<HalfPack*>(cache);
    for (std::int64_t c0 = tid; c0 < nchunk; c0 += kUnroll * nthreads) {
      InPack buf[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        std::int64_t c = c0 + std::int64_t(u) * nthreads;
        if (c < nchunk) buf[u] = in_v[c];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        std::int64_t c = c0 + std::int64_t(u) * nthreads;
        if (c < nchunk) {
          HalfPack h;
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            float t = softcap_t(to_float(buf[u].v[j]), p.u_scale, p.fast_tanh);
            h.v[j] = __float2half_rn(t);
            acc.push(p, t, sc2);
          }
          if (p.cache) cache_v[c] = h;
        }
      }
    }
    for (std::int64_t i = tail_start + tid; i < cols; i += nthreads) {
      float t = softcap_t(to_float(in[i]), p.u_scale, p.fast_tanh);
      if (p.cache) cache[i] = __float2half_rn(t);
      acc.push(p, t, sc2);
    }

    float m = p.fixed_shift ? sc2 : acc.m, s = acc.s;
    if (p.fixed_shift) {
      s = warp_sum(s);
    } else {
      warp_lse(m, s);
    }
    const int warp = tid >> 5, lane = tid & 31, nwarps = nthreads >> 5;
    if (lane == 0) {
      red_m[warp] = m;
      red_s[warp] = s;
    }
    __syncthreads();
    if (warp == 0) {
      if (p.fixed_shift) {
        s = warp_sum(lane < nwarps ? red_s[lane] : 0.0f);
        m = sc2;
      } else {
        m = lane < nwarps ? red_m[lane] : -INFINITY;
        s = lane < nwarps ? red_s[lane] : 0.0f;
        warp_lse(m, s);
      }
      if (lane == 0) bcast_lse = (m + log2f(s)) * kLn2;
    }
    __syncthreads();  // also publishes the cached row to every thread
    const float lse = bcast_lse;
    // Derived from the stored lse exactly as the lse_in path does, so a
    // backward from the saved lse reproduces the fused pass up to the cache's rounding.
    lse2 = lse * kLog2e;
    if (tid == 0) {
      if (p.lse_out) p.lse_out[row] = lse;
      if (p.loss) {
        float loss = 0.0f;
        if (!ignored) {
          if (tgt_ok) {
            loss = lse - p.softcap * softcap_t(to_float(in[tgt]), p.u_scale, false);
          } else {
            loss = NAN;  // a target outside [0, cols) that is not ignore_index
          }
        }
        p.loss[row] = loss;
      }
    }
  }
  if (p.dl == nullptr) return;

  // ---------------------------------------------------------------- pass 2
  Tout* out = static_cast<Tout*>(p.dl) + row * p.ld_dl;
  float coef = 0.0f;
  const float scale = p.dl_scale_ptr ? *p.dl_scale_ptr : p.dl_scale;
  const float inv_scale = 1.0f / scale;
  if (!ignored) {
    float g = tgt_ok ? (p.grad ? p.grad[row * p.grad_stride] : 1.0f) * p.grad_mult : NAN;
    coef = p.round_bf16 ? g * p.logit_scale : g * p.logit_scale / scale;
  }
  // With a saved lse or no cache the row is read again from device memory
  // (most of it from L2 right after pass 1) and the tanh recomputed, approximately.
  const bool from_cache = p.cache && p.lse_in == nullptr;
  const InPack* src_v = reinterpret_cast<const InPack*>(in);
  const HalfPack* cache_v = reinterpret_cast<const HalfPack*>(cache);
  OutPack* out_v = reinterpret_cast<OutPack*>(out);
  // One chunk of VEC outputs from VEC values of t.
  auto emit = [&](std::int64_t c, const float* t) {
    OutPack o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float d = ignored ? 0.0f
                        : grad_value(t[j], sc2, lse2, tgt_ok && c * VEC + j == tgt, coef, inv_scale, p.round_bf16);
      o.v[j] = from_float<Tout>(d);
    }
    out_v[c] = o;
  };
  // Loads are issued for kUnroll chunks before any is used; they stay packed (fp16 or the input
  // type) until then, which keeps the loop within the 64 registers of two 512-thread blocks per SM.
  // src: the row's packed chunks (the cached fp16 t, or the logits); to_t: one element -> t.
  auto chunk_loop = [&](const auto* src, auto to_t) {
    using SrcPack = std::remove_cv_t<std::remove_pointer_t<decltype(src)>>;
    for (std::int64_t c0 = tid; c0 < nchunk; c0 += kUnroll * nthreads) {
      SrcPack b[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        std::int64_t c = c0 + std::int64_t(u) * nthreads;
        if (c < nchunk) b[u] = src[c];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        std::int64_t c = c0 + std::int64_t(u) * nthreads;
        if (c < nchunk) {
          float t[VEC];
#pragma unroll
          for (int j = 0; j < VEC; ++j) t[j] = to_t(b[u].v[j]);
          emit(c, t);
        }
      }
    }
  };
  if (from_cache) {
    chunk_loop(cache_v, [](__half h) { return __half2float(h); });
  } else {
    chunk_loop(src_v, [&](Tin v) { return softcap_t(to_float(v), p.u_scale, true); });
  }
  for (std::int64_t i = tail_start + tid; i < cols; i += nthreads) {
    float d = 0.0f;
    if (!ignored) {
      float t = from_cache ? __half2float(cache[i]) : softcap_t(to_float(in[i]), p.u_scale, true);
      d = grad_value(t, sc2, lse2, tgt_ok && i == tgt, coef, inv_scale, p.round_bf16);
    }
    out[i] = from_float<Tout>(d);
  }
}

template <typename Tin, typename Tout>
void launch(int device, cudaStream_t stream, CeParams p, std::int64_t rows) {
  constexpr int VEC = 16 / sizeof(Tin);
  std::int64_t work = p.vec ? (p.cols + VEC - 1) / VEC : p.cols;
  int threads = static_cast<int>(std::min<std::int64_t>(kMaxThreads, ((work + 31) / 32) * 32));
  threads = std::max(threads, 32);
  std::int64_t cache_bytes = ((p.cols * static_cast<std::int64_t>(sizeof(__half)) + 15) / 16) * 16;
  p.cache = p.lse_in == nullptr && p.dl != nullptr && cache_bytes <= kMaxCacheBytes;
  int smem = p.cache ? static_cast<int>(cache_bytes) : 0;
  auto kernel = softcap_ce_kernel<Tin, Tout>;
  if (smem > 48 * 1024) ensure_smem_limit(reinterpret_cast<const void*>(kernel), device, smem);
  kernel<<<static_cast<unsigned>(rows), threads, smem, stream>>>(p);
  check_launch("softcap_ce_kernel");
}

template <typename Tin>
void dispatch_out(int device, cudaStream_t stream, const CeParams& p, std::int64_t rows, int out_dtype) {
  switch (out_dtype) {
    case kFloat32: return launch<Tin, float>(device, stream, p, rows);
    case kFloat16: return launch<Tin, __half>(device, stream, p, rows);
    case kBFloat16: return launch<Tin, __nv_bfloat16>(device, stream, p, rows);
    case kFloat8E4M3: return launch<Tin, e4m3>(device, stream, p, rows);
    case kFloat8E5M2: return launch<Tin, e5m2>(device, stream, p, rows);
  }
  throw std::invalid_argument("softcap_ce: unsupported dlogits dtype code " + std::to_string(out_dtype));
}

}  // namespace

void softcap_ce(int device, ptr_t stream_handle, const SoftcapCEArgs& a) {
  if (a.rows < 0 || a.cols <= 0) throw std::invalid_argument("softcap_ce: need rows >= 0 and cols > 0");
  if (a.rows > 0x7fffffffLL) throw std::invalid_argument("softcap_ce: more than 2^31-1 rows");
  if (a.ld_logits < a.cols) throw std::invalid_argument("softcap_ce: ld_logits < cols");
  if (a.dlogits && a.ld_dlogits < a.cols) throw std::invalid_argument("softcap_ce: ld_dlogits < cols");
  if (!(a.softcap > 0.0f)) throw std::invalid_argument("softcap_ce: softcap must be > 0");
  int in_size = elem_size(a.logits_dtype);
  if (in_size < 2) throw std::invalid_argument("softcap_ce: logits must be fp32, fp16 or bf16");
  int out_size = elem_size(a.dlogits_dtype);
  if (a.dlogits && out_size == 0) throw std::invalid_argument("softcap_ce: unsupported dlogits dtype");
  prepare_device(device);
  if (a.rows == 0) return;

  CeParams p{};
  p.logits = reinterpret_cast<const void*>(a.logits);
  p.ld = a.ld_logits;
  p.targets = reinterpret_cast<const std::int64_t*>(a.targets);
  p.cols = a.cols;
  p.softcap = a.softcap;
  p.u_scale = a.logit_scale / a.softcap;
  p.logit_scale = a.logit_scale;
  p.ignore_index = a.ignore_index;
  p.loss = reinterpret_cast<float*>(a.loss);
  p.lse_out = reinterpret_cast<float*>(a.lse_out);
  p.lse_in = reinterpret_cast<const float*>(a.lse_in);
  p.grad = reinterpret_cast<const float*>(a.grad);
  p.grad_stride = a.grad_stride;
  p.grad_mult = a.grad_mult;
  p.dl = reinterpret_cast<void*>(a.dlogits);
  p.ld_dl = a.ld_dlogits;
  p.dl_scale_ptr = reinterpret_cast<const float*>(a.dl_scale_ptr);
  p.dl_scale = a.dl_scale;
  p.fast_tanh = a.fast_tanh;
  p.fixed_shift = a.softcap <= kMaxFixedShiftSoftcap;
  p.round_bf16 = a.round_bf16;

  // 16-byte input chunks need 16-byte aligned rows; the matching output chunk
  // (VEC elements) needs its own alignment.
  const int vec = 16 / in_size;
  bool vec_ok = a.logits % 16 == 0 && (a.ld_logits * in_size) % 16 == 0;
  if (a.dlogits) {
    std::int64_t out_chunk = static_cast<std::int64_t>(vec) * out_size;
    vec_ok = vec_ok && a.dlogits % out_chunk == 0 && (a.ld_dlogits * out_size) % out_chunk == 0;
  }
  p.vec = vec_ok;

  cudaStream_t stream = as_stream(stream_handle);
  // Without dlogits the output type is irrelevant; use the smallest instance.
  int out_dtype = a.dlogits ? a.dlogits_dtype : kBFloat16;
  switch (a.logits_dtype) {
    case kFloat32: return dispatch_out<float>(device, stream, p, a.rows, out_dtype);
    case kFloat16: return dispatch_out<__half>(device, stream, p, a.rows, out_dtype);
    case kBFloat16: return dispatch_out<__nv_bfloat16>(device, stream, p, a.rows, out_dtype);
  }
}

}  // namespace kx
