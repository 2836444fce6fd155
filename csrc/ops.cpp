// Operator schemas of the bertkern namespace and the Python module init; nothing else.
// Implementations register per device in csrc/cpu/*.cpp and csrc/cuda/*.cu; fakes and autograd
// are registered in Python (bertkern/ops/).
// Python's limited API (Py_LIMITED_API, set by setup.py): one binary for every CPython >= 3.10.
#include <Python.h>

#include "schemas.h"
#include "torch_api.h"


// `import bertkern._C` loads this shared library, which runs the static registrations below.
// PyMODINIT_FUNC exports the symbol despite -fvisibility=hidden.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "bertkern operator library", -1, nullptr};
  return PyModule_Create(&module_def);
}

STABLE_TORCH_LIBRARY(bertkern, m) {
  // LayerNorm over the last dimension of z = x (+ residual).
  //   x, residual: (..., N); weight, bias: (N,) or None.
  //   y: like x. residual_out: z when residual is given and store_residual, else an empty (0,).
  //   mean, rstd: x.shape[:-1], float32 (float64 for float64 input).
  m.def(bertkern::schema::kLayerNormFwd);
  // Backward of layer_norm_fwd. z is the normalized input (x, or residual_out).
  //   dz = d(loss)/dz including dresidual_out when given; dweight/dbias: (N,) or empty (0,).
  m.def(bertkern::schema::kLayerNormBwd);

  // Key-padding masking (True = padding, torch's convention).
  //   key_padding_mask (B, S) bool -> indices (T,) int64 flat positions b*S+s of the real
  //   tokens in row-major order, cu_seqlens (B+1,) int32, max_seqlen. T is data-dependent.
  m.def(bertkern::schema::kMaskToIndices);
  // x (R, *F) -> (T, *F): out[t] = x[indices[t]] (unpad).
  m.def(bertkern::schema::kGatherRows);
  // x_packed (T, *F) -> (n_rows, *F) zeros with out[indices[t]] = x_packed[t] (pad). indices unique.
  m.def(bertkern::schema::kScatterRows);

  // Varlen scaled-dot-product attention on packed tokens. CPU kernel: csrc/cpu/attention.cpp;
  // CUDA kernel: the Triton launchers of bertkern/ops/attention_triton.py, registered (with the
  // fake and autograd) in bertkern/ops/attention.py.
  //   q, k, v: (T, H, D); cu_seqlens (B+1,) int32; out (T, H, D); lse (H, T) float32
  //   (float64 for float64), the natural-log logsumexp of each query's scaled scores.
  //   dropout_seed: int64 (1,) on q's device when dropout_p > 0 (Philox, see attention.cpp).
  m.def(bertkern::schema::kAttentionFwd);
  m.def(bertkern::schema::kAttentionBwd);
  // Test-only, CPU: the four words of the attention kernels' Philox4x32-10
  // (tl.randint4x(seed, offsets)) as int32 bits. offsets int32 -> int32 of shape
  // offsets.shape + (4,).
  m.def(bertkern::schema::kPhiloxWords);

  // Dropout, optionally fused with the ReLU before it (CPU kernel, csrc/cpu/dropout.cpp; on CUDA
  // bertkern.ops.dropout calls torch's fused dropout). y = act(x) * keep / (1 - p), act = relu
  // or identity; keep from Philox4x32-10 of the element index (see dropout.cpp), p in [0, 1),
  // seed int64 (1,) required when p > 0. dropout_bwd regenerates the mask, or with relu reads
  // it off y (the forward output).
  m.def(bertkern::schema::kDropoutFwd);
  m.def(bertkern::schema::kDropoutBwd);
}
