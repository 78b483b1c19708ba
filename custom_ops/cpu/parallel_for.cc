// The worker pool behind ParallelFor (see parallel_for.h).
#include "parallel_for.h"

#include "kernel_common.h"

#include <pthread.h>

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace moe_ep {
namespace {

// One RunChunks call. Threads claim chunks with `next_chunk`; the caller waits for
// `finished_chunks` to reach chunk_count. A pool thread may pick a job up after every chunk is
// claimed (or even after the caller returned): it then finds nothing to claim and never touches
// run_chunk, which lives on the caller's stack. shared_ptr keeps the job itself alive.
struct Job {
  Job(int64_t chunks, const std::function<void(int64_t)> &run)
      : chunk_count(chunks), run_chunk(&run), failures(chunks) {}

  // Claims and runs chunks until none is left.
  void RunClaimedChunks() {
    for (int64_t chunk = next_chunk.fetch_add(1); chunk < chunk_count;
         chunk = next_chunk.fetch_add(1)) {
      try {
        (*run_chunk)(chunk);
      } catch (...) {
        failures[chunk] = std::current_exception();  // each chunk owns its entry
      }
      if (finished_chunks.fetch_add(1, std::memory_order_acq_rel) + 1 == chunk_count) {
        std::lock_guard<std::mutex> lock(mutex);  // the waiter checks under this mutex
        all_finished.notify_all();
      }
    }
  }

  void WaitUntilFinished() {
    std::unique_lock<std::mutex> lock(mutex);
    all_finished.wait(lock, [&] {
      return finished_chunks.load(std::memory_order_acquire) == chunk_count;
    });
  }

  const int64_t chunk_count;
  const std::function<void(int64_t)> *run_chunk;
  std::vector<std::exception_ptr> failures;
  std::atomic<int64_t> next_chunk{0};
  std::atomic<int64_t> finished_chunks{0};
  std::mutex mutex;
  std::condition_variable all_finished;
};

// Long-lived helper threads, started on first use (KernelThreadCount() - 1 of them). They sleep
// on a condition variable between jobs: no spinning, so an idle pool takes no CPU from the
// other processes of a small host.
class WorkerPool {
 public:
  // Offers `job` to up to `helper_count` idle-or-busy workers (each offer wakes one).
  void Offer(const std::shared_ptr<Job> &job, int64_t helper_count) {
    std::lock_guard<std::mutex> lock(mutex_);
    StartWorkers();
    const int64_t offers = std::min<int64_t>(helper_count, static_cast<int64_t>(workers_));
    for (int64_t i = 0; i < offers; ++i) pending_.push_back(job);
    for (int64_t i = 0; i < offers; ++i) work_available_.notify_one();
  }

  // Drops the offers of `job` no worker has taken yet (the caller has claimed every chunk).
  void Withdraw(const std::shared_ptr<Job> &job) {
    std::lock_guard<std::mutex> lock(mutex_);
    pending_.erase(std::remove(pending_.begin(), pending_.end(), job), pending_.end());
  }

 private:
  void StartWorkers() {
    const int wanted = KernelThreadCount() - 1;
    for (; workers_ < wanted; ++workers_) std::thread([this] { WorkerLoop(); }).detach();
  }

  void WorkerLoop() {
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        work_available_.wait(lock, [&] { return !pending_.empty(); });
        job = std::move(pending_.front());
        pending_.pop_front();
      }
      job->RunClaimedChunks();
    }
  }

  std::mutex mutex_;
  std::condition_variable work_available_;
  std::deque<std::shared_ptr<Job>> pending_;
  int workers_ = 0;
};

// The process's pool. It is never destroyed (its detached workers may be waiting on it at exit).
// After fork() the child has none of the parent's threads, and the parent's pool may be locked
// forever, so the child forgets it (leaks it) and starts a fresh one on first use.
std::atomic<WorkerPool *> process_pool{nullptr};

void ForgetPoolInChild() { process_pool.store(nullptr); }

WorkerPool &Pool() {
  WorkerPool *pool = process_pool.load(std::memory_order_acquire);
  if (pool != nullptr) return *pool;
  static std::once_flag fork_handler_installed;
  std::call_once(fork_handler_installed,
                 [] { pthread_atfork(nullptr, nullptr, ForgetPoolInChild); });
  auto *created = new WorkerPool();
  if (!process_pool.compare_exchange_strong(pool, created, std::memory_order_acq_rel)) {
    delete created;  // another thread installed one first
    return *pool;
  }
  return *created;
}

}  // namespace

namespace {
// Set by MoeEpSetDefaultThreadCount before the first kernel runs (0: none).
std::atomic<int> default_thread_count{0};
}  // namespace

int KernelThreadCount() {
  static const int thread_count = [] {
    if (const char *requested = std::getenv("MOE_EP_NUM_THREADS")) {
      const int value = std::atoi(requested);
      if (value > 0) return value;
    }
    if (default_thread_count.load() > 0) return default_thread_count.load();
    const unsigned cores = std::thread::hardware_concurrency();
    return cores > 0 ? static_cast<int>(cores) : 1;
  }();
  return thread_count;
}

void RunChunks(int64_t chunk_count, int64_t helper_count,
               const std::function<void(int64_t)> &run_chunk) {
  if (chunk_count <= 0) return;
  auto job = std::make_shared<Job>(chunk_count, run_chunk);
  WorkerPool &pool = Pool();
  if (helper_count > 0 && chunk_count > 1) pool.Offer(job, helper_count);
  job->RunClaimedChunks();  // the caller starts at once, whatever the helpers do
  pool.Withdraw(job);
  job->WaitUntilFinished();  // chunks a helper claimed but has not finished yet
  for (const std::exception_ptr &failure : job->failures) {
    if (failure) std::rethrow_exception(failure);
  }
}

}  // namespace moe_ep

// The kernel thread count to use when MOE_EP_NUM_THREADS is not set (the Python side passes the
// usable cores shared by the ranks on this host, host_defaults.py). Effective only before the
// first kernel asks for the count; returns the count in force afterwards.
MOE_EP_EXPORT int MoeEpSetDefaultThreadCount(int threads) {
  if (threads > 0) moe_ep::default_thread_count.store(threads);
  return moe_ep::KernelThreadCount();
}
