// Device helpers shared by the CUDA kernels of taps_fast::small_linear and
// taps_fast::small_mt_linear (see small_linear_cuda.cu for the design notes).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace taps_fast {
namespace cuda_detail {

// Launch shape shared by both kernels: 4 warps per block; the warps split into
// `groups_per_block = kWarps / ksplit` row groups of R output rows each, and the `ksplit` warps
// of one group split the K dimension between them (reduced deterministically in shared memory).
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxMB = 16;
// Every kernel is declared __launch_bounds__(kThreads, 1): with the minimum-blocks hint given,
// ptxas does not trade a few registers for stack spills to reach a higher occupancy step (it did,
// 8-16 bytes, on some sm_90 instantiations without it); the register counts stay where the
// unrolled loops put them (≤ 255, no spills: see python -m taps_fast.ext_check).

// Score dtype codes (the gate tensors may have any float dtype, whatever x's dtype is).
enum ScoreCode : int { kScoreF32 = 0, kScoreF16 = 1, kScoreBF16 = 2, kScoreF64 = 3 };

// A gate value (score or threshold) in double: exact for every score dtype, so s >= τ compares
// as torch does in the score's dtype (an fp64 score in double, not rounded to float first).
__device__ __forceinline__ double read_score(const void* p, int code, int64_t i) {
  switch (code) {
    case kScoreF16: return static_cast<double>(__half2float(static_cast<const __half*>(p)[i]));
    case kScoreBF16: return static_cast<double>(__bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]));
    case kScoreF64: return static_cast<const double*>(p)[i];
    default: return static_cast<double>(static_cast<const float*>(p)[i]);
  }
}

__device__ __forceinline__ int64_t read_index(const void* p, bool is_long, int64_t i) {
  return is_long ? static_cast<const int64_t*>(p)[i]
                 : static_cast<int64_t>(static_cast<const int32_t*>(p)[i]);
}

// ---- element conversions ----------------------------------------------------------------
template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// v rounded to T and widened back (a no-op for fp32): W + ΔW takes the values merge stores. The
// fp32 sum of two fp16 / bf16 numbers rounded once more is the correctly rounded fp16 / bf16 sum
// (24 >= 2 * 11 + 2 significand bits: the double rounding is innocuous).
template <typename T> __device__ __forceinline__ float round_to_layer(float v) {
  return to_f32<T>(from_f32<T>(v));
}
template <> __device__ __forceinline__ float round_to_layer<float>(float v) { return v; }

// A "vector" is VEC consecutive elements of one row: 16 bytes (uint4) on the fast path, a single
// element on the unaligned fallback. Raw<T, VEC> is its undecoded register form, so that all the
// loads of a step are issued before any of them is consumed.
template <typename T, int VEC>
struct Raw {
  using type = typename std::conditional<VEC * sizeof(T) == 16, uint4, T>::type;
};

// Weights (W, ΔW): read exactly once, so stream them past L1 (L1::no_allocate keeps x resident
// in L1, where every warp of the SM re-reads it) and ask L2 for 256-byte sectors.
__device__ __forceinline__ uint4 ld_stream(const void* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
}

template <typename T, int VEC>
__device__ __forceinline__ typename Raw<T, VEC>::type ld_weight(const T* p) {
  if constexpr (VEC * sizeof(T) == 16) {
    return ld_stream(p);
  } else {
    return __ldg(p);
  }
}

// x: small and re-read by every warp of the block and of the SM: the read-only path through L1.
template <typename T, int VEC>
__device__ __forceinline__ typename Raw<T, VEC>::type ld_x(const T* p) {
  if constexpr (VEC * sizeof(T) == 16) {
    return __ldg(reinterpret_cast<const uint4*>(p));
  } else {
    return __ldg(p);
  }
}

__device__ __forceinline__ void bf16x2_to_f32(uint32_t u, float& lo, float& hi) {
  lo = __uint_as_float(u << 16);
  hi = __uint_as_float(u & 0xffff0000u);
}

__device__ __forceinline__ void f16x2_to_f32(uint32_t u, float& lo, float& hi) {
  __half2 h = *reinterpret_cast<__half2*>(&u);
  float2 f = __half22float2(h);
  lo = f.x;
  hi = f.y;
}

template <typename T, int VEC>
__device__ __forceinline__ void decode(const typename Raw<T, VEC>::type& r, float (&f)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    const uint32_t u[4] = {r.x, r.y, r.z, r.w};
    if constexpr (std::is_same<T, float>::value) {
#pragma unroll
      for (int i = 0; i < 4; ++i) f[i] = __uint_as_float(u[i]);
    } else if constexpr (std::is_same<T, __nv_bfloat16>::value) {
#pragma unroll
      for (int i = 0; i < 4; ++i) bf16x2_to_f32(u[i], f[2 * i], f[2 * i + 1]);
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) f16x2_to_f32(u[i], f[2 * i], f[2 * i + 1]);
    }
  } else {
    f[0] = to_f32<T>(r);
  }
}

// ---- epilogue ------------------------------------------------------------------------------
// acc[m][r]: this lane's partial dot products. Reduce over the warp (xor butterfly: every lane
// ends with every sum), park the warp's sums in red[warp][MB*R], then one thread per output sums
// the ksplit warps of its row group in a fixed order (deterministic), adds bias and the row's
// poison (0 or NaN) and stores. Must be reached by every thread of the block.
template <typename T, int MB, int R>
__device__ __forceinline__ void reduce_and_store(float (&acc)[MB][R], float (*red)[MB * R],
                                                 const float* poison, const T* __restrict__ bias,
                                                 T* __restrict__ y, int64_t m0, int64_t M,
                                                 int64_t N, int64_t n_block0, int ksplit) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int m = 0; m < MB; ++m) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float v = acc[m][r];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == ((m * R + r) & 31)) red[warp][m * R + r] = v;
    }
  }
  __syncthreads();
  const int groups = kWarps / ksplit;
  for (int i = threadIdx.x; i < groups * MB * R; i += kThreads) {
    const int g = i / (MB * R);
    const int mr = i - g * (MB * R);
    const int m = mr / R;
    const int r = mr - m * R;
    const int64_t n = n_block0 + static_cast<int64_t>(g) * R + r;
    if (n < N && m0 + m < M) {
      float s = 0.f;
      for (int ks = 0; ks < ksplit; ++ks) s += red[g * ksplit + ks][mr];
      if (bias != nullptr) s += to_f32<T>(bias[n]);
      s += poison[m];
      y[(m0 + m) * N + n] = from_f32<T>(s);
    }
  }
}

}  // namespace cuda_detail
}  // namespace taps_fast
