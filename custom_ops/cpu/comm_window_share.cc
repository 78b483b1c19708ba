// ShareRows on a SharedMemoryWindow: every rank writes its rows for a peer straight into its slot
// to that peer, and the peer reads them where they lie (see SharedRows in comm_window.h).
#include <cstdint>
#include <vector>

#include "comm_window_shared_memory.h"

namespace moe_ep::comm {

bool SharedMemoryWindow::CanShareRows(int64_t capacity, int64_t row_bytes) const {
  return capacity * row_bytes <= layout_.slot_bytes;
}

void SharedMemoryWindow::ShareRows(const SharedRows &shared) {
  RunLockedStep(shared.operation, [&](uint64_t step) {
    if (!CanShareRows(shared.capacity, shared.row_bytes)) {
      Fail(kInternalError, "ShareRows needs ", shared.capacity, " rows of ", shared.row_bytes,
           " bytes to fit in slot_bytes = ", layout_.slot_bytes, Where());
    }
    RequireValidCounts(RowExchange{nullptr, shared.send_counts, nullptr, nullptr,
                                   shared.capacity, shared.row_bytes});
    RunShare(shared, step);
  });
}

// A shared-rows step: every rank writes its rows for each peer into its slot to that peer as
// soon as the slot is free (the peer has consumed the previous message), and its own rows
// locally; once a rank has every peer's message it uses the rows in place and only then
// consumes the messages, so the slots stay unchanged while they are read.
void SharedMemoryWindow::RunShare(const SharedRows &shared, uint64_t step) {
  const int own_rank = options_.rank, world_size = options_.world_size;
  const RowExchange shape{nullptr, shared.send_counts, nullptr, nullptr, shared.capacity,
                          shared.row_bytes};
  std::vector<PeerProgress> progress(world_size);
  std::vector<const uint8_t *> rows(world_size, nullptr);
  std::vector<int32_t> counts(world_size, 0);
  for (int peer = 0; peer < world_size; ++peer) {
    progress[peer].send_bytes = shared.send_counts[peer] * shared.row_bytes;
  }
  int missing = world_size - 1;
  bool used = false;
  RunStep(step, progress, [&] {
    bool progressed = false;
    for (int peer = 0; peer < world_size; ++peer) {
      PeerProgress &peer_progress = progress[peer];
      if (peer == own_rank || peer_progress.done()) continue;
      if (!peer_progress.send_started &&
          TryPublish(peer, step, [&](SlotHeader &message) {
            shared.write(peer, slot_payload(own_rank, peer));
            DescribeRows(message, kRowsInSlot, shared.send_counts[peer], shared.row_bytes,
                         shared.capacity, 0, peer_progress.send_bytes);
          })) {
        peer_progress.sent_bytes = peer_progress.send_bytes;
        peer_progress.send_started = progressed = true;
      }
      const SlotHeader &message = slot_header(peer, own_rank);
      if (rows[peer] == nullptr && message.published.load(std::memory_order_acquire) !=
                                       message.consumed.load(std::memory_order_relaxed)) {
        CheckMessage(peer, message, shape, step, peer_progress);
        if (message.chunk_bytes != message.total_rows * shared.row_bytes) {
          Fail(kInternalError, "corrupt shared-rows message from rank ", peer, " in step ", step,
               " (", message.total_rows, " rows in ", message.chunk_bytes, " bytes)", Where());
        }
        rows[peer] = slot_payload(peer, own_rank);
        counts[peer] = static_cast<int32_t>(message.total_rows);
        peer_progress.receive_bytes = message.chunk_bytes;
        --missing;
        progressed = true;
      }
    }
    if (rows[own_rank] == nullptr) {  // after the first messages are out: peers start meanwhile
      shared.write(own_rank, shared.own_rows);
      rows[own_rank] = shared.own_rows;
      counts[own_rank] = shared.send_counts[own_rank];
      progressed = true;
    }
    if (missing == 0 && !used) {
      shared.use(rows, counts);
      for (int peer = 0; peer < world_size; ++peer) {
        if (peer == own_rank) continue;
        slot_header(peer, own_rank).consumed.fetch_add(1, std::memory_order_release);
        RingDoorbell(record(peer));
        progress[peer].received_bytes = progress[peer].receive_bytes;
      }
      used = progressed = true;
    }
    return progressed;
  });
}

}  // namespace moe_ep::comm
