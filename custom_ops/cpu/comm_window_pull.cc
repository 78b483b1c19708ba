// PullRows on a SharedMemoryWindow: the ranks exchange small notes describing the rows they
// offer, and each receiver reads the rows it plans for straight into their final places (see
// RowPull in comm_window.h).
#include <algorithm>
#include <cstring>
#include <vector>

#include "comm_window_shared_memory.h"

namespace moe_ep::comm {

bool SharedMemoryWindow::CanPullRows(int64_t capacity, int64_t note_bytes) const {
  if (capacity * (note_bytes + static_cast<int64_t>(sizeof(int32_t))) > layout_.slot_bytes) {
    return false;
  }
  for (int rank = 0; rank < options_.world_size; ++rank) {
    if (record(rank).transport.load(std::memory_order_acquire) != kSingleCopy) return false;
  }
  return true;
}

void SharedMemoryWindow::PullRows(const RowPull &pull) {
  RunLockedStep(pull.notes.operation, [&](uint64_t step) {
    const RowExchange &notes = pull.notes;
    if (!CanPullRows(notes.capacity, notes.row_bytes)) {
      Fail(kInternalError, "PullRows needs single copy between every pair of ranks and ",
           notes.capacity, " notes of ", notes.row_bytes, " bytes (and their indices) to fit in "
           "slot_bytes = ", layout_.slot_bytes, Where());
    }
    RequireValidCounts(notes);
    for (int peer = 0; peer < options_.world_size; ++peer) {
      for (int64_t i = 0; i < notes.send_counts[peer]; ++i) {
        const int32_t row = pull.offered_rows[peer * notes.capacity + i];
        if (row < 0 || row >= pull.row_count) {
          Fail(kOutOfRange, "offered row ", row, " (to rank ", peer, ") is out of range [0, ",
               pull.row_count, ")", Where());
        }
      }
    }
    RunPull(pull, step);
  });
}

// A pull step: every rank publishes its notes (with its offered rows, or where they are) to
// every peer; once a rank has every peer's notes it plans its copies, makes them and consumes
// the peers' messages, which acknowledges them. A rank whose rows a peer reads from its memory
// leaves the step only once that peer has acknowledged.
void SharedMemoryWindow::RunPull(const RowPull &pull, uint64_t step) {
  const int own_rank = options_.rank;
  const RowExchange &notes = pull.notes;
  const int64_t notes_block_bytes = notes.capacity * notes.row_bytes;
  std::memcpy(notes.recv + own_rank * notes_block_bytes, notes.send + own_rank * notes_block_bytes,
              notes.send_counts[own_rank] * notes.row_bytes);
  notes.recv_counts[own_rank] = notes.send_counts[own_rank];

  std::vector<PeerProgress> progress(options_.world_size);
  std::vector<PeerOffer> offers(options_.world_size);
  offers[own_rank] = {true, false, reinterpret_cast<uint64_t>(pull.rows), pull.row_count};
  int missing_notes = options_.world_size - 1;
  bool pulled = false;
  RunStep(step, progress, [&] {
    bool progressed = false;
    for (int peer = 0; peer < options_.world_size; ++peer) {
      if (peer == own_rank || progress[peer].done()) continue;
      if (!progress[peer].send_done()) {
        progressed |= TryOfferRows(peer, pull, step, progress[peer]);
      }
      if (!offers[peer].known && TryTakeNotes(peer, pull, step, progress[peer], offers[peer])) {
        --missing_notes;
        progressed = true;
      }
    }
    if (missing_notes == 0 && !pulled) {
      PullPlannedRows(pull, step, offers, progress);
      pulled = true;
      progressed = true;
    }
    return progressed;
  });
}

// Small offers travel in the slot (no acknowledgement to wait for, as in TrySend); larger ones
// stay in our memory and the peer reads them.
bool SharedMemoryWindow::TryOfferRows(int peer, const RowPull &pull, uint64_t step,
                                      PeerProgress &progress) {
  if (progress.awaiting_ack) return TakeAcknowledgement(peer, progress);
  const RowExchange &notes = pull.notes;
  const int64_t count = notes.send_counts[peer];
  const int64_t note_bytes = count * notes.row_bytes;
  const int32_t *offered = pull.offered_rows + peer * notes.capacity;
  const bool rows_in_slot = note_bytes + count * pull.row_bytes <=
                            std::min<int64_t>(layout_.slot_bytes, kSmallMessageBytes);
  const bool sent = TryPublish(peer, step, [&](SlotHeader &message) {
    uint8_t *payload = slot_payload(options_.rank, peer);
    std::memcpy(payload, notes.send + peer * notes.capacity * notes.row_bytes, note_bytes);
    if (rows_in_slot) {
      for (int64_t i = 0; i < count; ++i) {
        std::memcpy(payload + note_bytes + i * pull.row_bytes,
                    pull.rows + offered[i] * pull.row_bytes, pull.row_bytes);
      }
    } else {
      std::memcpy(payload + note_bytes, offered, count * sizeof(int32_t));
    }
    DescribeRows(message, rows_in_slot ? kNotesAndRowsInSlot : kNotesAndRowsInSenderMemory,
                 count, notes.row_bytes, notes.capacity, 0,
                 note_bytes + count * (rows_in_slot ? pull.row_bytes : int64_t{sizeof(int32_t)}),
                 reinterpret_cast<uint64_t>(pull.rows));
    message.source_rows = pull.row_count;
    message.source_row_bytes = pull.row_bytes;
  });
  if (sent) {
    progress.send_started = true;
    progress.awaiting_ack = !rows_in_slot;
  }
  return sent;
}

bool SharedMemoryWindow::TryTakeNotes(int peer, const RowPull &pull, uint64_t step,
                                      const PeerProgress &progress, PeerOffer &offer) {
  const SlotHeader &message = slot_header(peer, options_.rank);
  if (message.published.load(std::memory_order_acquire) ==
      message.consumed.load(std::memory_order_relaxed)) {
    return false;  // nothing new from this peer
  }
  CheckMessage(peer, message, pull.notes, step, progress, &pull);
  const RowExchange &notes = pull.notes;
  std::memcpy(notes.recv + peer * notes.capacity * notes.row_bytes,
              slot_payload(peer, options_.rank), message.total_rows * notes.row_bytes);
  notes.recv_counts[peer] = static_cast<int32_t>(message.total_rows);
  offer = {true, message.kind == kNotesAndRowsInSlot, message.source_address, message.source_rows};
  return true;
}

void SharedMemoryWindow::PullPlannedRows(const RowPull &pull, uint64_t step,
                                         const std::vector<PeerOffer> &offers,
                                         std::vector<PeerProgress> &progress) {
  const RowExchange &notes = pull.notes;
  std::vector<std::vector<RowCopy>> copies(options_.world_size);
  pull.plan(copies);
  const auto require_offered = [&](int source, const RowCopy &copy) {
    if (copy.offered_row < 0 || copy.offered_row >= notes.recv_counts[source]) {
      Fail(kInternalError, "the pull plan names offered row ", copy.offered_row, " of rank ",
           source, ", which offered ", notes.recv_counts[source], " rows in step ", step,
           Where());
    }
  };
  // The copies of one source in batches of about kDeliveryBatchBytes, each handed to
  // `delivered` once it has landed.
  const auto deliver_in_batches = [&](const std::vector<RowCopy> &planned, auto copy_batch) {
    const int64_t rows_per_batch = std::max<int64_t>(1, kDeliveryBatchBytes / pull.row_bytes);
    for (size_t begin = 0; begin < planned.size(); begin += rows_per_batch) {
      const size_t end = std::min(planned.size(), begin + static_cast<size_t>(rows_per_batch));
      copy_batch(begin, end);
      if (pull.delivered) pull.delivered(planned.data() + begin, planned.data() + end);
    }
  };
  // The peers first: consuming their messages lets them leave the step.
  for (int peer = 0; peer < options_.world_size; ++peer) {
    if (peer == options_.rank) continue;
    const PeerOffer &offer = offers[peer];
    // After the notes in the slot: the rows themselves, or their indices.
    const uint8_t *after_notes =
        slot_payload(peer, options_.rank) + notes.recv_counts[peer] * notes.row_bytes;
    for (const RowCopy &copy : copies[peer]) require_offered(peer, copy);
    deliver_in_batches(copies[peer], [&](size_t begin, size_t end) {
      std::vector<PeerRange> ranges;
      for (size_t i = begin; i < end; ++i) {
        const RowCopy &copy = copies[peer][i];
        if (offer.in_slot) {
          std::memcpy(copy.destination, after_notes + copy.offered_row * pull.row_bytes,
                      pull.row_bytes);
          continue;
        }
        int32_t row;
        std::memcpy(&row, after_notes + copy.offered_row * sizeof(int32_t), sizeof(row));
        if (row < 0 || row >= offer.rows) {
          Fail(kInternalError, "rank ", peer, " offers its row ", row, " of ", offer.rows,
               " in step ", step, Where());
        }
        ranges.push_back({offer.address + row * pull.row_bytes, copy.destination,
                          pull.row_bytes});
      }
      ReadPeerMemory(peer, step, ranges);
    });
    slot_header(peer, options_.rank).consumed.fetch_add(1, std::memory_order_release);
    RingDoorbell(record(peer));
    progress[peer].receive_bytes = progress[peer].received_bytes =
        static_cast<int64_t>(copies[peer].size()) * pull.row_bytes;
  }
  const std::vector<RowCopy> &own_copies = copies[options_.rank];
  const int32_t *own_offered = pull.offered_rows + options_.rank * notes.capacity;
  for (const RowCopy &copy : own_copies) require_offered(options_.rank, copy);
  deliver_in_batches(own_copies, [&](size_t begin, size_t end) {
    for (size_t i = begin; i < end; ++i) {
      std::memcpy(own_copies[i].destination,
                  pull.rows + own_offered[own_copies[i].offered_row] * pull.row_bytes,
                  pull.row_bytes);
    }
  });
}

}  // namespace moe_ep::comm
