// CPU kernels of taps_fast::small_linear / small_mt_linear (see csrc/README.md for the contract).
//
// This file holds the host side: the shared checks, the gates (read on the CPU, in the
// accumulation type), the grouping of the rows by effective weight (W alone, or W + ΔW_u per
// distinct open slot u), the packing of x in that order in the accumulation type, and the choice
// of the kernel copy: AVX2 (small_linear_cpu_avx2.cpp) where the CPU has avx2 + fma + f16c, else
// the DEFAULT copy compiled below. TAPS_FAST_CPU_CAPABILITY=default forces the DEFAULT copy (tests).
#define CPU_CAPABILITY DEFAULT
#include "small_linear_cpu_kernel.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <cstdlib>
#include <cstring>
#include <map>

#include "../small_linear.h"

namespace taps_fast {
namespace {

const char* kLin = "taps_fast::small_linear";
const char* kMt = "taps_fast::small_mt_linear";

bool cpu_has_avx2() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

// Completes the plan (its groups are set by the caller; xa is x in the accumulation type, rows
// in group order) and runs the kernel copy this CPU supports.
void run(cpu::Plan& plan, const at::Tensor& xa, const at::Tensor& weight,
         const std::optional<at::Tensor>& bias, at::Tensor& y, const std::vector<int64_t>& out_row,
         const std::vector<double>& poisons) {
  plan.dtype = weight.scalar_type();
  plan.M = xa.size(0), plan.N = weight.size(0), plan.K = weight.size(1);
  plan.x = xa.data_ptr();
  plan.weight = weight.data_ptr();
  plan.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  plan.y = y.data_ptr();
  plan.out_row = out_row.data();
  plan.poison = poisons.data();
  const char* force = std::getenv("TAPS_FAST_CPU_CAPABILITY");
  const bool want_default = force != nullptr && std::strcmp(force, "default") == 0;
  if (!want_default && cpu_has_avx2()) {
    cpu::AVX2::run_small_linear(plan);
  } else {
    cpu::DEFAULT::run_small_linear(plan);
  }
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// (is_open, poison) of a gate: the comparison torch makes for `score >= threshold` (the threshold
// rounded to the score's dtype first; both are then exact in double), and poison = NaN when the
// score or the threshold is NaN (a diverged score must not read as closed), else 0. An infinite
// threshold is a legitimate "never open" and an infinite score reads as open, as in torch.
std::pair<bool, double> gate(double score, double threshold) {
  const bool nan = std::isnan(score) || std::isnan(threshold);
  return {score >= threshold, nan ? std::numeric_limits<double>::quiet_NaN() : 0.0};
}

// A Python-float threshold rounded to the score tensor's dtype, as torch's comparison with a
// scalar does (the scalar takes the tensor's dtype).
double round_to(double v, at::ScalarType t) {
  switch (t) {
    case at::kHalf: return static_cast<double>(static_cast<float>(c10::Half(static_cast<float>(v))));
    case at::kBFloat16: return static_cast<double>(static_cast<float>(c10::BFloat16(static_cast<float>(v))));
    case at::kFloat: return static_cast<double>(static_cast<float>(v));
    default: return v;
  }
}

// A CPU 0-dim floating-point tensor's value, read in place (Tensor::item goes through the
// dispatcher: 0.3 µs of a 3.5 µs call of a 64x64 layer on a 2-core x86_64 machine, torch 2.14.1).
double read_cpu_scalar(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return static_cast<double>(*t.const_data_ptr<float>());
    case at::kDouble: return *t.const_data_ptr<double>();
    case at::kHalf: return static_cast<double>(static_cast<float>(*t.const_data_ptr<c10::Half>()));
    case at::kBFloat16: return static_cast<double>(static_cast<float>(*t.const_data_ptr<c10::BFloat16>()));
    default: return t.item<double>();
  }
}

std::vector<int64_t> read_index(const at::Tensor& t) {
  std::vector<int64_t> v(t.numel());
  if (t.scalar_type() == at::kInt) {
    const int32_t* p = t.data_ptr<int32_t>();
    for (int64_t i = 0; i < t.numel(); ++i) v[i] = p[i];
  } else {
    const int64_t* p = t.data_ptr<int64_t>();
    for (int64_t i = 0; i < t.numel(); ++i) v[i] = p[i];
  }
  return v;
}

at::Tensor small_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& delta,
                            const at::Tensor& score, const std::optional<at::Tensor>& bias,
                            double threshold) {
  check_small_linear(x, weight, delta, score, bias);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  auto y = new_output(x, M, N);
  if (M == 0 || N == 0) return y;
  const auto [open, poison] = gate(read_cpu_scalar(score), round_to(threshold, score.scalar_type()));

  // x in the accumulation type: x itself for fp32/fp64 (checked contiguous), without a call of
  // Tensor::to (0.2 µs through the dispatcher even when it returns x)
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  const at::Tensor xa = x.scalar_type() == acc ? x : x.to(acc).contiguous();
  std::vector<int64_t> out_row(M);
  for (int64_t m = 0; m < M; ++m) out_row[m] = m;
  std::vector<double> poisons(M, poison);

  cpu::Plan plan;
  plan.groups.push_back({0, M, open ? delta.data_ptr() : nullptr});
  run(plan, xa, weight, bias, y, out_row, poisons);
  return y;
}

at::Tensor small_mt_linear_cpu(const at::Tensor& x, const at::Tensor& task_ids,
                               const at::Tensor& weight, const at::Tensor& deltas,
                               const at::Tensor& slot, const at::Tensor& scores,
                               const at::Tensor& thresholds, const std::optional<at::Tensor>& bias) {
  check_small_mt_linear(x, task_ids, weight, deltas, slot, scores, thresholds, bias);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const int64_t T = scores.size(0), S = deltas.size(0);
  const std::vector<int64_t> tasks = read_index(task_ids);
  const std::vector<int64_t> slots = read_index(slot);
  for (int64_t m = 0; m < M; ++m) {
    const int64_t t = tasks[m];
    TORCH_CHECK(t >= -1 && t < T, kMt, ": task_ids[", m, "] = ", t, " is outside [-1, ", T,
                ") (T = ", T, " tasks; -1 = base row)");
    if (t >= 0) {
      TORCH_CHECK(slots[t] >= -1 && slots[t] < S, kMt, ": slot[", t, "] = ", slots[t],
                  " (task ", t, ", used by row ", m, ") is outside [-1, ", S, ") (S = ", S,
                  " stacked deltas; -1 = none)");
    }
  }
  auto y = new_output(x, M, N);
  if (M == 0 || N == 0) return y;
  const at::Tensor sc = scores.to(at::kDouble), th = thresholds.to(at::kDouble);
  const double* scp = sc.data_ptr<double>();
  const double* thp = th.data_ptr<double>();

  // Group key per row: -1 = W only (base rows, closed tasks, tasks without a slot), else the
  // open slot. std::map orders the groups: W only first, then the slots ascending.
  std::map<int64_t, std::vector<int64_t>> rows_of;
  std::vector<double> row_poison(M, 0.0);
  for (int64_t m = 0; m < M; ++m) {
    const int64_t t = tasks[m];
    int64_t key = -1;
    if (t >= 0) {
      const auto [open, poison] = gate(scp[t], thp[t]);
      row_poison[m] = poison;
      if (open && slots[t] >= 0) key = slots[t];
    }
    rows_of[key].push_back(m);
  }
  std::vector<int64_t> out_row;
  std::vector<double> poisons;
  out_row.reserve(M), poisons.reserve(M);
  cpu::Plan plan;
  const int64_t delta_stride = N * K * deltas.element_size();
  const char* dbase = static_cast<const char*>(deltas.data_ptr());
  for (const auto& [key, rows] : rows_of) {
    const int64_t begin = static_cast<int64_t>(out_row.size());
    for (int64_t m : rows) out_row.push_back(m), poisons.push_back(row_poison[m]);
    plan.groups.push_back({begin, static_cast<int64_t>(out_row.size()),
                           key < 0 ? nullptr : static_cast<const void*>(dbase + key * delta_stride)});
  }
  bool identity = true;
  for (int64_t i = 0; i < M; ++i) identity = identity && out_row[i] == i;
  at::Tensor xa = x;
  if (!identity) {
    xa = x.index_select(0, at::from_blob(out_row.data(), {M}, at::TensorOptions().dtype(at::kLong)));
  }
  xa = xa.to(acc_dtype(x.scalar_type())).contiguous();

  run(plan, xa, weight, bias, y, out_row, poisons);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(taps_fast, CPU, m) {
  m.impl("small_linear", &small_linear_cpu);
  m.impl("small_mt_linear", &small_mt_linear_cpu);
}

}  // namespace taps_fast
