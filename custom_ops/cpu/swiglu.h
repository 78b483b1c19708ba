// The SwiGLU activation (and its gradient) of one range of rows, shared by the grouped SwiGLU
// kernels and the row-wise experts (expert_ffn.cc).
#ifndef MOE_EP_SWIGLU_H_
#define MOE_EP_SWIGLU_H_

#include <cstdint>

#include "kernel_common.h"

namespace moe_ep {

// hidden[r] = silu(gate_up[r, :ffn]) * gate_up[r, ffn:] for rows [first, last), computed in
// float32 (AVX2 where the CPU has it) and rounded once to T (float, BFloat16 or Float16).
template <typename T>
void SwiGLURows(const T *gate_up, int64_t ffn, int64_t first, int64_t last, T *hidden);

// Its gradient for the same rows: d_gate = d_hidden * up * silu'(gate), d_up = d_hidden *
// silu(gate), into d_gate_up [rows, 2 * ffn].
template <typename T>
void SwiGLUGradRows(const T *d_hidden, const T *gate_up, int64_t ffn, int64_t first,
                    int64_t last, T *d_gate_up);

}  // namespace moe_ep

#endif  // MOE_EP_SWIGLU_H_
