// The communication window: the intra-host transport of expert parallelism on CPU.
//
// MindSpore's CPU backend has no all-to-all, so the ranks of one host exchange rows through a
// POSIX shared-memory segment, the "window". For every ordered pair of distinct ranks
// (src, dst) the window holds one slot: a small header (message counters, step id, row count)
// and `slot_bytes` of payload. A message from src to dst announces the rows src sends to dst in
// this step. The rows themselves travel one of two ways:
//   - single copy (the default where the kernel allows it): the message carries the address of
//     the rows in the sender's memory and the receiver copies them straight into its own
//     buffer with process_vm_readv (cross-memory attach). The sender stays in the exchange
//     until every receiver has acknowledged (consumed) its message, so its buffer outlives the
//     reads;
//   - through the slot (the fallback, and for small payloads, up to 64 KiB, in any case: a
//     second copy of a few kilobytes costs less than waiting for the acknowledgement): the
//     sender copies rows into its slot and the receiver copies them out; payloads larger than a
//     slot travel as several messages (chunks), so an exchange never drops rows and never fails
//     because of its size.
// A pull step (PullRows: the fused decode Dispatch and Deliver, the prefill DeliverRows) is the
// single copy turned around: each rank first sends small notes describing the rows it offers, and
// each receiver, once it has every peer's notes, decides where every offered row goes and reads the
// rows straight into their final places (or takes them from the slot when notes and rows fit in a
// small message). A shared-rows step (ShareRows: the fused decode Return and Combine) keeps the
// rows in the slots: each rank writes its rows for a peer straight into its slot to that peer, and
// the receiver reads them there before consuming the message (no copy out; the slot must hold a
// whole block).
// Which way is decided once, when the window opens: every rank probes whether it can read
// its peers' memory (process_vm_readv may be forbidden by Yama, seccomp or a missing
// capability) and records the answer in the window; rows to a rank travel by single copy if
// and only if that rank could read all its peers. MOE_EP_WINDOW_TRANSPORT=slots (Python side)
// forces the slots.
//
// Waiting: a rank with nothing to do spins for a few microseconds, then sleeps on its
// "doorbell", a 32-bit futex word in the window that every peer bumps (and wakes) when it
// publishes a message to the rank or consumes one of the rank's messages. Sleeps last at most
// a few milliseconds, after which the rank checks on its peers, so a waiting rank gives its
// core away without losing failure detection.
//
// Life cycle (see comm_window_lifecycle.h):
//   - rank 0 of the group creates the segment /dev/shm/moe-ep-<job token> (mode 0600) and
//     writes a header (magic, version, world size, job token, slot size); the job token is
//     128 random bits drawn once per window and shared by the Python side;
//   - the other ranks attach and validate every header field (a segment of another job is
//     never used), then every rank records its pid, and then which transport it receives by;
//   - once all ranks are attached the name is unlinked, so nothing is left in /dev/shm when
//     the job ends, normally or by kill -9.
//
// Every exchange is one "step" (a per-window sequence number). Messages carry the step id and
// the name of the operator that sent them (RowExchange::operation), so ranks that disagree on
// the sequence of exchanges, or run different operators in one step (e.g. one decodes while
// another prefills), fail at once with an error naming both instead of silently mixing data. A rank that waits on a peer detects a peer that exited (pidfd), a peer that
// reported an error, and a peer that makes no progress within `timeout_s`.
//
// Python opens and closes windows through the C functions MoeEpWindowOpen / MoeEpWindowClose
// (comm_window_c_api.cc); kernels find an open window by its integer id with FindCommWindow().
//
// The implementation, one concept per file (internal headers: comm_window_*.h):
//   comm_window_segment.h       the segment's layout: header, rank records, slots
//   comm_window_lifecycle.*     creating, attaching to and unlinking the segment; the watcher
//                               ("reaper") and rank 0's creation-failure notice
//   comm_window_peers.*         watching peers (pidfds), doorbell waits, timeouts and the
//                               errors naming ranks, message checks
//   comm_window_single_copy.cc  the transport agreement and reads of a peer's memory
//   comm_window_shared_memory.h SharedMemoryWindow and what its steps share
//                               (comm_window_steps.cc)
//   comm_window_exchange.cc, comm_window_pull.cc, comm_window_share.cc   the three protocols
//   comm_window_registry.*      opening windows and the registry of open ones
//   comm_window_c_api.cc        the exported MoeEpWindow... functions
#ifndef MOE_EP_COMM_WINDOW_H_
#define MOE_EP_COMM_WINDOW_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "kernel_common.h"

namespace moe_ep {

// One rank's side of an all-to-all-v of rows. Rows for destination d are the
// send_counts[d] rows starting at row d * capacity of `send`; rows from source s arrive at
// row s * capacity of `recv`, and recv_counts[s] says how many. Rows are opaque bytes.
// `send` must stay valid and unchanged during ExchangeRows (peers may read it directly).
struct RowExchange {
  const uint8_t *send = nullptr;   // [world_size * capacity, row_bytes]
  const int32_t *send_counts = nullptr;  // [world_size], each in [0, capacity]
  uint8_t *recv = nullptr;         // [world_size * capacity, row_bytes]
  int32_t *recv_counts = nullptr;  // [world_size]
  int64_t capacity = 0;            // rows per peer block
  int64_t row_bytes = 0;
  // true: the rows of block s past recv_counts[s] are zeroed. false: they are left as they
  // were (unspecified), which saves writing them when the caller reads only counted rows.
  bool zero_tail = true;
  // The operator running this step and its phase, e.g. "FusedDeliver (decode)": every message
  // carries it, so ranks that run different operators in one step fail at once on every rank,
  // naming both, instead of mixing their data (see WindowOperation in the kernels).
  const char *operation = "";
};

// A copy that a pull asks for: the `offered_row`-th row a source offered this rank (the row its
// offered_row-th note describes) into `destination`.
struct RowCopy {
  int64_t offered_row = 0;
  uint8_t *destination = nullptr;
  int64_t tag = 0;  // the caller's, handed back to `delivered`
};

// One rank's side of a pull step. Every rank offers each peer d some of its `rows` (the
// notes.send_counts[d] rows offered_rows[d * capacity + i]) and describes them with as many
// small notes (laid out like the rows of a RowExchange: notes.send / notes.send_counts in,
// notes.recv / notes.recv_counts out). Once the notes of every rank are in, `plan` lists, per
// source rank, which offered rows to copy where. The rows travel with the notes through the
// slot where all fit in a small message; otherwise (single copy only, see CanPullRows) the
// receiver reads them straight from the source's memory, one process_vm_readv list per peer,
// and the source stays in the step until then: `rows` must stay valid and unchanged during
// PullRows.
struct RowPull {
  RowExchange notes;                      // zero_tail is ignored: note tails stay unspecified
  const int32_t *offered_rows = nullptr;  // [world_size * notes.capacity], indices into rows
  const uint8_t *rows = nullptr;          // [row_count, row_bytes]
  int64_t row_count = 0;
  int64_t row_bytes = 0;
  // Called once, when the notes of every rank have arrived; fills copies[source].
  std::function<void(std::vector<std::vector<RowCopy>> &copies)> plan;
  // Optional: called after each batch of planned copies has landed (a few hundred kilobytes,
  // so the rows are still in cache), with the batch, e.g. to copy them on to more places.
  std::function<void(const RowCopy *begin, const RowCopy *end)> delivered;
};

// One rank's side of a step in which the ranks read each other's rows where they lie in the window,
// without copying them out: every rank writes the rows for peer d (send_counts[d] rows of
// row_bytes) straight into its slot to d, and once the rows of every peer are in, `use` reads them
// in place. The fused Return and Combine sum the returned partial rows this way: no staging buffer
// and no copy between the expert rank's sum and the source's (see CanShareRows).
struct SharedRows {
  const int32_t *send_counts = nullptr;  // [world_size], each in [0, capacity]
  int64_t capacity = 0;                  // rows per peer
  int64_t row_bytes = 0;
  uint8_t *own_rows = nullptr;  // [capacity, row_bytes]: where the rows for this rank go
  // Writes the send_counts[rank] rows for `rank` at `destination` (a slot, or own_rows).
  std::function<void(int rank, uint8_t *destination)> write;
  // Called once every rank's rows are in: rows[s] holds counts[s] rows from rank s. The peers'
  // rows stay valid (and unchanged) only during the call.
  std::function<void(const std::vector<const uint8_t *> &rows, const std::vector<int32_t> &counts)>
      use;
  const char *operation = "";  // as RowExchange::operation
};

// An open communication window of one group of ranks on this host.
class CommWindow {
 public:
  virtual ~CommWindow() = default;

  virtual int world_size() const = 0;
  virtual int rank() const = 0;

  // Runs one exchange step with every rank of the group (all ranks must call it).
  // Throws KernelError (naming the peer and the step) on any failure; after a failure the
  // window is unusable and the peers are told why.
  virtual void ExchangeRows(const RowExchange &exchange) = 0;

  // Whether PullRows works on this window with up to `capacity` notes of `note_bytes` per peer:
  // every rank reads its peers' memory and the notes (with their row indices) fit in a slot.
  // The answer is the same on every rank of the group.
  virtual bool CanPullRows(int64_t capacity, int64_t note_bytes) const = 0;

  // Runs one pull step with every rank of the group (all ranks must call it); fails like
  // ExchangeRows, and also if `plan` throws or names a row a peer does not expose.
  virtual void PullRows(const RowPull &pull) = 0;

  // Whether ShareRows works on this window with up to `capacity` rows of `row_bytes` per peer:
  // they fit in one slot. The answer is the same on every rank of the group.
  virtual bool CanShareRows(int64_t capacity, int64_t row_bytes) const = 0;

  // Runs one shared-rows step with every rank of the group (all ranks must call it); fails
  // like ExchangeRows, and also if `write` or `use` throws.
  virtual void ShareRows(const SharedRows &shared) = 0;

  // Marks the next step as failed for `reason` without exchanging anything: the peers waiting
  // for this rank get the reason instead of a timeout. The window is unusable afterwards.
  virtual void Abandon(const std::string &reason) = 0;
};

// Runs `checks` (validation before an exchange); if they fail, the window is abandoned so that
// the peers waiting in this exchange step fail at once with the reason, then the error goes on
// (marked as told to the peers).
template <typename Checks>
auto AbandonOnFailure(CommWindow &window, Checks &&checks) -> decltype(checks()) {
  try {
    return checks();
  } catch (KernelError &error) {
    window.Abandon(error.what());
    error.set_peers_informed();
    throw;
  }
}

// The open window with this id; throws KernelError if there is none.
std::shared_ptr<CommWindow> FindCommWindow(int64_t window_id);

}  // namespace moe_ep

#endif  // MOE_EP_COMM_WINDOW_H_
