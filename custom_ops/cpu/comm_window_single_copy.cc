// Single copy on a SharedMemoryWindow: every rank probes whether it can read its peers' memory
// (process_vm_readv), the ranks agree on how rows travel to each of them, and a receiver reads
// a peer's rows straight from the peer's memory.
#include <sys/prctl.h>
#include <sys/uio.h>

#include <algorithm>
#include <cerrno>
#include <fstream>
#include <vector>

#include "comm_window_shared_memory.h"

namespace moe_ep::comm {

void AllowSiblingsToReadMemory() {
  std::ifstream scope_file("/proc/sys/kernel/yama/ptrace_scope");
  int scope = 0;
  if (scope_file >> scope && scope == 1) prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY, 0, 0, 0);
}

bool SharedMemoryWindow::CanReadMemoryOf(int peer) const {
  const RankRecord &peer_record = record(peer);
  uint64_t value = 0;
  iovec local{&value, sizeof(value)};
  iovec remote{reinterpret_cast<void *>(peer_record.probe_address), sizeof(value)};
  const ssize_t read = process_vm_readv(static_cast<pid_t>(peer_record.pid.load()), &local, 1,
                                        &remote, 1, 0);
  // EPERM (ptrace rules), ENOSYS (no such call), ESRCH (another pid namespace): no single copy.
  return read == static_cast<ssize_t>(sizeof(value)) && value == peer_record.probe_value;
}

void SharedMemoryWindow::AgreeOnTransport(double deadline) {
  bool can_read_all = options_.allow_single_copy;
  for (int peer = 0; peer < options_.world_size && can_read_all; ++peer) {
    if (peer != options_.rank) can_read_all = CanReadMemoryOf(peer);
  }
  // Peers may still probe us until every rank has answered: probe_value_ must stay put.
  record(options_.rank).transport.store(can_read_all ? kSingleCopy : kSlots,
                                        std::memory_order_release);
  RingPeers();
  WaitForEveryPeer(deadline, "finish opening the communication window", [&](int peer) {
    return record(peer).transport.load(std::memory_order_acquire) != kUndecided;
  });
  for (int peer = 0; peer < options_.world_size; ++peer) {
    sends_by_address_[peer] = peer != options_.rank && record(peer).transport.load() == kSingleCopy;
  }
}

void SharedMemoryWindow::ReadPeerMemory(int peer, uint64_t step,
                                        const std::vector<PeerRange> &ranges) const {
  constexpr size_t kMaxRangesPerCall = 1024;  // IOV_MAX
  const pid_t pid = static_cast<pid_t>(record(peer).pid.load());
  int64_t total = 0, done = 0;
  for (const PeerRange &range : ranges) total += range.bytes;
  // The first range not read completely, and how much of it is: a call may come back partial.
  size_t next = 0;
  int64_t offset = 0;
  iovec local[kMaxRangesPerCall], remote[kMaxRangesPerCall];
  while (true) {
    while (next < ranges.size() && offset == ranges[next].bytes) {
      ++next;
      offset = 0;
    }
    if (next == ranges.size()) return;
    size_t count = 0;
    for (size_t i = next; i < ranges.size() && count < kMaxRangesPerCall; ++i, ++count) {
      const int64_t skip = i == next ? offset : 0;
      local[count] = {ranges[i].destination + skip, static_cast<size_t>(ranges[i].bytes - skip)};
      remote[count] = {reinterpret_cast<void *>(ranges[i].source_address + skip),
                       static_cast<size_t>(ranges[i].bytes - skip)};
    }
    const ssize_t read = process_vm_readv(pid, local, count, remote, count, 0);
    if (read > 0) {
      done += read;
      for (int64_t left = read; left > 0;) {
        const int64_t taken = std::min(left, ranges[next].bytes - offset);
        offset += taken;
        left -= taken;
        if (offset == ranges[next].bytes) {
          ++next;
          offset = 0;
        }
      }
      continue;
    }
    if (read < 0 && errno == EINTR) continue;
    const int error = read < 0 ? errno : EIO;
    RequireHealthy(peer);  // a peer that gave up may have released its rows: say so instead
    if (monitor_.HasExited(peer)) {
      Fail(kInternalError, "rank ", peer, " (pid ", pid, ") exited during exchange step ", step,
           Where());
    }
    Fail(kInternalError, "reading ", total, " bytes of rows from rank ", peer, " (pid ", pid,
         ") with process_vm_readv failed after ", done, " bytes in exchange step ", step, ": ",
         ErrnoText(error), " (MOE_EP_WINDOW_TRANSPORT=slots avoids direct reads)", Where());
  }
}

}  // namespace moe_ep::comm
