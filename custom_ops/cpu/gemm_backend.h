// Row-major GEMM for the grouped-matmul kernels: C = op(A) * op(B), op = identity or transpose,
// with float32 accumulation for every element type.
//
// float32 uses oneDNN's dnnl_sgemm and bfloat16 its dnnl_gemm_bf16bf16f32, from the libdnnl.so.3
// that ships with MindSpore. The library is not linked at build time: it is looked up in the
// running process (dlsym(RTLD_DEFAULT)) and otherwise opened from the path in the environment
// variable MOE_EP_DNNL_LIBRARY (set by mindspore_moe_ep/ops/kernel_library.py). Without it a plain
// C++ loop is used. bfloat16 products run either "direct" (oneDNN's bfloat16 GEMM) or
// "converted" (widened to float32 panel by panel, like float16; see Gemm below), whichever is
// faster on the CPU, by a fixed rule (never a timing: the two paths round differently, and every
// process on a machine must take the same one): direct only where oneDNN uses AMX (its effective
// ISA, dnnl_get_effective_cpu_isa) and the kernels' ISA is AVX-512; measured, the direct GEMM
// beats the float32 one only with AMX, not where bfloat16 is emulated or with AVX512-BF16 alone.
// MOE_EP_BF16_GEMM=direct|converted|auto (default) overrides the choice.
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

// The problem of contiguous row-major operands: A [m, k] (or [k, m]), B [k, n] (or [n, k]) and
// C [m, n] with no gaps between rows, so the row strides follow from the shapes.
inline GemmProblem ContiguousGemm(int64_t m, int64_t n, int64_t k, bool trans_a = false,
                                  bool trans_b = false) {
  GemmProblem problem;
  problem.trans_a = trans_a;
  problem.trans_b = trans_b;
  problem.m = m;
  problem.n = n;
  problem.k = k;
  problem.lda = trans_a ? m : k;
  problem.ldb = trans_b ? k : n;
  problem.ldc = n;
  return problem;
}

// C = op(A) op(B). Throws a KernelError if oneDNN reports an error.
void Gemm(const GemmProblem &problem, const float *a, const float *b, float *c);

// The same for 16-bit storage types: every product and sum is computed in float32 (the inputs
// are widened exactly) and each result is rounded once to the storage type. Without a fast
// bfloat16 GEMM the inputs are converted to float32 in cache-sized pieces: op(A) once, B and C
// in panels of columns, so no float32 copy of a whole operand is made.
void Gemm(const GemmProblem &problem, const BFloat16 *a, const BFloat16 *b, BFloat16 *c);
void Gemm(const GemmProblem &problem, const Float16 *a, const Float16 *b, Float16 *c);

// Whether bfloat16 inputs are multiplied directly (see the top of this file).
bool HasFastBFloat16Gemm();

}  // namespace moe_ep

#endif  // MOE_EP_GEMM_BACKEND_H_
