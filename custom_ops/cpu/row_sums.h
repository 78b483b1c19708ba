// Float32 sums of rows of any storage type (float32, float16, bfloat16): the accumulation of the
// row-wise experts' weighted outputs, and of the partial sums a source gets back from its expert
// ranks.
//
// A sum is a float32 row of `hidden` elements. On AVX2 CPUs each run of 16 elements is kept in
// Load16's lane order (for bfloat16, evens then odds), which RoundRow's Store16 undoes; the last
// hidden % 16 elements, and every element without AVX2, are in plain order. So a sum is read
// only through RoundRow, and for float32 (whose lane order is the plain one) the sum may be the
// output row itself.
#ifndef MOE_EP_ROW_SUMS_H_
#define MOE_EP_ROW_SUMS_H_

#include <cstdint>

#include "kernel_common.h"
#include "simd_convert.h"

namespace moe_ep {

template <typename T>
MOE_EP_AVX2 void AddWeightedRowAvx2(const T *row, float weight, int64_t hidden, float *sum) {
  const __m256 w = _mm256_set1_ps(weight);
  int64_t h = 0;
  for (; h + 16 <= hidden; h += 16) {
    __m256 first, second;
    Load16(row + h, first, second);
    _mm256_storeu_ps(sum + h, _mm256_add_ps(_mm256_loadu_ps(sum + h), _mm256_mul_ps(w, first)));
    _mm256_storeu_ps(sum + h + 8,
                     _mm256_add_ps(_mm256_loadu_ps(sum + h + 8), _mm256_mul_ps(w, second)));
  }
  for (; h < hidden; ++h) sum[h] += weight * ToFloat(row[h]);
}

template <typename T>
MOE_EP_AVX2 void RoundRowAvx2(const float *sum, int64_t hidden, T *out) {
  int64_t h = 0;
  for (; h + 16 <= hidden; h += 16) {
    Store16(out + h, _mm256_loadu_ps(sum + h), _mm256_loadu_ps(sum + h + 8), /*streaming=*/false);
  }
  for (; h < hidden; ++h) out[h] = FromFloat<T>(sum[h]);
}

// sum += weight * row (multiply, then add, in float32).
template <typename T>
void AddWeightedRow(const T *row, float weight, int64_t hidden, float *sum) {
  if (CpuHasAvx2F16c()) return AddWeightedRowAvx2(row, weight, hidden, sum);
  for (int64_t h = 0; h < hidden; ++h) sum[h] += weight * ToFloat(row[h]);
}

// out = sum, rounded once to T.
template <typename T>
void RoundRow(const float *sum, int64_t hidden, T *out) {
  if (CpuHasAvx2F16c()) return RoundRowAvx2(sum, hidden, out);
  for (int64_t h = 0; h < hidden; ++h) out[h] = FromFloat<T>(sum[h]);
}

}  // namespace moe_ep

#endif  // MOE_EP_ROW_SUMS_H_
