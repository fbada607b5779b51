// Plain description of one small_linear / small_mt_linear call, handed from the host code
// (small_linear_cpu.cpp: checks, gates, row grouping) to the vectorized kernels
// (small_linear_cpu_kernel.h, compiled once per CPU capability: DEFAULT and AVX2).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <vector>

namespace taps_fast {
namespace cpu {

// A run of packed rows [begin, end) that share one effective weight: W alone (delta == nullptr:
// base rows and closed tasks) or W + ΔW_u (delta points at the open slot u's [N, K] matrix).
struct RowGroup {
  int64_t begin;
  int64_t end;
  const void* delta;
};

struct Plan {
  c10::ScalarType dtype;  // of x, weight, delta(s), bias and y
  int64_t M = 0, N = 0, K = 0;
  const void* x = nullptr;       // [M, K] in the accumulation type (float, double for fp64), rows in group order
  const void* weight = nullptr;  // [N, K]
  const void* bias = nullptr;    // [N] or nullptr
  void* y = nullptr;             // [M, N], output row out_row[i] receives packed row i
  const int64_t* out_row = nullptr;  // [M]
  const double* poison = nullptr;    // [M]: 0, or NaN for a task with a NaN score/threshold
  std::vector<RowGroup> groups;      // cover [0, M) in order; at most one without delta
  // Software-prefetch the next block of W / ΔW: one A/B on a loaded 2-core x86_64 machine favoured it slightly on
  // the memory-bound 3072x3072 rows (1.01-1.18x the floor with it, 0.96-1.28x without).
  bool prefetch = true;
};

// One implementation per CPU capability (the namespaces mirror ATen's at::vec::CPU_CAPABILITY).
namespace DEFAULT {
void run_small_linear(const Plan& plan);
}
namespace AVX2 {
void run_small_linear(const Plan& plan);
}

}  // namespace cpu
}  // namespace taps_fast
