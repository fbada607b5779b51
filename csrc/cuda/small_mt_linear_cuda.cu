// CUDA kernel of taps_fast::small_mt_linear: the mixed batch (BGMV-style), each row with its own
// task. Registered for the CUDA dispatch key in small_linear_cuda.cu (design notes there).
//
//   y[m] = x[m]·(W + g_t·ΔW_slot[t])ᵀ + b,   t = task_ids[m],
//   g_t = 1[t ≥ 0 ∧ slot[t] ≥ 0 ∧ scores[t] ≥ thresholds[t]]
//
// Bytes: W once per M block (all rows), plus each distinct open ΔW present in the block once,
// however many rows share it. At kernel start the block's first MB threads resolve their row's
// task (bounds-checked: a bad task id or slot gives a NaN row, never a wild read), and thread 0
// dedupes the open slots into a list (≤ MB entries) with, per distinct slot, the bit mask of its
// rows; rows of the base, of a closed task, or with a bad id form the base mask (W only). In the
// K loop a warp loads its R rows of W and of the first listed ΔW together, then walks the list,
// prefetching the next ΔW before consuming the current one; the per-row selection is a
// warp-uniform branch on a compile-time row index (the accumulators stay in registers).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>

#include <climits>
#include <cmath>

#include "../small_linear.h"
#include "small_linear_host.cuh"
#include "small_linear_kloop.cuh"

namespace taps_fast {
namespace cuda_detail {

template <typename T, int MB, int R, int VEC>
__device__ __forceinline__ void small_mt_linear_body(
    const T* __restrict__ x, const void* task_ids, bool ids_long, const T* __restrict__ W,
    const T* __restrict__ deltas, const void* slot, bool slot_long, const void* scores,
    const void* thresholds, int score_code, const T* __restrict__ bias, T* __restrict__ y,
    int64_t M, int64_t N, int64_t K, int64_t num_tasks, int64_t num_slots, int ksplit,
    int64_t m_base) {
  using RawT = typename Raw<T, VEC>::type;
  __shared__ float red[kWarps][MB * R];
  __shared__ float poison_s[MB];
  __shared__ int row_slot_s[MB];        // the row's open slot, -1 (W only), -2 (padding row)
  __shared__ int slot_id_s[MB];         // distinct open slots of the block
  __shared__ int64_t slot_off_s[MB];    // their element offsets into deltas (slot · N · K)
  __shared__ uint32_t slot_mask_s[MB];  // their rows (bit m = row m0 + m)
  __shared__ uint32_t base_mask_s;
  __shared__ int nslots_s;

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int group = warp / ksplit;
  const int ks = warp - group * ksplit;
  const int64_t m0 = m_base + static_cast<int64_t>(blockIdx.y) * MB;
  const int64_t n_block0 = static_cast<int64_t>(blockIdx.x) * (kWarps / ksplit) * R;
  const int64_t n0 = n_block0 + static_cast<int64_t>(group) * R;

  if (threadIdx.x < MB) {
    const int64_t m = m0 + threadIdx.x;
    int sl = -2;
    float poison = 0.f;
    if (m < M) {
      sl = -1;
      const int64_t t = read_index(task_ids, ids_long, m);
      if (t < -1 || t >= num_tasks) {
        poison = __int_as_float(0x7fc00000);  // bad task id: NaN row
      } else if (t >= 0) {
        const int64_t s = read_index(slot, slot_long, t);
        if (s < -1 || s >= num_slots) {
          poison = __int_as_float(0x7fc00000);  // bad slot: NaN row
        } else {
          const double sc = read_score(scores, score_code, t);
          const double th = read_score(thresholds, score_code, t);
          poison = (isnan(sc) || isnan(th)) ? static_cast<float>(sc + th) : 0.f;  // NaN gate: NaN rows
          if (s >= 0 && sc >= th) sl = static_cast<int>(s);
        }
      }
    }
    row_slot_s[threadIdx.x] = sl;
    poison_s[threadIdx.x] = poison;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int ns = 0;
    uint32_t base = 0;
    for (int m = 0; m < MB; ++m) {
      const int sl = row_slot_s[m];
      if (sl == -2) continue;
      if (sl < 0) {
        base |= 1u << m;
        continue;
      }
      int j = 0;
      while (j < ns && slot_id_s[j] != sl) ++j;
      if (j == ns) {
        slot_id_s[ns] = sl;
        slot_off_s[ns] = static_cast<int64_t>(sl) * N * K;
        slot_mask_s[ns] = 0;
        ++ns;
      }
      slot_mask_s[j] |= 1u << m;
    }
    base_mask_s = base;
    nslots_s = ns;
  }
  __syncthreads();
  const uint32_t base_mask = base_mask_s;
  const int nslots = nslots_s;

  int64_t rowoff[R];  // rows past N are clamped to N - 1 (valid memory; never stored)
#pragma unroll
  for (int r = 0; r < R; ++r) rowoff[r] = (n0 + r < N ? n0 + r : N - 1) * K;
  const T* xb = x + m0 * K;
  const int mmax = static_cast<int>(M - 1 - m0 < MB - 1 ? M - 1 - m0 : MB - 1);
  const int KV = static_cast<int>(K / VEC);
  const int stride = 32 * ksplit;

  float acc[MB][R];
#pragma unroll
  for (int m = 0; m < MB; ++m) {
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = 0.f;
  }

  for (int v = ks * 32 + lane; v < KV; v += stride) {
    const int64_t k = static_cast<int64_t>(v) * VEC;
    const T* xk = xb + k;
    RawT w[R];
    RawT dc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) w[r] = ld_weight<T, VEC>(W + rowoff[r] + k);
    if (nslots > 0) {
      const T* D = deltas + slot_off_s[0] + k;
#pragma unroll
      for (int r = 0; r < R; ++r) dc[r] = ld_weight<T, VEC>(D + rowoff[r]);
    }
    if (base_mask != 0) {
      float wf[R][VEC];
      effective_weight<T, R, VEC, false>(w, dc, wf);
#pragma unroll
      for (int m = 0; m < MB; ++m) {
        if (base_mask & (1u << m)) fma_row<T, MB, R, VEC>(m, xk, K, mmax, wf, acc);
      }
    }
    for (int j = 0; j < nslots; ++j) {
      RawT dn[R];
      const bool more = j + 1 < nslots;
      if (more) {  // prefetch the next distinct ΔW before consuming this one
        const T* D = deltas + slot_off_s[j + 1] + k;
#pragma unroll
        for (int r = 0; r < R; ++r) dn[r] = ld_weight<T, VEC>(D + rowoff[r]);
      }
      const uint32_t mask = slot_mask_s[j];
      float wf[R][VEC];
      effective_weight<T, R, VEC, true>(w, dc, wf);
#pragma unroll
      for (int m = 0; m < MB; ++m) {
        if (mask & (1u << m)) fma_row<T, MB, R, VEC>(m, xk, K, mmax, wf, acc);
      }
      if (more) {
#pragma unroll
        for (int r = 0; r < R; ++r) dc[r] = dn[r];
      }
    }
  }
  reduce_and_store<T, MB, R>(acc, red, poison_s, bias, y, m0, M, N, n_block0, ksplit);
}

}  // namespace cuda_detail

// 16-byte vector path (VEC = 16 / sizeof(T)).
template <typename T, int MB, int R, int VEC>
__global__ void __launch_bounds__(cuda_detail::kThreads, 1)
_taps_small_mt_linear_fwd_kernel(const T* __restrict__ x, const void* task_ids, bool ids_long,
                                 const T* __restrict__ W, const T* __restrict__ deltas,
                                 const void* slot, bool slot_long, const void* scores,
                                 const void* thresholds, int score_code,
                                 const T* __restrict__ bias, T* __restrict__ y, int64_t M,
                                 int64_t N, int64_t K, int64_t num_tasks, int64_t num_slots,
                                 int ksplit, int64_t m_base) {
  cuda_detail::small_mt_linear_body<T, MB, R, VEC>(x, task_ids, ids_long, W, deltas, slot,
                                                   slot_long, scores, thresholds, score_code, bias,
                                                   y, M, N, K, num_tasks, num_slots, ksplit,
                                                   m_base);
}

// Fallback for unaligned pointers or K·e % 16 != 0: one element per load.
template <typename T, int MB, int R>
__global__ void __launch_bounds__(cuda_detail::kThreads, 1)
_taps_small_mt_linear_fwd_scalar_kernel(const T* __restrict__ x, const void* task_ids,
                                        bool ids_long, const T* __restrict__ W,
                                        const T* __restrict__ deltas, const void* slot,
                                        bool slot_long, const void* scores,
                                        const void* thresholds, int score_code,
                                        const T* __restrict__ bias, T* __restrict__ y, int64_t M,
                                        int64_t N, int64_t K, int64_t num_tasks,
                                        int64_t num_slots, int ksplit, int64_t m_base) {
  cuda_detail::small_mt_linear_body<T, MB, R, 1>(x, task_ids, ids_long, W, deltas, slot,
                                                 slot_long, scores, thresholds, score_code, bias,
                                                 y, M, N, K, num_tasks, num_slots, ksplit, m_base);
}

namespace {

using namespace cuda_detail;

template <typename T>
struct MtArgs {
  const T* x;
  const void* task_ids;
  bool ids_long;
  const T* W;
  const T* deltas;
  const void* slot;
  bool slot_long;
  const void* scores;
  const void* thresholds;
  int score_code;
  const T* bias;
  T* y;
  int64_t M, N, K, num_tasks, num_slots;
};

template <typename T, int MB, bool VECTOR>
void launch_mt(const MtArgs<T>& a) {
  constexpr int R = MB >= 16 ? 2 : 4;  // MB·R accumulators: ≤ 32 registers
  constexpr int VEC = VECTOR ? 16 / static_cast<int>(sizeof(T)) : 1;
  const cudaStream_t stream = current_stream();
  launch_m_chunks("taps_fast::small_mt_linear", a.M, a.N, a.K / VEC, MB, R, [&](dim3 grid, int ksplit, int64_t m_base) {
    if constexpr (VECTOR) {
      _taps_small_mt_linear_fwd_kernel<T, MB, R, VEC><<<grid, kThreads, 0, stream>>>(
          a.x, a.task_ids, a.ids_long, a.W, a.deltas, a.slot, a.slot_long, a.scores, a.thresholds,
          a.score_code, a.bias, a.y, a.M, a.N, a.K, a.num_tasks, a.num_slots, ksplit, m_base);
    } else {
      _taps_small_mt_linear_fwd_scalar_kernel<T, MB, R><<<grid, kThreads, 0, stream>>>(
          a.x, a.task_ids, a.ids_long, a.W, a.deltas, a.slot, a.slot_long, a.scores, a.thresholds,
          a.score_code, a.bias, a.y, a.M, a.N, a.K, a.num_tasks, a.num_slots, ksplit, m_base);
    }
  });
}

}  // namespace

at::Tensor small_mt_linear_cuda(const at::Tensor& x, const at::Tensor& task_ids,
                                const at::Tensor& weight, const at::Tensor& deltas,
                                const at::Tensor& slot, const at::Tensor& scores,
                                const at::Tensor& thresholds, const std::optional<at::Tensor>& bias) {
  check_small_mt_linear(x, task_ids, weight, deltas, slot, scores, thresholds, bias);
  const char* op = "taps_fast::small_mt_linear";
  return launch_by_dtype(op, x, weight.size(0), [&](auto tag, const at::Tensor& y) {
    using T = typename decltype(tag)::type;
    const int64_t S = deltas.size(0);
    TORCH_CHECK(S <= INT_MAX, op, ": too many delta slots (", S, ")");
    const MtArgs<T> a{data_as<T>(x), task_ids.data_ptr(), task_ids.scalar_type() == at::kLong,
                      data_as<T>(weight), S > 0 ? data_as<T>(deltas) : nullptr, slot.data_ptr(),
                      slot.scalar_type() == at::kLong, scores.data_ptr(), thresholds.data_ptr(),
                      score_code(scores.scalar_type()), bias.has_value() ? data_as<T>(*bias) : nullptr,
                      static_cast<T*>(y.data_ptr()), x.size(0), weight.size(0), x.size(1),
                      scores.size(0), S};
    const bool vector = vector_ok(a.K, x.element_size(), {a.x, a.W, a.deltas});
    dispatch_mb(a.M, vector, [&](auto mb, auto vec) {
      launch_mt<T, decltype(mb)::value, decltype(vec)::value>(a);
    });
  });
}

}  // namespace taps_fast
