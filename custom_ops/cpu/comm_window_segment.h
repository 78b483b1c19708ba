// The layout of a communication window's shared-memory segment (see comm_window.h): its header,
// one record per rank and one slot per ordered pair of distinct ranks, with the constants that
// size them. Every process of a group maps the same bytes, so these structs are the protocol.
#ifndef MOE_EP_COMM_WINDOW_SEGMENT_H_
#define MOE_EP_COMM_WINDOW_SEGMENT_H_

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

namespace moe_ep::comm {

constexpr char kSegmentNamePrefix[] = "/moe-ep-";
constexpr char kSharedMemoryDirectory[] = "/dev/shm";
constexpr uint64_t kSegmentMagic = 0x4e49575045454f4dULL;  // the bytes "MOEEPWIN"
constexpr uint32_t kLayoutVersion = 4;  // 2: doorbells, transport records, single copy; 3: pulls;
                                        // 4: operation names in messages and rank records
constexpr int kJobTokenBytes = 16;
constexpr size_t kCacheLine = 64;
constexpr size_t kFailureMessageBytes = 512;
constexpr size_t kOperationNameBytes = 48;  // RowExchange::operation, truncated to fit
constexpr int kMaxWorldSize = 4096;

static_assert(std::atomic<uint32_t>::is_always_lock_free &&
                  std::atomic<uint64_t>::is_always_lock_free &&
                  std::atomic<int64_t>::is_always_lock_free,
              "inter-process atomics must be lock-free");

// Written once by the creator; `ready` is set last.
struct alignas(kCacheLine) SegmentHeader {
  uint64_t magic;
  uint32_t version;
  uint32_t world_size;
  uint8_t job_token[kJobTokenBytes];
  uint64_t slot_bytes;
  std::atomic<uint32_t> ready;
};

// How the rows sent to a rank travel (RankRecord::transport; the receiver decides).
enum Transport : uint32_t {
  kUndecided = 0,   // the rank has not finished probing its peers yet
  kSlots = 1,       // through the slots (two copies)
  kSingleCopy = 2,  // the rank reads its peers' send buffers directly (process_vm_readv)
};

// What one rank tells the others about itself.
struct alignas(kCacheLine) RankRecord {
  std::atomic<int64_t> pid;            // 0 until the rank has attached
  std::atomic<uint64_t> entered_step;  // the last exchange step the rank entered
  std::atomic<uint64_t> failed_step;   // 0, or the step in which the rank failed
  std::atomic<uint32_t> transport;     // a Transport; kUndecided while the window opens
  // The single-copy probe: `probe_address` in the rank's memory holds `probe_value`. Written
  // before pid.
  uint64_t probe_address;
  uint64_t probe_value;
  char failure[kFailureMessageBytes];  // why it failed; written before failed_step
  char operation[kOperationNameBytes];  // the operator of entered_step; written before it

  // Written by the peers (own cache line). The doorbell is a futex word: a peer bumps it and
  // wakes the rank after publishing a message to it or consuming a message from it, and after
  // a failure. `sleepers` counts the rank's threads blocked on it, so that the peers make the
  // wake system call only when someone sleeps.
  alignas(kCacheLine) std::atomic<uint32_t> doorbell;
  std::atomic<uint32_t> sleepers;
};

// Where the rows of a message are.
enum MessageKind : uint32_t {
  kRowsInSlot = 1,          // chunk_bytes bytes in the slot's payload
  kRowsInSenderMemory = 2,  // all rows at source_address in the sender's memory (single copy)
  // A pull step: the slot's payload holds all notes, then either the offered rows themselves
  // or their indices (int32) into the source_rows rows at source_address in the sender's memory.
  kNotesAndRowsInSlot = 3,
  kNotesAndRowsInSenderMemory = 4,
};

// The header of the slot carrying messages from one rank to another. A message is present
// while published > consumed; the sender writes the next one only after the receiver has
// consumed the previous one. The two counters live on separate cache lines.
struct alignas(kCacheLine) SlotHeader {
  std::atomic<uint64_t> published;  // messages written (by the sender)
  uint64_t step;                    // exchange step of the current message
  int64_t total_rows;               // rows the sender sends to this receiver in this step
  int64_t row_bytes;
  int64_t capacity;
  int64_t chunk_offset;             // byte offset of this chunk within those rows
  int64_t chunk_bytes;
  uint32_t kind;                    // a MessageKind
  char operation[kOperationNameBytes];  // the operator that sent it (RowExchange::operation)
  uint64_t source_address;          // k...InSenderMemory: the rows in the sender's memory
  int64_t source_rows;              // kNotesAndRowsInSenderMemory: how many rows are there
  int64_t source_row_bytes;         // kNotesAndRows...: the size of an offered row
  alignas(kCacheLine) std::atomic<uint64_t> consumed;  // messages read (by the receiver)
};

// Text a peer wrote into the shared segment, made safe to print: at most `capacity` bytes, up to
// the first NUL, every byte outside printable ASCII (and newline, tab) shown as '?', so that a
// corrupted segment yields a readable message rather than raw bytes.
inline std::string PrintableText(const char *text, size_t capacity) {
  std::string printable(text, strnlen(text, capacity));
  for (char &c : printable) {
    const unsigned char byte = static_cast<unsigned char>(c);
    if ((byte < 0x20 && c != '\n' && c != '\t') || byte >= 0x7f) c = '?';
  }
  return printable;
}

// Copies the operator name `name` into `destination` (kOperationNameBytes, truncated).
inline void WriteOperationName(char *destination, const std::string &name) {
  const size_t length = std::min(name.size(), kOperationNameBytes - 1);
  std::memcpy(destination, name.data(), length);
  destination[length] = '\0';
}

inline size_t RoundUp(size_t value, size_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// Where the parts of a segment lie:
//   SegmentHeader | RankRecord x world_size | (SlotHeader + payload) x world_size*(world_size-1)
// Slots exist only for ordered pairs of distinct ranks (a rank copies its own rows directly).
struct SegmentLayout {
  SegmentLayout(int world_size, int64_t slot_bytes)
      : world_size(world_size),
        slot_bytes(slot_bytes),
        ranks_offset(RoundUp(sizeof(SegmentHeader), kCacheLine)),
        slots_offset(ranks_offset + world_size * sizeof(RankRecord)),
        slot_stride(sizeof(SlotHeader) + RoundUp(slot_bytes, kCacheLine)),
        total_bytes(slots_offset + static_cast<size_t>(world_size) * (world_size - 1) * slot_stride) {}

  // Index of the slot carrying messages from `source` to `destination` (source != destination).
  size_t SlotIndex(int source, int destination) const {
    return static_cast<size_t>(source) * (world_size - 1) +
           (destination < source ? destination : destination - 1);
  }

  int world_size;
  int64_t slot_bytes;
  size_t ranks_offset;
  size_t slots_offset;
  size_t slot_stride;
  size_t total_bytes;
};

}  // namespace moe_ep::comm

#endif  // MOE_EP_COMM_WINDOW_SEGMENT_H_
