// Row-major GEMM for the grouped-matmul kernels: C = op(A) * op(B), op = identity or transpose.
//
// float32 and bfloat16 use oneDNN (dnnl_sgemm, dnnl_gemm_bf16bf16f32) from the libdnnl.so.3 that
// ships with MindSpore. The library is not linked at build time: it is looked up in the running
// process (dlsym(RTLD_DEFAULT)) and otherwise opened from the path in the environment variable
// MOE_EP_DNNL_LIBRARY (set by mindspore_moe_ep/ops/kernel_library.py). Without it a plain C++
// loop is used. float16 is converted to float32 and multiplied with the float32 GEMM.
// All variants accumulate in float32.
#ifndef MOE_EP_GEMM_BACKEND_H_
#define MOE_EP_GEMM_BACKEND_H_

#include <cstdint>

#include "kernel_common.h"

namespace moe_ep {

// Sizes of C [m, n] = op(A) [m, k] * op(B) [k, n]; ld* are row strides in elements.
// A is stored [m, k] (or [k, m] if trans_a), B is stored [k, n] (or [n, k] if trans_b).
struct GemmProblem {
  bool trans_a = false;
  bool trans_b = false;
  int64_t m = 0, n = 0, k = 0;
  int64_t lda = 0, ldb = 0, ldc = 0;
};

// C = op(A) op(B) with float32 output; these fail with a KernelError if oneDNN reports an error.
void GemmFloat32(const GemmProblem &problem, const float *a, const float *b, float *c);
void GemmBFloat16(const GemmProblem &problem, const BFloat16 *a, const BFloat16 *b, float *c);

// C = op(A) op(B) for any supported element type (C has the type of A and B).
template <typename T>
void Gemm(const GemmProblem &problem, const T *a, const T *b, T *c);

}  // namespace moe_ep

#endif  // MOE_EP_GEMM_BACKEND_H_
