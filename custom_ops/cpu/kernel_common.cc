// Error buffer, argument checks and thread count shared by all CPU kernels.
#include "kernel_common.h"

#include <cstdio>
#include <cstdlib>
#include <mutex>

namespace moe_ep {
namespace {

// The last error of any kernel. Kernels run on MindSpore's worker threads while Python reads the
// message on its own thread, so this is one process-wide buffer guarded by a mutex.
std::mutex last_error_mutex;
std::string last_error;

}  // namespace

void RecordError(const char *kernel_name, const char *message) {
  const std::string full_message = std::string(kernel_name) + ": " + message;
  std::fprintf(stderr, "[mindspore_moe_ep] kernel error in %s\n", full_message.c_str());
  std::lock_guard<std::mutex> lock(last_error_mutex);
  last_error = full_message;
}

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

std::vector<TensorArg> BindArgs(int nparam, void **params, int *ndims, int64_t **shapes,
                                const char **dtypes, std::initializer_list<const char *> names) {
  if (nparam != static_cast<int>(names.size())) {
    Fail(kInvalidArgument, "expected ", names.size(), " tensors (inputs and outputs), got ",
         nparam);
  }
  std::vector<TensorArg> args;
  args.reserve(names.size());
  int index = 0;
  for (const char *name : names) {
    args.push_back(TensorArg{name, params[index], ndims[index], shapes[index], dtypes[index]});
    ++index;
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

int KernelThreadCount() {
  static const int thread_count = [] {
    if (const char *requested = std::getenv("MOE_EP_NUM_THREADS")) {
      const int value = std::atoi(requested);
      if (value > 0) return value;
    }
    const unsigned cores = std::thread::hardware_concurrency();
    return cores > 0 ? static_cast<int>(cores) : 1;
  }();
  return thread_count;
}

}  // namespace moe_ep

// Returns the message of the most recent kernel failure ("" if none). The pointer stays valid
// until the next call of MoeEpLastError or MoeEpClearLastError.
MOE_EP_EXPORT const char *MoeEpLastError() {
  static std::string snapshot;
  std::lock_guard<std::mutex> lock(moe_ep::last_error_mutex);
  snapshot = moe_ep::last_error;
  return snapshot.c_str();
}

MOE_EP_EXPORT void MoeEpClearLastError() {
  std::lock_guard<std::mutex> lock(moe_ep::last_error_mutex);
  moe_ep::last_error.clear();
}
