// The life cycle of a window's shared-memory segment (see "Life cycle" in comm_window.h): rank 0
// creates /dev/shm/moe-ep-<job token>, with a watcher that unlinks it should rank 0 die before
// every rank attached; the other ranks attach after validating every header field; a rank 0
// that cannot create the segment leaves a creation-failure notice under its name instead, so
// that the ranks waiting to attach fail at once with its reason.
#ifndef MOE_EP_COMM_WINDOW_LIFECYCLE_H_
#define MOE_EP_COMM_WINDOW_LIFECYCLE_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "comm_window_segment.h"

namespace moe_ep::comm {

// The text of a system error number (strerror).
std::string ErrnoText(int error_number);

// A shared mapping of a whole segment, unmapped when it goes out of scope.
class MappedSegment {
 public:
  MappedSegment() = default;
  MappedSegment(int fd, size_t size);  // maps the segment; throws KernelError on failure
  ~MappedSegment();
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

// Rank 0: creates the segment (replacing a stale one of the same name) and writes its header,
// empty rank records and empty slots.
MappedSegment CreateSegment(const std::string &name, const SegmentLayout &layout,
                            const std::vector<uint8_t> &job_token);

// Ranks other than 0: waits (until `deadline`, in SecondsSinceStart) for rank 0's segment and
// attaches to it after validating it; fails at once on rank 0's creation-failure notice.
MappedSegment AttachSegment(const std::string &name, const SegmentLayout &layout,
                            const std::vector<uint8_t> &job_token, double deadline,
                            double attach_timeout_s);

// Rank 0 unlinks the segment's name once every rank has attached; if it is killed before that
// (kill -9, or msrun stopping the job while a peer is still compiling), nobody would. So the
// creator starts a detached watcher ("reaper": a shell loop in its own session, holding none of
// the creator's file descriptors) that unlinks the name as soon as the creator has exited, and
// ends as soon as the name is gone or after `lifetime_s`. It costs one short-lived process per
// window. Best effort: if /bin/sh cannot be started, the window works as before.
// With `remove_at_end` (a creation-failure notice, see PublishCreationFailure), the watcher also
// unlinks the name when its lifetime ends.
void StartSegmentReaper(const std::string &name, double lifetime_s, bool remove_at_end = false);

// Rank 0, when it cannot create the window: leaves a notice with `reason` under the segment's
// name (a watcher removes it after `lifetime_s`), so that the ranks waiting to attach fail at
// once with the reason instead of after attach_timeout_s.
void PublishCreationFailure(const std::string &name, const std::string &reason,
                            double lifetime_s);

// Whether `name` holds a creation-failure notice (which must stay for the peers).
bool CreationFailureNoticeExists(const std::string &name);

}  // namespace moe_ep::comm

#endif  // MOE_EP_COMM_WINDOW_LIFECYCLE_H_
