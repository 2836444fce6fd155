// CPU key-padding ops: mask -> (indices, cu_seqlens, max_seqlen), row gather and scatter.
// The CUDA twin is csrc/cuda/padding.{cuh,cu}; semantics are identical.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "cpu/cpu_common.h"
#include "padding_common.h"
#include "torch_api.h"

namespace bertkern {
namespace {

// max_seqlen is the schema's SymInt output, returned as a plain integer.
std::tuple<Tensor, Tensor, int64_t> mask_to_indices_cpu(const Tensor& mask_in) {
  check_key_padding_mask(mask_in);
  const Tensor mask = as_contiguous(mask_in);
  const int64_t B = mask.size(0), S = mask.size(1);
  const bool* m = const_data<bool>(mask);
  Tensor cu_seqlens = empty({B + 1}, kInt, mask.device());
  int32_t* cu = data<int32_t>(cu_seqlens);

  std::vector<int64_t> seqlens(B);
  parallel_for(0, B, parallel_grain(16384, S), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const bool* row = m + b * S;
      int64_t count = 0;
      for (int64_t s = 0; s < S; ++s) count += row[s] ? 0 : 1;
      seqlens[b] = count;
    }
  });
  int64_t total = 0, max_seqlen = 0;
  cu[0] = 0;
  for (int64_t b = 0; b < B; ++b) {
    total += seqlens[b];
    max_seqlen = std::max(max_seqlen, seqlens[b]);
    BERTKERN_CHECK_VALUE(total <= INT32_MAX, "key_padding_mask: more than 2^31 - 1 real tokens; ",
                         "cu_seqlens is int32");
    cu[b + 1] = static_cast<int32_t>(total);
  }

  Tensor indices = empty({total}, kLong, mask.device());
  int64_t* idx = data<int64_t>(indices);
  parallel_for(0, B, parallel_grain(16384, S), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const bool* row = m + b * S;
      int64_t out = cu[b];
      for (int64_t s = 0; s < S; ++s) {
        if (!row[s]) idx[out++] = b * S + s;
      }
    }
  });
  return {indices, cu_seqlens, max_seqlen};
}

// Checked on the CPU path: every index in [0, n_rows).
void check_indices_in_range(const Tensor& indices, int64_t n_rows, const char* op) {
  const int64_t* idx = const_data<int64_t>(indices);
  const int64_t n = indices.numel();
  int64_t bad = -1;
  for (int64_t t = 0; t < n; ++t) {
    if (idx[t] < 0 || idx[t] >= n_rows) {
      bad = t;
      break;
    }
  }
  BERTKERN_CHECK_INDEX(bad < 0, op, ": indices[", bad, "] = ", bad < 0 ? 0 : idx[bad],
                       " is out of range for ", n_rows, " rows");
}

// Checked on the CPU path before a scatter: no row written twice (a duplicate index would make
// the result depend on the write order and the backward's gather wrong).
void check_indices_unique(const Tensor& indices, int64_t n_rows, const char* op) {
  const int64_t* idx = const_data<int64_t>(indices);
  const int64_t n = indices.numel();
  std::vector<uint8_t> seen(static_cast<size_t>(n_rows), 0);
  for (int64_t t = 0; t < n; ++t) {
    BERTKERN_CHECK_INDEX(!seen[idx[t]], op, ": indices[", t, "] = ", idx[t],
                         " is a duplicate; indices must be unique (each row is written once)");
    seen[idx[t]] = 1;
  }
}

// dst row perm(t) <- src row t (scatter) or dst row t <- src row perm(t) (gather), as bytes.
template <bool kScatter>
void copy_rows_cpu(const Tensor& src, const Tensor& indices, const Tensor& dst) {
  const int64_t n = indices.numel();
  if (n == 0 || src.numel() == 0) return;
  const int64_t row_bytes = src.numel() / src.size(0) * static_cast<int64_t>(src.element_size());
  const int64_t* idx = const_data<int64_t>(indices);
  const char* s = static_cast<const char*>(src.const_data_ptr());
  char* d = static_cast<char*>(dst.mutable_data_ptr());
  parallel_for(0, n, parallel_grain(65536, row_bytes), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if constexpr (kScatter) {
        std::memcpy(d + idx[t] * row_bytes, s + t * row_bytes, row_bytes);
      } else {
        std::memcpy(d + t * row_bytes, s + idx[t] * row_bytes, row_bytes);
      }
    }
  });
}

Tensor gather_rows_cpu(const Tensor& x_in, const Tensor& indices_in) {
  check_rows_args(x_in, indices_in, "gather_rows", "x");
  const Tensor indices = as_contiguous(indices_in);
  check_indices_in_range(indices, x_in.size(0), "gather_rows");
  const Tensor x = as_contiguous(x_in);
  std::vector<int64_t> out_shape = shape(x);
  out_shape[0] = indices.numel();
  Tensor out = empty(out_shape, x.scalar_type(), x.device());
  copy_rows_cpu<false>(x, indices, out);
  return out;
}

Tensor scatter_rows_cpu(const Tensor& x_in, const Tensor& indices_in, int64_t n_rows) {
  check_rows_args(x_in, indices_in, "scatter_rows", "x_packed");
  check_scatter_rows(x_in, indices_in, n_rows);
  const Tensor indices = as_contiguous(indices_in);
  check_indices_in_range(indices, n_rows, "scatter_rows");
  check_indices_unique(indices, n_rows, "scatter_rows");
  const Tensor x = as_contiguous(x_in);
  std::vector<int64_t> out_shape = shape(x);
  out_shape[0] = n_rows;
  Tensor out = zeros(out_shape, x.scalar_type(), x.device());
  copy_rows_cpu<true>(x, indices, out);
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(bertkern, CPU, m) {
  m.impl("mask_to_indices", TORCH_BOX(&mask_to_indices_cpu));
  m.impl("gather_rows", TORCH_BOX(&gather_rows_cpu));
  m.impl("scatter_rows", TORCH_BOX(&scatter_rows_cpu));
}

}  // namespace bertkern
