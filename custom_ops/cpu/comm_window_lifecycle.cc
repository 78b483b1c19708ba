// Creating, attaching to and cleaning up a window's shared-memory segment (see
// comm_window_lifecycle.h).
#include "comm_window_lifecycle.h"

#include <fcntl.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <new>
#include <optional>
#include <sstream>
#include <thread>

#include "comm_window_clock.h"
#include "kernel_common.h"

namespace moe_ep::comm {

std::string ErrnoText(int error_number) { return std::strerror(error_number); }

namespace {

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

}  // namespace

MappedSegment::MappedSegment(int fd, size_t size) : size_(size) {
  void *address = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (address == MAP_FAILED) {
    Fail(kInternalError, "mapping the communication window (", DescribeBytes(size),
         ") failed: ", ErrnoText(errno));
  }
  address_ = static_cast<uint8_t *>(address);
}

MappedSegment::~MappedSegment() {
  if (address_ != nullptr) munmap(address_, size_);
}

namespace {

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

// What rank 0 leaves under the segment's name when it cannot create the window, so that the
// ranks waiting to attach fail at once with its reason instead of after attach_timeout_s.
struct CreationFailure {
  uint64_t magic;                      // kCreationFailureMagic
  char reason[kFailureMessageBytes];   // NUL-terminated
};
constexpr uint64_t kCreationFailureMagic = 0x5252455045454f4dULL;  // the bytes "MOEEPERR"

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

}  // namespace

void StartSegmentReaper(const std::string &name, double lifetime_s, bool remove_at_end) {
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

}  // namespace moe_ep::comm
