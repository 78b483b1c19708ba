// How a rank watches and waits for its peers on a communication window: a pidfd per peer
// process, to notice an exit at once, and the doorbell, a futex word in the rank's record that
// the peers bump after every change the rank may wait for (see "Waiting" in comm_window.h).
#ifndef MOE_EP_COMM_WINDOW_PEERS_H_
#define MOE_EP_COMM_WINDOW_PEERS_H_

#include <linux/futex.h>
#include <poll.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <ctime>
#include <vector>

#include "comm_window_clock.h"
#include "comm_window_segment.h"

namespace moe_ep::comm {

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
inline long Futex(std::atomic<uint32_t> &word, int operation, uint32_t value,
                  const timespec *timeout = nullptr) {
  static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t), "futex words are 32-bit");
  return syscall(SYS_futex, reinterpret_cast<uint32_t *>(&word), operation, value, timeout,
                 nullptr, 0);
}

// Tells a rank that something it may wait for has changed.
inline void RingDoorbell(RankRecord &record) {
  record.doorbell.fetch_add(1, std::memory_order_seq_cst);
  // Seen no sleeper: any sleeper-to-be registers after our bump, so its FUTEX_WAIT finds the
  // doorbell changed and returns at once.
  if (record.sleepers.load(std::memory_order_seq_cst) != 0) {
    Futex(record.doorbell, FUTEX_WAKE, INT32_MAX);
  }
}

// The number of CPUs this process may run on.
int UsableCpus();

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

}  // namespace moe_ep::comm

#endif  // MOE_EP_COMM_WINDOW_PEERS_H_
