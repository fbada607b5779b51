// Shared declarations of the small-M gated linear ops (see csrc/README.md for the math).
//
//   taps_fast::small_linear(x[M,K], weight[N,K], delta[N,K], score[], bias[N]?, threshold)
//       y = x·(W + g·ΔW)ᵀ + b,  g = 1[score >= threshold]            (read on the device)
//   taps_fast::small_mt_linear(x[M,K], task_ids[M], weight[N,K], deltas[S,N,K], slot[T],
//                              scores[T], thresholds[T], bias[N]?)
//       y[m] = x[m]·(W + g_t·ΔW_slot[t])ᵀ + b,  t = task_ids[m],
//       g_t = 1[slot[t] >= 0 and scores[t] >= thresholds[t]];  t = -1: the base row, W only.
//
// Numerics shared by every backend of these ops: products accumulate in fp32 (fp64 for fp64
// inputs), W + g·ΔW is formed in the accumulation type, and a NaN score (or NaN threshold)
// poisons its rows (acc += s - s) instead of reading as closed, as the Triton kernels do. A task
// id outside [-1, T) or a slot outside [-1, S) is refused on the CPU; on CUDA (no host sync) its
// rows are written as NaN.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace taps_fast {

// Checks on metadata only (shapes, dtypes, devices, layout); each error names the argument.
void check_small_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& delta,
                        const at::Tensor& score, const std::optional<at::Tensor>& bias);
void check_small_mt_linear(const at::Tensor& x, const at::Tensor& task_ids,
                           const at::Tensor& weight, const at::Tensor& deltas,
                           const at::Tensor& slot, const at::Tensor& scores,
                           const at::Tensor& thresholds, const std::optional<at::Tensor>& bias);

// The ops' output: at::empty, or NaN-filled when the tests switch poisoning on
// (taps_fast._C._set_poison_outputs(True)), so an element a kernel fails to write shows as NaN.
at::Tensor new_output(const at::Tensor& like, int64_t rows, int64_t cols);

}  // namespace taps_fast
