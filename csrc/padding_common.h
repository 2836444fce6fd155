// Argument checks shared by the CPU and CUDA key-padding ops. They raise ValueError / TypeError
// (BERTKERN_CHECK_VALUE / BERTKERN_CHECK_TYPE) naming the argument, before any kernel runs.
#pragma once

#include "torch_api.h"

namespace bertkern {

inline void check_key_padding_mask(const Tensor& mask) {
  BERTKERN_CHECK_TYPE(mask.scalar_type() == kBool,
                   "key_padding_mask must be a bool tensor (True = padding), got dtype ",
                   mask.scalar_type());
  BERTKERN_CHECK_VALUE(mask.dim() == 2, "key_padding_mask must have shape (B, S), got ", mask.sizes());
}

inline void check_rows_args(const Tensor& x, const Tensor& indices, const char* op,
                            const char* x_name) {
  BERTKERN_CHECK_VALUE(x.dim() >= 1, op, ": ", x_name, " must have at least 1 dimension (rows first)");
  BERTKERN_CHECK_TYPE(indices.scalar_type() == kLong, op, ": indices must be int64, got ",
                   indices.scalar_type());
  BERTKERN_CHECK_VALUE(indices.dim() == 1, op, ": indices must be 1-D (T,), got shape ", indices.sizes());
  BERTKERN_CHECK_VALUE(indices.device() == x.device(), op, ": indices is on ", indices.device(),
                    " but ", x_name, " is on ", x.device());
}

inline void check_scatter_rows(const Tensor& x, const Tensor& indices, int64_t n_rows) {
  BERTKERN_CHECK_VALUE(n_rows >= 0, "scatter_rows: n_rows must be >= 0, got ", n_rows);
  BERTKERN_CHECK_VALUE(x.size(0) == indices.numel(), "scatter_rows: x_packed has ", x.size(0),
                    " rows but indices has ", indices.numel(), " entries");
}

}  // namespace bertkern
