// CUDA kernels of taps_fast::small_linear (this file) and taps_fast::small_mt_linear
// (small_mt_linear_cuda.cu), registered for the CUDA dispatch key here.
//
// Math (csrc/README.md is the contract):
//   small_linear:     y[m, n]  = Σ_k x[m, k] · (W[n, k] + g·ΔW[n, k]) + b[n],   g = 1[s ≥ τ]
//   small_mt_linear:  y[m, n]  = Σ_k x[m, k] · (W[n, k] + g_t·ΔW_slot[t][n, k]) + b[n],
//                     t = task_ids[m],  g_t = 1[t ≥ 0 ∧ slot[t] ≥ 0 ∧ s_t ≥ τ_t]
//   products accumulate in fp32; W + g·ΔW is formed in registers, rounded to the layer dtype
//   (as merge stores it and the Triton kernels form it: no jump at 16/17 rows); a NaN score or
//   threshold makes its rows NaN (acc += NaN, the Triton kernels' s - s, but for NaN only: an
//   infinite τ or s is a legitimate gate value); on the mixed batch a task id outside [-1, T) or
//   a slot outside [-1, S) makes its row NaN (no host sync, no out-of-bounds read).
//
// Performance model. For M ≤ 16 rows the op is a GEMV: the bytes that must move are N·K·e for W,
// N·K·e more for each open ΔW, and a negligible M·(K + N)·e for x and y (e = element size). A
// bf16 3072×3072 layer is 18.9 MB of W: ≈ 6 µs at H100 HBM speed, against M·N·K = 151 MFMA for
// M = 16, which the CUDA cores do in ≈ 5 µs, so the kernel must stream W at full bandwidth and
// spend as few instructions as possible per weight element. Layout choices:
//   * Each weight byte is read exactly once, with 16-byte loads (uint4: 8 halves or 4 floats),
//     through ld.global.nc.L1::no_allocate: the weights stream past L1, which keeps x resident.
//     A closed gate takes a code path (template HAS_D = false) with no ΔW load at all.
//   * One warp owns R = 4 output rows; its 32 lanes walk K in 16-byte vectors, so every load
//     instruction of the warp reads 512 contiguous bytes of one row (fully coalesced). The R rows
//     share each x vector: one x load + decode feeds 4·VEC FMAs per row of the M block.
//   * Several loads in flight per thread: U unrolled K steps × R rows (8 weight loads for M ≤ 4,
//     4 for M ≥ 8, twice as many with an open ΔW), all issued before the first is consumed.
//   * x ([M, K], tiny) is read through the read-only path (__ldg): after the first warp of an SM
//     touches it, it is an L1 hit for every other warp of the SM; no shared-memory staging (and
//     so no block size or K limit from it, and no __syncthreads in the loop).
//   * The M block (MB = 1, 2, 4, 8, 16 rows) is a template parameter, so the MB·R accumulators
//     live in registers (no local memory); M > 16 loops over M blocks (grid.y).
//   * Parallelism: 4 warps per block; when N / R row groups are too few to fill the GPU (N = 768,
//     or N = 3072 on 132 SMs), ksplit = 2 or 4 warps of a block share one row group and split K;
//     their partial sums meet in shared memory and are added in a fixed order (deterministic).
//   * x, W, ΔW not 16-byte aligned, or K·e not a multiple of 16: a fallback instantiation
//     (*_scalar_kernel) with the same structure and one-element loads (correct, slower).
//   * No allocation but the output, no host sync: the launch is CUDA-graph capturable.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include "../small_linear.h"
#include "small_linear_host.cuh"
#include "small_linear_kloop.cuh"

namespace taps_fast {

at::Tensor small_mt_linear_cuda(const at::Tensor& x, const at::Tensor& task_ids,
                                const at::Tensor& weight, const at::Tensor& deltas,
                                const at::Tensor& slot, const at::Tensor& scores,
                                const at::Tensor& thresholds, const std::optional<at::Tensor>& bias);

namespace cuda_detail {

template <typename T, int MB, int R, int U, int VEC>
__device__ __forceinline__ void small_linear_body(const T* __restrict__ x, const T* __restrict__ W,
                                                  const T* __restrict__ D,
                                                  const T* __restrict__ bias, T* __restrict__ y,
                                                  const void* score, int score_code, double thr,
                                                  int64_t M, int64_t N, int64_t K, int ksplit,
                                                  int64_t m_base) {
  __shared__ float red[kWarps][MB * R];
  __shared__ float poison_s[MB];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int group = warp / ksplit;
  const int ks = warp - group * ksplit;
  const int64_t m0 = m_base + static_cast<int64_t>(blockIdx.y) * MB;
  const int64_t n_block0 = static_cast<int64_t>(blockIdx.x) * (kWarps / ksplit) * R;
  const int64_t n0 = n_block0 + static_cast<int64_t>(group) * R;

  // The gate, read on the device (every thread reads the same word: one broadcast load).
  const double s = read_score(score, score_code, 0);
  const bool open = s >= thr;
  // NaN score or threshold: NaN rows (the s - s of the Triton kernels, restricted to NaN, so an
  // infinite threshold, a legitimate "never open", does not poison).
  if (threadIdx.x < MB) poison_s[threadIdx.x] = (isnan(s) || isnan(thr)) ? static_cast<float>(s + thr) : 0.f;

  int64_t rowoff[R];  // rows past N are clamped to N - 1 (valid memory; never stored)
#pragma unroll
  for (int r = 0; r < R; ++r) rowoff[r] = (n0 + r < N ? n0 + r : N - 1) * K;
  const T* xb = x + m0 * K;
  const int mmax = static_cast<int>(M - 1 - m0 < MB - 1 ? M - 1 - m0 : MB - 1);
  const int KV = static_cast<int>(K / VEC);
  const int stride = 32 * ksplit;
  const int v0 = ks * 32 + lane;

  float acc[MB][R];
#pragma unroll
  for (int m = 0; m < MB; ++m) {
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = 0.f;
  }
  if (open) {
    single_k_loop<T, MB, R, U, VEC, true>(W, D, rowoff, xb, K, mmax, v0, stride, KV, acc);
  } else {
    single_k_loop<T, MB, R, U, VEC, false>(W, D, rowoff, xb, K, mmax, v0, stride, KV, acc);
  }
  reduce_and_store<T, MB, R>(acc, red, poison_s, bias, y, m0, M, N, n_block0, ksplit);
}

}  // namespace cuda_detail

// 16-byte vector path (VEC = 16 / sizeof(T)).
template <typename T, int MB, int R, int U, int VEC>
__global__ void __launch_bounds__(cuda_detail::kThreads, 1)
_taps_small_linear_fwd_kernel(const T* __restrict__ x, const T* __restrict__ W,
                              const T* __restrict__ D, const T* __restrict__ bias,
                              T* __restrict__ y, const void* score, int score_code, double thr,
                              int64_t M, int64_t N, int64_t K, int ksplit, int64_t m_base) {
  cuda_detail::small_linear_body<T, MB, R, U, VEC>(x, W, D, bias, y, score, score_code, thr, M, N,
                                                   K, ksplit, m_base);
}

// Fallback for unaligned pointers or K·e % 16 != 0: one element per load.
template <typename T, int MB, int R, int U>
__global__ void __launch_bounds__(cuda_detail::kThreads, 1)
_taps_small_linear_fwd_scalar_kernel(const T* __restrict__ x, const T* __restrict__ W,
                                     const T* __restrict__ D, const T* __restrict__ bias,
                                     T* __restrict__ y, const void* score, int score_code,
                                     double thr, int64_t M, int64_t N, int64_t K, int ksplit,
                                     int64_t m_base) {
  cuda_detail::small_linear_body<T, MB, R, U, 1>(x, W, D, bias, y, score, score_code, thr, M, N, K,
                                                 ksplit, m_base);
}

namespace {

using namespace cuda_detail;

template <typename T>
struct SingleArgs {
  const T* x;
  const T* W;
  const T* D;
  const T* bias;
  T* y;
  const void* score;
  int score_code;
  double thr;
  int64_t M, N, K;
};

template <typename T, int MB, bool VECTOR>
void launch_single(const SingleArgs<T>& a) {
  constexpr int R = 4;
  constexpr int VEC = VECTOR ? 16 / static_cast<int>(sizeof(T)) : 1;
  constexpr int U = VECTOR ? (MB <= 4 ? 2 : 1) : 4;
  const cudaStream_t stream = current_stream();
  launch_m_chunks("taps_fast::small_linear", a.M, a.N, a.K / VEC, MB, R, [&](dim3 grid, int ksplit, int64_t m_base) {
    if constexpr (VECTOR) {
      _taps_small_linear_fwd_kernel<T, MB, R, U, VEC><<<grid, kThreads, 0, stream>>>(
          a.x, a.W, a.D, a.bias, a.y, a.score, a.score_code, a.thr, a.M, a.N, a.K, ksplit, m_base);
    } else {
      _taps_small_linear_fwd_scalar_kernel<T, MB, R, U><<<grid, kThreads, 0, stream>>>(
          a.x, a.W, a.D, a.bias, a.y, a.score, a.score_code, a.thr, a.M, a.N, a.K, ksplit, m_base);
    }
  });
}

at::Tensor small_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& delta,
                             const at::Tensor& score, const std::optional<at::Tensor>& bias,
                             double threshold) {
  check_small_linear(x, weight, delta, score, bias);
  return launch_by_dtype("taps_fast::small_linear", x, weight.size(0), [&](auto tag, const at::Tensor& y) {
    using T = typename decltype(tag)::type;
    const SingleArgs<T> a{data_as<T>(x), data_as<T>(weight), data_as<T>(delta),
                          bias.has_value() ? data_as<T>(*bias) : nullptr,
                          static_cast<T*>(y.data_ptr()), score.data_ptr(),
                          score_code(score.scalar_type()), threshold_in(threshold, score.scalar_type()),
                          x.size(0), weight.size(0), x.size(1)};
    const bool vector = vector_ok(a.K, x.element_size(), {a.x, a.W, a.D});
    dispatch_mb(a.M, vector, [&](auto mb, auto vec) {
      launch_single<T, decltype(mb)::value, decltype(vec)::value>(a);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(taps_fast, CUDA, m) {
  m.impl("small_linear", &small_linear_cuda);
  m.impl("small_mt_linear", &small_mt_linear_cuda);
}

}  // namespace taps_fast
