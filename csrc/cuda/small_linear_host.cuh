// Host-side helpers of the small-M CUDA launchers (no device syncs, no allocations).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <climits>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "../small_linear.h"
#include "small_linear_common.cuh"

namespace taps_fast {
namespace cuda_detail {

constexpr int64_t kMaxGridY = 65535;

inline void check_cuda_dtype(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16,
              op, ": the CUDA kernel supports float32, float16 and bfloat16 inputs, got ",
              x.scalar_type(), " (float64 runs on the CPU kernel only; cast to float32 for CUDA)");
}

inline int score_code(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return kScoreF16;
    case at::kBFloat16: return kScoreBF16;
    case at::kDouble: return kScoreF64;
    default: return kScoreF32;
  }
}

// τ rounded to the score's dtype, as torch compares s >= τ in s's dtype (and as the Triton
// kernels and the CPU do), then compared with the score in double (exact for every dtype).
inline double threshold_in(double threshold, at::ScalarType score_dtype) {
  switch (score_dtype) {
    case at::kHalf: return static_cast<double>(static_cast<float>(c10::Half(static_cast<float>(threshold))));
    case at::kBFloat16: return static_cast<double>(static_cast<float>(c10::BFloat16(static_cast<float>(threshold))));
    case at::kDouble: return threshold;
    default: return static_cast<double>(static_cast<float>(threshold));
  }
}

// The M block: the next power of two ≥ min(M, 16).
inline int pick_mb(int64_t M) {
  if (M <= 1) return 1;
  if (M <= 2) return 2;
  if (M <= 4) return 4;
  if (M <= 8) return 8;
  return 16;
}

// Calls launch(std::integral_constant<int, MB>, std::bool_constant<VECTOR>) with the M block
// for M rows: 1, 2, 4, 8 or 16 on the vector path; the unaligned fallback has fewer
// instantiations (1, 4 and 16-row blocks).
template <typename F>
void dispatch_mb(int64_t M, bool vector, F&& launch) {
  const int mb = pick_mb(M);
  if (vector) {
    switch (mb) {
      case 1: return launch(std::integral_constant<int, 1>{}, std::true_type{});
      case 2: return launch(std::integral_constant<int, 2>{}, std::true_type{});
      case 4: return launch(std::integral_constant<int, 4>{}, std::true_type{});
      case 8: return launch(std::integral_constant<int, 8>{}, std::true_type{});
      default: return launch(std::integral_constant<int, 16>{}, std::true_type{});
    }
  }
  switch (mb) {
    case 1: return launch(std::integral_constant<int, 1>{}, std::false_type{});
    case 2:
    case 4: return launch(std::integral_constant<int, 4>{}, std::false_type{});
    default: return launch(std::integral_constant<int, 16>{}, std::false_type{});
  }
}

// 16-byte loads need every row start 16-byte aligned: K·e % 16 == 0 and aligned base pointers.
inline bool vector_ok(int64_t K, int64_t elem, std::initializer_list<const void*> ptrs) {
  if ((K * elem) % 16 != 0) return false;
  for (const void* p : ptrs) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

// The current device's SM count, cached per device (one runtime query per device, no sync).
inline int sm_count() {
  static std::array<std::atomic<int>, 64> cache{};
  const int dev = c10::cuda::current_device();
  if (dev >= 0 && dev < 64) {
    int v = cache[dev].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev));
  if (v <= 0) v = 1;
  if (dev >= 0 && dev < 64) cache[dev].store(v, std::memory_order_relaxed);
  return v;
}

// The current stream (c10::cuda::getCurrentCUDAStream is what at::cuda::getCurrentCUDAStream
// forwards to; ATen/cuda/CUDAContext.h is avoided: it needs the cuSPARSE/cuBLAS headers).
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// How many warps share one row group (split K): ksplit ∈ {1, 2, 4}. A block carries
// (4 / ksplit)·R rows, so its work is ∝ 4 / ksplit, and an SM's time ∝ its share of the blocks,
// at best ceil(blocks / SMs): pick the ksplit with the smallest ceil(blocks / SMs) · 4 / ksplit
// (the fewest rows on the busiest SM), ties to the smaller ksplit (less reduction work), and never
// so large that a lane has no K vector at all. N = K = 3072, R = 4 on 132 SMs: ksplit = 2 (384
// blocks, ≤ 3 per SM: 97% balance, against 73% for 192 blocks of 4 row groups).
inline int choose_ksplit(int64_t N, int R, int64_t KV) {
  const int sms = sm_count();
  const int64_t groups = (N + R - 1) / R;
  int best = 1;
  int64_t best_cost = INT64_MAX;
  for (int ks = 1; ks <= kWarps; ks *= 2) {
    if (ks > 1 && KV < 32LL * ks) break;
    const int64_t gpb = kWarps / ks;
    const int64_t blocks = (groups + gpb - 1) / gpb;
    const int64_t cost = (blocks + sms - 1) / sms * gpb;
    if (cost < best_cost) {
      best_cost = cost;
      best = ks;
    }
  }
  return best;
}

// One M-blocked launch: grid.x = blocks of (kWarps / ksplit)·R output rows, grid.y = blocks of MB
// rows of x, issued in chunks of at most kMaxGridY M blocks; launch(grid, ksplit, m_base) issues
// one chunk's kernel (m_base = its first row), on the current stream.
template <typename F>
void launch_m_chunks(const char* op, int64_t M, int64_t N, int64_t KV, int MB, int R, F&& launch) {
  const int ksplit = choose_ksplit(N, R, KV);
  const int64_t rows_per_block = static_cast<int64_t>(kWarps / ksplit) * R;
  const int64_t grid_x = (N + rows_per_block - 1) / rows_per_block;
  TORCH_CHECK(grid_x <= INT_MAX, op, ": N=", N, " is too large");
  const int64_t m_blocks_total = (M + MB - 1) / MB;
  for (int64_t mb0 = 0; mb0 < m_blocks_total; mb0 += kMaxGridY) {
    const int64_t gy = std::min<int64_t>(kMaxGridY, m_blocks_total - mb0);
    launch(dim3(static_cast<unsigned>(grid_x), static_cast<unsigned>(gy)), ksplit, mb0 * MB);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// The element type T of a launch (float, __half or __nv_bfloat16), as launch_by_dtype passes it.
template <typename T>
struct ElementTag {
  using type = T;
};

// A tensor's data as the kernels' element type: at::Half and at::BFloat16 have the layout of
// __half and __nv_bfloat16.
template <typename T>
const T* data_as(const at::Tensor& t) {
  return static_cast<const T*>(t.data_ptr());
}

// The host side both CUDA ops share, before their own launch: the dtype check, the device guard,
// the [M, N] output (M = x.size(0)), nothing to launch for M = 0 or N = 0, K = x.size(1) within the
// kernels' int range; then launch(ElementTag<T>{}, y) for x's element type T. Returns y.
template <typename F>
at::Tensor launch_by_dtype(const char* op, const at::Tensor& x, int64_t N, F&& launch) {
  check_cuda_dtype(op, x);
  c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor y = new_output(x, M, N);
  if (M == 0 || N == 0) return y;
  TORCH_CHECK(K <= INT_MAX / 2, op, ": K=", K, " is too large");
  switch (x.scalar_type()) {
    case at::kFloat: launch(ElementTag<float>{}, y); break;
    case at::kHalf: launch(ElementTag<__half>{}, y); break;
    default: launch(ElementTag<__nv_bfloat16>{}, y); break;
  }
  return y;
}

}  // namespace cuda_detail
}  // namespace taps_fast
