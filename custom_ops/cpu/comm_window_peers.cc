// A rank and its peers on a SharedMemoryWindow: joining the group, a peer's failure or exit,
// timeouts, and the checks of every message a peer sends; every failure names the ranks.
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "comm_window_shared_memory.h"

namespace moe_ep::comm {

// The number of CPUs this process may run on.
int UsableCpus() {
  cpu_set_t cpus;
  if (sched_getaffinity(0, sizeof(cpus), &cpus) == 0) return CPU_COUNT(&cpus);
  return static_cast<int>(std::max(1L, sysconf(_SC_NPROCESSORS_ONLN)));
}

void SharedMemoryWindow::JoinGroup(double deadline) {
  RankRecord &own = record(options_.rank);
  if (options_.allow_single_copy) AllowSiblingsToReadMemory();
  own.probe_address = reinterpret_cast<uint64_t>(&probe_value_);
  own.probe_value = probe_value_;
  int64_t no_pid = 0;
  const int64_t own_pid = getpid();
  if (!own.pid.compare_exchange_strong(no_pid, own_pid)) {  // publishes the probe fields too
    Fail(kInternalError, "rank ", options_.rank, " of the communication window is already taken "
         "by pid ", no_pid, ": two processes were started with the same rank", Where());
  }
  RingPeers();
  WaitForEveryPeer(deadline, "attach to the communication window", [&](int peer) {
    return record(peer).pid.load(std::memory_order_acquire) != 0;
  });
}

void SharedMemoryWindow::RequireHealthy(int peer) const {
  const RankRecord &peer_record = record(peer);
  const uint64_t failed_step = peer_record.failed_step.load(std::memory_order_acquire);
  if (failed_step != 0) {
    Fail(kInternalError, "rank ", peer, " failed in exchange step ", failed_step, ": ",
         PrintableText(peer_record.failure, kFailureMessageBytes), Where());
  }
}

void SharedMemoryWindow::CheckPendingPeers(const std::vector<PeerProgress> &progress,
                                           uint64_t step, double idle_seconds) const {
  int first_pending = -1;
  int first_behind = -1;  // a pending peer that has not entered this step yet
  for (int peer = 0; peer < options_.world_size; ++peer) {
    if (peer == options_.rank || progress[peer].done()) continue;
    RequireHealthy(peer);
    const RankRecord &peer_record = record(peer);
    if (monitor_.HasExited(peer)) {
      Fail(kInternalError, "rank ", peer, " (pid ", peer_record.pid.load(), ") exited during "
           "exchange step ", step, Where());
    }
    if (first_pending < 0) first_pending = peer;
    if (first_behind < 0 && peer_record.entered_step.load(std::memory_order_acquire) < step) {
      first_behind = peer;
    }
  }
  if (idle_seconds <= options_.timeout_s) return;
  if (first_behind >= 0) {
    Fail(kInternalError, "rank ", first_behind, " did not reach exchange step ", step, " within ",
         DescribeSeconds(options_.timeout_s), " (", options_.timeout_setting,
         "); its last exchange step was ", record(first_behind).entered_step.load(), " (",
         PrintableText(record(first_behind).operation, kOperationNameBytes),
         ") and this rank waits in ", operation_, Where());
  }
  Fail(kInternalError, "rank ", first_pending, " made no progress in exchange step ", step,
       " for ", DescribeSeconds(options_.timeout_s), " (", options_.timeout_setting, ")", Where());
}

void SharedMemoryWindow::CheckMessage(int peer, const SlotHeader &message,
                                      const RowExchange &exchange, uint64_t step,
                                      const PeerProgress &progress, const RowPull *pull) const {
  if (message.step != step) {
    Fail(kInvalidArgument, "ranks out of step: this rank is in exchange step ", step, " (",
         operation_, ") but rank ", peer, " sent a message of step ", message.step, " (",
         PrintableText(message.operation, kOperationNameBytes),
         "); every rank of a group must run the same operators in the same order", Where());
  }
  if (strncmp(message.operation, operation_.c_str(), kOperationNameBytes - 1) != 0) {
    Fail(kInvalidArgument, "ranks out of step in exchange step ", step, ": rank ", peer,
         " runs ", PrintableText(message.operation, kOperationNameBytes),
         " while this rank (", options_.rank, ") runs ", operation_,
         ". Every rank of an expert-parallel group must take the same path in a step: with "
         "phase=None a rank decodes when it has at most dispatch.decode_token_threshold tokens, "
         "so ranks whose token counts straddle the threshold take different paths; pass "
         "phase='prefill' or phase='decode' (the same on every rank)", Where());
  }
  if (message.row_bytes != exchange.row_bytes || message.capacity != exchange.capacity ||
      (pull != nullptr && message.source_row_bytes != pull->row_bytes)) {
    Fail(kInvalidArgument, "in exchange step ", step, " rank ", peer, " sends rows of ",
         message.row_bytes, " bytes with capacity_per_peer ", message.capacity,
         " but this rank uses rows of ", exchange.row_bytes, " bytes with capacity_per_peer ",
         exchange.capacity, "; send_rows must have the same shape and dtype on every rank",
         Where());
  }
  const int64_t total_bytes = message.total_rows * exchange.row_bytes;
  const auto well_formed_exchange = [&] {
    // A rank receiving by single copy also takes small payloads through the slot (TrySend).
    const bool kind_allowed =
        message.kind == kRowsInSlot ||
        (message.kind == kRowsInSenderMemory && receive_transport() == kSingleCopy &&
         progress.receive_bytes < 0);
    const int64_t expected_offset = progress.receive_bytes < 0 ? 0 : progress.received_bytes;
    return kind_allowed && message.chunk_offset == expected_offset && message.chunk_bytes >= 0 &&
           message.chunk_offset + message.chunk_bytes <= total_bytes &&
           (message.kind == kRowsInSlot ? message.chunk_bytes <= layout_.slot_bytes
                                        : message.chunk_bytes == total_bytes);
  };
  const auto well_formed_pull = [&] {
    // The notes, then the rows (in the slot) or their int32 indices.
    const bool rows_in_slot = message.kind == kNotesAndRowsInSlot;
    const bool kind_allowed =
        rows_in_slot || (message.kind == kNotesAndRowsInSenderMemory &&
                         receive_transport() == kSingleCopy && message.source_rows >= 0);
    const int64_t after_notes = message.total_rows * (rows_in_slot ? pull->row_bytes : 4);
    return kind_allowed && message.chunk_offset == 0 &&
           message.chunk_bytes == total_bytes + after_notes &&
           message.chunk_bytes <= layout_.slot_bytes;
  };
  const bool pull_message =
      message.kind == kNotesAndRowsInSlot || message.kind == kNotesAndRowsInSenderMemory;
  const bool exchange_message = message.kind == kRowsInSlot || message.kind == kRowsInSenderMemory;
  if ((pull != nullptr && exchange_message) || (pull == nullptr && pull_message)) {
    Fail(kInvalidArgument, "ranks out of step in exchange step ", step, " of ", operation_,
         ": rank ", peer, (pull_message ? " offers rows to pull" : " sends packed rows"),
         " while this rank ", (pull != nullptr ? "pulls rows" : "exchanges packed rows"),
         "; the ranks disagree on how rows travel: set MOE_EP_DISPATCH_PULL the same on every "
         "rank", Where());
  }
  if (message.total_rows < 0 || message.total_rows > exchange.capacity ||
      !(pull != nullptr ? well_formed_pull() : well_formed_exchange())) {
    Fail(kInternalError, "corrupt message from rank ", peer, " in exchange step ", step,
         " (kind ", message.kind, ", rows ", message.total_rows, ", chunk at byte ",
         message.chunk_offset, " of ", message.chunk_bytes, " bytes)", Where());
  }
}

}  // namespace moe_ep::comm
