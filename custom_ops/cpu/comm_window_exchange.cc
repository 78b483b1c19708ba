// ExchangeRows on a SharedMemoryWindow: the all-to-all-v of rows, by single copy (the receiver
// reads the sender's block) or through the slots in chunks (see comm_window.h).
#include <algorithm>
#include <cstring>
#include <vector>

#include "comm_window_shared_memory.h"

namespace moe_ep::comm {

void SharedMemoryWindow::ExchangeRows(const RowExchange &exchange) {
  RunLockedStep(exchange.operation, [&](uint64_t step) {
    RequireValidCounts(exchange);
    RunExchange(exchange, step);
  });
}

void SharedMemoryWindow::RunExchange(const RowExchange &exchange, uint64_t step) {
  const int own_rank = options_.rank;
  const int64_t block_bytes = exchange.capacity * exchange.row_bytes;  // one peer's rows

  std::vector<PeerProgress> progress(options_.world_size);
  for (int peer = 0; peer < options_.world_size; ++peer) {
    progress[peer].send_bytes = exchange.send_counts[peer] * exchange.row_bytes;
  }
  bool own_rows_copied = false;
  RunStep(step, progress, [&] {
    bool progressed = false;
    for (int peer = 0; peer < options_.world_size; ++peer) {
      PeerProgress &peer_progress = progress[peer];
      if (peer == own_rank || peer_progress.done()) continue;
      if (!peer_progress.send_done()) {
        progressed |= TrySend(peer, exchange, step, peer_progress);
      }
      if (!peer_progress.receive_done()) {
        progressed |= TryReceive(peer, exchange, step, peer_progress);
      }
    }
    if (!own_rows_copied) {
      // Own rows need no messages; copied once the messages to the peers are out, so that
      // they can start reading meanwhile.
      std::memcpy(exchange.recv + own_rank * block_bytes, exchange.send + own_rank * block_bytes,
                  exchange.send_counts[own_rank] * exchange.row_bytes);
      own_rows_copied = true;
      progressed = true;
    }
    return progressed;
  });
  exchange.recv_counts[own_rank] = exchange.send_counts[own_rank];

  // Zero the unused tail of every peer's block, or leave it unspecified; the test aid
  // MOE_EP_POISON_UNUSED_ROWS=1 fills unspecified tails with all-ones bytes (NaN as floats).
  if (exchange.zero_tail || PoisonUnusedRows()) {
    const int fill = exchange.zero_tail ? 0 : 0xff;
    for (int source = 0; source < options_.world_size; ++source) {
      const int64_t used_bytes = exchange.recv_counts[source] * exchange.row_bytes;
      std::memset(exchange.recv + source * block_bytes + used_bytes, fill,
                  block_bytes - used_bytes);
    }
  }
}

bool SharedMemoryWindow::TrySend(int peer, const RowExchange &exchange, uint64_t step,
                                 PeerProgress &progress) {
  // Small payloads take the slot even where single copy is possible: one more copy of a few
  // kilobytes costs less than waiting for the receiver's acknowledgement.
  const bool fits_small_slot_message =
      progress.send_bytes <= std::min<int64_t>(layout_.slot_bytes, kSmallMessageBytes);
  if (sends_by_address_[peer] && !fits_small_slot_message) {
    return TrySendByAddress(peer, exchange, step, progress);
  }
  const int64_t chunk_bytes =
      std::min<int64_t>(progress.send_bytes - progress.sent_bytes, layout_.slot_bytes);
  const uint8_t *rows = exchange.send + peer * exchange.capacity * exchange.row_bytes;
  const bool sent = TryPublish(peer, step, [&](SlotHeader &message) {
    std::memcpy(slot_payload(options_.rank, peer), rows + progress.sent_bytes, chunk_bytes);
    DescribeRows(message, kRowsInSlot, exchange.send_counts[peer], exchange.row_bytes,
                 exchange.capacity, progress.sent_bytes, chunk_bytes);
  });
  if (sent) {
    progress.sent_bytes += chunk_bytes;
    progress.send_started = true;
  }
  return sent;
}

// Single copy: one message announces all rows by their address; the peer reads them and
// acknowledges by consuming the message. Until then our rows must stay put.
bool SharedMemoryWindow::TrySendByAddress(int peer, const RowExchange &exchange, uint64_t step,
                                          PeerProgress &progress) {
  if (progress.awaiting_ack) return TakeAcknowledgement(peer, progress);
  const bool sent = TryPublish(peer, step, [&](SlotHeader &message) {
    DescribeRows(message, kRowsInSenderMemory, exchange.send_counts[peer], exchange.row_bytes,
                 exchange.capacity, 0, progress.send_bytes,
                 reinterpret_cast<uint64_t>(exchange.send +
                                            peer * exchange.capacity * exchange.row_bytes));
  });
  if (sent) {
    progress.sent_bytes = progress.send_bytes;
    progress.send_started = true;
    progress.awaiting_ack = true;
  }
  return sent;
}

bool SharedMemoryWindow::TryReceive(int peer, const RowExchange &exchange, uint64_t step,
                                    PeerProgress &progress) {
  SlotHeader &message = slot_header(peer, options_.rank);
  const uint64_t consumed = message.consumed.load(std::memory_order_relaxed);
  if (message.published.load(std::memory_order_acquire) == consumed) {
    return false;  // nothing new from this peer
  }
  CheckMessage(peer, message, exchange, step, progress);
  if (progress.receive_bytes < 0) {  // the first message of the step carries the row count
    exchange.recv_counts[peer] = static_cast<int32_t>(message.total_rows);
    progress.receive_bytes = message.total_rows * exchange.row_bytes;
  }
  uint8_t *rows = exchange.recv + peer * exchange.capacity * exchange.row_bytes;
  if (message.kind == kRowsInSenderMemory) {
    ReadPeerMemory(peer, step, {{message.source_address, rows, message.chunk_bytes}});
  } else {
    std::memcpy(rows + message.chunk_offset, slot_payload(peer, options_.rank),
                message.chunk_bytes);
  }
  progress.received_bytes += message.chunk_bytes;
  message.consumed.store(consumed + 1, std::memory_order_release);
  RingDoorbell(record(peer));
  return true;
}

}  // namespace moe_ep::comm
