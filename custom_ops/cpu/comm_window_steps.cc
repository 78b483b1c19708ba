// What every step of a SharedMemoryWindow shares: where an error happened, the checks before a
// step, recording a failure for the peers, abandoning the window, and a single-copy sender's
// wait for the acknowledgement.
#include <algorithm>
#include <cstring>
#include <mutex>
#include <sstream>
#include <string>

#include "comm_window_shared_memory.h"

namespace moe_ep::comm {

std::string SharedMemoryWindow::Where() const {
  std::ostringstream text;
  text << " [window " << id_ << ", rank " << options_.rank << " of " << options_.world_size
       << "]";
  return text.str();
}

void SharedMemoryWindow::RequireUsable() const {
  if (!failure_.empty()) {
    Fail(kInternalError, "the communication window is unusable after an earlier failure: ",
         failure_);
  }
}

void SharedMemoryWindow::RequireValidCounts(const RowExchange &exchange) const {
  for (int peer = 0; peer < options_.world_size; ++peer) {
    const int32_t count = exchange.send_counts[peer];
    if (count < 0 || count > exchange.capacity) {
      Fail(kOutOfRange, "send_counts[", peer, "] = ", count, " is out of range [0, ",
           exchange.capacity, "] (capacity_per_peer = ", exchange.capacity, ")");
    }
  }
}

void SharedMemoryWindow::RecordFailure(uint64_t step, const std::string &reason) {
  failure_ = reason;
  RankRecord &own = record(options_.rank);
  const size_t length = std::min(reason.size(), kFailureMessageBytes - 1);
  std::memcpy(own.failure, reason.data(), length);
  own.failure[length] = '\0';
  own.failed_step.store(step, std::memory_order_release);
  RingPeers();  // peers sleeping on us learn at once
}

void SharedMemoryWindow::Abandon(const std::string &reason) {
  std::lock_guard<std::mutex> lock(exchange_mutex_);
  if (failure_.empty()) RecordFailure(step_ + 1, reason);
}

bool SharedMemoryWindow::TakeAcknowledgement(int peer, PeerProgress &progress) {
  const SlotHeader &message = slot_header(options_.rank, peer);
  if (message.consumed.load(std::memory_order_acquire) !=
      message.published.load(std::memory_order_relaxed)) {
    return false;  // the peer is still reading
  }
  progress.awaiting_ack = false;
  return true;
}

}  // namespace moe_ep::comm
