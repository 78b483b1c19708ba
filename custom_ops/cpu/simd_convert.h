// AVX2 conversions between the storage types (float32, float16, bfloat16) and float32 lanes,
// shared by the kernels' vector paths. The library is built for x86-64-v2: every function here
// carries MOE_EP_AVX2 and callers must be MOE_EP_AVX2 functions chosen at run time with
// CpuHasAvx2F16c() (kernel_common.h).
#ifndef MOE_EP_SIMD_CONVERT_H_
#define MOE_EP_SIMD_CONVERT_H_

#include <immintrin.h>

#include "kernel_common.h"

namespace moe_ep {

// 16 elements as two vectors of 8 floats.
//
// Load16 widens 16 elements exactly into two __m256 (bfloat16: in an order of its own, which
// Store16 undoes); Store16 rounds them back like FromFloat (to nearest even, NaN stays a quiet
// NaN). With `streaming`, Store16 uses non-temporal stores and `out` must be 16-byte aligned.
#define MOE_EP_AVX2 __attribute__((target("avx2,f16c")))

MOE_EP_AVX2 inline void Stream16Bytes(void *out, __m128i bits) {
  _mm_stream_si128(static_cast<__m128i *>(out), bits);
}

MOE_EP_AVX2 inline void Load16(const float *in, __m256 &first, __m256 &second) {
  first = _mm256_loadu_ps(in);
  second = _mm256_loadu_ps(in + 8);
}

MOE_EP_AVX2 inline void Store16(float *out, __m256 first, __m256 second, bool streaming) {
  if (streaming) {
    _mm_stream_ps(out, _mm256_castps256_ps128(first));
    _mm_stream_ps(out + 4, _mm256_extractf128_ps(first, 1));
    _mm_stream_ps(out + 8, _mm256_castps256_ps128(second));
    _mm_stream_ps(out + 12, _mm256_extractf128_ps(second, 1));
  } else {
    _mm256_storeu_ps(out, first);
    _mm256_storeu_ps(out + 8, second);
  }
}

// Stores 16 x 16 bits (two halves of 8).
MOE_EP_AVX2 inline void Store16Bits(void *out, __m256i bits, bool streaming) {
  if (streaming) {
    Stream16Bytes(out, _mm256_castsi256_si128(bits));
    Stream16Bytes(static_cast<uint8_t *>(out) + 16, _mm256_extracti128_si256(bits, 1));
  } else {
    _mm256_storeu_si256(static_cast<__m256i *>(out), bits);
  }
}

MOE_EP_AVX2 inline void Load16(const Float16 *in, __m256 &first, __m256 &second) {
  first = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(in)));
  second = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(in + 8)));
}

// F16C rounds to nearest even (immediate rounding mode), overflows to infinity and keeps a NaN
// quiet with its top mantissa bits: the same as FromFloat<Float16>.
MOE_EP_AVX2 inline void Store16(Float16 *out, __m256 first, __m256 second, bool streaming) {
  const __m256i bits =
      _mm256_set_m128i(_mm256_cvtps_ph(second, _MM_FROUND_TO_NEAREST_INT),
                       _mm256_cvtps_ph(first, _MM_FROUND_TO_NEAREST_INT));
  Store16Bits(out, bits, streaming);
}

// bfloat16: `even` holds elements 0, 2, 4, ... and `odd` elements 1, 3, 5, ... Each is a float32
// whose upper half is the bfloat16 (even: the 32-bit lane shifted left by 16, done as a byte
// shuffle, which runs on more ports than a shift on AMD Zen; odd: the lane with its low half
// cleared). Fewer instructions per element than zero-extending 8 values at a time.
MOE_EP_AVX2 inline void Load16(const BFloat16 *in, __m256 &even, __m256 &odd) {
  const __m256i even_to_upper_half = _mm256_setr_epi8(
      -1, -1, 0, 1, -1, -1, 4, 5, -1, -1, 8, 9, -1, -1, 12, 13,
      -1, -1, 0, 1, -1, -1, 4, 5, -1, -1, 8, 9, -1, -1, 12, 13);
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(in));
  even = _mm256_castsi256_ps(_mm256_shuffle_epi8(bits, even_to_upper_half));
  odd = _mm256_and_ps(_mm256_castsi256_ps(bits),
                      _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}

// 8 floats -> 8 x 32 bits whose upper halves are FromFloat<BFloat16> (lower halves: garbage).
MOE_EP_AVX2 inline __m256i RoundToBFloat16UpperHalves(__m256 values) {
  const __m256i bits = _mm256_castps_si256(values);
  // bits + 0x7fff + (lowest kept bit): round to nearest, ties to even
  const __m256i lowest_kept_bit =
      _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lowest_kept_bit));
  // NaN (|bits| above infinity's): keep the upper half, with the quiet bit set
  const __m256i magnitude = _mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff));
  const __m256i is_nan = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x7f800000));
  const __m256i quiet_nan = _mm256_or_si256(bits, _mm256_set1_epi32(0x00400000));
  return _mm256_blendv_epi8(rounded, quiet_nan, is_nan);
}

MOE_EP_AVX2 inline void Store16(BFloat16 *out, __m256 even, __m256 odd, bool streaming) {
  const __m256i even_halves = _mm256_srli_epi32(RoundToBFloat16UpperHalves(even), 16);
  const __m256i odd_halves = RoundToBFloat16UpperHalves(odd);
  Store16Bits(out, _mm256_blend_epi16(even_halves, odd_halves, 0xaa), streaming);
}

}  // namespace moe_ep

#endif  // MOE_EP_SIMD_CONVERT_H_
