// taps_fast._C.small_linear(x, weight, delta, score, bias, threshold): the op
// taps_fast::small_linear called from Python without boxing its arguments.
//
// torch.ops.taps_fast.small_linear goes through the boxed dispatcher: each argument becomes an
// IValue checked against the schema: a 64x64 layer at M = 1 takes 3.5 µs through torch.ops and
// 2.2 µs through this entry point on a 2-core x86_64 machine without a GPU, torch 2.14.1
// (F.linear takes 3.1 µs there, nn.Linear's whole call 5.6 µs). This entry point unpacks the tensors with torch's own Python API and calls the same
// op through the C++ dispatcher, unboxed, so the registered CPU or CUDA kernel runs with every
// check of the op's contract. The eager serving path uses it (no tensor needs a gradient, no
// torch function mode or subclass); torch.compile and autograd see the Python custom ops around
// it. This is the one translation unit that includes torch's Python headers.
#include <Python.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>

namespace taps_fast {

namespace {

bool tensor_arg(PyObject* const* args, int i, const char* name) {
  if (THPVariable_Check(args[i])) return true;
  PyErr_Format(PyExc_TypeError, "taps_fast._C.small_linear: %s must be a Tensor, got %s", name,
               Py_TYPE(args[i])->tp_name);
  return false;
}

}  // namespace

PyObject* small_linear_fastcall(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 6) {
    PyErr_Format(PyExc_TypeError, "taps_fast._C.small_linear: expected 6 arguments (x, weight, "
                 "delta, score, bias, threshold), got %zd", nargs);
    return nullptr;
  }
  if (!tensor_arg(args, 0, "x") || !tensor_arg(args, 1, "weight") || !tensor_arg(args, 2, "delta") ||
      !tensor_arg(args, 3, "score")) {
    return nullptr;
  }
  std::optional<at::Tensor> bias;
  if (args[4] != Py_None) {
    if (!tensor_arg(args, 4, "bias")) return nullptr;
    bias = THPVariable_Unpack(args[4]);
  }
  const double threshold = PyFloat_AsDouble(args[5]);
  if (threshold == -1.0 && PyErr_Occurred()) return nullptr;
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("taps_fast::small_linear", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, double)>();
  at::Tensor y;
  {
    pybind11::gil_scoped_release no_gil;  // as torch's own ops: other threads run meanwhile
    y = op.call(THPVariable_Unpack(args[0]), THPVariable_Unpack(args[1]), THPVariable_Unpack(args[2]),
                THPVariable_Unpack(args[3]), bias, threshold);
  }
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

}  // namespace taps_fast
