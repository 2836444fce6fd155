// Run-time x86 feature detection, for the CPU kernels written with intrinsics for one
// instruction set (a target attribute on the function) and picked at run time: streaming stores
// (layer_norm.cpp), F16C float16 conversion (convert.cpp). Loops that GCC vectorizes by itself
// use BERTKERN_MULTIVERSION (cpu_common.h) instead.
#pragma once

// x86-64 with GCC or clang: the intrinsics and __builtin_cpu_supports are available.
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define BERTKERN_X86_DISPATCH 1
#include <immintrin.h>
#else
#define BERTKERN_X86_DISPATCH 0
#endif

namespace bertkern {

#if BERTKERN_X86_DISPATCH
// Each is a test of a word libgcc fills in at load time: cheap enough to ask per call.
inline bool cpu_has_avx512f() { return __builtin_cpu_supports("avx512f"); }
inline bool cpu_has_avx2_fma() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
inline bool cpu_has_f16c() {
  return __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
}
#endif

}  // namespace bertkern
