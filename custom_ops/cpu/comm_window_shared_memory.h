// SharedMemoryWindow, the CommWindow of the ranks of one host over a shared-memory segment, and
// what its steps share: the progress of a step with each peer, entering a step, publishing a
// message, waiting for every peer. Its members are defined by concern:
//   comm_window_steps.cc        failures and where they happened, acknowledgements
//   comm_window_peers.cc        joining the group, a peer's health, timeouts, message checks
//   comm_window_single_copy.cc  agreeing on the transport, reading a peer's memory
//   comm_window_exchange.cc     ExchangeRows
//   comm_window_pull.cc         PullRows
//   comm_window_share.cc        ShareRows
#ifndef MOE_EP_COMM_WINDOW_SHARED_MEMORY_H_
#define MOE_EP_COMM_WINDOW_SHARED_MEMORY_H_

#include <atomic>
#include <cstdint>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "comm_window.h"
#include "comm_window_clock.h"
#include "comm_window_lifecycle.h"
#include "comm_window_peers.h"
#include "comm_window_segment.h"
#include "kernel_common.h"

namespace moe_ep::comm {

// How a window is opened (MoeEpWindowOpen's arguments).
struct WindowOptions {
  std::string job_token_hex;  // 32 hex digits, the same on every rank of the group
  int world_size = 0;
  int rank = 0;
  int64_t slot_bytes = 0;
  double timeout_s = 0.0;          // longest wait for a peer during an exchange
  double attach_timeout_s = 0.0;   // longest wait for all ranks to attach
  std::string timeout_setting;     // name of the setting behind timeout_s, for messages
  bool allow_single_copy = true;   // false: rows always travel through the slots
};

// How far the exchange with one peer has got in the current step.
struct PeerProgress {
  int64_t send_bytes = 0;      // bytes of rows to send to the peer
  int64_t sent_bytes = 0;      // bytes published (in the slot or by address)
  bool send_started = false;   // the first message (carrying the row count) is out
  bool awaiting_ack = false;   // single copy: the peer has not yet read our rows
  int64_t receive_bytes = -1;  // bytes of rows the peer sends us; -1 until its first message
  int64_t received_bytes = 0;

  bool send_done() const { return send_started && sent_bytes == send_bytes && !awaiting_ack; }
  bool receive_done() const { return receive_bytes >= 0 && received_bytes == receive_bytes; }
  bool done() const { return send_done() && receive_done(); }
};

// Where the rows a rank offers in a pull step are, known once its notes have arrived.
struct PeerOffer {
  bool known = false;
  bool in_slot = false;  // true: after the notes in the slot; false: in the rank's memory
  uint64_t address = 0;  // in the rank's memory
  int64_t rows = 0;      // rows there
};

// A contiguous range of bytes to copy from a peer's memory into ours.
struct PeerRange {
  uint64_t source_address;
  uint8_t *destination;
  int64_t bytes;
};

// Writes what a message of `kind` carries: total_rows rows of row_bytes (capacity per peer),
// the chunk [chunk_offset, chunk_offset + chunk_bytes) of their bytes, at source_address in the
// sender's memory for the kinds that leave rows there.
inline void DescribeRows(SlotHeader &message, MessageKind kind, int64_t total_rows,
                         int64_t row_bytes, int64_t capacity, int64_t chunk_offset,
                         int64_t chunk_bytes, uint64_t source_address = 0) {
  message.total_rows = total_rows;
  message.row_bytes = row_bytes;
  message.capacity = capacity;
  message.chunk_offset = chunk_offset;
  message.chunk_bytes = chunk_bytes;
  message.kind = kind;
  message.source_address = source_address;
}

// Lets processes of our user read this process's memory with process_vm_readv where Yama's
// ptrace_scope = 1 would restrict that to our ancestors (the ranks are siblings). This widens
// what other processes of the same user may do to this one (ptrace attach included), which is
// the price of the single copy; MOE_EP_WINDOW_TRANSPORT=slots avoids it.
void AllowSiblingsToReadMemory();

// One rank's side of an open window: the mapped segment, its peers' processes and the current
// step.
class SharedMemoryWindow final : public CommWindow {
 public:
  SharedMemoryWindow(int64_t id, const WindowOptions &options, const SegmentLayout &layout,
                     MappedSegment segment)
      : id_(id), options_(options), layout_(layout), segment_(std::move(segment)),
        monitor_(options.world_size),
        spin_seconds_(options.world_size <= UsableCpus() ? kSpinSecondsWithFreeCores
                                                         : kSpinSecondsWhenOversubscribed),
        sends_by_address_(options.world_size, false),
        probe_value_(std::random_device{}() | (uint64_t{std::random_device{}()} << 32)) {}

  int world_size() const override { return options_.world_size; }
  int rank() const override { return options_.rank; }
  uint64_t step() const { return step_.load(); }
  // How rows arrive at this rank (kSlots or kSingleCopy), once the window is open.
  Transport receive_transport() const {
    return static_cast<Transport>(record(options_.rank).transport.load());
  }
  // Whether rows to `peer` travel by single copy.
  bool sends_by_address(int peer) const { return sends_by_address_[peer]; }

  // Records this rank's pid and waits (until `deadline`) for every rank to do the same.
  void JoinGroup(double deadline);
  // Probes whether this rank can read its peers' memory, records the answer and waits (until
  // `deadline`) for every rank's answer; then rows to rank d travel by single copy if rank d
  // could read all its peers.
  void AgreeOnTransport(double deadline);

  void ExchangeRows(const RowExchange &exchange) override;
  bool CanPullRows(int64_t capacity, int64_t note_bytes) const override;
  void PullRows(const RowPull &pull) override;
  bool CanShareRows(int64_t capacity, int64_t row_bytes) const override;
  void ShareRows(const SharedRows &shared) override;
  void Abandon(const std::string &reason) override;

 private:
  // Spin this long before sleeping on the doorbell: a few microseconds when every rank has a
  // core to itself, less when ranks share cores (a spinning rank would hold a core a peer with
  // work to do needs).
  static constexpr double kSpinSecondsWithFreeCores = 20e-6;
  static constexpr double kSpinSecondsWhenOversubscribed = 2e-6;
  // Payloads up to this size travel through the slot in any case (see TrySend).
  static constexpr int64_t kSmallMessageBytes = 64 << 10;
  // A pull step hands its copies to RowPull::delivered in batches of about this size: small
  // enough to stay in a core's L2 cache.
  static constexpr int64_t kDeliveryBatchBytes = 256 << 10;

  RankRecord &record(int rank) const {
    return *reinterpret_cast<RankRecord *>(segment_.bytes() + layout_.ranks_offset +
                                           rank * sizeof(RankRecord));
  }
  uint8_t *slot(int source, int destination) const {
    return segment_.bytes() + layout_.slots_offset +
           layout_.SlotIndex(source, destination) * layout_.slot_stride;
  }
  SlotHeader &slot_header(int source, int destination) const {
    return *reinterpret_cast<SlotHeader *>(slot(source, destination));
  }
  uint8_t *slot_payload(int source, int destination) const {
    return slot(source, destination) + sizeof(SlotHeader);
  }
  void RingPeers() {
    for (int peer = 0; peer < options_.world_size; ++peer) {
      if (peer != options_.rank) RingDoorbell(record(peer));
    }
  }

  // " [window 2, rank 0 of 4]": where an error happened.
  std::string Where() const;
  void RequireUsable() const;
  void RequireValidCounts(const RowExchange &exchange) const;
  void RecordFailure(uint64_t step, const std::string &reason);
  // Waits until is_ready(peer) holds for every peer, failing (with "rank(s) ... did not
  // <what> within ...") after `deadline` or as soon as a peer exits.
  template <typename IsReady>
  void WaitForEveryPeer(double deadline, const char *what, IsReady is_ready);
  // Whether process_vm_readv reads `peer`'s probe value.
  bool CanReadMemoryOf(int peer) const;

  // Enters the next step as `operation` and runs `body(step)` in it; a failure is recorded for
  // the peers.
  template <typename Body>
  void RunLockedStep(const char *operation, Body body);
  // Calls `advance()` (true: something progressed) until every peer's progress is done,
  // waiting on the doorbell in between and checking on the pending peers while it waits.
  template <typename Advance>
  void RunStep(uint64_t step, const std::vector<PeerProgress> &progress, Advance advance);
  void RunExchange(const RowExchange &exchange, uint64_t step);
  void RunPull(const RowPull &pull, uint64_t step);
  void RunShare(const SharedRows &shared, uint64_t step);
  // Publishes the next message to `peer` (`fill` writes its fields) once the peer has consumed
  // the previous one; false while it has not.
  template <typename Fill>
  bool TryPublish(int peer, uint64_t step, Fill fill);
  // Single copy: true once `peer` has consumed (acknowledged) the message awaiting it.
  bool TakeAcknowledgement(int peer, PeerProgress &progress);
  bool TrySend(int peer, const RowExchange &exchange, uint64_t step, PeerProgress &progress);
  bool TrySendByAddress(int peer, const RowExchange &exchange, uint64_t step,
                        PeerProgress &progress);
  bool TryReceive(int peer, const RowExchange &exchange, uint64_t step, PeerProgress &progress);
  // Pull steps: send our notes and the address of our rows; take a peer's notes (without
  // consuming its message, whose rows are read later); read the planned rows of every rank.
  bool TryOfferRows(int peer, const RowPull &pull, uint64_t step, PeerProgress &progress);
  bool TryTakeNotes(int peer, const RowPull &pull, uint64_t step, const PeerProgress &progress,
                    PeerOffer &offer);
  void PullPlannedRows(const RowPull &pull, uint64_t step, const std::vector<PeerOffer> &offers,
                       std::vector<PeerProgress> &progress);
  // Copies every range from `peer`'s memory (process_vm_readv, as few calls as possible).
  void ReadPeerMemory(int peer, uint64_t step, const std::vector<PeerRange> &ranges) const;
  // `pull`: the pull step the message belongs to, or null in an exchange step.
  void CheckMessage(int peer, const SlotHeader &message, const RowExchange &exchange,
                    uint64_t step, const PeerProgress &progress,
                    const RowPull *pull = nullptr) const;
  // Fails if a peer we still wait for has failed or exited, or if we waited too long.
  void CheckPendingPeers(const std::vector<PeerProgress> &progress, uint64_t step,
                         double idle_seconds) const;
  // Fails if `peer` has reported a failure.
  void RequireHealthy(int peer) const;

  const int64_t id_;
  const WindowOptions options_;
  const SegmentLayout layout_;
  MappedSegment segment_;
  PeerMonitor monitor_;
  const double spin_seconds_;
  std::vector<bool> sends_by_address_;  // per peer: rows to it travel by single copy
  const uint64_t probe_value_;          // what peers read at &probe_value_ to test single copy
  std::mutex exchange_mutex_;  // one exchange at a time per window
  std::atomic<uint64_t> step_{0};  // exchange steps entered so far
  std::string operation_;      // the operator of the current step (RowExchange::operation)
  std::string failure_;        // non-empty once the window is unusable
};

template <typename IsReady>
void SharedMemoryWindow::WaitForEveryPeer(double deadline, const char *what, IsReady is_ready) {
  DoorbellWaiter waiter(record(options_.rank), spin_seconds_);
  while (true) {
    const uint32_t doorbell = waiter.Observe();
    std::vector<int> missing;
    for (int peer = 0; peer < options_.world_size; ++peer) {
      if (peer == options_.rank) continue;
      const int64_t pid = record(peer).pid.load(std::memory_order_acquire);
      if (pid != 0) {
        if (!monitor_.IsWatching(peer)) monitor_.Watch(peer, pid);
        if (monitor_.HasExited(peer)) {
          Fail(kInternalError, "rank ", peer, " (pid ", pid,
               ") exited before all ranks attached to the communication window", Where());
        }
      }
      if (!is_ready(peer)) missing.push_back(peer);
    }
    if (missing.empty()) return;
    if (SecondsSinceStart() > deadline) {
      std::ostringstream ranks;
      for (size_t i = 0; i < missing.size(); ++i) ranks << (i ? ", " : "") << missing[i];
      Fail(kInternalError, "rank(s) ", ranks.str(), " did not ", what, " within ",
           DescribeSeconds(options_.attach_timeout_s), " (attach_timeout_s)", Where());
    }
    waiter.Wait(doorbell);
  }
}

template <typename Body>
void SharedMemoryWindow::RunLockedStep(const char *operation, Body body) {
  std::lock_guard<std::mutex> lock(exchange_mutex_);
  try {
    RequireUsable();  // an earlier failure: the peers were told then
  } catch (KernelError &error) {
    error.set_peers_informed();
    throw;
  }
  const uint64_t step = ++step_;
  operation_ = operation != nullptr && *operation ? operation : "an unnamed operator";
  WriteOperationName(record(options_.rank).operation, operation_);
  record(options_.rank).entered_step.store(step, std::memory_order_release);
  try {
    body(step);
  } catch (KernelError &error) {
    RecordFailure(step, error.what());
    error.set_peers_informed();
    throw;
  }
}

template <typename Advance>
void SharedMemoryWindow::RunStep(uint64_t step, const std::vector<PeerProgress> &progress,
                                 Advance advance) {
  const auto every_peer_done = [&] {
    for (int peer = 0; peer < options_.world_size; ++peer) {
      if (peer != options_.rank && !progress[peer].done()) return false;
    }
    return true;
  };
  DoorbellWaiter waiter(record(options_.rank), spin_seconds_);
  do {
    const uint32_t doorbell = waiter.Observe();  // before looking: see DoorbellWaiter
    if (advance()) {
      waiter.Reset();
    } else if (waiter.Wait(doorbell)) {
      CheckPendingPeers(progress, step, waiter.IdleSeconds());
    }
  } while (!every_peer_done());
  // A peer may have given up on this step after handing us all its rows (e.g. it timed out
  // waiting for us): then this rank fails too, so that no rank goes on alone.
  for (int peer = 0; peer < options_.world_size; ++peer) {
    if (peer != options_.rank) RequireHealthy(peer);
  }
}

template <typename Fill>
bool SharedMemoryWindow::TryPublish(int peer, uint64_t step, Fill fill) {
  SlotHeader &message = slot_header(options_.rank, peer);
  const uint64_t published = message.published.load(std::memory_order_relaxed);
  if (message.consumed.load(std::memory_order_acquire) != published) {
    return false;  // the peer has not read our previous message yet
  }
  message.step = step;
  WriteOperationName(message.operation, operation_);
  fill(message);
  message.published.store(published + 1, std::memory_order_release);
  RingDoorbell(record(peer));
  return true;
}

}  // namespace moe_ep::comm

#endif  // MOE_EP_COMM_WINDOW_SHARED_MEMORY_H_
