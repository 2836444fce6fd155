// Everything bertkern's C++ takes from libtorch, through the LibTorch stable ABI only
// (torch/csrc/stable, torch/headeronly): the built extension calls libtorch through its C shim
// (aoti_torch_* / torch_* functions), so one build loads in every torch from the target version
// on (TORCH_TARGET_VERSION, set by setup.py). tests/test_stable_abi.py checks the built library
// imports nothing else from libtorch. Include this header, never ATen / c10 / torch/library.h.
//
//   Tensor, ScalarType, Device, Half, BFloat16      the stable / header-only types
//   BERTKERN_CHECK_VALUE / _TYPE / _INDEX / BERTKERN_CHECK
//                                                   argument checks (see "Errors" below)
//   empty / zeros / full / as_contiguous / to_dtype / to_cpu / shape / same_shape
//                                                   (torch::stable::empty_like etc. directly)
//   data<T>(t)                                      typed data pointer, dtype checked
//   parallel_for / get_num_threads                  libtorch's intra-op thread pool
//   BERTKERN_DISPATCH_FLOATS / _REDUCED_FLOATS / _CASES
//                                                   dtype switch binding scalar_t
#pragma once

#include <torch/csrc/stable/device.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>
#include <torch/headeronly/util/HeaderOnlyArrayRef.h>

#include <cstdint>
#include <optional>
#include <ostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace bertkern {

using Tensor = torch::stable::Tensor;
using OptionalTensor = std::optional<torch::stable::Tensor>;
using Device = torch::stable::Device;
using ScalarType = torch::headeronly::ScalarType;
using IntArrayRef = torch::headeronly::IntHeaderOnlyArrayRef;
using c10::BFloat16;  // header-only (torch/headeronly/util), still in namespace c10
using c10::Half;

inline constexpr ScalarType kFloat = ScalarType::Float;
inline constexpr ScalarType kDouble = ScalarType::Double;
inline constexpr ScalarType kHalf = ScalarType::Half;
inline constexpr ScalarType kBFloat16 = ScalarType::BFloat16;
inline constexpr ScalarType kBool = ScalarType::Bool;
inline constexpr ScalarType kInt = ScalarType::Int;
inline constexpr ScalarType kLong = ScalarType::Long;

// ---------------------------------------------------------------------------------------------
// Errors. Only std::exception crosses the stable ABI, and torch turns it into RuntimeError, so a
// check throws std::runtime_error whose message starts with the Python exception type
// ("ValueError: layer_norm: eps must be >= 0, got -1"). bertkern's Python calls of the
// operators (bertkern.errors.kernel_call) re-raise such an error as that type (an exception that
// is also a RuntimeError, so `except RuntimeError` keeps working); a direct torch.ops.bertkern
// call gets the RuntimeError with the type named in its message.
// ---------------------------------------------------------------------------------------------

namespace detail {

inline const char* device_type_name(torch::headeronly::DeviceType t) {
  switch (t) {
    case torch::headeronly::DeviceType::CPU: return "cpu";
    case torch::headeronly::DeviceType::CUDA: return "cuda";
    case torch::headeronly::DeviceType::Meta: return "meta";
    default: return "device";
  }
}

// Message pieces, printed as torch prints them: shapes "[2, 3]", devices "cpu" / "cuda:0",
// dtypes by ScalarType name ("Float", "BFloat16").
template <typename T>
void put(std::ostream& os, const T& value) {
  os << value;
}
inline void put(std::ostream& os, const Device& d) {
  os << device_type_name(d.type());
  if (d.has_index()) os << ':' << static_cast<int>(d.index());
}
inline void put(std::ostream& os, ScalarType t) { os << torch::headeronly::toString(t); }
inline void put(std::ostream& os, IntArrayRef shape) {
  os << '[';
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << ']';
}
inline void put(std::ostream& os, const std::vector<int64_t>& shape) { put(os, IntArrayRef(shape)); }

}  // namespace detail

template <typename... Args>
std::string message(const Args&... args) {
  std::ostringstream os;
  (detail::put(os, args), ...);
  return os.str();
}

// python_type: "ValueError", "TypeError", "IndexError", or nullptr for a plain RuntimeError.
[[noreturn]] inline void raise(const char* python_type, const std::string& msg) {
  throw std::runtime_error(python_type ? std::string(python_type) + ": " + msg : msg);
}

}  // namespace bertkern

#define BERTKERN_CHECK_AS(python_type, cond, ...)                                   \
  do {                                                                              \
    if (!(cond)) ::bertkern::raise(python_type, ::bertkern::message(__VA_ARGS__)); \
  } while (0)
// A bad argument value (shape, size, device): ValueError.
#define BERTKERN_CHECK_VALUE(cond, ...) BERTKERN_CHECK_AS("ValueError", cond, __VA_ARGS__)
// A bad argument type or dtype: TypeError.
#define BERTKERN_CHECK_TYPE(cond, ...) BERTKERN_CHECK_AS("TypeError", cond, __VA_ARGS__)
// An index out of range: IndexError.
#define BERTKERN_CHECK_INDEX(cond, ...) BERTKERN_CHECK_AS("IndexError", cond, __VA_ARGS__)
// Anything else (an internal invariant, a CUDA failure): RuntimeError.
#define BERTKERN_CHECK(cond, ...) BERTKERN_CHECK_AS(nullptr, cond, __VA_ARGS__)

namespace bertkern {

// ---------------------------------------------------------------------------------------------
// Tensors
// ---------------------------------------------------------------------------------------------

inline std::vector<int64_t> shape(const Tensor& t) { return t.sizes().vec(); }

inline bool same_shape(const Tensor& a, const Tensor& b) {
  if (a.dim() != b.dim()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) != b.size(d)) return false;
  }
  return true;
}

inline Tensor empty(IntArrayRef sizes, ScalarType dtype, const Device& device) {
  return torch::stable::empty(sizes, dtype, std::nullopt, device);
}

inline Tensor zeros(IntArrayRef sizes, ScalarType dtype, const Device& device) {
  Tensor t = empty(sizes, dtype, device);
  torch::stable::zero_(t);
  return t;
}

inline Tensor full(IntArrayRef sizes, double value, ScalarType dtype, const Device& device) {
  Tensor t = empty(sizes, dtype, device);
  torch::stable::fill_(t, value);
  return t;
}

// t itself when already contiguous, else a contiguous copy (named apart from
// torch::stable::contiguous, which argument-dependent lookup also finds).
inline Tensor as_contiguous(const Tensor& t) {
  return t.is_contiguous() ? t : torch::stable::contiguous(t);
}

inline OptionalTensor as_contiguous(const OptionalTensor& t) {
  return t ? OptionalTensor(as_contiguous(*t)) : std::nullopt;
}

inline Tensor to_dtype(const Tensor& t, ScalarType dtype) {
  return t.scalar_type() == dtype ? t : torch::stable::to(t, dtype);
}

inline Tensor to_cpu(const Tensor& t) {
  return t.is_cpu() ? t : torch::stable::to(t, Device(torch::headeronly::DeviceType::CPU));
}

// Typed data pointer; raises (RuntimeError) when T is not the tensor's dtype.
template <typename T>
T* data(const Tensor& t) {
  return t.mutable_data_ptr<T>();
}
template <typename T>
const T* const_data(const Tensor& t) {
  return t.const_data_ptr<T>();
}
template <typename T>
const T* const_data_or_null(const OptionalTensor& t) {
  return t ? t->const_data_ptr<T>() : nullptr;
}

// ---------------------------------------------------------------------------------------------
// Threads: libtorch's intra-op pool (OpenMP in torch's wheels), reached through the shim, so the
// extension needs no OpenMP of its own. f(begin, end) over [begin, end) in chunks of >= grain;
// inside a parallel region it runs inline, as at::parallel_for does.
// ---------------------------------------------------------------------------------------------

template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (begin >= end) return;
  torch::stable::parallel_for(begin, end, grain, f);
}

inline int64_t get_num_threads() { return static_cast<int64_t>(torch::stable::get_num_threads()); }

}  // namespace bertkern

// ---------------------------------------------------------------------------------------------
// dtype dispatch: BERTKERN_DISPATCH_CASES(dtype, "op", CASES, [&] { ... scalar_t ... }) runs the
// lambda with scalar_t bound to the C++ type of dtype; any other dtype raises TypeError.
// ---------------------------------------------------------------------------------------------

#define BERTKERN_DISPATCH_CASE(TYPE, CPP, ...) \
  case TYPE: {                                 \
    using scalar_t [[maybe_unused]] = CPP;     \
    return __VA_ARGS__();                      \
  }
#define BERTKERN_DISPATCH_SWITCH(DTYPE, NAME, CASES)                                    \
  [&] {                                                                                 \
    const ::bertkern::ScalarType bertkern_dispatch_dtype = (DTYPE);                     \
    switch (bertkern_dispatch_dtype) {                                                  \
      CASES                                                                             \
      default:                                                                          \
        ::bertkern::raise("TypeError", ::bertkern::message(NAME, ": dtype ",              \
                                                           bertkern_dispatch_dtype,     \
                                                           " is not supported"));       \
    }                                                                                   \
  }()
// float32, float64, float16, bfloat16.
#define BERTKERN_DISPATCH_FLOATS(DTYPE, NAME, ...)                              \
  BERTKERN_DISPATCH_SWITCH(                                                     \
      DTYPE, NAME,                                                              \
      BERTKERN_DISPATCH_CASE(::bertkern::kFloat, float, __VA_ARGS__)            \
      BERTKERN_DISPATCH_CASE(::bertkern::kDouble, double, __VA_ARGS__)          \
      BERTKERN_DISPATCH_CASE(::bertkern::kHalf, ::bertkern::Half, __VA_ARGS__)  \
      BERTKERN_DISPATCH_CASE(::bertkern::kBFloat16, ::bertkern::BFloat16, __VA_ARGS__))
// float16, bfloat16.
#define BERTKERN_DISPATCH_REDUCED_FLOATS(DTYPE, NAME, ...)                     \
  BERTKERN_DISPATCH_SWITCH(                                                    \
      DTYPE, NAME,                                                             \
      BERTKERN_DISPATCH_CASE(::bertkern::kHalf, ::bertkern::Half, __VA_ARGS__) \
      BERTKERN_DISPATCH_CASE(::bertkern::kBFloat16, ::bertkern::BFloat16, __VA_ARGS__))
// float32, float16, bfloat16 (the CUDA kernels' dtypes).
#define BERTKERN_DISPATCH_CUDA_FLOATS(DTYPE, NAME, ...)                         \
  BERTKERN_DISPATCH_SWITCH(                                                     \
      DTYPE, NAME,                                                              \
      BERTKERN_DISPATCH_CASE(::bertkern::kFloat, float, __VA_ARGS__)            \
      BERTKERN_DISPATCH_CASE(::bertkern::kHalf, ::bertkern::Half, __VA_ARGS__)  \
      BERTKERN_DISPATCH_CASE(::bertkern::kBFloat16, ::bertkern::BFloat16, __VA_ARGS__))
