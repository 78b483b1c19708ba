// Per-token int8 rows: quantize and dequantize, scalar and AVX2 (the rule: int8_rows.h).
//
//   MoeEpQuantizeRows    x [T, H] (float32 / float16 / bfloat16), slot_token [M, 1] int32
//                        -> q [M, W] int32: row m holds token slot_token[m] quantized (each
//                        token quantized once, then copied to its slots; rows with
//                        slot_token -1 unspecified). The pack of the exchange's send slots.
//   MoeEpDequantizeRows  q [R*C, W] int32, row_counts [R] int32, like [1, H] (the output dtype)
//                        -> rows [R*C, H]  (rows past the counts of each block unspecified)
//   MoeEpQuantizeRoundTrip  x [T, H] -> x' [T, H]: dequantize(quantize(x)), what a row that
//                        travelled quantized holds at its destination (expert parallelism 1)
//
// W = Int8RowWords(H). The first two are the source and receiver halves of the quantized
// exchange where the rows travel through MindSpore's collectives (AllGather); over the
// shared-memory window the row-moving kernels quantize and dequantize inside their copies.
#include "int8_rows.h"

#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <sstream>
#include <string>

#include "scratch.h"
#include "simd_convert.h"

namespace moe_ep {

QuantMode QuantModeInput(const TensorArg &quant_mode) {
  const int32_t value = ScalarInput(quant_mode);
  if (value != static_cast<int32_t>(QuantMode::kNone) &&
      value != static_cast<int32_t>(QuantMode::kInt8PerToken)) {
    Fail(kInvalidArgument, quant_mode.name, " = ", value,
         " is not a quantization mode: 0 (none) or 2 (int8 per token)");
  }
  return static_cast<QuantMode>(value);
}

RowDtype RowDtypeOf(const TensorArg &tensor) {
  if (tensor.dtype == "float32") return RowDtype::kFloat32;
  if (tensor.dtype == "float16") return RowDtype::kFloat16;
  if (tensor.dtype == "bfloat16") return RowDtype::kBFloat16;
  Fail(kInvalidArgument, tensor.name, " has dtype ", tensor.dtype,
       "; expected float32, float16 or bfloat16");
}

namespace {

constexpr float kInt8Max = 127.0f;

// 16-bit values widened to float32, 8 at a time (exact, like ToFloat).
MOE_EP_AVX2 void WidenAvx2(const Float16 *in, int64_t count, float *out) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(
                                  _mm_loadu_si128(reinterpret_cast<const __m128i *>(in + i))));
  }
  for (; i < count; ++i) out[i] = ToFloat(in[i]);
}

MOE_EP_AVX2 void WidenAvx2(const BFloat16 *in, int64_t count, float *out) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m256i halves =
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(in + i)));
    _mm256_storeu_ps(out + i, _mm256_castsi256_ps(_mm256_slli_epi32(halves, 16)));
  }
  for (; i < count; ++i) out[i] = ToFloat(in[i]);
}

template <typename T>
void Widen(const T *in, int64_t count, float *out) {
  if (CpuHasAvx2F16c()) return WidenAvx2(in, count, out);
  for (int64_t i = 0; i < count; ++i) out[i] = ToFloat(in[i]);
}

// One row widened to float32 (float32 rows are read in place).
const float *RowAsFloat(const void *rows, RowDtype dtype, int64_t hidden, int64_t row,
                        float *widened) {
  if (dtype == RowDtype::kFloat32) return static_cast<const float *>(rows) + row * hidden;
  if (dtype == RowDtype::kFloat16) {
    Widen(static_cast<const Float16 *>(rows) + row * hidden, hidden, widened);
  } else {
    Widen(static_cast<const BFloat16 *>(rows) + row * hidden, hidden, widened);
  }
  return widened;
}

[[noreturn]] void FailNotFinite(const float *values, int64_t hidden, int64_t row,
                                std::string_view what) {
  int64_t column = 0;
  while (column < hidden && std::isfinite(values[column])) ++column;
  std::ostringstream value;
  value << values[column < hidden ? column : 0];
  Fail(kInvalidArgument, "dispatch.quant = int8: ", what, "[", row, ", ", column, "] = ",
       value.str(), " (token ", row, " of this rank); a row is quantized with one scale, so every "
       "value must be finite. Check the layer's input (the step sent nothing)");
}

inline int8_t QuantizeValue(float value, float scale) {
  const float q = std::nearbyint(value / scale);  // the default rounding: to nearest even
  return static_cast<int8_t>(std::max(-kInt8Max, std::min(kInt8Max, q)));
}

float AbsMaxScalar(const float *values, int64_t hidden, bool &finite) {
  float amax = 0.0f;
  finite = true;
  for (int64_t i = 0; i < hidden; ++i) {
    const float magnitude = std::fabs(values[i]);
    finite &= magnitude <= std::numeric_limits<float>::max();
    amax = std::max(amax, magnitude);
  }
  return amax;
}

void QuantizeRowScalar(const float *values, int64_t hidden, float scale, int8_t *out) {
  for (int64_t i = 0; i < hidden; ++i) out[i] = QuantizeValue(values[i], scale);
}

MOE_EP_AVX2 float AbsMaxAvx2(const float *values, int64_t hidden, bool &finite) {
  const __m256 magnitude_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 largest = _mm256_set1_ps(std::numeric_limits<float>::max());
  __m256 amax = _mm256_setzero_ps();
  __m256 all_finite = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  int64_t i = 0;
  for (; i + 8 <= hidden; i += 8) {
    const __m256 magnitude = _mm256_and_ps(_mm256_loadu_ps(values + i), magnitude_mask);
    all_finite = _mm256_and_ps(all_finite, _mm256_cmp_ps(magnitude, largest, _CMP_LE_OQ));
    amax = _mm256_max_ps(amax, magnitude);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, amax);
  float result = 0.0f;
  for (float lane : lanes) result = std::max(result, lane);
  bool tail_finite = true;
  result = std::max(result, AbsMaxScalar(values + i, hidden - i, tail_finite));
  finite = tail_finite && _mm256_movemask_ps(all_finite) == 0xff;
  return result;
}

// 8 values -> 8 int32 in [-127, 127]: round(value / scale) to nearest even, clamped. (Dividing
// costs no measurable time here: the pass is bound by reading the row; a multiply by 1 / scale
// with a division only near half-integers measured the same, 1.7 ms for 512 x 7168 values.)
MOE_EP_AVX2 inline __m256i Quantize8(const float *in, __m256 scale) {
  const __m256 rounded = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(in), scale),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_max_epi32(_mm256_set1_epi32(-127),
                          _mm256_min_epi32(_mm256_set1_epi32(127), _mm256_cvtps_epi32(rounded)));
}

MOE_EP_AVX2 void QuantizeRowAvx2(const float *values, int64_t hidden, float scale, int8_t *out) {
  const __m256 scale_lanes = _mm256_set1_ps(scale);
  // packs interleave the 128-bit lanes; this puts the 4-byte groups back in order
  const __m256i in_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  int64_t i = 0;
  for (; i + 32 <= hidden; i += 32) {
    const __m256i words = _mm256_packs_epi32(Quantize8(values + i, scale_lanes),
                                             Quantize8(values + i + 8, scale_lanes));
    const __m256i more = _mm256_packs_epi32(Quantize8(values + i + 16, scale_lanes),
                                            Quantize8(values + i + 24, scale_lanes));
    const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(words, more), in_order);
    _mm256_storeu_si256(reinterpret_cast<__m256i *>(out + i), bytes);
  }
  QuantizeRowScalar(values + i, hidden - i, scale, out + i);
}

template <typename T>
void DequantizeScalar(const int8_t *q, int64_t hidden, float scale, T *out) {
  for (int64_t i = 0; i < hidden; ++i) out[i] = FromFloat<T>(static_cast<float>(q[i]) * scale);
}

// 16 int8 values -> two vectors of 8 floats times the scale.
MOE_EP_AVX2 inline void Dequantize16(const int8_t *q, __m256 scale, __m256 &first,
                                     __m256 &second) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i *>(q));
  first = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), scale);
  second = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(bytes, 8))),
                         scale);
}

// 16 float lanes stored as 16 elements in order (float32 and float16: Store16; bfloat16 rounds
// each lane into the lower half of a 32-bit lane and packs them, since Store16's bfloat16 form
// takes even / odd lanes).
MOE_EP_AVX2 inline void StoreInOrder16(float *out, __m256 first, __m256 second) {
  Store16(out, first, second, /*streaming=*/false);
}

MOE_EP_AVX2 inline void StoreInOrder16(Float16 *out, __m256 first, __m256 second) {
  Store16(out, first, second, /*streaming=*/false);
}

MOE_EP_AVX2 inline void StoreInOrder16(BFloat16 *out, __m256 first, __m256 second) {
  const __m256i low = _mm256_srli_epi32(RoundToBFloat16UpperHalves(first), 16);
  const __m256i high = _mm256_srli_epi32(RoundToBFloat16UpperHalves(second), 16);
  const __m256i halves = _mm256_permute4x64_epi64(_mm256_packus_epi32(low, high), 0xd8);
  _mm256_storeu_si256(reinterpret_cast<__m256i *>(out), halves);
}

template <typename T>
MOE_EP_AVX2 void DequantizeAvx2(const int8_t *q, int64_t hidden, float scale, T *out) {
  const __m256 scale_lanes = _mm256_set1_ps(scale);
  int64_t i = 0;
  for (; i + 16 <= hidden; i += 16) {
    __m256 first, second;
    Dequantize16(q + i, scale_lanes, first, second);
    StoreInOrder16(out + i, first, second);
  }
  DequantizeScalar(q + i, hidden - i, scale, out + i);
}

float RowScale(const uint8_t *row, int64_t hidden) {
  float scale;
  std::memcpy(&scale, row + Int8RowBytes(hidden) - 4, sizeof(scale));
  return scale;
}

template <typename T>
void DequantizeRowAs(const uint8_t *row, int64_t hidden, T *out) {
  const int8_t *q = reinterpret_cast<const int8_t *>(row);
  const float scale = RowScale(row, hidden);
  if (CpuHasAvx2F16c()) return DequantizeAvx2(q, hidden, scale, out);
  DequantizeScalar(q, hidden, scale, out);
}

}  // namespace

void QuantizeRowsInt8(const void *rows, RowDtype dtype, int64_t hidden, int64_t first,
                      int64_t last, uint8_t *out, std::string_view what) {
  const bool avx2 = CpuHasAvx2F16c();
  const int64_t row_bytes = Int8RowBytes(hidden);
  std::unique_ptr<float[]> widened(dtype == RowDtype::kFloat32 ? nullptr : new float[hidden]);
  for (int64_t row = first; row < last; ++row) {
    const float *values = RowAsFloat(rows, dtype, hidden, row, widened.get());
    uint8_t *quantized = out + (row - first) * row_bytes;
    bool finite = true;
    const float amax = avx2 ? AbsMaxAvx2(values, hidden, finite)
                            : AbsMaxScalar(values, hidden, finite);
    if (!finite) FailNotFinite(values, hidden, row, what);
    const float scale = amax / kInt8Max;
    int8_t *q = reinterpret_cast<int8_t *>(quantized);
    if (scale == 0.0f) {  // a row of zeros (or so small that amax / 127 underflows)
      std::memset(q, 0, hidden);
    } else if (avx2) {
      QuantizeRowAvx2(values, hidden, scale, q);
    } else {
      QuantizeRowScalar(values, hidden, scale, q);
    }
    std::memset(quantized + hidden, 0, row_bytes - 4 - hidden);  // padding to 4 bytes
    std::memcpy(quantized + row_bytes - 4, &scale, sizeof(scale));
  }
}

void DequantizeRowInt8(const uint8_t *row, int64_t hidden, RowDtype dtype, void *out) {
  switch (dtype) {
    case RowDtype::kFloat32: return DequantizeRowAs(row, hidden, static_cast<float *>(out));
    case RowDtype::kFloat16: return DequantizeRowAs(row, hidden, static_cast<Float16 *>(out));
    case RowDtype::kBFloat16: return DequantizeRowAs(row, hidden, static_cast<BFloat16 *>(out));
  }
}

bool HoldsInt8Rows(const TensorArg &rows, int64_t hidden) {
  if (rows.dtype != "int32") return false;
  rows.RequireRank(2);
  rows.RequireDim(1, Int8RowWords(hidden), "ceil(hidden / 4) + 1 words per quantized row");
  return true;
}

void TravellingRows::Land(const uint8_t *travelled, uint8_t *destination) const {
  if (quantized) {
    DequantizeRowInt8(travelled, hidden, dtype, destination);
  } else {
    std::memcpy(destination, travelled, row_bytes);
  }
}

TravellingRows RowsToSend(const TensorArg &x, QuantMode mode) {
  x.RequireRank(2);
  TravellingRows rows;
  rows.count = x.dim(0);
  rows.hidden = x.dim(1);
  rows.dtype = RowDtypeOf(x);
  rows.quantized = mode == QuantMode::kInt8PerToken;
  if (!rows.quantized) {
    rows.rows = x.data_as<const uint8_t>();
    rows.row_bytes = rows.landed_row_bytes();
    return rows;
  }
  rows.row_bytes = Int8RowBytes(rows.hidden);
  uint8_t *quantized = ScratchBytes(Scratch::kInt8SourceRows, rows.count * rows.row_bytes);
  QuantizeRowsInt8(x.data, rows.dtype, rows.hidden, 0, rows.count, quantized, x.name);
  rows.rows = quantized;
  return rows;
}

namespace {

struct QuantizeRowsArgs {
  static constexpr const char *kNames[] = {"x", "slot_token", "q"};
  TensorArg x, slot_token;  // inputs
  TensorArg q;  // output
};

void QuantizeRows(const QuantizeRowsArgs &args) {
  args.x.RequireRank(2);
  const int64_t tokens = args.x.dim(0), hidden = args.x.dim(1);
  args.slot_token.RequireDtype("int32");
  args.slot_token.RequireRank(2);
  args.slot_token.RequireDim(1, 1, "1");
  const int64_t slots = args.slot_token.dim(0);
  args.q.RequireDtype("int32");
  args.q.RequireRank(2);
  args.q.RequireDim(0, slots, "slot_token.shape[0] (send slots)");
  args.q.RequireDim(1, Int8RowWords(hidden), "ceil(hidden / 4) + 1 words per quantized row");
  const int32_t *slot_token = args.slot_token.data_as<const int32_t>();
  for (int64_t slot = 0; slot < slots; ++slot) {
    if (slot_token[slot] < -1 || slot_token[slot] >= tokens) {
      Fail(kOutOfRange, "slot_token[", slot, "] = ", slot_token[slot], " is not -1 or a token of "
           "x (", tokens, " rows)");
    }
  }
  const TravellingRows quantized = RowsToSend(args.x, QuantMode::kInt8PerToken);
  uint8_t *out = args.q.data_as<uint8_t>();
  for (int64_t slot = 0; slot < slots; ++slot) {
    if (slot_token[slot] < 0) continue;
    std::memcpy(out + slot * quantized.row_bytes,
                quantized.rows + slot_token[slot] * quantized.row_bytes, quantized.row_bytes);
  }
}

struct DequantizeRowsArgs {
  static constexpr const char *kNames[] = {"q", "row_counts", "like", "rows"};
  TensorArg q, row_counts, like;  // inputs
  TensorArg rows;  // output
};

void DequantizeRows(const DequantizeRowsArgs &args) {
  args.like.RequireRank(2);
  const RowDtype dtype = RowDtypeOf(args.like);
  const int64_t hidden = args.like.dim(1);
  args.q.RequireDtype("int32");
  args.q.RequireRank(2);
  args.q.RequireDim(1, Int8RowWords(hidden), "ceil(hidden / 4) + 1 words per quantized row");
  args.rows.RequireSameDtype(args.like);
  args.rows.RequireDim(0, args.q.dim(0), "q.shape[0]");
  args.rows.RequireDim(1, hidden, "like.shape[1] (hidden)");
  args.row_counts.RequireDtype("int32");
  args.row_counts.RequireRank(1);
  const int64_t blocks = args.row_counts.dim(0);
  if (blocks <= 0 || args.q.dim(0) % blocks != 0) {
    Fail(kInvalidArgument, "q has ", args.q.dim(0), " rows, not a multiple of row_counts' ",
         blocks, " blocks");
  }
  const int64_t block_rows = args.q.dim(0) / blocks;
  const int32_t *counts = args.row_counts.data_as<const int32_t>();
  for (int64_t block = 0; block < blocks; ++block) {
    if (counts[block] < 0 || counts[block] > block_rows) {
      Fail(kOutOfRange, "row_counts[", block, "] = ", counts[block], " is outside [0, ",
           block_rows, "]");
    }
  }
  const uint8_t *q = args.q.data_as<const uint8_t>();
  uint8_t *rows = args.rows.data_as<uint8_t>();
  const int64_t row_bytes = hidden * RowDtypeBytes(dtype);
  for (int64_t block = 0; block < blocks; ++block) {
    ParallelFor(counts[block], MinItemsPerThread(row_bytes), [&](int64_t first, int64_t last) {
      for (int64_t i = first; i < last; ++i) {
        const int64_t row = block * block_rows + i;
        DequantizeRowInt8(q + row * Int8RowBytes(hidden), hidden, dtype, rows + row * row_bytes);
      }
    });
    if (PoisonUnusedRows()) {
      VisitFloatType(args.like, [&](auto element) {
        using T = decltype(element);
        FillWithNaN(args.rows.data_as<T>() + (block * block_rows + counts[block]) * hidden,
                    (block_rows - counts[block]) * hidden);
      });
    }
  }
}

struct QuantizeRoundTripArgs {
  static constexpr const char *kNames[] = {"x", "y"};
  TensorArg x;  // input
  TensorArg y;  // output
};

void QuantizeRoundTrip(const QuantizeRoundTripArgs &args) {
  args.x.RequireRank(2);
  const RowDtype dtype = RowDtypeOf(args.x);
  args.y.RequireSameDtype(args.x);
  const int64_t tokens = args.x.dim(0), hidden = args.x.dim(1);
  args.y.RequireDim(0, tokens, "x.shape[0]");
  args.y.RequireDim(1, hidden, "x.shape[1]");
  const int64_t row_bytes = hidden * RowDtypeBytes(dtype);
  uint8_t *out = args.y.data_as<uint8_t>();
  ParallelFor(tokens, MinItemsPerThread(row_bytes), [&](int64_t first, int64_t last) {
    std::unique_ptr<uint8_t[]> quantized(new uint8_t[Int8RowBytes(hidden)]);
    for (int64_t row = first; row < last; ++row) {
      QuantizeRowsInt8(args.x.data, dtype, hidden, row, row + 1, quantized.get(), "x");
      DequantizeRowInt8(quantized.get(), hidden, dtype, out + row * row_bytes);
    }
  });
}

}  // namespace
}  // namespace moe_ep

MOE_EP_EXPORT int MoeEpQuantizeRows(int nparam, void **params, int *ndims, int64_t **shapes,
                                    const char **dtypes, void * /*stream*/, void * /*extra*/) {
  return moe_ep::RunKernel("MoeEpQuantizeRows", [&] {
    moe_ep::QuantizeRows(
        moe_ep::BindArgsAs<moe_ep::QuantizeRowsArgs>(nparam, params, ndims, shapes, dtypes));
  });
}

MOE_EP_EXPORT int MoeEpDequantizeRows(int nparam, void **params, int *ndims, int64_t **shapes,
                                      const char **dtypes, void * /*stream*/, void * /*extra*/) {
  return moe_ep::RunKernel("MoeEpDequantizeRows", [&] {
    moe_ep::DequantizeRows(
        moe_ep::BindArgsAs<moe_ep::DequantizeRowsArgs>(nparam, params, ndims, shapes, dtypes));
  });
}

MOE_EP_EXPORT int MoeEpQuantizeRoundTrip(int nparam, void **params, int *ndims,
                                         int64_t **shapes, const char **dtypes,
                                         void * /*stream*/, void * /*extra*/) {
  return moe_ep::RunKernel("MoeEpQuantizeRoundTrip", [&] {
    moe_ep::QuantizeRoundTrip(
        moe_ep::BindArgsAs<moe_ep::QuantizeRoundTripArgs>(nparam, params, ndims, shapes, dtypes));
  });
}
