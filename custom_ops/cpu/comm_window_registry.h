// The windows open in this process, by the integer id handed to Python and to the kernels, and
// opening one (MoeEpWindowOpen).
#ifndef MOE_EP_COMM_WINDOW_REGISTRY_H_
#define MOE_EP_COMM_WINDOW_REGISTRY_H_

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "comm_window_shared_memory.h"
#include "kernel_common.h"

namespace moe_ep::comm {

// The open windows, indexed by the id handed to Python and to the kernels.
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

// Opens (rank 0: creates) the window of a group, waits until every rank has attached and agreed
// on the transport, and registers it; returns its id.
int64_t OpenWindow(const WindowOptions &options);

}  // namespace moe_ep::comm

#endif  // MOE_EP_COMM_WINDOW_REGISTRY_H_
