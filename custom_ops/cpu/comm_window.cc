// Shared-memory communication windows: segment creation and validation, the row exchange
// protocol (single copy or through slots), waiting on doorbells, failure detection, and the C
// interface used by Python (see comm_window.h).
#include "comm_window.h"

#include <fcntl.h>
#include <linux/futex.h>
#include <poll.h>
#include <spawn.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <iomanip>
#include <map>
#include <mutex>
#include <new>
#include <optional>
#include <random>
#include <sstream>
#include <thread>
#include <utility>
#include <vector>

#include "kernel_common.h"

namespace moe_ep {
namespace {

// ---------------------------------------------------------------------------------------------
// The shared segment
// ---------------------------------------------------------------------------------------------

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
std::string PrintableText(const char *text, size_t capacity) {
  std::string printable(text, strnlen(text, capacity));
  for (char &c : printable) {
    const unsigned char byte = static_cast<unsigned char>(c);
    if ((byte < 0x20 && c != '\n' && c != '\t') || byte >= 0x7f) c = '?';
  }
  return printable;
}

// Copies the operator name `name` into `destination` (kOperationNameBytes, truncated).
void WriteOperationName(char *destination, const std::string &name) {
  const size_t length = std::min(name.size(), kOperationNameBytes - 1);
  std::memcpy(destination, name.data(), length);
  destination[length] = '\0';
}

// Writes what a message of `kind` carries: total_rows rows of row_bytes (capacity per peer),
// the chunk [chunk_offset, chunk_offset + chunk_bytes) of their bytes, at source_address in the
// sender's memory for the kinds that leave rows there.
void DescribeRows(SlotHeader &message, MessageKind kind, int64_t total_rows, int64_t row_bytes,
                  int64_t capacity, int64_t chunk_offset, int64_t chunk_bytes,
                  uint64_t source_address = 0) {
  message.total_rows = total_rows;
  message.row_bytes = row_bytes;
  message.capacity = capacity;
  message.chunk_offset = chunk_offset;
  message.chunk_bytes = chunk_bytes;
  message.kind = kind;
  message.source_address = source_address;
}

size_t RoundUp(size_t value, size_t multiple) {
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

// ---------------------------------------------------------------------------------------------
// Small system helpers
// ---------------------------------------------------------------------------------------------

double SecondsSinceStart() {
  using Clock = std::chrono::steady_clock;
  static const Clock::time_point start = Clock::now();
  return std::chrono::duration<double>(Clock::now() - start).count();
}

std::string ErrnoText(int error_number) { return std::strerror(error_number); }

// "60.0 s"
std::string DescribeSeconds(double seconds) {
  std::ostringstream text;
  text << std::fixed << std::setprecision(1) << seconds << " s";
  return text.str();
}

std::string DescribeBytes(uint64_t bytes) {
  std::ostringstream text;
  text << bytes << " bytes (" << (bytes >> 20) << " MiB)";
  return text.str();
}

// Closes a file descriptor when it goes out of scope.
class ScopedFd {
 public:
  explicit ScopedFd(int fd = -1) : fd_(fd) {}
  ~ScopedFd() {
    if (fd_ >= 0) close(fd_);
  }
  ScopedFd(ScopedFd &&other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  ScopedFd &operator=(ScopedFd &&other) noexcept {
    std::swap(fd_, other.fd_);
    return *this;
  }
  int get() const { return fd_; }

 private:
  int fd_;
};

// A shared mapping of a whole segment, unmapped when it goes out of scope.
class MappedSegment {
 public:
  MappedSegment() = default;
  MappedSegment(int fd, size_t size) : size_(size) {
    void *address = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (address == MAP_FAILED) {
      Fail(kInternalError, "mapping the communication window (", DescribeBytes(size),
           ") failed: ", ErrnoText(errno));
    }
    address_ = static_cast<uint8_t *>(address);
  }
  ~MappedSegment() {
    if (address_ != nullptr) munmap(address_, size_);
  }
  MappedSegment(MappedSegment &&other) noexcept
      : address_(std::exchange(other.address_, nullptr)), size_(other.size_) {}
  MappedSegment &operator=(MappedSegment &&other) noexcept {
    std::swap(address_, other.address_);
    std::swap(size_, other.size_);
    return *this;
  }
  uint8_t *bytes() const { return address_; }

 private:
  uint8_t *address_ = nullptr;
  size_t size_ = 0;
};

// Watches peer processes through pidfds. A pidfd becomes readable once its process has exited,
// including while it is an unreaped zombie (kill(pid, 0) would still succeed then). Where
// pidfd_open is unavailable a peer's exit is noticed only through the timeout.
class PeerMonitor {
 public:
  explicit PeerMonitor(int world_size) : pidfds_(world_size, -1), exited_(world_size, false) {}
  ~PeerMonitor() {
    for (int fd : pidfds_) {
      if (fd >= 0) close(fd);
    }
  }
  PeerMonitor(const PeerMonitor &) = delete;
  PeerMonitor &operator=(const PeerMonitor &) = delete;

  bool IsWatching(int rank) const { return pidfds_[rank] >= 0 || exited_[rank]; }

  void Watch(int rank, int64_t pid) {
#ifdef SYS_pidfd_open
    const int fd = static_cast<int>(syscall(SYS_pidfd_open, static_cast<pid_t>(pid), 0));
    if (fd >= 0) {
      pidfds_[rank] = fd;
    } else if (errno == ESRCH) {
      exited_[rank] = true;  // gone before we could watch it
    }
#else
    (void)rank;
    (void)pid;
#endif
  }

  bool HasExited(int rank) const {
    if (exited_[rank]) return true;
    if (pidfds_[rank] < 0) return false;
    pollfd request{pidfds_[rank], POLLIN, 0};
    return poll(&request, 1, 0) > 0 && (request.revents & POLLIN) != 0;
  }

 private:
  std::vector<int> pidfds_;
  std::vector<bool> exited_;
};

// Tells the CPU that this thread is spinning (saves power, helps a sibling hyper-thread).
inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// The futex system call on a 32-bit word of the shared segment. Not the _PRIVATE operations:
// the word is shared between processes (MAP_SHARED), so the kernel must key it by the page.
long Futex(std::atomic<uint32_t> &word, int operation, uint32_t value,
           const timespec *timeout = nullptr) {
  static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t), "futex words are 32-bit");
  return syscall(SYS_futex, reinterpret_cast<uint32_t *>(&word), operation, value, timeout,
                 nullptr, 0);
}

// Tells a rank that something it may wait for has changed.
void RingDoorbell(RankRecord &record) {
  record.doorbell.fetch_add(1, std::memory_order_seq_cst);
  // Seen no sleeper: any sleeper-to-be registers after our bump, so its FUTEX_WAIT finds the
  // doorbell changed and returns at once.
  if (record.sleepers.load(std::memory_order_seq_cst) != 0) {
    Futex(record.doorbell, FUTEX_WAKE, INT32_MAX);
  }
}

// The number of CPUs this process may run on.
int UsableCpus() {
  cpu_set_t cpus;
  if (sched_getaffinity(0, sizeof(cpus), &cpus) == 0) return CPU_COUNT(&cpus);
  return static_cast<int>(std::max(1L, sysconf(_SC_NPROCESSORS_ONLN)));
}

// Waiting for peers on this rank's doorbell. The caller reads the doorbell (Observe) *before*
// checking whether it can progress, and passes that value to Wait: a peer's change after the
// check has also bumped the doorbell, so Wait returns at once instead of missing the wake-up.
// Wait spins briefly (a peer often answers within microseconds), then sleeps on the futex for
// at most kSleepSlice. It returns true when the caller should check on its peers (dead, failed,
// timed out): whenever kCheckInterval has passed since the last check, so after every sleep
// that nobody ended.
class DoorbellWaiter {
 public:
  // `spin_seconds`: how long to spin before sleeping.
  DoorbellWaiter(RankRecord &own, double spin_seconds) : own_(own), spin_seconds_(spin_seconds) {
    Reset();
    last_check_ = idle_since_;
  }

  uint32_t Observe() const { return own_.doorbell.load(std::memory_order_acquire); }

  // The caller progressed: the timeout counts from now.
  void Reset() { idle_since_ = SecondsSinceStart(); }

  bool Wait(uint32_t observed) {
    const double spin_until = SecondsSinceStart() + spin_seconds_;
    for (int round = 1;; ++round) {
      if (own_.doorbell.load(std::memory_order_acquire) != observed) return CheckDue();
      CpuRelax();
      if (round % kRoundsPerClockRead == 0 && SecondsSinceStart() >= spin_until) break;
    }
    own_.sleepers.fetch_add(1, std::memory_order_seq_cst);
    Futex(own_.doorbell, FUTEX_WAIT, observed, &kSleepSlice);  // woken, timed out or EAGAIN
    own_.sleepers.fetch_sub(1, std::memory_order_seq_cst);
    return CheckDue();  // always due after a sleep nobody ended (it lasted kSleepSlice)
  }

  double IdleSeconds() const { return SecondsSinceStart() - idle_since_; }

 private:
  static constexpr timespec kSleepSlice{0, 2'000'000};  // 2 ms
  static constexpr double kCheckInterval = 0.002;       // seconds, at most kSleepSlice
  static constexpr int kRoundsPerClockRead = 64;

  bool CheckDue() {
    const double now = SecondsSinceStart();
    if (now - last_check_ < kCheckInterval) return false;
    last_check_ = now;
    return true;
  }

  RankRecord &own_;
  const double spin_seconds_;
  double idle_since_ = 0.0;
  double last_check_ = 0.0;
};

// ---------------------------------------------------------------------------------------------
// Opening a window
// ---------------------------------------------------------------------------------------------

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

void ValidateOptions(const WindowOptions &options) {
  const std::string &token = options.job_token_hex;
  if (token.size() != 2 * kJobTokenBytes ||
      token.find_first_not_of("0123456789abcdef") != std::string::npos) {
    Fail(kInvalidArgument, "the job token must be ", 2 * kJobTokenBytes,
         " lowercase hex digits, got '", token, "'");
  }
  if (options.world_size < 1 || options.world_size > kMaxWorldSize) {
    Fail(kInvalidArgument, "world_size = ", options.world_size, " must be in [1, ",
         kMaxWorldSize, "]");
  }
  if (options.rank < 0 || options.rank >= options.world_size) {
    Fail(kInvalidArgument, "rank = ", options.rank, " must be in [0, ", options.world_size, ")");
  }
  if (options.slot_bytes < static_cast<int64_t>(kCacheLine) || options.slot_bytes > (1LL << 40)) {
    Fail(kInvalidArgument, "slot_bytes = ", options.slot_bytes, " must be in [", kCacheLine,
         ", 2^40]");
  }
  if (!(options.timeout_s > 0.0) || !(options.attach_timeout_s > 0.0)) {
    Fail(kInvalidArgument, "timeout_s = ", options.timeout_s, " and attach_timeout_s = ",
         options.attach_timeout_s, " must be positive");
  }
}

std::vector<uint8_t> ParseJobToken(const std::string &hex) {
  std::vector<uint8_t> token(kJobTokenBytes);
  for (int i = 0; i < kJobTokenBytes; ++i) {
    token[i] = static_cast<uint8_t>(std::stoi(hex.substr(2 * i, 2), nullptr, 16));
  }
  return token;
}

void RequireFreeSharedMemory(const SegmentLayout &layout) {
  struct statvfs filesystem {};
  if (statvfs(kSharedMemoryDirectory, &filesystem) != 0) return;  // cannot tell; fallocate will
  const uint64_t available = static_cast<uint64_t>(filesystem.f_bavail) * filesystem.f_frsize;
  if (layout.total_bytes > available) {
    Fail(kInternalError, "the communication window needs ", DescribeBytes(layout.total_bytes),
         " of ", kSharedMemoryDirectory, " (world size ", layout.world_size, ", slot_bytes ",
         layout.slot_bytes, ") but only ", DescribeBytes(available),
         " are available; lower dispatch.window_slot_bytes in the config (smaller slots move "
         "large payloads in more chunks) or enlarge ", kSharedMemoryDirectory,
         " (e.g. docker run --shm-size)");
  }
}

// Rank 0 unlinks the segment's name once every rank has attached; if it is killed before that
// (kill -9, or msrun stopping the job while a peer is still compiling), nobody would. So the
// creator starts a detached watcher ("reaper": a shell loop in its own session, holding none of
// the creator's file descriptors) that unlinks the name as soon as the creator has exited, and
// ends as soon as the name is gone or after `lifetime_s`. It costs one short-lived process per
// window. Best effort: if /bin/sh cannot be started, the window works as before.
// With `remove_at_end` (a creation-failure notice, see PublishCreationFailure), the watcher also
// unlinks the name when its lifetime ends.
void StartSegmentReaper(const std::string &name, double lifetime_s, bool remove_at_end = false) {
  static const char kScript[] =
      "( i=0; while [ -e \"$2\" ] && [ $i -lt $3 ]; do "
      "state=$(sed 's/^.*) //' /proc/$1/stat 2>/dev/null | cut -c1); "
      "if [ -z \"$state\" ] || [ \"$state\" = Z ]; then rm -f \"$2\"; exit 0; fi; "
      "sleep 0.2; i=$((i+1)); done; [ \"$4\" = 1 ] && rm -f \"$2\" ) "
      "</dev/null >/dev/null 2>&1 &";
  const std::string creator = std::to_string(getpid());
  const std::string path = std::string(kSharedMemoryDirectory) + name;
  const std::string polls = std::to_string(static_cast<int64_t>(lifetime_s / 0.2) + 1);
  const char *argv[] = {"sh", "-c", kScript, "moe-ep-reaper", creator.c_str(), path.c_str(),
                        polls.c_str(), remove_at_end ? "1" : "0", nullptr};
  posix_spawn_file_actions_t actions;
  posix_spawnattr_t attributes;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0);
  posix_spawn_file_actions_addclosefrom_np(&actions, 3);
  posix_spawnattr_init(&attributes);
  posix_spawnattr_setflags(&attributes, POSIX_SPAWN_SETSID);
  pid_t shell = -1;
  if (posix_spawn(&shell, "/bin/sh", &actions, &attributes, const_cast<char *const *>(argv),
                  environ) == 0) {
    int status = 0;
    waitpid(shell, &status, 0);  // the shell exits at once, leaving the loop in the background
  }
  posix_spawnattr_destroy(&attributes);
  posix_spawn_file_actions_destroy(&actions);
}

// What rank 0 leaves under the segment's name when it cannot create the window, so that the
// ranks waiting to attach fail at once with its reason instead of after attach_timeout_s.
struct CreationFailure {
  uint64_t magic;                      // kCreationFailureMagic
  char reason[kFailureMessageBytes];   // NUL-terminated
};
constexpr uint64_t kCreationFailureMagic = 0x5252455045454f4dULL;  // the bytes "MOEEPERR"

void PublishCreationFailure(const std::string &name, const std::string &reason,
                            double lifetime_s) {
  shm_unlink(name.c_str());
  ScopedFd fd(shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600));
  if (fd.get() < 0) return;  // best effort: the peers then wait for attach_timeout_s
  CreationFailure notice{};
  notice.magic = kCreationFailureMagic;
  std::memcpy(notice.reason, reason.data(), std::min(reason.size(), kFailureMessageBytes - 1));
  if (write(fd.get(), &notice, sizeof(notice)) != static_cast<ssize_t>(sizeof(notice))) {
    shm_unlink(name.c_str());
    return;
  }
  StartSegmentReaper(name, lifetime_s, /*remove_at_end=*/true);
}

bool CreationFailureNoticeExists(const std::string &name) {
  ScopedFd fd(shm_open(name.c_str(), O_RDONLY, 0));
  struct stat status {};
  return fd.get() >= 0 && fstat(fd.get(), &status) == 0 &&
         status.st_size == static_cast<off_t>(sizeof(CreationFailure));
}

// A rank waiting to attach: fails with rank 0's reason if `fd` is its creation-failure notice.
void RequireNoCreationFailure(int fd, const std::string &name) {
  struct stat status {};
  if (fstat(fd, &status) != 0 || status.st_size != static_cast<off_t>(sizeof(CreationFailure))) {
    return;
  }
  CreationFailure notice{};
  if (pread(fd, &notice, sizeof(notice), 0) == static_cast<ssize_t>(sizeof(notice)) &&
      notice.magic == kCreationFailureMagic) {
    Fail(kInternalError, "rank 0 could not create the communication window ",
         kSharedMemoryDirectory, name, ": ", PrintableText(notice.reason, kFailureMessageBytes));
  }
}

// Rank 0: creates the segment (replacing a stale one of the same name) and writes its header.
MappedSegment CreateSegment(const std::string &name, const SegmentLayout &layout,
                            const std::vector<uint8_t> &job_token) {
  shm_unlink(name.c_str());  // a leftover of a crashed job with the same name, if any
  RequireFreeSharedMemory(layout);
  ScopedFd fd(shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600));
  if (fd.get() < 0) {
    Fail(kInternalError, "creating the shared-memory segment ", name, " failed: ",
         ErrnoText(errno));
  }
  // Reserve the memory now: a full /dev/shm then fails here instead of with SIGBUS later.
  const int reserve_error = posix_fallocate(fd.get(), 0, static_cast<off_t>(layout.total_bytes));
  if (reserve_error != 0) {
    Fail(kInternalError, "reserving ", DescribeBytes(layout.total_bytes), " in ",
         kSharedMemoryDirectory, " for the communication window failed: ",
         ErrnoText(reserve_error));
  }
  MappedSegment segment(fd.get(), layout.total_bytes);
  auto *header = new (segment.bytes()) SegmentHeader();
  header->magic = kSegmentMagic;
  header->version = kLayoutVersion;
  header->world_size = static_cast<uint32_t>(layout.world_size);
  std::memcpy(header->job_token, job_token.data(), kJobTokenBytes);
  header->slot_bytes = static_cast<uint64_t>(layout.slot_bytes);
  for (int rank = 0; rank < layout.world_size; ++rank) {
    new (segment.bytes() + layout.ranks_offset + rank * sizeof(RankRecord)) RankRecord();
  }
  const size_t num_slots = static_cast<size_t>(layout.world_size) * (layout.world_size - 1);
  for (size_t slot = 0; slot < num_slots; ++slot) {
    new (segment.bytes() + layout.slots_offset + slot * layout.slot_stride) SlotHeader();
  }
  header->ready.store(1, std::memory_order_release);
  return segment;
}

// Checks that an opened segment is the one rank 0 created for this job. Returns the mapping,
// or nothing with `problem` saying why the segment is not (or not yet) usable.
std::optional<MappedSegment> InspectSegment(int fd, const SegmentLayout &layout,
                                            const std::vector<uint8_t> &job_token,
                                            std::string &problem) {
  struct stat status {};
  if (fstat(fd, &status) != 0) {
    problem = "fstat failed: " + ErrnoText(errno);
    return std::nullopt;
  }
  if (status.st_uid != geteuid() || (status.st_mode & 0077) != 0) {
    std::ostringstream text;
    text << "it belongs to uid " << status.st_uid << " with mode 0" << std::oct
         << (status.st_mode & 0777) << " (expected our uid and mode 0600)";
    problem = text.str();
    return std::nullopt;
  }
  if (status.st_size == 0) {
    problem = "rank 0 has not finished creating it";
    return std::nullopt;
  }
  if (static_cast<uint64_t>(status.st_size) != layout.total_bytes) {
    problem = "its size is " + std::to_string(status.st_size) + " bytes but this rank expects " +
              std::to_string(layout.total_bytes) + " (world size " +
              std::to_string(layout.world_size) + ", slot_bytes " +
              std::to_string(layout.slot_bytes) + ")";
    return std::nullopt;
  }
  MappedSegment segment(fd, layout.total_bytes);
  const auto *header = reinterpret_cast<const SegmentHeader *>(segment.bytes());
  if (header->ready.load(std::memory_order_acquire) != 1) {
    problem = "rank 0 has not finished writing its header";
  } else if (header->magic != kSegmentMagic) {
    problem = "its header has the wrong magic number (not a moe-ep communication window)";
  } else if (header->version != kLayoutVersion) {
    problem = "its layout version is " + std::to_string(header->version) + ", expected " +
              std::to_string(kLayoutVersion);
  } else if (header->world_size != static_cast<uint32_t>(layout.world_size)) {
    problem = "its world size is " + std::to_string(header->world_size) + ", expected " +
              std::to_string(layout.world_size);
  } else if (std::memcmp(header->job_token, job_token.data(), kJobTokenBytes) != 0) {
    problem = "its job token differs (it belongs to another or an earlier job)";
  } else if (header->slot_bytes != static_cast<uint64_t>(layout.slot_bytes)) {
    problem = "its slot size is " + std::to_string(header->slot_bytes) + " bytes, expected " +
              std::to_string(layout.slot_bytes);
  } else {
    return segment;
  }
  return std::nullopt;
}

// Ranks other than 0: waits for rank 0's segment and attaches to it after validating it.
MappedSegment AttachSegment(const std::string &name, const SegmentLayout &layout,
                            const std::vector<uint8_t> &job_token, double deadline,
                            double attach_timeout_s) {
  std::string problem = "it does not exist";
  while (true) {
    ScopedFd fd(shm_open(name.c_str(), O_RDWR, 0));
    if (fd.get() >= 0) {
      RequireNoCreationFailure(fd.get(), name);
      std::optional<MappedSegment> segment = InspectSegment(fd.get(), layout, job_token, problem);
      if (segment) return std::move(*segment);
    } else if (errno != ENOENT) {
      problem = "opening it failed: " + ErrnoText(errno);
    }
    if (SecondsSinceStart() > deadline) {
      Fail(kInternalError, "could not attach to the communication window ", kSharedMemoryDirectory,
           name, " within ", DescribeSeconds(attach_timeout_s), " (attach_timeout_s): ", problem);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
}

// ---------------------------------------------------------------------------------------------
// The window
// ---------------------------------------------------------------------------------------------

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

// Lets processes of our user read this process's memory with process_vm_readv where Yama's
// ptrace_scope = 1 would restrict that to our ancestors (the ranks are siblings). This widens
// what other processes of the same user may do to this one (ptrace attach included), which is
// the price of the single copy; MOE_EP_WINDOW_TRANSPORT=slots avoids it.
void AllowSiblingsToReadMemory() {
  std::ifstream scope_file("/proc/sys/kernel/yama/ptrace_scope");
  int scope = 0;
  if (scope_file >> scope && scope == 1) prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY, 0, 0, 0);
}

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

std::string SharedMemoryWindow::Where() const {
  std::ostringstream text;
  text << " [window " << id_ << ", rank " << options_.rank << " of " << options_.world_size
       << "]";
  return text.str();
}

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

bool SharedMemoryWindow::TakeAcknowledgement(int peer, PeerProgress &progress) {
  const SlotHeader &message = slot_header(options_.rank, peer);
  if (message.consumed.load(std::memory_order_acquire) !=
      message.published.load(std::memory_order_relaxed)) {
    return false;  // the peer is still reading
  }
  progress.awaiting_ack = false;
  return true;
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

// ---------------------------------------------------------------------------------------------
// Registry of open windows (indexed by the id handed to Python and to the kernels)
// ---------------------------------------------------------------------------------------------

class WindowRegistry {
 public:
  static WindowRegistry &Instance() {
    static WindowRegistry registry;
    return registry;
  }

  int64_t ReserveId() {
    std::lock_guard<std::mutex> lock(mutex_);
    return next_id_++;
  }

  void Add(int64_t id, std::shared_ptr<SharedMemoryWindow> window) {
    std::lock_guard<std::mutex> lock(mutex_);
    windows_[id] = std::move(window);
  }

  std::shared_ptr<SharedMemoryWindow> Find(int64_t id) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto found = windows_.find(id);
    if (found == windows_.end()) {
      Fail(kInvalidArgument, "communication window ", id, " is not open in this process");
    }
    return found->second;
  }

  // Abandons every open window (see CommWindow::Abandon); windows already failed keep their
  // first failure.
  void AbandonAll(const std::string &reason) {
    std::vector<std::shared_ptr<SharedMemoryWindow>> open;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (const auto &entry : windows_) open.push_back(entry.second);
    }
    for (const auto &window : open) window->Abandon(reason);
  }

  size_t Count() {
    std::lock_guard<std::mutex> lock(mutex_);
    return windows_.size();
  }

  void Remove(int64_t id) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (windows_.erase(id) == 0) {
      Fail(kInvalidArgument, "communication window ", id, " is not open in this process");
    }
  }

 private:
  std::mutex mutex_;
  std::map<int64_t, std::shared_ptr<SharedMemoryWindow>> windows_;
  int64_t next_id_ = 0;
};

int64_t OpenWindow(const WindowOptions &options) {
  ValidateOptions(options);
  const double deadline = SecondsSinceStart() + options.attach_timeout_s;
  const SegmentLayout layout(options.world_size, options.slot_bytes);
  const std::vector<uint8_t> job_token = ParseJobToken(options.job_token_hex);
  const std::string name = kSegmentNamePrefix + options.job_token_hex;
  try {
    std::optional<MappedSegment> created;
    if (options.rank == 0) {
      try {
        created.emplace(CreateSegment(name, layout, job_token));
      } catch (const KernelError &error) {
        if (options.world_size > 1) {
          PublishCreationFailure(name, error.what(), options.attach_timeout_s + 5.0);
        }
        throw;
      }
    }
    MappedSegment segment =
        options.rank == 0
            ? std::move(*created)
            : AttachSegment(name, layout, job_token, deadline, options.attach_timeout_s);
    if (options.rank == 0 && options.world_size > 1) {
      StartSegmentReaper(name, options.attach_timeout_s + 5.0);
    }
    const int64_t id = WindowRegistry::Instance().ReserveId();
    auto window = std::make_shared<SharedMemoryWindow>(id, options, layout, std::move(segment));
    window->JoinGroup(deadline);
    window->AgreeOnTransport(deadline);
    shm_unlink(name.c_str());  // all ranks hold a mapping: the name is no longer needed
    WindowRegistry::Instance().Add(id, std::move(window));
    return id;
  } catch (...) {
    // Never leave a half-built window in /dev/shm (a creation-failure notice stays for the
    // peers until its watcher removes it).
    if (options.rank != 0 || !CreationFailureNoticeExists(name)) shm_unlink(name.c_str());
    throw;
  }
}

}  // namespace

// Any failed kernel of this process abandons its open windows: the process will not reach its
// next exchange (PyNative stops the step, GRAPH_MODE stops the graph), so peers waiting there
// get the reason at once. This covers kernels that have no window of their own, e.g. the
// prefill layout kernel rejecting an expert id.
const bool kernel_failures_abandon_windows = [] {
  SetKernelFailureListener(
      [](const std::string &reason) { WindowRegistry::Instance().AbandonAll(reason); });
  return true;
}();

std::shared_ptr<CommWindow> FindCommWindow(int64_t window_id) {
  return WindowRegistry::Instance().Find(window_id);
}

}  // namespace moe_ep

// ---------------------------------------------------------------------------------------------
// C interface for Python (ctypes). Failures return -1 and set MoeEpLastError().
// ---------------------------------------------------------------------------------------------

// Opens (rank 0: creates) the window of a group and waits until every rank has attached.
// `allow_single_copy` = 0 makes rows always travel through the slots. Returns the window id
// (>= 0) or -1.
MOE_EP_EXPORT int64_t MoeEpWindowOpen(const char *job_token_hex, int world_size, int rank,
                                      int64_t slot_bytes, double timeout_s,
                                      double attach_timeout_s, const char *timeout_setting,
                                      int allow_single_copy) {
  int64_t window_id = -1;
  const int status = moe_ep::RunKernel("MoeEpWindowOpen", [&] {
    moe_ep::WindowOptions options;
    options.job_token_hex = job_token_hex;
    options.world_size = world_size;
    options.rank = rank;
    options.slot_bytes = slot_bytes;
    options.timeout_s = timeout_s;
    options.attach_timeout_s = attach_timeout_s;
    options.timeout_setting = timeout_setting;
    options.allow_single_copy = allow_single_copy != 0;
    window_id = moe_ep::OpenWindow(options);
  });
  return status == 0 ? window_id : -1;
}

// Closes a window in this process (its memory is released once every rank closed or exited).
MOE_EP_EXPORT int MoeEpWindowClose(int64_t window_id) {
  return moe_ep::RunKernel("MoeEpWindowClose",
                           [&] { moe_ep::WindowRegistry::Instance().Remove(window_id); });
}

// Marks a window's next step as failed for `reason` (the peers waiting in it get the reason at
// once); the window is unusable afterwards. For failures found in Python before any exchange.
MOE_EP_EXPORT int MoeEpWindowAbandon(int64_t window_id, const char *reason) {
  return moe_ep::RunKernel("MoeEpWindowAbandon", [&] {
    moe_ep::WindowRegistry::Instance().Find(window_id)->Abandon(reason ? reason : "");
  });
}

// The number of windows open in this process.
MOE_EP_EXPORT int64_t MoeEpOpenWindowCount() {
  return static_cast<int64_t>(moe_ep::WindowRegistry::Instance().Count());
}

// Bytes of /dev/shm a window of `world_size` ranks with `slot_bytes` slots occupies.
MOE_EP_EXPORT int64_t MoeEpWindowSegmentBytes(int world_size, int64_t slot_bytes) {
  return static_cast<int64_t>(moe_ep::SegmentLayout(world_size, slot_bytes).total_bytes);
}

// The number of exchange steps this rank has entered on a window, or -1.
MOE_EP_EXPORT int64_t MoeEpWindowStep(int64_t window_id) {
  int64_t step = -1;
  moe_ep::RunKernel("MoeEpWindowStep", [&] {
    step = static_cast<int64_t>(moe_ep::WindowRegistry::Instance().Find(window_id)->step());
  });
  return step;
}

// How rows travel between this rank and its peers: 2 = all by single copy (process_vm_readv),
// 1 = some pairs by single copy and some through slots, 0 = all through slots; -1 on error.
// A group of one reports what it would receive by.
MOE_EP_EXPORT int MoeEpWindowTransport(int64_t window_id) {
  int transport = -1;
  moe_ep::RunKernel("MoeEpWindowTransport", [&] {
    const auto window = moe_ep::WindowRegistry::Instance().Find(window_id);
    const bool receives_by_address = window->receive_transport() == moe_ep::kSingleCopy;
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
