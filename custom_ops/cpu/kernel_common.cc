// Error buffer, argument checks and CPU features shared by all CPU kernels.
#include "kernel_common.h"

#include <emmintrin.h>  // SSE2: _mm_stream_si128, _mm_sfence
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <string>

namespace moe_ep {
namespace {

// Kernel failures since the last MoeEpClearLastError: the first (usually the cause: in PyNative
// the kernels queued after a failed one still run, on its garbage outputs, and may fail too),
// the most recent, and how many there were. Kernels run on MindSpore's worker threads while
// Python reads the messages on its own thread, so this is process-wide, guarded by a mutex.
std::mutex last_error_mutex;
std::string first_error;
std::string last_error;
int64_t error_count = 0;
std::atomic<KernelFailureListener> failure_listener{nullptr};

}  // namespace

void RecordError(const char *kernel_name, const char *message, bool peers_informed) {
  const std::string full_message = std::string(kernel_name) + ": " + message;
  std::fprintf(stderr, "[mindspore_moe_ep] kernel error in %s\n", full_message.c_str());
  {
    std::lock_guard<std::mutex> lock(last_error_mutex);
    if (error_count++ == 0) first_error = full_message;
    last_error = full_message;
  }
  if (peers_informed) return;
  if (KernelFailureListener listener = failure_listener.load()) listener(full_message);
}

void SetKernelFailureListener(KernelFailureListener listener) { failure_listener.store(listener); }

int64_t TensorArg::numel() const {
  int64_t count = 1;
  for (int axis = 0; axis < rank; ++axis) count *= shape[axis];
  return count;
}

std::string TensorArg::ShapeString() const {
  std::ostringstream text;
  text << "[";
  for (int axis = 0; axis < rank; ++axis) text << (axis ? ", " : "") << shape[axis];
  text << "]";
  return text.str();
}

void TensorArg::RequireRank(int expected_rank) const {
  if (rank != expected_rank) {
    Fail(kInvalidArgument, name, " must have rank ", expected_rank, ", got shape ",
         ShapeString());
  }
}

void TensorArg::RequireDim(int axis, int64_t expected, const char *expected_description) const {
  if (dim(axis) != expected) {
    Fail(kInvalidArgument, name, ".shape[", axis, "] = ", dim(axis), " must equal ",
         expected_description, " = ", expected, " (", name, " has shape ", ShapeString(), ")");
  }
}

void TensorArg::RequireDtype(std::string_view expected_dtype) const {
  if (dtype != expected_dtype) {
    Fail(kInvalidArgument, name, " has dtype ", dtype, "; expected ", expected_dtype);
  }
}

void TensorArg::RequireSameDtype(const TensorArg &other) const {
  if (dtype != other.dtype) {
    Fail(kInvalidArgument, name, " has dtype ", dtype, " but ", other.name, " has dtype ",
         other.dtype, "; they must match");
  }
}

int32_t ScalarInput(const TensorArg &scalar) {
  scalar.RequireDtype("int32");
  if (scalar.numel() != 1) {
    Fail(kInvalidArgument, scalar.name, " must hold one int32, got shape ", scalar.ShapeString());
  }
  return *scalar.data_as<const int32_t>();
}

std::vector<TensorArg> BindArgs(int nparam, void **params, int *ndims, int64_t **shapes,
                                const char **dtypes, std::initializer_list<const char *> names) {
  return BindArgs(nparam, params, ndims, shapes, dtypes, names.begin(), names.size());
}

std::vector<TensorArg> BindArgs(int nparam, void **params, int *ndims, int64_t **shapes,
                                const char **dtypes, const char *const *names, size_t count) {
  if (nparam != static_cast<int>(count)) {
    Fail(kInvalidArgument, "expected ", count, " tensors (inputs and outputs), got ", nparam);
  }
  std::vector<TensorArg> args;
  args.reserve(count);
  for (size_t index = 0; index < count; ++index) {
    args.push_back(TensorArg{names[index], params[index], ndims[index], shapes[index],
                             dtypes[index]});
  }
  return args;
}

std::string TensorArg::IndexString(int64_t flat_index) const {
  std::vector<int64_t> index(rank);
  for (int axis = rank - 1; axis >= 0; --axis) {
    index[axis] = shape[axis] > 0 ? flat_index % shape[axis] : 0;
    flat_index = shape[axis] > 0 ? flat_index / shape[axis] : 0;
  }
  std::ostringstream text;
  text << "[";
  for (int axis = 0; axis < rank; ++axis) text << (axis ? "," : "") << index[axis];
  text << "]";
  return text.str();
}

CpuIsa DetectedCpuIsa() {
  static const CpuIsa detected = [] {
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("f16c")) return CpuIsa::kScalar;
    const bool avx512_core = __builtin_cpu_supports("avx512f") &&
                             __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl") &&
                             __builtin_cpu_supports("avx512dq");
    return avx512_core ? CpuIsa::kAvx512 : CpuIsa::kAvx2;
  }();
  return detected;
}

const char *CpuIsaName(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kScalar: return "scalar";
    case CpuIsa::kAvx2: return "avx2";
    case CpuIsa::kAvx512: return "avx512";
  }
  return "unknown";
}

namespace {

// -1, or the instruction set named by name ("scalar", "avx2", "avx512").
int ParseCpuIsa(const char *name) {
  const std::string text = name ? name : "";
  for (CpuIsa isa : {CpuIsa::kScalar, CpuIsa::kAvx2, CpuIsa::kAvx512}) {
    if (text == CpuIsaName(isa)) return static_cast<int>(isa);
  }
  return -1;
}

// The cap on the instruction set: MOE_EP_CPU_ISA when the library is first used (an unknown
// value is reported once on stderr and ignored), then whatever MoeEpSetCpuIsa sets.
std::atomic<int> &CpuIsaCap() {
  static std::atomic<int> cap{[] {
    const char *requested = std::getenv("MOE_EP_CPU_ISA");
    if (requested == nullptr || *requested == 0) return static_cast<int>(CpuIsa::kAvx512);
    const int parsed = ParseCpuIsa(requested);
    if (parsed < 0) {
      std::fprintf(stderr, "mindspore_moe_ep: MOE_EP_CPU_ISA=%s is not one of scalar, avx2, "
                   "avx512; ignored\n", requested);
      return static_cast<int>(CpuIsa::kAvx512);
    }
    return parsed;
  }()};
  return cap;
}

}  // namespace

CpuIsa ActiveCpuIsa() {
  return static_cast<CpuIsa>(
      std::min(static_cast<int>(DetectedCpuIsa()), CpuIsaCap().load(std::memory_order_relaxed)));
}

namespace {

// Parses a sysfs cache size such as "8192K" or "32M"; 0 if unreadable.
int64_t ReadCacheSize(const std::string &path) {
  std::ifstream file(path);
  int64_t value = 0;
  std::string unit;
  if (!(file >> value)) return 0;
  file >> unit;
  if (unit == "K") return value << 10;
  if (unit == "M") return value << 20;
  if (unit == "G") return value << 30;
  return value;
}

// The size of the highest-level data or unified cache that sysfs lists for cpu0; 0 if none.
int64_t SysfsLastLevelCacheBytes() {
  int best_level = 0;
  int64_t best_size = 0;
  for (int index = 0; index < 16; ++index) {
    const std::string directory =
        "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    std::ifstream level_file(directory + "level"), type_file(directory + "type");
    int level = 0;
    std::string type;
    if (!(level_file >> level) || !(type_file >> type)) break;
    if (type == "Instruction") continue;
    const int64_t size = ReadCacheSize(directory + "size");
    if (size > 0 && level >= best_level) {
      best_level = level;
      best_size = size;
    }
  }
  return best_size;
}

}  // namespace

int64_t LastLevelCacheBytes() {
  static const int64_t bytes = [] {
    if (const int64_t sysfs = SysfsLastLevelCacheBytes(); sysfs > 0) return sysfs;
    const long level3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
    if (level3 > 0) return static_cast<int64_t>(level3);
    return int64_t{8} << 20;
  }();
  return bytes;
}

namespace {

// Copies 64 (then 16) bytes at a time from `in` to 16-byte aligned `out`, forward or backward.
void StreamAlignedBody(uint8_t *out, const uint8_t *in, size_t bytes, bool backward) {
  auto copy16 = [&](size_t offset) {
    _mm_stream_si128(reinterpret_cast<__m128i *>(out + offset),
                     _mm_loadu_si128(reinterpret_cast<const __m128i *>(in + offset)));
  };
  auto copy64 = [&](size_t offset) {  // all four loads first, then the four stores
    const __m128i part0 = _mm_loadu_si128(reinterpret_cast<const __m128i *>(in + offset));
    const __m128i part1 = _mm_loadu_si128(reinterpret_cast<const __m128i *>(in + offset + 16));
    const __m128i part2 = _mm_loadu_si128(reinterpret_cast<const __m128i *>(in + offset + 32));
    const __m128i part3 = _mm_loadu_si128(reinterpret_cast<const __m128i *>(in + offset + 48));
    _mm_stream_si128(reinterpret_cast<__m128i *>(out + offset), part0);
    _mm_stream_si128(reinterpret_cast<__m128i *>(out + offset + 16), part1);
    _mm_stream_si128(reinterpret_cast<__m128i *>(out + offset + 32), part2);
    _mm_stream_si128(reinterpret_cast<__m128i *>(out + offset + 48), part3);
  };
  const size_t whole_lines = bytes / 64 * 64;
  if (!backward) {
    for (size_t offset = 0; offset < whole_lines; offset += 64) copy64(offset);
    for (size_t offset = whole_lines; offset < bytes; offset += 16) copy16(offset);
  } else {
    for (size_t offset = bytes; offset > whole_lines; offset -= 16) copy16(offset - 16);
    for (size_t offset = whole_lines; offset > 0; offset -= 64) copy64(offset - 64);
  }
}

}  // namespace

void CopyStreaming(void *destination, const void *source, size_t bytes) {
  auto *out = static_cast<uint8_t *>(destination);
  const auto *in = static_cast<const uint8_t *>(source);
  const size_t head = std::min<size_t>(bytes, (16 - reinterpret_cast<uintptr_t>(out) % 16) % 16);
  const size_t body = (bytes - head) / 16 * 16;
  const size_t tail = bytes - head - body;
  // 4K aliasing: a load whose address matches a pending store's in the low 12 bits waits for
  // it. Copying forward with the source just behind the destination modulo 4 KiB makes every
  // load match a recent store (measured: 2.4x slower); copying backward avoids that.
  constexpr uintptr_t kPage = 4096, kAliasWindow = 1024;
  const uintptr_t source_lag =
      (reinterpret_cast<uintptr_t>(out) - reinterpret_cast<uintptr_t>(in)) % kPage;
  const bool backward = source_lag > 0 && source_lag <= kAliasWindow;
  std::memcpy(out, in, head);
  StreamAlignedBody(out + head, in + head, body, backward);
  std::memcpy(out + head + body, in + head + body, tail);
}

void StreamingStoreFence() { _mm_sfence(); }

bool PoisonUnusedRows() {
  const char *value = std::getenv("MOE_EP_POISON_UNUSED_ROWS");
  return value != nullptr && std::string_view(value) == "1";
}

bool PullDisabled() {
  const char *value = std::getenv("MOE_EP_DISPATCH_PULL");
  return value != nullptr && std::string_view(value) == "0";
}

}  // namespace moe_ep

// Returns the message of the most recent kernel failure ("" if none). The pointer stays valid
// until the next call of MoeEpLastError or MoeEpClearLastError.
// The instruction set the kernels use now ("scalar", "avx2" or "avx512").
MOE_EP_EXPORT const char *MoeEpCpuIsa() { return moe_ep::CpuIsaName(moe_ep::ActiveCpuIsa()); }

// The best instruction set this CPU runs ("scalar", "avx2" or "avx512").
MOE_EP_EXPORT const char *MoeEpDetectedCpuIsa() {
  return moe_ep::CpuIsaName(moe_ep::DetectedCpuIsa());
}

// Caps the instruction set the kernels use (like MOE_EP_CPU_ISA; a cap above what the CPU runs
// leaves DetectedCpuIsa()). Returns 0, or 1 for an unknown name.
MOE_EP_EXPORT int MoeEpSetCpuIsa(const char *name) {
  const int parsed = moe_ep::ParseCpuIsa(name);
  if (parsed < 0) return 1;
  moe_ep::CpuIsaCap().store(parsed, std::memory_order_relaxed);
  return 0;
}

MOE_EP_EXPORT const char *MoeEpLastError() {
  static std::string snapshot;
  std::lock_guard<std::mutex> lock(moe_ep::last_error_mutex);
  snapshot = moe_ep::last_error;
  return snapshot.c_str();
}

// Returns the first kernel failure since the last MoeEpClearLastError ("" if none), followed,
// when more kernels failed after it, by how many and the most recent one. The pointer stays
// valid until the next call of MoeEpFirstError or MoeEpClearLastError.
MOE_EP_EXPORT const char *MoeEpFirstError() {
  static std::string snapshot;
  std::lock_guard<std::mutex> lock(moe_ep::last_error_mutex);
  snapshot = moe_ep::first_error;
  if (moe_ep::error_count > 1) {
    snapshot += "\n(then " + std::to_string(moe_ep::error_count - 1) +
                " more kernel failure(s), probably consequences; the last: " +
                moe_ep::last_error + ")";
  }
  return snapshot.c_str();
}

MOE_EP_EXPORT void MoeEpClearLastError() {
  std::lock_guard<std::mutex> lock(moe_ep::last_error_mutex);
  moe_ep::first_error.clear();
  moe_ep::last_error.clear();
  moe_ep::error_count = 0;
}
