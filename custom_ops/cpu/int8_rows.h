// Per-token int8 token rows: the quantized form in which token rows travel with
// dispatch.quant: int8 (CANN's quant mode 2, "dynamic per-token int8").
//
// The rule, per row of H values read in float32 (float16 and bfloat16 widen exactly):
//   amax  = max |x|
//   scale = amax / 127                    (float32 division; 0 for a row of zeros)
//   q     = round_to_nearest_even(x / scale), clamped to [-127, 127]; q = 0 where scale = 0
//           (a row of zeros, or one so small that amax / 127 underflows)
//   x'    = float32(q) * scale, then rounded to the row's dtype (to nearest even)
// A row holding a NaN or an infinity is refused (the error names the row and column): its scale
// would be meaningless for every other value of the row.
//
// Wire format of one quantized row (Int8RowBytes(H) bytes): the H int8 values, zero bytes up to a
// multiple of 4, then the scale's float32 bits. That is an int32 row of Int8RowWords(H) words,
// which every transport moves (MindSpore's CPU AllGather has no int8).
//
// Where the passes sit: a row is quantized once, at its source, in the pass that already reads
// it (into the rows that travel); the receiver dequantizes in the copy that writes the experts'
// input. Both have a scalar and an AVX2 path (ActiveCpuIsa()), bit-identical: the same IEEE
// division and rounding, element by element.
#ifndef MOE_EP_INT8_ROWS_H_
#define MOE_EP_INT8_ROWS_H_

#include <cstdint>
#include <string_view>

#include "kernel_common.h"

namespace moe_ep {

// The quant_mode input of the row-moving kernels (CANN's numbering).
enum class QuantMode : int32_t {
  kNone = 0,             // rows travel in their own dtype
  kInt8PerToken = 2,     // rows travel as per-token int8 + a float32 scale
};

// The value of a quant_mode input ([1] int32: 0 or 2); throws naming the tensor otherwise.
QuantMode QuantModeInput(const TensorArg &quant_mode);

inline int64_t Int8RowWords(int64_t hidden) { return (hidden + 3) / 4 + 1; }
inline int64_t Int8RowBytes(int64_t hidden) { return Int8RowWords(hidden) * 4; }

// The element types of token rows, as the codec reads and writes them.
enum class RowDtype { kFloat32, kFloat16, kBFloat16 };
// `tensor`'s dtype as a RowDtype; throws naming the tensor for any other dtype.
RowDtype RowDtypeOf(const TensorArg &tensor);
inline int64_t RowDtypeBytes(RowDtype dtype) { return dtype == RowDtype::kFloat32 ? 4 : 2; }
// The RowDtype of a storage type (float, Float16, BFloat16).
template <typename T>
constexpr RowDtype RowDtypeFor() {
  if constexpr (std::is_same_v<T, float>) return RowDtype::kFloat32;
  if constexpr (std::is_same_v<T, Float16>) return RowDtype::kFloat16;
  return RowDtype::kBFloat16;
}

// Whether `rows` holds quantized rows (int32 [N, Int8RowWords(hidden)]: the rows stay int8
// where they land, for kernels that dequantize as they read them) rather than rows of a float
// dtype; throws naming the tensor for an int32 tensor of another width.
bool HoldsInt8Rows(const TensorArg &rows, int64_t hidden);

// Quantizes rows [first, last) of `rows` (rows of `hidden` elements of `dtype`, back to back)
// into `out` (row i at out + (i - first) * Int8RowBytes(hidden)). `what` names the rows in the
// error for a NaN or an infinity, e.g. "x" -> "x[5, 3] = nan".
void QuantizeRowsInt8(const void *rows, RowDtype dtype, int64_t hidden, int64_t first,
                      int64_t last, uint8_t *out, std::string_view what);

// Writes the dequantized form of one quantized row into `out` (hidden elements of `dtype`).
void DequantizeRowInt8(const uint8_t *row, int64_t hidden, RowDtype dtype, void *out);

// A source's token rows as they travel: x itself (QuantMode::kNone), or its rows quantized once,
// here, into per-thread scratch (Scratch::kInt8SourceRows, scratch.h).
struct TravellingRows {
  const uint8_t *rows = nullptr;  // [count, row_bytes]
  int64_t row_bytes = 0;          // bytes of one travelling row
  int64_t count = 0;
  int64_t hidden = 0;
  RowDtype dtype = RowDtype::kFloat32;  // x's
  bool quantized = false;

  // Bytes of a row where it lands (hidden elements of x's dtype).
  int64_t landed_row_bytes() const { return hidden * RowDtypeBytes(dtype); }
  // Writes a travelled row (row_bytes at `travelled`) to `destination` in x's dtype.
  void Land(const uint8_t *travelled, uint8_t *destination) const;
  // The bytes of a row where it lands: landed_row_bytes(), or row_bytes where quantized rows
  // land as they travelled (`keep_quantized`).
  int64_t LandedBytes(bool keep_quantized) const {
    return keep_quantized ? row_bytes : landed_row_bytes();
  }
};

// x [T, H]'s rows to send under `mode`; throws (naming the token) for a row int8 cannot carry.
TravellingRows RowsToSend(const TensorArg &x, QuantMode mode);

}  // namespace moe_ep

#endif  // MOE_EP_INT8_ROWS_H_
