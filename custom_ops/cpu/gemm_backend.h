// Row-major GEMM for the grouped-matmul kernels: C = op(A) * op(B), op = identity or transpose,
// always with a float32 result (float32 accumulation).
//
// float32 uses oneDNN's dnnl_sgemm and bfloat16 its dnnl_gemm_bf16bf16f32, from the libdnnl.so.3
// that ships with MindSpore. The library is not linked at build time: it is looked up in the
// running process (dlsym(RTLD_DEFAULT)) and otherwise opened from the path in the environment
// variable MOE_EP_DNNL_LIBRARY (set by mindspore_moe_ep/ops/kernel_library.py). Without it a plain
// C++ loop is used. oneDNN's bfloat16 GEMM is only used on CPUs with AVX-512 (elsewhere it falls
// back to a very slow reference path); otherwise bfloat16, like float16, is converted to float32.
#ifndef MOE_EP_GEMM_BACKEND_H_
#define MOE_EP_GEMM_BACKEND_H_

#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

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

// C = op(A) op(B). Throws a KernelError if oneDNN reports an error.
void Gemm(const GemmProblem &problem, const float *a, const float *b, float *c);
// Only valid when HasFastBFloat16Gemm().
void Gemm(const GemmProblem &problem, const BFloat16 *a, const BFloat16 *b, float *c);

// Whether bfloat16 inputs can be multiplied directly (oneDNN found, CPU with AVX-512).
bool HasFastBFloat16Gemm();

// Runs compute(a, b, out) where a and b hold the inputs in an element type Gemm() accepts
// (T itself when possible, else float32 copies of their first a_count / b_count elements) and
// out is a float32 buffer of out_count elements, which compute must fill, then stores out into
// the first out_count elements of `destination` as T. For float32 nothing is copied.
template <typename T, typename Compute>
void ComputeWithGemmTypes(const T *a, int64_t a_count, const T *b, int64_t b_count,
                          T *destination, int64_t out_count, Compute &&compute) {
  if constexpr (std::is_same_v<T, float>) {
    compute(a, b, destination);
  } else {
    const std::unique_ptr<float[]> out_buffer(new float[out_count]);  // not zero-filled
    float *out = out_buffer.get();
    bool computed = false;
    if constexpr (std::is_same_v<T, BFloat16>) {
      if (HasFastBFloat16Gemm()) {
        compute(a, b, out);
        computed = true;
      }
    }
    if (!computed) {
      std::vector<float> a_float(a_count), b_float(b_count);
      ConvertArray(a, a_count, a_float.data());
      ConvertArray(b, b_count, b_float.data());
      compute(a_float.data(), b_float.data(), out);
    }
    ConvertArray(out, out_count, destination);
  }
}

}  // namespace moe_ep

#endif  // MOE_EP_GEMM_BACKEND_H_
