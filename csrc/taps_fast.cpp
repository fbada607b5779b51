// taps_fast._C: op schemas (TORCH_LIBRARY_FRAGMENT), the shared input checks, and the Python
// module itself, written against the plain CPython API: build_info(), small_linear() (from
// fast_call.cpp, the one file with torch's Python headers) and _set_poison_outputs() are all it
// exports, and doing without <torch/extension.h> (all of torch plus pybind11) takes the
// heaviest header set out of the build (the C++20 torch 2.14 headers make every translation unit
// cost about a minute of the 2-core CI machine). The kernels register their implementations per
// dispatch key: csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA, built only where nvcc is present).
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <atomic>
#include <limits>

#include "small_linear.h"

#ifndef TAPS_FAST_CUDA_ARCHS
#define TAPS_FAST_CUDA_ARCHS ""
#endif

namespace taps_fast {

namespace {

const char* kLin = "taps_fast::small_linear";
const char* kMt = "taps_fast::small_mt_linear";

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

void check_matrix_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(is_float_dtype(x.scalar_type()), op, ": x must be float32, float16, bfloat16 or "
              "float64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, K], got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [N, K], got shape ", weight.sizes());
  TORCH_CHECK(x.size(1) == weight.size(1), op, ": x has K=", x.size(1), " columns but weight "
              "has in_features=", weight.size(1));
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": dtype mismatch: x is ",
              x.scalar_type(), " but weight is ", weight.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), op, ": device mismatch: x is on ", x.device(),
              " but weight is on ", weight.device());
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), op,
              ": x and weight must be contiguous (row-major)");
  if (bias.has_value()) {
    const auto& b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == weight.size(0), op, ": bias has shape ", b.sizes(),
                ", expected [", weight.size(0), "]");
    TORCH_CHECK(b.scalar_type() == x.scalar_type(), op, ": dtype mismatch: x is ",
                x.scalar_type(), " but bias is ", b.scalar_type());
    TORCH_CHECK(b.device() == x.device(), op, ": device mismatch: x is on ", x.device(),
                " but bias is on ", b.device());
    TORCH_CHECK(b.is_contiguous(), op, ": bias must be contiguous");
  }
}

void check_gate_tensor(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf ||
              t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kDouble,
              op, ": ", name, " must be a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": device mismatch: x is on ", x.device(), " but ",
              name, " is on ", t.device());
}

void check_index_tensor(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, ": ", name,
              " must be int32 or int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1, op, ": ", name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(t.device() == x.device(), op, ": device mismatch: x is on ", x.device(), " but ",
              name, " is on ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

std::atomic<bool> g_poison_outputs{false};

}  // namespace

at::Tensor new_output(const at::Tensor& like, int64_t rows, int64_t cols) {
  auto y = at::empty({rows, cols}, like.options());
  if (g_poison_outputs.load(std::memory_order_relaxed)) y.fill_(std::numeric_limits<double>::quiet_NaN());
  return y;
}

void check_small_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& delta,
                        const at::Tensor& score, const std::optional<at::Tensor>& bias) {
  check_matrix_inputs(kLin, x, weight, bias);
  TORCH_CHECK(delta.sizes() == weight.sizes(), kLin, ": delta has shape ", delta.sizes(),
              " but weight has shape ", weight.sizes());
  TORCH_CHECK(delta.scalar_type() == x.scalar_type(), kLin, ": dtype mismatch: x is ",
              x.scalar_type(), " but delta is ", delta.scalar_type());
  TORCH_CHECK(delta.device() == x.device(), kLin, ": device mismatch: x is on ", x.device(),
              " but delta is on ", delta.device());
  TORCH_CHECK(delta.is_contiguous(), kLin, ": delta must be contiguous");
  TORCH_CHECK(score.dim() == 0, kLin, ": score must be a 0-dim tensor, got shape ", score.sizes());
  check_gate_tensor(kLin, "score", score, x);
}

void check_small_mt_linear(const at::Tensor& x, const at::Tensor& task_ids,
                           const at::Tensor& weight, const at::Tensor& deltas,
                           const at::Tensor& slot, const at::Tensor& scores,
                           const at::Tensor& thresholds, const std::optional<at::Tensor>& bias) {
  check_matrix_inputs(kMt, x, weight, bias);
  check_index_tensor(kMt, "task_ids", task_ids, x);
  check_index_tensor(kMt, "slot", slot, x);
  TORCH_CHECK(task_ids.size(0) == x.size(0), kMt, ": task_ids has ", task_ids.size(0),
              " entries but x has M=", x.size(0), " rows (one task id per row)");
  TORCH_CHECK(deltas.dim() == 3 && deltas.size(1) == weight.size(0) && deltas.size(2) == weight.size(1),
              kMt, ": deltas must be [S, ", weight.size(0), ", ", weight.size(1), "] (the stacked "
              "task deltas of this weight), got shape ", deltas.sizes());
  TORCH_CHECK(deltas.scalar_type() == x.scalar_type(), kMt, ": dtype mismatch: x is ",
              x.scalar_type(), " but deltas is ", deltas.scalar_type());
  TORCH_CHECK(deltas.device() == x.device(), kMt, ": device mismatch: x is on ", x.device(),
              " but deltas is on ", deltas.device());
  TORCH_CHECK(deltas.is_contiguous(), kMt, ": deltas must be contiguous");
  check_gate_tensor(kMt, "scores", scores, x);
  check_gate_tensor(kMt, "thresholds", thresholds, x);
  TORCH_CHECK(scores.dim() == 1 && scores.is_contiguous(), kMt,
              ": scores must be a contiguous 1-D [T] tensor, got shape ", scores.sizes());
  TORCH_CHECK(thresholds.sizes() == scores.sizes() && thresholds.scalar_type() == scores.scalar_type()
              && thresholds.is_contiguous(), kMt, ": thresholds must be a contiguous [T] tensor "
              "of the scores' dtype, got ", thresholds.scalar_type(), " ", thresholds.sizes());
  TORCH_CHECK(slot.size(0) == scores.size(0), kMt, ": slot has ", slot.size(0),
              " entries but scores has T=", scores.size(0));
}

}  // namespace taps_fast

TORCH_LIBRARY_FRAGMENT(taps_fast, m) {
  // TORCH_LIBRARY's fragment form: the namespace is shared with the Python custom ops
  // (taps_fast::linear, ...), which torch.library registers as fragments too, so neither side
  // claims sole ownership of "taps_fast" and the import order does not matter.
  m.def("small_linear(Tensor x, Tensor weight, Tensor delta, Tensor score, Tensor? bias, "
        "float threshold) -> Tensor");
  m.def("small_mt_linear(Tensor x, Tensor task_ids, Tensor weight, Tensor deltas, Tensor slot, "
        "Tensor scores, Tensor thresholds, Tensor? bias) -> Tensor");
}

namespace taps_fast {
// csrc/fast_call.cpp: taps_fast._C.small_linear, the op called without boxing (the eager path)
PyObject* small_linear_fastcall(PyObject*, PyObject* const* args, Py_ssize_t nargs);
}  // namespace taps_fast

namespace {

PyObject* build_info(PyObject*, PyObject*) {
#ifdef TAPS_FAST_WITH_CUDA
  PyObject* cuda = Py_True;
  const char* archs = TAPS_FAST_CUDA_ARCHS;
#else
  PyObject* cuda = Py_False;
  const char* archs = "";
#endif
  return Py_BuildValue("{s:O,s:s,s:s}", "cuda", cuda, "cuda_archs", archs, "torch", TAPS_FAST_TORCH_VERSION);
}

PyObject* set_poison_outputs(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  taps_fast::g_poison_outputs = on != 0;
  Py_RETURN_NONE;
}

PyMethodDef kMethods[] = {
    {"build_info", build_info, METH_NOARGS,
     "What this build contains: {'cuda': bool, 'cuda_archs': '8.0;9.0', 'torch': the version it was built against}"},
    {"small_linear", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(taps_fast::small_linear_fastcall)),
     METH_FASTCALL,
     "small_linear(x, weight, delta, score, bias, threshold): torch.ops.taps_fast.small_linear "
     "called without boxing (the eager path; no autograd)"},
    {"_set_poison_outputs", set_poison_outputs, METH_O,
     "Tests: fill every output with NaN before the kernels run, so unwritten elements show"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C",
                       "taps_fast compiled kernels (the ops are under torch.ops.taps_fast)", -1, kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
