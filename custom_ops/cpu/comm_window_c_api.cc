// The C interface of the communication windows, for Python (ctypes, comm/window.py). Failures
// return -1 (or a kernel error code) and set MoeEpLastError().
#include <cstdint>

#include "comm_window_registry.h"
#include "kernel_common.h"

// Opens (rank 0: creates) the window of a group and waits until every rank has attached.
// `allow_single_copy` = 0 makes rows always travel through the slots. Returns the window id
// (>= 0) or -1.
MOE_EP_EXPORT int64_t MoeEpWindowOpen(const char *job_token_hex, int world_size, int rank,
                                      int64_t slot_bytes, double timeout_s,
                                      double attach_timeout_s, const char *timeout_setting,
                                      int allow_single_copy) {
  int64_t window_id = -1;
  const int status = moe_ep::RunKernel("MoeEpWindowOpen", [&] {
    moe_ep::comm::WindowOptions options;
    options.job_token_hex = job_token_hex;
    options.world_size = world_size;
    options.rank = rank;
    options.slot_bytes = slot_bytes;
    options.timeout_s = timeout_s;
    options.attach_timeout_s = attach_timeout_s;
    options.timeout_setting = timeout_setting;
    options.allow_single_copy = allow_single_copy != 0;
    window_id = moe_ep::comm::OpenWindow(options);
  });
  return status == 0 ? window_id : -1;
}

// Closes a window in this process (its memory is released once every rank closed or exited).
MOE_EP_EXPORT int MoeEpWindowClose(int64_t window_id) {
  return moe_ep::RunKernel("MoeEpWindowClose",
                           [&] { moe_ep::comm::WindowRegistry::Instance().Remove(window_id); });
}

// Marks a window's next step as failed for `reason` (the peers waiting in it get the reason at
// once); the window is unusable afterwards. For failures found in Python before any exchange.
MOE_EP_EXPORT int MoeEpWindowAbandon(int64_t window_id, const char *reason) {
  return moe_ep::RunKernel("MoeEpWindowAbandon", [&] {
    moe_ep::comm::WindowRegistry::Instance().Find(window_id)->Abandon(reason ? reason : "");
  });
}

// The number of windows open in this process.
MOE_EP_EXPORT int64_t MoeEpOpenWindowCount() {
  return static_cast<int64_t>(moe_ep::comm::WindowRegistry::Instance().Count());
}

// Bytes of /dev/shm a window of `world_size` ranks with `slot_bytes` slots occupies.
MOE_EP_EXPORT int64_t MoeEpWindowSegmentBytes(int world_size, int64_t slot_bytes) {
  return static_cast<int64_t>(moe_ep::comm::SegmentLayout(world_size, slot_bytes).total_bytes);
}

// The number of exchange steps this rank has entered on a window, or -1.
MOE_EP_EXPORT int64_t MoeEpWindowStep(int64_t window_id) {
  int64_t step = -1;
  moe_ep::RunKernel("MoeEpWindowStep", [&] {
    step = static_cast<int64_t>(moe_ep::comm::WindowRegistry::Instance().Find(window_id)->step());
  });
  return step;
}

// How rows travel between this rank and its peers: 2 = all by single copy (process_vm_readv),
// 1 = some pairs by single copy and some through slots, 0 = all through slots; -1 on error.
// A group of one reports what it would receive by.
MOE_EP_EXPORT int MoeEpWindowTransport(int64_t window_id) {
  int transport = -1;
  moe_ep::RunKernel("MoeEpWindowTransport", [&] {
    const auto window = moe_ep::comm::WindowRegistry::Instance().Find(window_id);
    const bool receives_by_address = window->receive_transport() == moe_ep::comm::kSingleCopy;
    int pairs = 0, single_copy_pairs = 0;
    for (int peer = 0; peer < window->world_size(); ++peer) {
      if (peer == window->rank()) continue;
      pairs += 2;
      single_copy_pairs += int{receives_by_address} + int{window->sends_by_address(peer)};
    }
    if (pairs == 0) {
      transport = receives_by_address ? 2 : 0;
    } else {
      transport = single_copy_pairs == pairs ? 2 : single_copy_pairs == 0 ? 0 : 1;
    }
  });
  return transport;
}
