// Per-thread scratch memory of the kernels (scratch.h).
#include "scratch.h"

#include <memory>

namespace moe_ep {

uint8_t *ScratchBytes(Scratch purpose, int64_t bytes) {
  struct Buffer {
    std::unique_ptr<uint8_t[]> data;
    int64_t size = 0;
  };
  thread_local Buffer buffers[static_cast<int>(Scratch::kCount)];
  Buffer &buffer = buffers[static_cast<int>(purpose)];
  if (bytes > buffer.size) {
    buffer.data.reset(new uint8_t[bytes]);  // not value-initialised: no page is touched here
    buffer.size = bytes;
  }
  return buffer.data.get();
}

}  // namespace moe_ep
