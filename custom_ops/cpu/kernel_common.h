// Shared building blocks of the CPU AOT kernels: error reporting, argument checking and the
// floating-point element types (float32 / float16 / bfloat16). The parallel loop is in
// parallel_for.h (included here, since most kernels use it).
//
// Notation of every kernel's shape comments (mindspore_moe_ep/dispatcher.py): T tokens on this
// rank, H hidden, K experts per token, E experts, L local experts, R ranks of the expert-parallel
// group, C = max_tokens_per_rank (rows per source rank of the static buffers: the "slot layout"
// is R blocks of C rows, the first counts[r] of block r used); "capacity" only means the expert
// drop limit.
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
#include <iterator>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "parallel_for.h"

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

  // Whether the peers of this rank already know of the failure (a communication window recorded
  // it). If not, RunKernel tells the kernel failure listener (see SetKernelFailureListener).
  bool peers_informed() const { return peers_informed_; }
  void set_peers_informed() { peers_informed_ = true; }

 private:
  ErrorCode code_;
  bool peers_informed_ = false;
};

// Throws a KernelError whose message is the concatenation of `parts` (anything streamable).
template <typename... Parts>
[[noreturn]] void Fail(ErrorCode code, const Parts &...parts) {
  std::ostringstream message;
  (message << ... << parts);
  throw KernelError(code, message.str());
}

// Stores "<kernel>: <message>" as the last error and prints it to stderr; unless
// `peers_informed`, also tells the failure listener, if one is set.
void RecordError(const char *kernel_name, const char *message, bool peers_informed = false);

// Called with "<kernel>: <message>" whenever a kernel of this process fails without its peers
// having been told. The communication windows set it (comm_window_registry.cc): a rank whose
// kernel failed will not reach its next exchange, so its peers are told at once instead of
// waiting for the exchange timeout.
using KernelFailureListener = void (*)(const std::string &reason);
void SetKernelFailureListener(KernelFailureListener listener);

// Runs a kernel body, converting exceptions into a return code and a recorded error message.
template <typename Body>
int RunKernel(const char *kernel_name, Body &&body) noexcept {
  try {
    body();
    return 0;
  } catch (const KernelError &error) {
    RecordError(kernel_name, error.what(), error.peers_informed());
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
  std::string ShapeString() const;                  // e.g. "[4, 8]"
  std::string IndexString(int64_t flat_index) const;  // e.g. "[3,1]" for element 3 * 8 + 1

  template <typename T>
  T *data_as() const { return static_cast<T *>(data); }

  // Checks; each throws a KernelError with a message naming this tensor.
  void RequireRank(int expected_rank) const;
  void RequireDim(int axis, int64_t expected, const char *expected_description) const;
  void RequireDtype(std::string_view expected_dtype) const;
  void RequireSameDtype(const TensorArg &other) const;
};

// The value of a one-element int32 input (a window id, a count); throws naming the tensor.
int32_t ScalarInput(const TensorArg &scalar);

// The inputs and outputs of one kernel call, named in order.
// Throws if the number of tensors differs from the number of names.
std::vector<TensorArg> BindArgs(int nparam, void **params, int *ndims, int64_t **shapes,
                                const char **dtypes, std::initializer_list<const char *> names);
std::vector<TensorArg> BindArgs(int nparam, void **params, int *ndims, int64_t **shapes,
                                const char **dtypes, const char *const *names, size_t count);

// `Args` built from its members in order (see BindArgsAs).
template <typename Args, size_t... index>
Args ArgsFromTensors(std::vector<TensorArg> &tensors, std::index_sequence<index...>) {
  return Args{std::move(tensors[index])...};
}

// The inputs and outputs of one kernel call as the struct `Args`, whose TensorArg members are
// declared in the order of its `kNames` (inputs, then outputs, as MindSpore passes them): a
// kernel names its tensors in one place and reads them by name. Throws like BindArgs.
template <typename Args>
Args BindArgsAs(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  constexpr size_t count = std::size(Args::kNames);
  static_assert(sizeof(Args) == count * sizeof(TensorArg), "one TensorArg member per name");
  std::vector<TensorArg> tensors =
      BindArgs(nparam, params, ndims, shapes, dtypes, Args::kNames, count);
  return ArgsFromTensors<Args>(tensors, std::make_index_sequence<count>{});
}

// ---------------------------------------------------------------------------------------------
// Element types
// ---------------------------------------------------------------------------------------------

// float16 and bfloat16 are stored as their 16 raw bits and converted with integer arithmetic
// (exact IEEE conversions, round to nearest even). The build targets x86-64-v2, which has no F16C,
// and GCC's _Float16 conversions there are library calls (~20 ns each); these take ~1.5 ns.
struct Float16 {
  uint16_t bits;
};

// bfloat16: the upper half of a float32.
struct BFloat16 {
  uint16_t bits;
};

inline uint32_t FloatBits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

inline float FloatFromBits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline float ToFloat(float value) { return value; }

inline float ToFloat(BFloat16 value) {
  return FloatFromBits(static_cast<uint32_t>(value.bits) << 16);
}

inline float ToFloat(Float16 value) {
  constexpr uint32_t kExponentMask = 0x7c00u;
  const uint32_t sign = static_cast<uint32_t>(value.bits & 0x8000u) << 16;
  const uint32_t magnitude = value.bits & 0x7fffu;  // exponent and mantissa
  if (magnitude >= kExponentMask) {                 // infinity or NaN
    return FloatFromBits(sign | 0x7f800000u | ((magnitude & 0x03ffu) << 13));
  }
  if (magnitude >= 0x0400u) {  // normal: widen the mantissa, re-bias the exponent by 127 - 15
    return FloatFromBits(sign | ((magnitude << 13) + ((127u - 15u) << 23)));
  }
  // zero or subnormal: magnitude * 2^-24, exact in float32
  return FloatFromBits(sign | FloatBits(static_cast<float>(magnitude) * 0x1p-24f));
}

template <typename T>
T FromFloat(float value);

template <>
inline float FromFloat<float>(float value) { return value; }

// Round to nearest, ties to even; NaN stays a (quiet) NaN.
template <>
inline BFloat16 FromFloat<BFloat16>(float value) {
  uint32_t bits = FloatBits(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    return BFloat16{static_cast<uint16_t>((bits >> 16) | 0x0040u)};
  }
  const uint32_t lowest_kept_bit = (bits >> 16) & 1u;
  bits += 0x7fffu + lowest_kept_bit;
  return BFloat16{static_cast<uint16_t>(bits >> 16)};
}

// Round to nearest, ties to even; overflow gives infinity; NaN stays a (quiet) NaN.
template <>
inline Float16 FromFloat<Float16>(float value) {
  const uint32_t bits = FloatBits(value);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7fffffffu;
  uint32_t result;
  if (magnitude > 0x7f800000u) {  // NaN
    result = 0x7e00u | ((magnitude >> 13) & 0x03ffu);
  } else if (magnitude >= 0x477ff000u) {  // >= 65520 rounds past the largest float16, 65504
    result = 0x7c00u;
  } else if (magnitude < 0x38800000u) {  // below 2^-14: a float16 subnormal (or zero)
    // Adding 0.5 puts the float16 subnormal's bits at the bottom of the mantissa; the float32
    // addition does the rounding to nearest even.
    result = FloatBits(FloatFromBits(magnitude) + 0.5f) - FloatBits(0.5f);
  } else {  // normal: re-bias the exponent, round away the low 13 mantissa bits
    const uint32_t lowest_kept_bit = (magnitude >> 13) & 1u;
    result = (magnitude - ((127u - 15u) << 23) + 0x0fffu + lowest_kept_bit) >> 13;
  }
  return Float16{static_cast<uint16_t>(sign | result)};
}

// Calls visitor(T{}) with T = float, Float16 or BFloat16 according to tensor.dtype.
template <typename Visitor>
void VisitFloatType(const TensorArg &tensor, Visitor &&visitor) {
  if (tensor.dtype == "float32") {
    visitor(float{});
  } else if (tensor.dtype == "float16") {
    visitor(Float16{});
  } else if (tensor.dtype == "bfloat16") {
    visitor(BFloat16{});
  } else {
    Fail(kInvalidArgument, tensor.name, " has dtype ", tensor.dtype,
         "; expected float32, float16 or bfloat16");
  }
}

// ---------------------------------------------------------------------------------------------
// CPU features and memory
// ---------------------------------------------------------------------------------------------

// The instruction sets the kernels choose between at run time, in increasing order. The library
// is built for x86-64-v2 (kScalar); faster loops live in __attribute__((target(...))) functions
// chosen with ActiveCpuIsa(). Different paths give bit-identical results where they add in the
// same order (each kernel says where they do not).
enum class CpuIsa : int {
  kScalar = 0,  // x86-64-v2: plain C++ loops
  kAvx2 = 1,    // AVX2 + F16C (8 floats per instruction, hardware float16 conversion)
  kAvx512 = 2,  // AVX-512 F/BW/VL/DQ ("avx512_core"): enables oneDNN's bfloat16 GEMM candidate
};

// The best instruction set the CPU (and OS) run, read once.
CpuIsa DetectedCpuIsa();
// The instruction set the kernels use: DetectedCpuIsa(), capped by the environment variable
// MOE_EP_CPU_ISA (scalar, avx2 or avx512; read once) or by MoeEpSetCpuIsa() (tests), so that
// every path can be run and compared on any CPU that has it.
CpuIsa ActiveCpuIsa();
// The name of an instruction set: "scalar", "avx2" or "avx512".
const char *CpuIsaName(CpuIsa isa);

// Whether the kernels may run their AVX2 + F16C loops (ActiveCpuIsa() >= kAvx2).
inline bool CpuHasAvx2F16c() { return ActiveCpuIsa() >= CpuIsa::kAvx2; }

// Size of the last-level cache in bytes, read once: sysfs (/sys/devices/system/cpu/cpu0/cache),
// else sysconf(_SC_LEVEL3_CACHE_SIZE), else 8 MiB. sysfs comes first because in VMs glibc's
// sysconf may report the host's whole L3 (64 MiB here, for an 8 MiB L3 per core complex).
int64_t LastLevelCacheBytes();

// Whether a kernel writing `output_bytes` should use non-temporal (streaming) stores: for outputs
// above half the last-level cache, which (with the inputs and the consumer's data) would not
// stay in cache anyway; streaming stores skip reading each destination line first
// (write-allocate). Smaller outputs stay in cache for their consumer. Measured (dispatch, then a
// combine reading every row; one thread, 8 MiB L3; cold / hot destination): streaming takes
// 0.65 / 0.63 of the time at 8 MiB, 0.74-0.84 / 0.72-1.18 at 5-7 MiB, 0.97 / 1.46 at 4 MiB.
inline bool PreferStreamingStores(int64_t output_bytes) {
  return output_bytes > LastLevelCacheBytes() / 2;
}

// memcpy with non-temporal stores for the 16-byte aligned part of `destination` (ordinary stores
// for an unaligned head and a tail shorter than 16 bytes). The thread that copied must call
// StreamingStoreFence() before another thread reads destination (a ParallelFor body: at the
// end of its range).
void CopyStreaming(void *destination, const void *source, size_t bytes);

// Orders this thread's earlier non-temporal stores before its later stores (sfence).
void StreamingStoreFence();

// Test aid for the contract "rows of a worst-case buffer past the used rows are unspecified":
// when the environment variable MOE_EP_POISON_UNUSED_ROWS is set to 1 (read on every call),
// kernels fill those rows with NaN instead of leaving them unwritten, so that tests can show
// that nothing downstream reads them.
bool PoisonUnusedRows();

// Benchmark aid: MOE_EP_DISPATCH_PULL=0 (set on every rank, read on every call) makes the fused
// decode Dispatch and the prefill DeliverRows pack their rows and exchange them even where they
// could pull them, for comparing the two ways.
bool PullDisabled();

// Fills `count` elements with a quiet NaN.
template <typename T>
void FillWithNaN(T *begin, int64_t count) {
  T nan;
  if constexpr (std::is_same_v<T, float>) {
    nan = FloatFromBits(0x7fc00000u);
  } else {
    nan.bits = std::is_same_v<T, Float16> ? 0x7e00u : 0x7fc0u;
  }
  std::fill(begin, begin + count, nan);
}

}  // namespace moe_ep

#endif  // MOE_EP_KERNEL_COMMON_H_
