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

  // Key-padding masking (True = padding, torch's convention).
  //   key_padding_mask (B, S) bool -> indices (T,) int64 flat positions b*S+s of the real
  //   tokens in row-major order, cu_seqlens (B+1,) int32, max_seqlen. T is data-dependent.
  m.def("mask_to_indices(Tensor key_padding_mask) -> (Tensor indices, Tensor cu_seqlens, SymInt max_seqlen)");
  // x (R, *F) -> (T, *F): out[t] = x[indices[t]] (unpad).
  m.def("gather_rows(Tensor x, Tensor indices) -> Tensor");
  // x_packed (T, *F) -> (n_rows, *F) zeros with out[indices[t]] = x_packed[t] (pad). indices unique.
  m.def("scatter_rows(Tensor x_packed, Tensor indices, SymInt n_rows) -> Tensor");

  // Varlen scaled-dot-product attention on packed tokens (C++ CPU kernel; the CUDA path is the
  // Triton op bertkern::attention_triton_fwd/bwd defined in Python, bertkern/ops/attention.py).
  //   q, k, v: (T, H, D); cu_seqlens (B+1,) int32; out (T, H, D); lse (H, T) float32
  //   (float64 for float64), the natural-log logsumexp of each query's scaled scores.
  //   dropout_seed: int64 (1,) on q's device when dropout_p > 0 (Philox, see attention.cpp).
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, SymInt max_seqlen, "
      "float scale, bool causal, float dropout_p, Tensor? dropout_seed) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor cu_seqlens, SymInt max_seqlen, float scale, bool causal, float dropout_p, "
      "Tensor? dropout_seed) -> (Tensor dq, Tensor dk, Tensor dv)");

  // Dropout, optionally fused with the ReLU before it (CPU kernel, csrc/cpu/dropout.cpp; on CUDA
  // bertkern.ops.dropout calls torch's fused dropout). y = act(x) * keep / (1 - p), act = relu
  // or identity; keep from Philox4x32-10 of the element index (see dropout.cpp), p in [0, 1),
  // seed int64 (1,) required when p > 0. dropout_bwd regenerates the mask, or with relu reads
  // it off y (the forward output).
  m.def("dropout_fwd(Tensor x, float p, Tensor? seed, bool relu) -> Tensor");
  m.def("dropout_bwd(Tensor grad, Tensor? y, float p, Tensor? seed, bool relu) -> Tensor");
}
