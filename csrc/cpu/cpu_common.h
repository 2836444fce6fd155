// Build macros shared by the CPU kernels (csrc/cpu/*.cpp).
#pragma once

// One binary for every x86-64 CPU: hot float loops are cloned for AVX-512 and AVX2 (both with
// FMA) and the clone is picked at load time (GCC target_clones + ifunc, ELF only). Elsewhere,
// or when the whole file is already built for AVX-512, a single version.
#if (defined(__GNUC__) && !defined(__clang__)) && defined(__x86_64__) && defined(__linux__) && \
    !defined(__AVX512F__)
#define BK_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BK_MULTIVERSION
#endif

#if defined(__GNUC__)
#define BK_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define BK_ALWAYS_INLINE inline
#endif

// at::parallel_for is a header template that parallelizes through "#pragma omp parallel" only
// when the including file is compiled with -fopenmp (setup.py passes it); otherwise every task
// runs on the calling thread.
#if !defined(_OPENMP)
#warning "bertkern: a csrc/cpu kernel was built without -fopenmp: at::parallel_for runs on one thread"
#endif
