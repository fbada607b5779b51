// The inner K loops of the small-M kernels (see small_linear_cuda.cu for the design notes).
#pragma once

#include "small_linear_common.cuh"

namespace taps_fast {
namespace cuda_detail {

// acc[m][r] += x[m, k:k+VEC] · wf[r][:] for one x row m (a compile-time index after unrolling).
// x row m is clamped to the block's last real row (mmax), so padding rows read valid memory.
template <typename T, int MB, int R, int VEC>
__device__ __forceinline__ void fma_row(int m, const T* __restrict__ xk, int64_t K, int mmax,
                                        const float (&wf)[R][VEC], float (&acc)[MB][R]) {
  const T* xp = xk + static_cast<int64_t>(m < mmax ? m : mmax) * K;
  float xf[VEC];
  decode<T, VEC>(ld_x<T, VEC>(xp), xf);
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[m][r] = fmaf(xf[e], wf[r][e], acc[m][r]);
  }
}

// wf[r] = W[r] (+ ΔW[r]), summed in fp32 and rounded to T (as merge stores W + ΔW, and as the
// Triton kernels form it): the effective weight is formed in registers, never in memory.
template <typename T, int R, int VEC, bool HAS_D>
__device__ __forceinline__ void effective_weight(const typename Raw<T, VEC>::type (&w)[R],
                                                 const typename Raw<T, VEC>::type (&d)[R],
                                                 float (&wf)[R][VEC]) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
    decode<T, VEC>(w[r], wf[r]);
    if constexpr (HAS_D) {
      float df[VEC];
      decode<T, VEC>(d[r], df);
#pragma unroll
      for (int e = 0; e < VEC; ++e) wf[r][e] = round_to_layer<T>(wf[r][e] + df[e]);
    }
  }
}

// Single task: every row of the M block uses the same weight, W (closed gate, HAS_D = false: the
// ΔW loads are not in the code at all) or W + ΔW (open gate). Each lane walks the vectors
// v0, v0 + stride, ... of its R rows; U steps (U·R weight loads, twice that with ΔW) are issued
// before any is consumed, so several 16-byte loads per thread are in flight.
template <typename T, int MB, int R, int U, int VEC, bool HAS_D>
__device__ __forceinline__ void single_k_loop(const T* __restrict__ W, const T* __restrict__ D,
                                              const int64_t (&rowoff)[R],
                                              const T* __restrict__ xb, int64_t K, int mmax,
                                              int v0, int stride, int KV, float (&acc)[MB][R]) {
  using RawT = typename Raw<T, VEC>::type;
  int v = v0;
  for (; v + (U - 1) * stride < KV; v += U * stride) {
    RawT w[U][R];
    RawT d[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t k = static_cast<int64_t>(v + u * stride) * VEC;
#pragma unroll
      for (int r = 0; r < R; ++r) w[u][r] = ld_weight<T, VEC>(W + rowoff[r] + k);
      if constexpr (HAS_D) {
#pragma unroll
        for (int r = 0; r < R; ++r) d[u][r] = ld_weight<T, VEC>(D + rowoff[r] + k);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float wf[R][VEC];
      effective_weight<T, R, VEC, HAS_D>(w[u], d[u], wf);
      const T* xk = xb + static_cast<int64_t>(v + u * stride) * VEC;
#pragma unroll
      for (int m = 0; m < MB; ++m) fma_row<T, MB, R, VEC>(m, xk, K, mmax, wf, acc);
    }
  }
  if constexpr (U > 1) {
    for (; v < KV; v += stride) {
      const int64_t k = static_cast<int64_t>(v) * VEC;
      RawT w[R];
      RawT d[R];
#pragma unroll
      for (int r = 0; r < R; ++r) w[r] = ld_weight<T, VEC>(W + rowoff[r] + k);
      if constexpr (HAS_D) {
#pragma unroll
        for (int r = 0; r < R; ++r) d[r] = ld_weight<T, VEC>(D + rowoff[r] + k);
      }
      float wf[R][VEC];
      effective_weight<T, R, VEC, HAS_D>(w, d, wf);
#pragma unroll
      for (int m = 0; m < MB; ++m) fma_row<T, MB, R, VEC>(m, xb + k, K, mmax, wf, acc);
    }
  }
}

}  // namespace cuda_detail
}  // namespace taps_fast
