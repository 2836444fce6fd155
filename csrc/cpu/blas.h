// Row-major GEMM for the CPU kernels, calling the BLAS that libtorch_cpu exports (sgemm_ /
// dgemm_, MKL on x86-64 wheels) directly: the cpublas::gemm overloads are not exported, and
// at::mm costs microseconds of dispatch per call, a large share of a 100 x 100 x 64 product. The
// BLAS symbols are weak, so a torch build without them still loads this library and falls back
// to at::addmm_out on the same buffers (as does a build with BERTKERN_ATEN_GEMM defined).
//
//   gemm<T>(...)        C = alpha op(A) op(B) + beta C, T float or double
//   SequentialBlas      makes the calling thread's BLAS single-threaded while it lives
#pragma once

#include <ATen/Config.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/from_blob.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

// Fortran BLAS exported by libtorch_cpu (the same symbols ATen's CPUBlas.cpp calls). Weak: null
// when this torch build does not export them, and then the ATen fallback runs.
#if AT_BUILD_WITH_BLAS() && defined(__GNUC__) && defined(__ELF__) && !defined(BERTKERN_ATEN_GEMM)
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

template <typename T>
void gemm_aten(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
               int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto view = [&](const T* ptr, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    at::Tensor stored = at::from_blob(const_cast<T*>(ptr), {trans ? cols : rows, trans ? rows : cols},
                                      {ld, 1}, options);
    return trans ? stored.t() : stored;
  };
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, options);
  at::addmm_out(c, c, view(A, M, K, lda, trans_a), view(B, K, N, ldb, trans_b), beta, alpha);
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
  gemm_aten<T>(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
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
