// Row-major GEMM for the CPU kernels, calling the BLAS that libtorch_cpu exports (sgemm_ /
// dgemm_, MKL on x86-64 wheels) directly: the cpublas::gemm overloads are not exported, and a
// matmul through the dispatcher costs microseconds per call, a large share of a 100 x 100 x 64
// product. These are the Fortran BLAS ABI, not libtorch's C++ ABI: the stable-ABI check
// (tests/test_stable_abi.py) allows exactly sgemm_, dgemm_ and MKL_Set_Num_Threads_Local. The
// symbols are weak, so a torch build without them still loads this library and falls back to
// torch::stable::matmul on views of the same buffers (as does a build with BERTKERN_FALLBACK_GEMM
// defined).
//
//   gemm<T>(...)        C = alpha op(A) op(B) + beta C, T float or double
//   SequentialBlas      makes the calling thread's BLAS single-threaded while it lives
#pragma once

#include "torch_api.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

// Fortran BLAS exported by libtorch_cpu (the same symbols ATen's CPUBlas.cpp calls). Weak: null
// when this torch build does not export them, and then the stable-ABI fallback runs.
#if defined(__GNUC__) && defined(__ELF__) && !defined(BERTKERN_FALLBACK_GEMM)
#define BERTKERN_BLAS_SYMBOLS 1
extern "C" {
__attribute__((weak)) void sgemm_(const char* transa, const char* transb, const int* m,
                                  const int* n, const int* k, const float* alpha, const float* a,
                                  const int* lda, const float* b, const int* ldb,
                                  const float* beta, float* c, const int* ldc);
__attribute__((weak)) void dgemm_(const char* transa, const char* transb, const int* m,
                                  const int* n, const int* k, const double* alpha,
                                  const double* a, const int* lda, const double* b,
                                  const int* ldb, const double* beta, double* c, const int* ldc);
// MKL's per-thread BLAS thread count (exported by libtorch_cpu on MKL builds); weak as above.
__attribute__((weak)) int MKL_Set_Num_Threads_Local(int nt);  // mkl_set_num_threads_local in C
}
#else
#define BERTKERN_BLAS_SYMBOLS 0
#endif

namespace bertkern {

// ---------------------------------------------------------------------------------------------
// GEMM on row-major matrices: C (M x N) = alpha * op(A) * op(B) + beta * C, op(A) M x K,
// op(B) K x N; lda / ldb / ldc are row strides (>= the stored column count). beta == 0 ignores
// C's contents.
// ---------------------------------------------------------------------------------------------

// Fallback without the BLAS symbols: P = op(A) op(B) by torch::stable::matmul on from_blob views
// of the buffers (strided, nothing copied in), then C = alpha P + beta C in a plain loop.
template <typename T>
void gemm_fallback(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha,
                   const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  const ScalarType dtype = std::is_same_v<T, double> ? kDouble : kFloat;
  const Device cpu(torch::headeronly::DeviceType::CPU);
  // op(X) (rows x cols) of a row-major buffer with row stride ld: X itself, or the transpose of
  // the stored (cols x rows) matrix, as strides.
  auto view = [&](const T* ptr, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    const std::vector<int64_t> sizes{rows, cols};
    const std::vector<int64_t> strides =
        trans ? std::vector<int64_t>{1, ld} : std::vector<int64_t>{ld, 1};
    return torch::stable::from_blob(const_cast<T*>(ptr), sizes, strides, cpu, dtype);
  };
  Tensor p;
  if (K > 0) {
    p = as_contiguous(
        torch::stable::matmul(view(A, M, K, lda, trans_a), view(B, K, N, ldb, trans_b)));
  }
  const T* pp = K > 0 ? const_data<T>(p) : nullptr;  // K == 0: the product is 0
  for (int64_t i = 0; i < M; ++i) {
    T* c = C + i * ldc;
    const T* pr = pp != nullptr ? pp + i * N : nullptr;
    for (int64_t j = 0; j < N; ++j) {
      const T prod = pr != nullptr ? alpha * pr[j] : T(0);
      c[j] = beta == T(0) ? prod : prod + beta * c[j];  // beta == 0 ignores C (NaN included)
    }
  }
}

template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
          int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
#if BERTKERN_BLAS_SYMBOLS
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  const bool fits = std::max({M, N, K, lda, ldb, ldc}) <= kIntMax;
  const bool have = std::is_same_v<T, float> ? sgemm_ != nullptr : dgemm_ != nullptr;
  if (fits && have) {
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: pass B first.
    const char tb = trans_b ? 'T' : 'N', ta = trans_a ? 'T' : 'N';
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int lb = static_cast<int>(ldb), la = static_cast<int>(lda), lc = static_cast<int>(ldc);
    if constexpr (std::is_same_v<T, float>) {
      sgemm_(&tb, &ta, &m, &n, &k, &alpha, B, &lb, A, &la, &beta, C, &lc);
    } else {
      dgemm_(&tb, &ta, &m, &n, &k, &alpha, B, &lb, A, &la, &beta, C, &lc);
    }
    return;
  }
#endif
  gemm_fallback<T>(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

// Makes the BLAS of the calling thread sequential for its lifetime (when `enable`; MKL only,
// a no-op elsewhere). Small GEMMs gain nothing from a BLAS that spreads each one over the
// intra-op threads (as MKL does outside a parallel region): waking the threads costs more.
class SequentialBlas {
 public:
  explicit SequentialBlas(bool enable) {
    (void)enable;
#if BERTKERN_BLAS_SYMBOLS
    if (enable && MKL_Set_Num_Threads_Local != nullptr) previous_ = MKL_Set_Num_Threads_Local(1);
#endif
  }
  ~SequentialBlas() {
#if BERTKERN_BLAS_SYMBOLS
    if (previous_ >= 0) MKL_Set_Num_Threads_Local(previous_);  // 0 = back to the global setting
#endif
  }
  SequentialBlas(const SequentialBlas&) = delete;
  SequentialBlas& operator=(const SequentialBlas&) = delete;

 private:
  int previous_ = -1;
};

}  // namespace bertkern
