// The kernels' parallel loop: a few long-lived worker threads that share a loop in small chunks.
//
// Why not one std::thread per share: starting and joining a thread costs ~20-100 us, and on a
// small host shared with other processes (4 expert-parallel ranks on 2 cores, say) the helper
// thread may not run for a while; with one fixed share per thread the caller then waits idle for
// the slowest share. Here the loop is cut into a few chunks per thread and every thread, the
// caller included, claims the next unclaimed chunk until none is left: a helper that starts late
// simply does fewer chunks, and the caller never waits for a chunk nobody has started.
// Which thread runs a chunk does not change what it computes, so results are deterministic.
#ifndef MOE_EP_PARALLEL_FOR_H_
#define MOE_EP_PARALLEL_FOR_H_

#include <algorithm>
#include <cstdint>
#include <functional>

namespace moe_ep {

// Number of threads kernels may use (caller included): MOE_EP_NUM_THREADS if set, else the
// core count.
int KernelThreadCount();

// The smallest share of a memory-bound loop worth a thread of its own: items of
// `bytes_per_item` bytes adding up to 256 KiB.
inline int64_t MinItemsPerThread(int64_t bytes_per_item) {
  constexpr int64_t kMinBytesPerThread = int64_t{1} << 18;
  return std::max<int64_t>(1, kMinBytesPerThread / std::max<int64_t>(1, bytes_per_item));
}

// Runs run_chunk(0) ... run_chunk(chunk_count - 1), each exactly once, on the calling thread and
// up to `helper_count` pool threads. Returns when all have finished; rethrows the exception of the
// lowest failing chunk, if any (the other chunks still run).
void RunChunks(int64_t chunk_count, int64_t helper_count,
               const std::function<void(int64_t)> &run_chunk);

// Runs body(begin, end) over disjoint ranges covering [0, count), in parallel when there are at
// least two threads' worth of items (`min_items_per_thread` each). The ranges depend only on
// `count` and the thread count, never on timing, so a body that writes only outputs owned by its
// range gives the same result on every run. The first exception thrown by a body is rethrown.
template <typename Body>
void ParallelFor(int64_t count, int64_t min_items_per_thread, Body &&body) {
  if (count <= 0) return;
  const int64_t useful_threads = count / std::max<int64_t>(min_items_per_thread, 1);
  const int64_t thread_count = std::min<int64_t>(KernelThreadCount(), useful_threads);
  if (thread_count <= 1) {
    body(int64_t{0}, count);
    return;
  }
  // A few chunks per thread: enough to even out a late helper, few enough that each chunk is
  // still long (>= a quarter of the minimum share).
  constexpr int64_t kChunksPerThread = 4;
  const int64_t chunk_count = std::min(count, thread_count * kChunksPerThread);
  RunChunks(chunk_count, thread_count - 1, [&](int64_t chunk) {
    body(count * chunk / chunk_count, count * (chunk + 1) / chunk_count);
  });
}

}  // namespace moe_ep

#endif  // MOE_EP_PARALLEL_FOR_H_
