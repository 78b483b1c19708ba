// Opening a window (checking the options, creating or attaching to the segment, joining the
// group) and finding it again by id; a failed kernel abandons every open window.
#include "comm_window_registry.h"

#include <sys/mman.h>

#include <optional>
#include <string>
#include <vector>

#include "comm_window_clock.h"
#include "comm_window_lifecycle.h"

namespace moe_ep {
namespace comm {
namespace {

void ValidateOptions(const WindowOptions &options) {
  const std::string &token = options.job_token_hex;
  if (token.size() != 2 * kJobTokenBytes ||
      token.find_first_not_of("0123456789abcdef") != std::string::npos) {
    Fail(kInvalidArgument, "the job token must be ", 2 * kJobTokenBytes,
         " lowercase hex digits, got '", token, "'");
  }
  if (options.world_size < 1 || options.world_size > kMaxWorldSize) {
    Fail(kInvalidArgument, "world_size = ", options.world_size, " must be in [1, ",
         kMaxWorldSize, "]");
  }
  if (options.rank < 0 || options.rank >= options.world_size) {
    Fail(kInvalidArgument, "rank = ", options.rank, " must be in [0, ", options.world_size, ")");
  }
  if (options.slot_bytes < static_cast<int64_t>(kCacheLine) || options.slot_bytes > (1LL << 40)) {
    Fail(kInvalidArgument, "slot_bytes = ", options.slot_bytes, " must be in [", kCacheLine,
         ", 2^40]");
  }
  if (!(options.timeout_s > 0.0) || !(options.attach_timeout_s > 0.0)) {
    Fail(kInvalidArgument, "timeout_s = ", options.timeout_s, " and attach_timeout_s = ",
         options.attach_timeout_s, " must be positive");
  }
}

std::vector<uint8_t> ParseJobToken(const std::string &hex) {
  std::vector<uint8_t> token(kJobTokenBytes);
  for (int i = 0; i < kJobTokenBytes; ++i) {
    token[i] = static_cast<uint8_t>(std::stoi(hex.substr(2 * i, 2), nullptr, 16));
  }
  return token;
}

}  // namespace

int64_t OpenWindow(const WindowOptions &options) {
  ValidateOptions(options);
  const double deadline = SecondsSinceStart() + options.attach_timeout_s;
  const SegmentLayout layout(options.world_size, options.slot_bytes);
  const std::vector<uint8_t> job_token = ParseJobToken(options.job_token_hex);
  const std::string name = kSegmentNamePrefix + options.job_token_hex;
  try {
    std::optional<MappedSegment> created;
    if (options.rank == 0) {
      try {
        created.emplace(CreateSegment(name, layout, job_token));
      } catch (const KernelError &error) {
        if (options.world_size > 1) {
          PublishCreationFailure(name, error.what(), options.attach_timeout_s + 5.0);
        }
        throw;
      }
    }
    MappedSegment segment =
        options.rank == 0
            ? std::move(*created)
            : AttachSegment(name, layout, job_token, deadline, options.attach_timeout_s);
    if (options.rank == 0 && options.world_size > 1) {
      StartSegmentReaper(name, options.attach_timeout_s + 5.0);
    }
    const int64_t id = WindowRegistry::Instance().ReserveId();
    auto window = std::make_shared<SharedMemoryWindow>(id, options, layout, std::move(segment));
    window->JoinGroup(deadline);
    window->AgreeOnTransport(deadline);
    shm_unlink(name.c_str());  // all ranks hold a mapping: the name is no longer needed
    WindowRegistry::Instance().Add(id, std::move(window));
    return id;
  } catch (...) {
    // Never leave a half-built window in /dev/shm (a creation-failure notice stays for the
    // peers until its watcher removes it).
    if (options.rank != 0 || !CreationFailureNoticeExists(name)) shm_unlink(name.c_str());
    throw;
  }
}

}  // namespace comm

// Any failed kernel of this process abandons its open windows: the process will not reach its
// next exchange (PyNative stops the step, GRAPH_MODE stops the graph), so peers waiting there
// get the reason at once. This covers kernels that have no window of their own, e.g. the
// prefill layout kernel rejecting an expert id.
const bool kernel_failures_abandon_windows = [] {
  SetKernelFailureListener(
      [](const std::string &reason) { comm::WindowRegistry::Instance().AbandonAll(reason); });
  return true;
}();

std::shared_ptr<CommWindow> FindCommWindow(int64_t window_id) {
  return comm::WindowRegistry::Instance().Find(window_id);
}

}  // namespace moe_ep
