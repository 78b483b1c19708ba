// Per-thread scratch memory of the kernels, kept across calls.
//
// A kernel's temporary buffers of megabytes, allocated on every call, come back from the
// allocator as fresh pages (glibc hands large blocks back to the system when they are freed),
// and every page a call touches then faults on first touch; in a VM a fault costs microseconds.
// A buffer here belongs to one purpose on one thread: it grows to the largest size asked for
// and is never freed, zeroed or otherwise touched, so only the pages that calls actually use
// become resident, once. A caller must not hold two buffers of the same purpose at a time (the
// second request may move the first).
#ifndef MOE_EP_SCRATCH_H_
#define MOE_EP_SCRATCH_H_

#include <cstdint>

namespace moe_ep {

enum class Scratch : int {
  kStagingSend,       // the fused decode operators' message rows (expert_parallel.cc)
  kStagingReceived,
  kInt8SourceRows,    // rows quantized at the source (int8_rows.h)
  kInt8ReceivedRows,  // int8 rows received, before they are dequantized
  kRoundSend,         // the fused experts + combine: a round's partial sums to send
  kRoundReceived,     // ... and the rows returned to this rank
  kRoundPartial,      // ... the round's float32 partial sums of 16-bit layers
  kTokenSums,         // float32 sums of 16-bit outputs (experts + combine, row-wise experts)
  kExpertChunks,      // the row-wise experts' per-chunk rows, gate_up and hidden (expert_ffn.cc)
  kCount
};

// `bytes` bytes of this thread's buffer for `purpose` (contents undefined).
uint8_t *ScratchBytes(Scratch purpose, int64_t bytes);

template <typename T>
T *ScratchArray(Scratch purpose, int64_t count) {
  return reinterpret_cast<T *>(ScratchBytes(purpose, count * static_cast<int64_t>(sizeof(T))));
}

}  // namespace moe_ep

#endif  // MOE_EP_SCRATCH_H_
