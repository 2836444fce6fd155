// Standalone run of the LayerNorm kernels of csrc/cuda/layer_norm.cuh, launched by the real
// launch plans (csrc/cuda/layer_norm_launch.cuh) through the CUDA host emulation, checked
// against a double-precision reference. No torch library: it links cleanly
// with -fsanitize=thread (only the header-only c10::Half / c10::BFloat16 of torch/headeronly
// come from torch's include dir). tests/test_emulated_layer_norm.py builds and runs it:
//   g++ -std=c++20 -O1 -g -fsanitize=thread -pthread -I<torch include> -Icsrc -Itests/emulation
//       tests/emulation/tsan_layer_norm.cpp -o tsan_layer_norm
// Prints one line per case and a summary; exits 1 on any mismatch (and with TSan's exitcode
// when TSan reported something).
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <torch/headeronly/util/BFloat16.h>  // the header-only types bertkern's kernels use
#include <torch/headeronly/util/Half.h>

#include "emu_launcher.h"  // first: cuda_host_emu.h
#include "tsan_report.h"
#include "cuda/layer_norm_launch.cuh"

namespace {

using bertkern::cuda::LayerNormPlan;

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

template <typename T>
const char* type_name();
template <>
const char* type_name<float>() { return "float32"; }
template <>
const char* type_name<c10::Half>() { return "float16"; }
template <>
const char* type_name<c10::BFloat16>() { return "bfloat16"; }

// Tolerances of tests/reference.py per storage type.
template <typename T>
double tolerance() {
  if constexpr (std::is_same_v<T, float>) return 1e-5;
  if constexpr (std::is_same_v<T, c10::Half>) return 2e-3;
  return 1.6e-2;
}

// 64-byte aligned storage; `misalign` shifts the data by one element so no pointer is 16-byte
// aligned (the launcher must fall back to VEC = 1).
template <typename T>
class Buffer {
 public:
  Buffer(size_t n, bool misalign) : n_(n) {
    const size_t bytes = ((n + 1) * sizeof(T) + 63) / 64 * 64 + 64;
    raw_ = static_cast<unsigned char*>(std::aligned_alloc(64, bytes));
    std::memset(raw_, 0xff, bytes);  // NaN garbage in anything the kernel forgets to write
    data_ = reinterpret_cast<T*>(raw_) + (misalign ? 1 : 0);
  }
  ~Buffer() { std::free(raw_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  T* data() { return data_; }
  T& operator[](size_t i) { return data_[i]; }
  size_t size() const { return n_; }

 private:
  size_t n_;
  unsigned char* raw_;
  T* data_;
};

struct Rng {
  uint64_t state;
  float uniform() {  // [-1, 1)
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<float>(static_cast<int64_t>(state >> 40) - (1ll << 23)) / static_cast<float>(1 << 23);
  }
};

struct Case {
  int64_t M, N;
  bool residual, weight, bias, store_residual, dresidual;
  bool misalign;
  int64_t row_block_cap;  // 0: the real plan
  float offset;           // added to x: rows with a large mean and a small spread
  int expect_vec;
  // Expected path: 'w' several rows a block (32 or 64 threads a row), 'b' a block per row,
  // 'l' loop path;
  // forward then backward.
  const char* expect_path;
};

char path_of(const LayerNormPlan& p) {
  if (!p.registers) return 'l';
  return p.rows_y > 1 ? 'w' : 'b';
}

std::string describe(const Case& c) {
  char buf[256];
  std::snprintf(buf, sizeof buf, "M=%lld N=%lld res=%d store=%d w=%d b=%d dres=%d misalign=%d cap=%lld offset=%g",
                static_cast<long long>(c.M), static_cast<long long>(c.N), c.residual, c.store_residual,
                c.weight, c.bias, c.dresidual, c.misalign, static_cast<long long>(c.row_block_cap),
                c.offset);
  return buf;
}

// max over i of |got - ref| / (tol * (scale + |ref|)); <= 1 passes.
struct Check {
  double worst = 0;
  void add(double got, double ref, double tol, double scale) {
    const double err = std::fabs(got - ref);
    const double r = err == 0 ? 0 : err / (tol * (scale + std::fabs(ref)));
    if (!(r <= worst)) worst = std::isnan(r) ? INFINITY : r;
  }
  bool ok() const { return worst <= 1.0; }
};

template <typename T>
bool run_case(const Case& c, uint64_t seed) {
  const auto start = std::chrono::steady_clock::now();
  const int64_t M = c.M, N = c.N, MN = M * N;
  const float eps = 1e-5f;
  Rng rng{seed};
  Buffer<T> x(MN, c.misalign), res(MN, c.misalign), w(N, c.misalign), b(N, c.misalign);
  Buffer<T> y(MN, c.misalign), res_out(MN, c.misalign), dy(MN, c.misalign), dres(MN, c.misalign);
  Buffer<T> dz(MN, c.misalign), dw(N, c.misalign), db(N, c.misalign);
  Buffer<float> mean(M, false), rstd(M, false);
  for (int64_t i = 0; i < MN; ++i) {
    x[i] = static_cast<T>(c.offset + rng.uniform());
    res[i] = static_cast<T>(rng.uniform());
    dy[i] = static_cast<T>(rng.uniform());
    dres[i] = static_cast<T>(rng.uniform());
  }
  for (int64_t j = 0; j < N; ++j) {
    w[j] = static_cast<T>(1.f + 0.5f * rng.uniform());
    b[j] = static_cast<T>(rng.uniform());
  }
  const int64_t max_blocks = c.row_block_cap > 0 ? c.row_block_cap : bertkern::cuda::kMaxRowBlocks;

  // ---- forward
  const T* x_p = x.data();
  const T* r_p = c.residual ? res.data() : nullptr;
  const T* w_p = c.weight ? w.data() : nullptr;
  const T* b_p = c.bias ? b.data() : nullptr;
  T* z_out = c.residual && c.store_residual ? res_out.data() : nullptr;
  const bool fwd_aligned = aligned16(x_p) && aligned16(r_p) && aligned16(w_p) && aligned16(b_p) &&
                           aligned16(y.data()) && aligned16(z_out);
  const LayerNormPlan fplan = bertkern::cuda::layer_norm_fwd_plan(M, N, sizeof(T), fwd_aligned, max_blocks);
  bertkern::cuda::layer_norm_fwd_launch<T>(emu_plans::EmuLauncher{}, fplan, x_p, r_p, w_p, b_p, y.data(),
                                           z_out, mean.data(), rstd.data(), M, N, eps);
  const int vec = fplan.vec;
  // z = x (+ residual rounded to T): the reference's, and the backward's input.
  Buffer<T> z(MN, c.misalign);
  for (int64_t i = 0; i < MN; ++i)
    z[i] = c.residual ? static_cast<T>(static_cast<float>(x[i]) + static_cast<float>(res[i])) : x[i];

  bool ok = vec == c.expect_vec;
  bool z_exact = true;
  Check c_mean, c_rstd, c_y;
  const double tol = tolerance<T>();
  for (int64_t r = 0; r < M; ++r) {
    double s = 0;
    for (int64_t j = 0; j < N; ++j) s += static_cast<float>(z[r * N + j]);
    const double m = s / N;
    double ss = 0;
    for (int64_t j = 0; j < N; ++j) {
      const double d = static_cast<float>(z[r * N + j]) - m;
      ss += d * d;
    }
    const double sd = std::sqrt(ss / N);
    const double rs = 1.0 / std::sqrt(ss / N + eps);
    // fp32 rounding of z - mean costs about |mean| * rstd ulps of xhat: a row far from zero
    // relative to its spread (`offset`) is that much less accurate in any fp32 algorithm
    // (and hopeless for a sum / sum-of-squares variance, which this still catches).
    const double cond = 1.0 + std::fabs(m) * rs;
    c_mean.add(mean[r], m, 1e-5, sd);  // fp32 statistics for every storage type
    c_rstd.add(rstd[r], rs, 1e-5 * cond, 0);
    for (int64_t j = 0; j < N; ++j) {
      const int64_t i = r * N + j;
      double v = (static_cast<float>(z[i]) - m) * rs;
      if (c.weight) v *= static_cast<float>(w[j]);
      if (c.bias) v += static_cast<float>(b[j]);
      c_y.add(static_cast<float>(y[i]), v, tol, cond);
      if (c.residual && c.store_residual &&
          std::memcmp(&res_out[i], &z[i], sizeof(T)) != 0)
        z_exact = false;
    }
  }
  ok = ok && z_exact && c_mean.ok() && c_rstd.ok() && c_y.ok();

  // ---- backward (from the kernel's own statistics, as autograd would pass them)
  const T* dr_p = c.dresidual ? dres.data() : nullptr;
  const bool bwd_aligned = aligned16(dy.data()) && aligned16(z.data()) && aligned16(dz.data()) &&
                           aligned16(w_p) && aligned16(dr_p);
  const LayerNormPlan bplan = bertkern::cuda::layer_norm_bwd_plan(M, N, sizeof(T), bwd_aligned,
                                                                  c.weight || c.bias, max_blocks);
  std::vector<float> workspace(static_cast<size_t>(bplan.workspace_floats), std::nanf(""));
  bertkern::cuda::layer_norm_bwd_launch<T>(
      emu_plans::EmuLauncher{}, bplan, bplan.workspace_floats ? workspace.data() : nullptr, dy.data(),
      dr_p, z.data(), mean.data(), rstd.data(), w_p, dz.data(), c.weight ? dw.data() : nullptr,
      c.bias ? db.data() : nullptr, M, N);
  const int vec_b = bplan.vec;
  const int64_t chunks = bplan.registers ? bplan.n_partials : bplan.loop_dwdb.n_chunks;
  const char path[3] = {path_of(fplan), path_of(bplan), 0};
  ok = ok && std::strcmp(path, c.expect_path) == 0;
  Check c_dz, c_dw, c_db;
  std::vector<double> ref_dw(N, 0.0), ref_db(N, 0.0), abs_dw(N, 0.0), abs_db(N, 0.0);
  for (int64_t r = 0; r < M; ++r) {
    const double m = mean[r], rs = rstd[r];
    double sum_g = 0, sum_gx = 0;
    for (int64_t j = 0; j < N; ++j) {
      const int64_t i = r * N + j;
      const double zi = static_cast<float>(z[i]);
      const double g = static_cast<double>(static_cast<float>(dy[i])) * (c.weight ? static_cast<float>(w[j]) : 1.0);
      const double xhat = (zi - m) * rs;
      sum_g += g;
      sum_gx += g * xhat;
      ref_dw[j] += static_cast<float>(dy[i]) * xhat;
      ref_db[j] += static_cast<float>(dy[i]);
      abs_dw[j] += std::fabs(static_cast<float>(dy[i]) * xhat);
      abs_db[j] += std::fabs(static_cast<float>(dy[i]));
    }
    for (int64_t j = 0; j < N; ++j) {
      const int64_t i = r * N + j;
      const double zi = static_cast<float>(z[i]);
      const double g = static_cast<double>(static_cast<float>(dy[i])) * (c.weight ? static_cast<float>(w[j]) : 1.0);
      const double xhat = (zi - m) * rs;
      double d = rs * (g - sum_g / N - xhat * sum_gx / N);
      if (c.dresidual) d += static_cast<float>(dres[i]);
      // dz is O(rstd) with cancellation inside: scale the absolute part by rstd (and cond).
      c_dz.add(static_cast<float>(dz[i]), d, tol, rs * (1.0 + std::fabs(m) * rs));
    }
  }
  for (int64_t j = 0; j < N; ++j) {
    if (c.weight) c_dw.add(static_cast<float>(dw[j]), ref_dw[j], tol, abs_dw[j]);
    if (c.bias) c_db.add(static_cast<float>(db[j]), ref_db[j], tol, abs_db[j]);
  }
  ok = ok && vec_b == c.expect_vec && c_dz.ok() && c_dw.ok() && c_db.ok();

  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("%s %-8s %s path=%s (fwd %dx%d iters %d, bwd %dx%d iters %d, %lld blocks) vec=%d/%d partials=%lld | err/tol mean %.3f rstd %.3f y %.3f z %s dz %.3f dw %.3f db %.3f | %.1f s\n",
              emu_report::status(ok), type_name<T>(), describe(c).c_str(), path, fplan.threads_x,
              fplan.rows_y, fplan.iters, bplan.threads_x, bplan.rows_y, bplan.iters,
              static_cast<long long>(bplan.blocks), vec, vec_b, static_cast<long long>(chunks), c_mean.worst, c_rstd.worst, c_y.worst,
              z_exact ? "exact" : "WRONG", c_dz.worst, c_dw.worst, c_db.worst, secs);
  return ok;
}

// The launch-plan helpers themselves, over a range of shapes.
bool check_plans() {
  using namespace bertkern::cuda;
  bool ok = layer_norm_vec(768, 4, true) == 4 && layer_norm_vec(768, 2, true) == 8 &&
            layer_norm_vec(768, 4, false) == 1 && layer_norm_vec(1023, 4, true) == 1;
  for (int64_t packs : {1ll, 7ll, 64ll, 65ll, 192ll, 1023ll, 1024ll, 2048ll, 100000ll}) {
    const int t = layer_norm_threads(packs);
    ok = ok && t % kWarpSize == 0 && t >= kWarpSize && t <= 512;
  }
  for (int64_t M : {1ll, 7ll, 31ll, 32ll, 33ll, 70ll, 1000ll, 4096ll, 123457ll, 10000000ll}) {
    for (int64_t N : {1ll, 7ll, 32ll, 33ll, 768ll, 1023ll, 1024ll, 1030ll, 4096ll, 8192ll, 16385ll,
                      32768ll, 32776ll, 100000ll}) {
      for (int elem : {2, 4}) {
        for (bool aligned : {true, false}) {
          for (int pass = 0; pass < 2; ++pass) {
            const LayerNormPlan p = pass == 0 ? layer_norm_fwd_plan(M, N, elem, aligned)
                                              : layer_norm_bwd_plan(M, N, elem, aligned, true);
            const int max_elems = pass == 0 ? fwd_max_elems(p.vec) : bwd_max_elems(p.vec);
            const int64_t P = N / p.vec;
            bool good = p.vec == layer_norm_vec(N, elem, aligned) && p.blocks >= 1 &&
                        p.blocks <= kMaxRowBlocks && p.threads_x % kWarpSize == 0 &&
                        p.threads_x * p.rows_y <= kMaxRowThreads;
            if (p.registers) {
              good = good && static_cast<int64_t>(p.iters) * p.threads_x >= P &&
                     p.iters * p.vec <= max_elems &&
                     (p.rows_y == 1 || (p.threads_x <= kMaxMultiRowThreads && N <= kMultiRowMaxN)) &&
                     (p.threads_x > kMaxMultiRowThreads || p.rows_y > 1) &&
                     p.blocks * p.rows_y <= ((M + p.rows_y - 1) / p.rows_y) * p.rows_y;
              if (pass == 1)
                good = good && p.n_partials == p.blocks && p.workspace_floats == 2 * p.blocks * N &&
                       p.blocks * p.threads_x * p.rows_y <= kBwdThreadsInFlight &&
                       p.blocks <= kBwdMaxPartials &&
                       p.workspace_floats == 2 * p.n_partials * N;
            } else {
              // the loop path only where a row does not fit 1024 threads' registers
              good = good && P > static_cast<int64_t>(kMaxRowThreads) * (max_elems / p.vec) / 2 &&
                     p.blocks == (M < kMaxRowBlocks ? M : kMaxRowBlocks) &&
                     (pass == 0 || p.workspace_floats == 2 * p.loop_dwdb.n_chunks * N);
            }
            if (!good) {
              std::printf("FAIL %s plan M=%lld N=%lld elem=%d aligned=%d: registers %d vec %d iters %d "
                          "threads %dx%d blocks %lld\n",
                          pass ? "bwd" : "fwd", static_cast<long long>(M), static_cast<long long>(N), elem,
                          aligned, p.registers, p.vec, p.iters, p.threads_x, p.rows_y,
                          static_cast<long long>(p.blocks));
              ok = false;
            }
          }
        }
      }
      const DwDbPlan p = layer_norm_dwdb_plan(M, N);
      const bool good = p.col_tiles * kColTile >= N && (p.col_tiles - 1) * kColTile < N &&
                        p.n_chunks >= 1 && p.n_chunks <= 65535 && p.rows_per_chunk % kRowThreads == 0 &&
                        p.rows_per_chunk > 0 && p.n_chunks * p.rows_per_chunk >= M &&
                        (M == 0 || (p.n_chunks - 1) * p.rows_per_chunk < M);
      if (!good) {
        std::printf("FAIL dwdb plan M=%lld N=%lld: col_tiles %lld n_chunks %lld rows_per_chunk %lld\n",
                    static_cast<long long>(M), static_cast<long long>(N),
                    static_cast<long long>(p.col_tiles), static_cast<long long>(p.n_chunks),
                    static_cast<long long>(p.rows_per_chunk));
        ok = false;
      }
    }
  }
  return ok;
}

}  // namespace

int main() {
  emu_report::Failures failures;
  failures.check("launch plan helpers", check_plans());
  uint64_t seed = 1;
  // path: forward then backward plan, 'w' warp per row, 'b' block per row, 'l' loop path.
  //                M     N     res    w      b      store  dres   misal  cap off   vec path
  const Case float_cases[] = {
      {1, 1, false, false, false, false, false, false, 0, 0.f, 1, "ww"},
      {1, 1, true, true, true, true, true, false, 0, 0.f, 1, "ww"},
      {3, 1023, true, true, true, true, true, false, 0, 0.f, 1, "wb"},   // 64 threads a row fwd
      {3, 1023, true, false, false, false, false, false, 0, 0.f, 1, "wb"},
      {2, 768, true, true, true, true, true, false, 0, 0.f, 4, "ww"},    // bwd 64 threads a row
      {2, 768, true, true, true, true, true, true, 0, 0.f, 1, "wb"},
      {2, 768, false, false, false, false, false, false, 0, 0.f, 4, "ww"},
      {70, 40, true, true, true, true, false, false, 8, 0.f, 4, "ww"},  // grid-stride, 8 partials
      {37, 7, false, true, false, false, true, false, 5, 1000.f, 1, "ww"},
      {5, 64, false, false, true, false, false, true, 2, 0.f, 1, "ww"},
      {9, 96, true, true, true, true, true, false, 0, 0.f, 4, "ww"},      // 4 / 8 rows a block, tail
      {300, 64, false, true, true, false, false, false, 0, 0.f, 4, "ww"},  // 38 partial rows
      {3, 2000, true, true, true, true, true, false, 0, 0.f, 4, "bb"},    // block per row, tail packs
      {7, 2000, true, true, true, false, false, false, 2, 0.f, 4, "bb"},  // block per row, grid-stride
      {2, 1030, false, true, true, false, true, false, 0, 0.f, 1, "bb"},  // N % 4 != 0, N > 1024
      {2, 12000, true, true, true, true, true, false, 0, 0.f, 4, "bl"},   // bwd loop path
      {2, 16385, true, true, true, true, true, true, 0, 0.f, 1, "ll"},    // loop path, unvectorized
  };
  for (const Case& c : float_cases) failures.add(run_case<float>(c, seed++));
  const Case half_cases[] = {
      {2, 768, true, true, true, true, true, false, 0, 0.f, 8, "ww"},
      {3, 1023, true, true, true, true, true, false, 0, 0.f, 1, "wb"},
      {70, 40, true, true, true, true, false, false, 8, 0.f, 8, "ww"},
      {2, 3000, true, true, true, true, true, false, 0, 0.f, 8, "bb"},
      {7, 768, true, true, true, true, true, false, 1, 0.f, 8, "ww"},  // bwd 64x4, 1 block, tail row idle
      {2, 32776, false, true, true, false, false, false, 0, 0.f, 8, "ll"},  // loop path
  };
  for (const Case& c : half_cases) failures.add(run_case<c10::Half>(c, seed++));
  const Case bf16_cases[] = {
      {2, 768, true, true, true, true, true, false, 0, 0.f, 8, "ww"},
      {3, 1023, false, true, false, false, false, false, 0, 0.f, 1, "wb"},
      {100, 24, true, true, true, true, true, false, 3, 0.f, 8, "ww"},  // 3 blocks of 8 warps sum partials
  };
  for (const Case& c : bf16_cases) failures.add(run_case<c10::BFloat16>(c, seed++));
  return failures.finish();
}
