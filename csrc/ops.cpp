// Schemas of the emokern custom ops. The kernels are registered per device in csrc/cpu and csrc/cuda; fake
// (meta) kernels and autograd live in emokern/ops/.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing emokern._C from Python runs the static TORCH_LIBRARY initialisers below; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(emokern, m) {
  // P_out <- h @ V.T in fp32. Reads h once; h is not written.
  m.def("project(Tensor h, Tensor V, Tensor(a!) P_out) -> ()");
  // P_out <- h @ V.T; then for tokens with row >= 0: h += (clamp(a + b*P, lo, hi) - P) @ V. See reference.py.
  m.def(
      "project_and_steer_(Tensor(a!) h, Tensor V, Tensor row, Tensor a, Tensor b, Tensor lo, Tensor hi, "
      "Tensor(b!) P_out) -> ()");
}
