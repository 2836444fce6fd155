// Operator schemas of the bertkern namespace and the Python module init; nothing else.
// Implementations register per device in csrc/cpu/*.cpp and csrc/cuda/*.cu; fakes and autograd
// are registered in Python (bertkern/ops/).
#include <Python.h>
#include <torch/library.h>

// `import bertkern._C` loads this shared library, which runs the static registrations below.
// PyMODINIT_FUNC exports the symbol despite -fvisibility=hidden.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "bertkern operator library", -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(bertkern, m) {
  // LayerNorm over the last dimension of z = x (+ residual).
  //   x, residual: (..., N); weight, bias: (N,) or None.
  //   y: like x. residual_out: z when residual is given and store_residual, else an empty (0,).
  //   mean, rstd: x.shape[:-1], float32 (float64 for float64 input).
  m.def(
      "layer_norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, "
      "bool store_residual) -> (Tensor y, Tensor residual_out, Tensor mean, Tensor rstd)");
  // Backward of layer_norm_fwd. z is the normalized input (x, or residual_out).
  //   dz = d(loss)/dz including dresidual_out when given; dweight/dbias: (N,) or empty (0,).
  m.def(
      "layer_norm_bwd(Tensor dy, Tensor? dresidual_out, Tensor z, Tensor mean, Tensor rstd, "
      "Tensor? weight, bool has_bias) -> (Tensor dz, Tensor dweight, Tensor dbias)");
}
