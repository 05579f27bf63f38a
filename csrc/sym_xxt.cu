// Batched symmetric Gram matrix out[b] = x[b] @ x[b]^T on tensor cores
// (mma.sync m16n8k16, bf16 in, fp32 accumulate) for Newton-Schulz.
//
// Only tiles on or above the diagonal are computed (t(t+1)/2 of t^2 blocks);
// each finished tile goes through shared memory and is written to both
// (ti, tj) and, transposed, to (tj, ti), so the output is the full matrix
// that the following torch matmuls expect.
//
// Both mma operands are rows of x with k contiguous: the A fragment is the
// row-major tile of rows ti, and the "col" B fragment of rows tj is the same
// layout, so both load with non-transposed ldmatrix. Diagonal tiles load
// their single operand once.
#include <algorithm>

#include "common.cuh"

namespace kx {
namespace {

constexpr int kBK = 32;          // k per pipeline stage
constexpr int kSRow = kBK + 8;   // smem row: 80 bytes, ldmatrix rows hit distinct banks
constexpr int kStages = 4;

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  // src_bytes = 0 zero-fills the 16 bytes: out-of-range rows and k contribute 0.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* smem) {
  unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

__device__ __forceinline__ void mma_bf16(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <int BM, int WARPS_M, int WARPS_N>
struct Config {
  static constexpr int kThreads = 32 * WARPS_M * WARPS_N;
  static constexpr int kWM = BM / WARPS_M;  // warp tile rows
  static constexpr int kWN = BM / WARPS_N;  // warp tile cols
  static constexpr int kMI = kWM / 16;
  static constexpr int kNI = kWN / 8;
  static constexpr int kTileElems = BM * kSRow;  // one operand, one stage
  static constexpr int kPipeBytes = kStages * 2 * kTileElems * 2;
  static constexpr int kEpiBytes = BM * (BM + 1) * 4;
  static constexpr int kSmemBytes = kPipeBytes > kEpiBytes ? kPipeBytes : kEpiBytes;
  static constexpr int kChunksPerThread = BM * kBK / 8 / kThreads;
  static_assert(kNI % 2 == 0, "B fragments load two n-blocks per ldmatrix.x4");
  static_assert(BM * kBK / 8 % kThreads == 0, "tile chunks split evenly over the block");
};

template <int BM, int WARPS_M, int WARPS_N, typename Tout>
__global__ void __launch_bounds__(Config<BM, WARPS_M, WARPS_N>::kThreads)
    sym_xxt_kernel(const __nv_bfloat16* __restrict__ x, int m, int k, std::int64_t sbx, std::int64_t ldx,
                   Tout* __restrict__ out, std::int64_t sbo, std::int64_t ldo, int ntiles) {
  using C = Config<BM, WARPS_M, WARPS_N>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __nv_bfloat16* smem = reinterpret_cast<__nv_bfloat16*>(smem_raw);

  // Linear upper-triangle index -> (ti, tj), ti <= tj, row by row.
  int rem = blockIdx.x, ti = 0;
  while (rem >= ntiles - ti) {
    rem -= ntiles - ti;
    ++ti;
  }
  const int tj = ti + rem;
  const bool diag = ti == tj;
  const int row0 = ti * BM, col0 = tj * BM;
  const __nv_bfloat16* xb = x + blockIdx.y * sbx;
  Tout* ob = out + blockIdx.y * sbo;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm0 = (warp / WARPS_N) * C::kWM;
  const int wn0 = (warp % WARPS_N) * C::kWN;

  auto a_tile = [&](int stage) { return smem + stage * 2 * C::kTileElems; };
  auto b_tile = [&](int stage) { return diag ? a_tile(stage) : smem + (stage * 2 + 1) * C::kTileElems; };

  auto load_stage = [&](int stage, int kt) {
    const int k0 = kt * kBK;
#pragma unroll
    for (int it = 0; it < C::kChunksPerThread; ++it) {
      const int chunk = tid + it * C::kThreads;
      const int r = chunk / (kBK / 8);
      const int kc = (chunk % (kBK / 8)) * 8;
      const bool k_ok = k0 + kc < k;
      {
        const int gr = row0 + r;
        const bool ok = k_ok && gr < m;
        const __nv_bfloat16* src = ok ? xb + gr * ldx + k0 + kc : xb;
        cp_async16(a_tile(stage) + r * kSRow + kc, src, ok ? 16 : 0);
      }
      if (!diag) {
        const int gr = col0 + r;
        const bool ok = k_ok && gr < m;
        const __nv_bfloat16* src = ok ? xb + gr * ldx + k0 + kc : xb;
        cp_async16(b_tile(stage) + r * kSRow + kc, src, ok ? 16 : 0);
      }
    }
  };

  float acc[C::kMI][C::kNI][4];
#pragma unroll
  for (int i = 0; i < C::kMI; ++i)
#pragma unroll
    for (int j = 0; j < C::kNI; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

  const int ktiles = (k + kBK - 1) / kBK;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ktiles) load_stage(s, s);
    cp_async_commit();
  }

  for (int kt = 0; kt < ktiles; ++kt) {
    // Tile kt has landed for this thread; the barrier makes it visible to all
    // and guarantees everyone is done with the stage refilled below (read in
    // iteration kt - 1).
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int next = kt + kStages - 1;
    if (next < ktiles) load_stage(next % kStages, next);
    cp_async_commit();

    const __nv_bfloat16* As = a_tile(kt % kStages);
    const __nv_bfloat16* Bs = b_tile(kt % kStages);
#pragma unroll
    for (int ks = 0; ks < kBK; ks += 16) {
      unsigned af[C::kMI][4];
      unsigned bf[C::kNI][2];
#pragma unroll
      for (int mi = 0; mi < C::kMI; ++mi) {
        // Matrices: rows 0-7 / 8-15 x k 0-7 / 8-15, in the a0..a3 order.
        const int r = wm0 + mi * 16 + (lane & 15);
        const int c = ks + (lane >> 4) * 8;
        ldmatrix_x4(af[mi], As + r * kSRow + c);
      }
#pragma unroll
      for (int nj = 0; nj < C::kNI / 2; ++nj) {
        // Matrices: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
        // = b0, b1 of n-block 2nj, then b0, b1 of n-block 2nj+1.
        const int n = wn0 + nj * 16 + (lane & 7) + (lane >> 4) * 8;
        const int c = ks + ((lane >> 3) & 1) * 8;
        unsigned r[4];
        ldmatrix_x4(r, Bs + n * kSRow + c);
        bf[2 * nj][0] = r[0];
        bf[2 * nj][1] = r[1];
        bf[2 * nj + 1][0] = r[2];
        bf[2 * nj + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < C::kMI; ++mi)
#pragma unroll
        for (int ni = 0; ni < C::kNI; ++ni) mma_bf16(acc[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the pipeline buffers before they become the tile

  // Accumulator (i, e) of n-block ni: row g (+8 for e >= 2), col 2t + (e & 1).
  float* cs = reinterpret_cast<float*>(smem_raw);
  constexpr int kCsRow = BM + 1;  // odd stride: column reads below are conflict-free
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mi = 0; mi < C::kMI; ++mi)
#pragma unroll
    for (int ni = 0; ni < C::kNI; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = wm0 + mi * 16 + g + (e >> 1) * 8;
        const int c = wn0 + ni * 8 + 2 * t + (e & 1);
        cs[r * kCsRow + c] = acc[mi][ni][e];
      }
  __syncthreads();

  for (int i = tid; i < BM * BM; i += C::kThreads) {
    const int r = i / BM, c = i % BM;
    // A diagonal tile mirrors its own upper triangle, so the whole output is
    // exactly symmetric whatever order the tensor cores summed (i, j) and (j, i) in.
    const int sr = diag && r > c ? c : r, sc = diag && r > c ? r : c;
    if (row0 + r < m && col0 + c < m) ob[(row0 + r) * ldo + col0 + c] = from_float<Tout>(cs[sr * kCsRow + sc]);
  }
  if (!diag) {
    for (int i = tid; i < BM * BM; i += C::kThreads) {
      const int c = i / BM, r = i % BM;
      if (row0 + r < m && col0 + c < m) ob[(col0 + c) * ldo + row0 + r] = from_float<Tout>(cs[r * kCsRow + c]);
    }
  }
}

template <int BM, int WARPS_M, int WARPS_N, typename Tout>
void launch(int device, cudaStream_t stream, ptr_t x, std::int64_t batch, int m, int k, std::int64_t sbx,
            std::int64_t ldx, ptr_t out, std::int64_t sbo, std::int64_t ldo) {
  using C = Config<BM, WARPS_M, WARPS_N>;
  const int ntiles = (m + BM - 1) / BM;
  const std::int64_t upper = static_cast<std::int64_t>(ntiles) * (ntiles + 1) / 2;
  auto kernel = sym_xxt_kernel<BM, WARPS_M, WARPS_N, Tout>;
  ensure_smem_limit(reinterpret_cast<const void*>(kernel), device, C::kSmemBytes);
  dim3 grid(static_cast<unsigned>(upper), static_cast<unsigned>(batch));
  kernel<<<grid, C::kThreads, C::kSmemBytes, stream>>>(reinterpret_cast<const __nv_bfloat16*>(x), m, k, sbx, ldx,
                                                        reinterpret_cast<Tout*>(out), sbo, ldo, ntiles);
  check_launch("sym_xxt_kernel");
}

template <typename Tout>
void dispatch_tile(int device, cudaStream_t stream, int tile, ptr_t x, std::int64_t batch, int m, int k,
                   std::int64_t sbx, std::int64_t ldx, ptr_t out, std::int64_t sbo, std::int64_t ldo) {
  if (tile == 128) return launch<128, 2, 4, Tout>(device, stream, x, batch, m, k, sbx, ldx, out, sbo, ldo);
  return launch<64, 2, 2, Tout>(device, stream, x, batch, m, k, sbx, ldx, out, sbo, ldo);
}

}  // namespace

void sym_xxt(int device, ptr_t stream_handle, ptr_t x, std::int64_t batch, std::int64_t m, std::int64_t k,
             std::int64_t sbx, std::int64_t ldx, ptr_t out, int out_dtype, std::int64_t sbo, std::int64_t ldo,
             int tile) {
  if (batch < 0 || m < 0 || k < 0) throw std::invalid_argument("sym_xxt: negative size");
  if (batch > 65535) throw std::invalid_argument("sym_xxt: batch > 65535");
  if (m > (1 << 30) || k > (1 << 30)) throw std::invalid_argument("sym_xxt: m or k too large");
  if (out_dtype != kBFloat16 && out_dtype != kFloat32) {
    throw std::invalid_argument("sym_xxt: out_dtype must be bf16 or fp32");
  }
  if (x % 16 != 0 || k % 8 != 0 || ldx % 8 != 0 || sbx % 8 != 0) {
    throw std::invalid_argument(
        "sym_xxt: rows of x must be 16-byte aligned (address, k, row stride and batch stride multiples of 8 "
        "elements)");
  }
  if (ldx < k || ldo < m) throw std::invalid_argument("sym_xxt: row stride smaller than the row");
  if (tile != 0 && tile != 64 && tile != 128) throw std::invalid_argument("sym_xxt: tile must be 0, 64 or 128");
  prepare_device(device);
  if (batch == 0 || m == 0) return;
  if (tile == 0) {
    const std::int64_t t128 = (m + 127) / 128;
    tile = batch * t128 * (t128 + 1) / 2 >= sm_count(device) ? 128 : 64;
  }
  cudaStream_t stream = as_stream(stream_handle);
  if (out_dtype == kBFloat16) {
    dispatch_tile<__nv_bfloat16>(device, stream, tile, x, batch, static_cast<int>(m), static_cast<int>(k), sbx, ldx,
                                 out, sbo, ldo);
  } else {
    dispatch_tile<float>(device, stream, tile, x, batch, static_cast<int>(m), static_cast<int>(k), sbx, ldx, out,
                         sbo, ldo);
  }
}

}  // namespace kx
