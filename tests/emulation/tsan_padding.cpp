// Standalone run of the key-padding kernels of csrc/cuda/padding.cuh through the CUDA host
// emulation, launched by the real launch plans (csrc/cuda/padding_launch.cuh), checked against
// a plain C++ reference. No torch at all. tests/test_emulated_padding.py builds and runs it:
//   g++ -std=c++20 -O1 -g -fsanitize=thread -pthread -Itests/emulation -Icsrc
//       tests/emulation/tsan_padding.cpp -o tsan_padding
// For each mask: mask -> (cu_seqlens, T, max_seqlen, indices), then gather_rows and
// scatter_rows over rows of a few byte widths (every copy unit: uint8, uint16, uint32 and
// 16-byte packs), compared byte for byte (scatter's output starts as garbage: the kernels must
// write every byte, zeros included); then out-of-range indices, which must fail the
// kernels' device-side check (emu::DeviceCheckError) and leave nothing written out of bounds.
// Prints one line per case and a summary; exits 1 on any mismatch (and with TSan's exitcode
// when TSan reported something).
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "emu_launcher.h"  // first: cuda_host_emu.h
#include "tsan_report.h"
#include "cuda/padding_launch.cuh"

namespace {

using bertkern::cuda::RowCopyInfo;
using bertkern::cuda::RowCopyPlan;

int64_t g_block_cap = 0;  // 0: the real plan
int64_t max_blocks() { return g_block_cap > 0 ? g_block_cap : bertkern::cuda::kMaxPaddingBlocks; }

struct MaskStats {
  int64_t total;
  int64_t max_seqlen;
};

// mask_to_indices as padding.cu runs it: lengths, the host read of the stats, indices.
MaskStats mask_lengths(const bool* mask, int32_t* cu_seqlens, int64_t B, int64_t S) {
  if (B == 0) {  // padding.cu: cu_seqlens.zero_(), no launch
    cu_seqlens[0] = 0;
    return {0, 0};
  }
  std::unique_ptr<int32_t[]> seqlens(new int32_t[B]);
  int64_t stats[2] = {-1, -1};
  bertkern::cuda::mask_lengths_launch(emu_plans::EmuLauncher{}, mask, seqlens.get(), cu_seqlens, stats,
                                      B, S, max_blocks());
  return {stats[0], stats[1]};
}

void mask_indices(const bool* mask, const int32_t* cu_seqlens, int64_t* indices, int64_t B, int64_t S,
                  int64_t total) {
  if (total <= 0) return;
  bertkern::cuda::mask_indices_launch(emu_plans::EmuLauncher{}, mask, cu_seqlens, indices, B, S,
                                      max_blocks());
}

RowCopyInfo run_gather(const void* src, const int64_t* idx, void* dst, int64_t n, int64_t n_src,
                   int64_t row_bytes) {
  return bertkern::cuda::gather_rows_launch(emu_plans::EmuLauncher{}, src, idx, dst, n, n_src, row_bytes,
                                            max_blocks());
}

RowCopyInfo run_scatter(const void* src, const int64_t* idx, void* dst, int64_t n, int64_t n_dst,
                    int64_t row_bytes) {
  std::vector<int64_t> inverse(static_cast<size_t>(n_dst), -7);
  return bertkern::cuda::scatter_rows_launch(emu_plans::EmuLauncher{}, src, idx, dst, inverse.data(), n,
                                             n_dst, row_bytes, max_blocks());
}

struct Rng {
  uint64_t state;
  uint32_t next() {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<uint32_t>(state >> 33);
  }
  bool chance(double p) { return next() < p * 2147483648.0; }
};

enum class Kind { kRightPadded, kScattered, kNone, kAll, kOneAllPadded };

struct MaskCase {
  const char* name;
  Kind kind;
  int64_t B, S;
  int64_t block_cap;               // 0: the real plan
  std::vector<int64_t> row_bytes;  // row widths for the gather / scatter checks
};

// 64-byte aligned bytes, `offset` bytes into the allocation; guard bytes after the end are
// checked for out-of-bounds writes.
class Bytes {
 public:
  static constexpr size_t kGuard = 64;
  Bytes(size_t n, size_t offset, unsigned char fill) : n_(n) {
    const size_t total = (offset + n + kGuard + 63) / 64 * 64;
    raw_ = static_cast<unsigned char*>(std::aligned_alloc(64, total));
    std::memset(raw_, 0xA5, total);
    data_ = raw_ + offset;
    std::memset(data_, fill, n);
  }
  ~Bytes() { std::free(raw_); }
  Bytes(const Bytes&) = delete;
  Bytes& operator=(const Bytes&) = delete;
  unsigned char* data() { return data_; }
  size_t size() const { return n_; }
  bool guard_intact() const {
    for (size_t i = 0; i < kGuard; ++i)
      if (data_[n_ + i] != 0xA5) return false;
    return true;
  }

 private:
  size_t n_;
  unsigned char* raw_;
  unsigned char* data_;
};

std::unique_ptr<bool[]> make_mask(const MaskCase& c, Rng& rng) {
  std::unique_ptr<bool[]> m(new bool[c.B * c.S > 0 ? c.B * c.S : 1]);
  for (int64_t b = 0; b < c.B; ++b) {
    // right-padded: lengths vary, the first sequence is full
    const int64_t len = b == 0 ? c.S : static_cast<int64_t>(rng.next() % static_cast<uint32_t>(c.S + 1));
    for (int64_t s = 0; s < c.S; ++s) {
      bool pad = false;
      switch (c.kind) {
        case Kind::kRightPadded: pad = s >= len; break;
        case Kind::kScattered: pad = rng.chance(0.35); break;
        case Kind::kNone: pad = false; break;
        case Kind::kAll: pad = true; break;
        case Kind::kOneAllPadded: pad = b == 1 || rng.chance(0.3); break;
      }
      m[b * c.S + s] = pad;
    }
  }
  return m;
}

// The unit and VEC padding.cu picks.
void expected_unit(int64_t row_bytes, bool aligned16, int* unit, int* vec) {
  if (aligned16 && row_bytes % 16 == 0) { *unit = 4; *vec = 4; }
  else if (row_bytes % 4 == 0) { *unit = 4; *vec = 1; }
  else if (row_bytes % 2 == 0) { *unit = 2; *vec = 1; }
  else { *unit = 1; *vec = 1; }
}

// gather then scatter rows of `row_bytes` through the kernels; byte-exact against the reference.
bool check_rows(const std::vector<int64_t>& idx, int64_t n_rows, int64_t row_bytes, size_t offset,
                Rng& rng, std::string* detail) {
  const int64_t T = static_cast<int64_t>(idx.size());
  Bytes x(static_cast<size_t>(n_rows * row_bytes), offset, 0);
  for (size_t i = 0; i < x.size(); ++i) x.data()[i] = static_cast<unsigned char>(rng.next());
  Bytes packed(static_cast<size_t>(T * row_bytes), offset, 0xEE);
  Bytes padded(static_cast<size_t>(n_rows * row_bytes), offset, 0x5A);  // garbage, as at::empty

  const auto g = run_gather(x.data(), idx.data(), packed.data(), T, n_rows, row_bytes);
  const auto s = run_scatter(packed.data(), idx.data(), padded.data(), T, n_rows, row_bytes);

  bool ok = true;
  int unit = 0, vec = 0;
  expected_unit(row_bytes, offset % 16 == 0, &unit, &vec);
  if (T > 0 && n_rows > 0) ok = ok && g.unit_bytes == unit && g.vec == vec;
  if (n_rows > 0) ok = ok && s.unit_bytes == unit && s.vec == vec;  // zeros are written too
  if (T == 0) ok = ok && g.unit_bytes == 0;                          // no gather launch
  if (n_rows == 0) ok = ok && s.unit_bytes == 0;
  for (int64_t t = 0; t < T && ok; ++t)
    ok = std::memcmp(packed.data() + t * row_bytes, x.data() + idx[t] * row_bytes, row_bytes) == 0;
  std::vector<bool> real(static_cast<size_t>(n_rows), false);
  for (int64_t i : idx) real[static_cast<size_t>(i)] = true;
  for (int64_t r = 0; r < n_rows && ok; ++r) {
    const unsigned char* row = padded.data() + r * row_bytes;
    if (real[static_cast<size_t>(r)]) {
      ok = std::memcmp(row, x.data() + r * row_bytes, row_bytes) == 0;
    } else {
      for (int64_t k = 0; k < row_bytes && ok; ++k) ok = row[k] == 0;
    }
  }
  ok = ok && x.guard_intact() && packed.guard_intact() && padded.guard_intact();
  char buf[160];
  std::snprintf(buf, sizeof buf, " rows%lld%s:u%dx%d/%dx%d,%lldblk", static_cast<long long>(row_bytes),
                offset % 16 ? "(unaligned)" : "", g.unit_bytes, g.vec, g.plan.threads_x, g.plan.rows_y,
                static_cast<long long>(g.plan.blocks));
  *detail += buf;
  return ok;
}

bool run_mask_case(const MaskCase& c, uint64_t seed) {
  const auto start = std::chrono::steady_clock::now();
  Rng rng{seed};
  g_block_cap = c.block_cap;
  const int64_t B = c.B, S = c.S;
  const auto mask = make_mask(c, rng);

  // reference
  std::vector<int32_t> cu_ref(static_cast<size_t>(B + 1), 0);
  std::vector<int64_t> idx_ref;
  int64_t max_ref = 0;
  for (int64_t b = 0; b < B; ++b) {
    int64_t len = 0;
    for (int64_t s = 0; s < S; ++s) {
      if (!mask[b * S + s]) {
        idx_ref.push_back(b * S + s);
        ++len;
      }
    }
    cu_ref[static_cast<size_t>(b + 1)] = cu_ref[static_cast<size_t>(b)] + static_cast<int32_t>(len);
    if (len > max_ref) max_ref = len;
  }

  // kernels (buffers start as garbage, as at::empty)
  std::vector<int32_t> cu(static_cast<size_t>(B + 1), -7);
  const MaskStats stats = mask_lengths(mask.get(), cu.data(), B, S);
  std::vector<int64_t> idx(static_cast<size_t>(stats.total > 0 ? stats.total : 0), -7);
  mask_indices(mask.get(), cu.data(), idx.data(), B, S, stats.total);

  const int64_t T = static_cast<int64_t>(idx_ref.size());
  bool ok = stats.total == T && stats.max_seqlen == max_ref && cu == cu_ref && idx == idx_ref;
  std::string detail;
  if (ok) {
    size_t k = 0;
    for (int64_t row_bytes : c.row_bytes) {
      // every other width also with both buffers 4 bytes past a 16-byte boundary
      const size_t offset = (k++ % 2 == 1 && row_bytes % 4 == 0) ? 4 : 0;
      ok = check_rows(idx_ref, B * S, row_bytes, offset, rng, &detail) && ok;
    }
  }
  g_block_cap = 0;
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("%s %-16s B=%lld S=%lld cap=%lld T=%lld max=%lld%s | %.1f s\n", emu_report::status(ok), c.name,
              static_cast<long long>(B), static_cast<long long>(S), static_cast<long long>(c.block_cap),
              static_cast<long long>(stats.total), static_cast<long long>(stats.max_seqlen), detail.c_str(), secs);
  return ok;
}

// An out-of-range index must fail the device-side check: emu::DeviceCheckError with the
// kernel's message, and no byte written outside the destination.
bool run_bad_index_case(bool scatter, int64_t bad, int64_t row_bytes, int64_t block_cap) {
  g_block_cap = block_cap;
  const int64_t n_rows = 10, T = 6;
  std::vector<int64_t> idx = {0, 2, 4, bad, 6, 8};
  Bytes x(static_cast<size_t>((scatter ? T : n_rows) * row_bytes), 0, 0x11);
  Bytes out(static_cast<size_t>((scatter ? n_rows : T) * row_bytes), 0, 0);
  std::string message;
  try {
    if (scatter) {
      run_scatter(x.data(), idx.data(), out.data(), T, n_rows, row_bytes);
    } else {
      run_gather(x.data(), idx.data(), out.data(), T, n_rows, row_bytes);
    }
  } catch (const emu::DeviceCheckError& e) {
    message = e.what();
  }
  g_block_cap = 0;
  const char* expect = scatter ? "scatter_rows: index out of range" : "gather_rows: index out of range";
  const bool ok = message.find(expect) != std::string::npos && out.guard_intact() && x.guard_intact();
  std::printf("%s bad index %s indices[3]=%lld rows%lld cap=%lld: %s\n", emu_report::status(ok),
              scatter ? "scatter" : "gather ", static_cast<long long>(bad), static_cast<long long>(row_bytes),
              static_cast<long long>(block_cap), message.empty() ? "(no error)" : message.c_str());
  return ok;
}

// The launch-shape helpers themselves.
bool check_plans() {
  using namespace bertkern::cuda;
  bool ok = mask_scan_threads(0) == 32 && mask_scan_threads(1) == 32 && mask_scan_threads(33) == 64 &&
            mask_scan_threads(512) == 512 && mask_scan_threads(100000) == 512;
  for (int64_t n : {1ll, 5ll, 100ll, 70000ll, 10000000ll}) {
    for (int64_t packs : {1ll, 3ll, 32ll, 33ll, 96ll, 256ll, 257ll, 5000ll}) {
      const RowCopyPlan p = row_copy_plan(n, packs);
      const bool good = p.threads_x % kWarpSize == 0 && p.threads_x >= kWarpSize && p.threads_x <= 256 &&
                        p.rows_y >= 1 && p.threads_x * p.rows_y <= 256 && p.blocks >= 1 && p.blocks <= 65536 &&
                        (p.blocks == 65536 || p.blocks * p.rows_y >= n);
      if (!good) {
        std::printf("FAIL row_copy_plan(%lld, %lld) = {%d, %d, %lld}\n", static_cast<long long>(n),
                    static_cast<long long>(packs), p.threads_x, p.rows_y, static_cast<long long>(p.blocks));
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
  // Row widths: 3 (uint8), 6 (uint16), 20 (uint32), 48 (16-byte packs; every other width is
  // also run 4 bytes past a 16-byte boundary: 48 then takes uint32), 1040 (65 packs: 96 threads
  // per row, 2 rows per block), 4097 (uint8: 17 passes of 256 threads over the row).
  // Each mask costs a 1024-thread cu_seqlens launch (about 1 s under TSan): few, dense cases.
  const MaskCase cases[] = {
      {"right_padded", Kind::kRightPadded, 4, 40, 0, {1040, 3}},  // S % 32 != 0
      {"scattered", Kind::kScattered, 3, 45, 0, {6, 20, 48}},
      {"none_padded", Kind::kNone, 2, 16, 0, {4097}},
      {"all_padded", Kind::kAll, 3, 20, 0, {48}},  // T == 0: no indices / copy launches
      {"B=0", Kind::kNone, 0, 16, 0, {48}},        // no launch at all
      {"S=1", Kind::kScattered, 9, 1, 0, {3, 48}},
      {"B=1_S=1100", Kind::kScattered, 1, 1100, 8, {20}},  // the scan loops over 3 chunks
      // capped grids: blocks stride over sequences (reusing their shared scratch) and rows
      {"one_all_padded", Kind::kOneAllPadded, 7, 70, 3, {3, 48, 1040}},
      {"stride_chunks", Kind::kScattered, 5, 600, 2, {6}},
  };
  uint64_t seed = 1;
  for (const MaskCase& c : cases) failures.add(run_mask_case(c, seed++));
  failures.add(run_bad_index_case(false, 10, 48, 0));
  failures.add(run_bad_index_case(false, -1, 3, 0));
  failures.add(run_bad_index_case(true, 10, 20, 0));
  failures.add(run_bad_index_case(true, -3, 1040, 1));
  return failures.finish();
}
