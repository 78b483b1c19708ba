// Shared building blocks of the CPU AOT kernels: error reporting, argument checking, the
// floating-point element types (float32 / float16 / bfloat16) and a deterministic parallel loop.
//
// Every kernel entry point has MindSpore's AOT signature
//   extern "C" int Name(int nparam, void **params, int *ndims, int64_t **shapes,
//                       const char **dtypes, void *stream, void *extra);
// (params = inputs, then outputs) and runs its body through RunKernel(), which turns a thrown
// KernelError into a non-zero return code plus a message that Python reads with MoeEpLastError().
#ifndef MOE_EP_KERNEL_COMMON_H_
#define MOE_EP_KERNEL_COMMON_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <initializer_list>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#define MOE_EP_EXPORT extern "C" __attribute__((visibility("default")))

namespace moe_ep {

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

// Return codes of the kernels (0 is success).
enum ErrorCode : int {
  kInvalidArgument = 1,  // wrong number of tensors, rank, shape or dtype
  kOutOfRange = 2,       // a value inside an index tensor is out of its valid range
  kInternalError = 3,    // anything else (e.g. a failing GEMM backend)
};

class KernelError : public std::runtime_error {
 public:
  KernelError(ErrorCode code, const std::string &message)
      : std::runtime_error(message), code_(code) {}
  ErrorCode code() const { return code_; }

 private:
  ErrorCode code_;
};

// Throws a KernelError whose message is the concatenation of `parts` (anything streamable).
template <typename... Parts>
[[noreturn]] void Fail(ErrorCode code, const Parts &...parts) {
  std::ostringstream message;
  (message << ... << parts);
  throw KernelError(code, message.str());
}

// Stores "<kernel>: <message>" as the last error and prints it to stderr.
void RecordError(const char *kernel_name, const char *message);

// Runs a kernel body, converting exceptions into a return code and a recorded error message.
template <typename Body>
int RunKernel(const char *kernel_name, Body &&body) noexcept {
  try {
    body();
    return 0;
  } catch (const KernelError &error) {
    RecordError(kernel_name, error.what());
    return error.code();
  } catch (const std::exception &error) {
    RecordError(kernel_name, error.what());
    return kInternalError;
  } catch (...) {
    RecordError(kernel_name, "unknown exception");
    return kInternalError;
  }
}

// ---------------------------------------------------------------------------------------------
// Kernel arguments
// ---------------------------------------------------------------------------------------------

// One tensor handed to a kernel, with the name used in error messages.
struct TensorArg {
  std::string name;
  void *data = nullptr;
  int rank = 0;
  const int64_t *shape = nullptr;
  std::string_view dtype;

  int64_t dim(int axis) const { return shape[axis]; }
  int64_t numel() const;
  std::string ShapeString() const;  // e.g. "[4, 8]"

  template <typename T>
  T *data_as() const { return static_cast<T *>(data); }

  // Checks; each throws a KernelError with a message naming this tensor.
  void RequireRank(int expected_rank) const;
  void RequireDim(int axis, int64_t expected, const char *expected_description) const;
  void RequireDtype(std::string_view expected_dtype) const;
  void RequireSameDtype(const TensorArg &other) const;
};

// The inputs and outputs of one kernel call, named in order.
// Throws if the number of tensors differs from the number of names.
std::vector<TensorArg> BindArgs(int nparam, void **params, int *ndims, int64_t **shapes,
                                const char **dtypes, std::initializer_list<const char *> names);

// Formats a multi-index as "[i,j]" for messages such as "expert_ids[3,1] = 9".
std::string IndexString(int64_t flat_index, int64_t row_length);

// ---------------------------------------------------------------------------------------------
// Element types
// ---------------------------------------------------------------------------------------------

using Half = _Float16;

// bfloat16 stored as its 16 raw bits (the upper half of a float32).
struct BFloat16 {
  uint16_t bits;
};

inline float ToFloat(float value) { return value; }
inline float ToFloat(Half value) { return static_cast<float>(value); }
inline float ToFloat(BFloat16 value) {
  const uint32_t bits = static_cast<uint32_t>(value.bits) << 16;
  float result;
  std::memcpy(&result, &bits, sizeof(result));
  return result;
}

template <typename T>
T FromFloat(float value);

template <>
inline float FromFloat<float>(float value) { return value; }

template <>
inline Half FromFloat<Half>(float value) { return static_cast<Half>(value); }

// Round to nearest, ties to even; NaN stays a (quiet) NaN.
template <>
inline BFloat16 FromFloat<BFloat16>(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    return BFloat16{static_cast<uint16_t>((bits >> 16) | 0x0040u)};
  }
  const uint32_t lowest_kept_bit = (bits >> 16) & 1u;
  bits += 0x7fffu + lowest_kept_bit;
  return BFloat16{static_cast<uint16_t>(bits >> 16)};
}

// Calls visitor(T{}) with T = float, Half or BFloat16 according to tensor.dtype.
template <typename Visitor>
void VisitFloatType(const TensorArg &tensor, Visitor &&visitor) {
  if (tensor.dtype == "float32") {
    visitor(float{});
  } else if (tensor.dtype == "float16") {
    visitor(Half{});
  } else if (tensor.dtype == "bfloat16") {
    visitor(BFloat16{});
  } else {
    Fail(kInvalidArgument, tensor.name, " has dtype ", tensor.dtype,
         "; expected float32, float16 or bfloat16");
  }
}

// ---------------------------------------------------------------------------------------------
// Parallel loop
// ---------------------------------------------------------------------------------------------

// Number of worker threads kernels may use: MOE_EP_NUM_THREADS if set, else the core count.
int KernelThreadCount();

// Runs body(begin, end) over disjoint ranges covering [0, count). Uses several threads only when
// each gets at least `min_items_per_thread` items. Results are deterministic as long as the
// body writes only outputs owned by its range. The first exception thrown by a body is rethrown.
template <typename Body>
void ParallelFor(int64_t count, int64_t min_items_per_thread, Body &&body) {
  if (count <= 0) return;
  const int64_t useful_threads = count / std::max<int64_t>(min_items_per_thread, 1);
  const int64_t thread_count = std::min<int64_t>(KernelThreadCount(), useful_threads);
  if (thread_count <= 1) {
    body(int64_t{0}, count);
    return;
  }
  std::vector<std::exception_ptr> failures(thread_count);
  std::vector<std::thread> helpers;
  helpers.reserve(thread_count - 1);
  auto run_share = [&](int64_t share) {
    const int64_t begin = count * share / thread_count;
    const int64_t end = count * (share + 1) / thread_count;
    try {
      body(begin, end);
    } catch (...) {
      failures[share] = std::current_exception();
    }
  };
  for (int64_t share = 1; share < thread_count; ++share) helpers.emplace_back(run_share, share);
  run_share(0);  // the calling thread takes the first share
  for (std::thread &helper : helpers) helper.join();
  for (const std::exception_ptr &failure : failures) {
    if (failure) std::rethrow_exception(failure);
  }
}

}  // namespace moe_ep

#endif  // MOE_EP_KERNEL_COMMON_H_
