// Local (EP = 1) token dispatch and combine kernels.
//
//   MoeEpDispatch      x [T, H], expert_ids [T, K] int32 (-1 = masked), capacity [1] int32
//                      -> grouped_x [T*K, H], positions [T, K] int32,
//                         tokens_per_expert [E] int32, num_dropped [1] int32
//                      Rows of grouped_x past sum(tokens_per_expert) are unspecified (not
//                      written): the buffer is worst-case sized and no consumer reads them.
//                      Optional 4th input block_counts [R] int32 (x in R blocks of T/R rows,
//                      the first block_counts[r] of block r used): not read here; MindSpore
//                      hands it to the gradient, which then writes only the used rows of dx.
//   MoeEpCombine       expert_out [N, H], positions [T, K] int32, weights [T, K] float32
//                      [, block_counts [R] int32] -> y [T, H]
//   MoeEpGatherSum     rows [N, H], positions [T, K] int32 [, block_counts [R] int32]
//                      -> y [T, H]  (an unweighted combine; the gradient of dispatch)
//                      With block_counts, y is R blocks of T/R rows and only the first
//                      block_counts[r] rows of block r are written (the slot layout of the
//                      expert-parallel exchange: the rest are unspecified, NaN with
//                      MOE_EP_POISON_UNUSED_ROWS=1), so a step touches only the rows it uses.
//   MoeEpCombineGrad   dy [T, H], expert_out [N, H], positions [T, K] int32,
//                      weights [T, K] float32 [, block_counts [R] int32]
//                      -> d_expert_out [N, H], d_weights [T, K] float32
//                      (rows of d_expert_out that no position refers to are zero: the exact
//                      gradient, whatever expert_out holds there. With block_counts, the
//                      gradient of the combine into the slot layout, whose expert_out is a
//                      grouped buffer: rows past the last row a position refers to are its
//                      unspecified tail and their gradient is too, so that a step touches only
//                      the rows it uses)
//
// E (the number of experts) is read from the shape of the tokens_per_expert output. Combine,
// GatherSum and CombineGrad read only the rows that positions refers to, so an unspecified tail
// (even NaN) never reaches their results.
//
// Speed: outputs above half the last-level cache are written with streaming stores; the sums
// run on AVX2 (8 floats per instruction, all K rows of a block of H summed in registers) when
// the CPU has it, with results bit-identical to the scalar path. CombineGrad's d_weights is the
// one exception: on AVX2 its dot product over H is summed in 16 partial sums (deterministic, but
// not the scalar path's order; the difference is float32 rounding).

#include <limits>

#include "gather_sum.h"
#include "kernel_common.h"
#include "simd_convert.h"

namespace moe_ep {
namespace {

// Fails unless every value of `ids` lies in [lowest, limit).
void RequireIndicesInRange(const TensorArg &ids, int64_t lowest, int64_t limit) {
  const int32_t *values = ids.data_as<const int32_t>();
  for (int64_t i = 0; i < ids.numel(); ++i) {
    if (values[i] < lowest || values[i] >= limit) {
      Fail(kOutOfRange, ids.name, ids.IndexString(i), " = ", values[i],
           " is out of range [", lowest, ", ", limit, ")");
    }
  }
}

// The tensors of each kernel, in MindSpore's order (inputs, then outputs); the "InBlocks" forms
// carry the optional block_counts input (see the header comment).
struct DispatchArgs {
  static constexpr const char *kNames[] = {"x", "expert_ids", "capacity", "grouped_x",
                                           "positions", "tokens_per_expert", "num_dropped"};
  TensorArg x, expert_ids, capacity;                              // inputs
  TensorArg grouped_x, positions, tokens_per_expert, num_dropped;  // outputs
};

struct DispatchInBlocksArgs {
  static constexpr const char *kNames[] = {"x", "expert_ids", "capacity", "block_counts",
                                           "grouped_x", "positions", "tokens_per_expert",
                                           "num_dropped"};
  TensorArg x, expert_ids, capacity, block_counts;                // inputs
  TensorArg grouped_x, positions, tokens_per_expert, num_dropped;  // outputs
  // The forward does not read block_counts (only the gradient's gather-sum does).
  DispatchArgs WithoutBlockCounts() const {
    return {x, expert_ids, capacity, grouped_x, positions, tokens_per_expert, num_dropped};
  }
};

struct CombineArgs {
  static constexpr const char *kNames[] = {"expert_out", "positions", "weights", "y"};
  TensorArg expert_out, positions, weights;  // inputs
  TensorArg y;                               // output
};

struct CombineInBlocksArgs {
  static constexpr const char *kNames[] = {"expert_out", "positions", "weights",
                                           "block_counts", "y"};
  TensorArg expert_out, positions, weights, block_counts;  // inputs
  TensorArg y;                                             // output
};

struct GatherSumArgs {
  static constexpr const char *kNames[] = {"rows", "positions", "y"};
  TensorArg rows, positions;  // inputs
  TensorArg y;                // output
};

struct GatherSumInBlocksArgs {
  static constexpr const char *kNames[] = {"rows", "positions", "block_counts", "y"};
  TensorArg rows, positions, block_counts;  // inputs
  TensorArg y;                              // output
};

struct CombineGradArgs {
  static constexpr const char *kNames[] = {"dy", "expert_out", "positions", "weights",
                                           "d_expert_out", "d_weights"};
  TensorArg dy, expert_out, positions, weights;  // inputs
  TensorArg d_expert_out, d_weights;             // outputs
};

struct CombineGradInBlocksArgs {
  static constexpr const char *kNames[] = {"dy", "expert_out", "positions", "weights",
                                           "block_counts", "d_expert_out", "d_weights"};
  TensorArg dy, expert_out, positions, weights, block_counts;  // inputs
  TensorArg d_expert_out, d_weights;                           // outputs
  CombineGradArgs WithoutBlockCounts() const {
    return {dy, expert_out, positions, weights, d_expert_out, d_weights};
  }
};

// Checks that positions [T, K] refers to rows of a [num_rows, H] tensor, -1 meaning "none".
void CheckPositions(const TensorArg &positions, int64_t num_tokens, int64_t num_rows) {
  positions.RequireRank(2);
  positions.RequireDtype("int32");
  positions.RequireDim(0, num_tokens, "the number of tokens");
  RequireIndicesInRange(positions, -1, num_rows);
}

// Checks block_counts [R] int32 against `num_rows` rows in R equal blocks, each count in
// [0, rows per block]; returns the rows per block.
int64_t CheckBlockCounts(const TensorArg &block_counts, int64_t num_rows) {
  block_counts.RequireRank(1);
  block_counts.RequireDtype("int32");
  const int64_t blocks = block_counts.dim(0);
  if (blocks <= 0 || num_rows % blocks != 0) {
    Fail(kInvalidArgument, "block_counts has ", blocks, " blocks, which must divide the ",
         num_rows, " rows");
  }
  const int64_t block_rows = num_rows / blocks;
  RequireIndicesInRange(block_counts, 0, block_rows + 1);
  return block_rows;
}

// ---------------------------------------------------------------------------------------------
// Dispatch
// ---------------------------------------------------------------------------------------------

// Assigns each (token, k) a row of grouped_x: experts in ascending order, and inside an expert
// tokens in ascending order, then k (a stable counting sort of the flattened expert_ids).
// With capacity > 0 only the first `capacity` assignments of each expert keep a row; the others
// get position -1. An expert id of -1 is a masked slot (the expert lives on another rank): it
// gets position -1 and is neither a row nor a drop.
struct DispatchLayout {
  int64_t used_rows = 0;
  int32_t dropped = 0;
};

DispatchLayout ComputeDispatchLayout(const int32_t *expert_ids, int64_t num_assignments,
                                     int64_t num_experts, int64_t capacity, int32_t *positions,
                                     int32_t *tokens_per_expert) {
  std::vector<int64_t> requested(num_experts, 0);
  for (int64_t i = 0; i < num_assignments; ++i) {
    if (expert_ids[i] >= 0) ++requested[expert_ids[i]];
  }

  std::vector<int64_t> next_row(num_experts);  // next free row of each expert's group
  std::vector<int64_t> group_end(num_experts);
  int64_t group_start = 0;
  for (int64_t expert = 0; expert < num_experts; ++expert) {
    const int64_t kept = capacity > 0 ? std::min(requested[expert], capacity) : requested[expert];
    tokens_per_expert[expert] = static_cast<int32_t>(kept);
    next_row[expert] = group_start;
    group_start += kept;
    group_end[expert] = group_start;
  }

  DispatchLayout layout{group_start, 0};
  for (int64_t i = 0; i < num_assignments; ++i) {
    const int32_t expert = expert_ids[i];
    if (expert < 0) {
      positions[i] = -1;
    } else if (next_row[expert] < group_end[expert]) {
      positions[i] = static_cast<int32_t>(next_row[expert]++);
    } else {
      positions[i] = -1;
      ++layout.dropped;
    }
  }
  return layout;
}

// grouped_x[positions[t, k]] = x[t]. Rows from `used_rows` to `total_rows` are not written
// (unspecified; NaN with MOE_EP_POISON_UNUSED_ROWS=1).
//
// Rows are written in destination order (each thread a contiguous range of grouped_x) and read
// from x (T rows, small and cached) in whatever order that takes: the output streams through
// memory like a memcpy, instead of landing on a random page per row. Outputs above half the
// last-level cache use streaming stores (see PreferStreamingStores): a row-by-row memcpy would
// first read every destination line.
template <typename T>
void PackRows(const T *x, int64_t num_tokens, int64_t top_k, int64_t hidden,
              const int32_t *positions, int64_t used_rows, int64_t total_rows, T *grouped_x) {
  std::vector<int32_t> source_token(used_rows);  // [used_rows]: the token each row copies
  for (int64_t slot = 0; slot < num_tokens * top_k; ++slot) {
    if (positions[slot] >= 0) source_token[positions[slot]] = static_cast<int32_t>(slot / top_k);
  }
  const size_t row_bytes = static_cast<size_t>(hidden) * sizeof(T);
  const bool streaming = PreferStreamingStores(used_rows * static_cast<int64_t>(row_bytes));
  ParallelFor(used_rows, MinItemsPerThread(row_bytes), [&](int64_t row_begin, int64_t row_end) {
    for (int64_t row = row_begin; row < row_end; ++row) {
      const T *source = x + source_token[row] * hidden;
      if (streaming) {
        CopyStreaming(grouped_x + row * hidden, source, row_bytes);
      } else {
        std::memcpy(grouped_x + row * hidden, source, row_bytes);
      }
    }
    if (streaming) StreamingStoreFence();
  });
  if (PoisonUnusedRows()) {
    FillWithNaN(grouped_x + used_rows * hidden, (total_rows - used_rows) * hidden);
  }
}

void Dispatch(const DispatchArgs &args) {
  const TensorArg &x = args.x, &expert_ids = args.expert_ids, &capacity = args.capacity;
  const TensorArg &grouped_x = args.grouped_x, &positions = args.positions;
  const TensorArg &tokens_per_expert = args.tokens_per_expert, &num_dropped = args.num_dropped;

  x.RequireRank(2);
  expert_ids.RequireRank(2);
  expert_ids.RequireDtype("int32");
  expert_ids.RequireDim(0, x.dim(0), "x.shape[0] (tokens)");
  const int64_t num_tokens = x.dim(0), hidden = x.dim(1), top_k = expert_ids.dim(1);
  const int64_t num_assignments = num_tokens * top_k;
  if (num_assignments > std::numeric_limits<int32_t>::max()) {
    Fail(kInvalidArgument, "tokens * top_k = ", num_assignments, " does not fit in int32");
  }
  capacity.RequireDtype("int32");
  if (capacity.numel() != 1) {
    Fail(kInvalidArgument, "capacity must hold one value, got shape ", capacity.ShapeString());
  }
  const int64_t capacity_value = *capacity.data_as<const int32_t>();
  if (capacity_value < 0) Fail(kOutOfRange, "capacity = ", capacity_value, " must be >= 0");

  grouped_x.RequireSameDtype(x);
  grouped_x.RequireRank(2);
  grouped_x.RequireDim(0, num_assignments, "tokens * top_k");
  grouped_x.RequireDim(1, hidden, "x.shape[1] (hidden)");
  positions.RequireDtype("int32");
  positions.RequireRank(2);
  positions.RequireDim(0, num_tokens, "the number of tokens");
  positions.RequireDim(1, top_k, "top_k");
  tokens_per_expert.RequireDtype("int32");
  tokens_per_expert.RequireRank(1);
  num_dropped.RequireDtype("int32");
  if (num_dropped.numel() != 1) {
    Fail(kInvalidArgument, "num_dropped must hold one value, got shape ",
         num_dropped.ShapeString());
  }
  const int64_t num_experts = tokens_per_expert.dim(0);
  RequireIndicesInRange(expert_ids, -1, num_experts);

  int32_t *position_data = positions.data_as<int32_t>();
  int32_t *count_data = tokens_per_expert.data_as<int32_t>();
  const DispatchLayout layout =
      ComputeDispatchLayout(expert_ids.data_as<const int32_t>(), num_assignments, num_experts,
                            capacity_value, position_data, count_data);
  *num_dropped.data_as<int32_t>() = layout.dropped;

  VisitFloatType(x, [&](auto element) {
    using T = decltype(element);
    PackRows(x.data_as<const T>(), num_tokens, top_k, hidden, position_data,
             layout.used_rows, num_assignments, grouped_x.data_as<T>());
  });
}

// ---------------------------------------------------------------------------------------------
// Combine and its gradients
// ---------------------------------------------------------------------------------------------

// ---- The gather-sum of one token ------------------------------------------------------------
//
// Every path computes, per element h, sum = 0.0f; sum = sum + weights[i] * float(rows[i][h]) for
// the token's present rows i in k order (a float32 multiply, then a float32 add: never fused,
// the build targets x86-64-v2 which has no FMA and the AVX2 path is compiled without it), then
// one rounding to T. So the scalar and AVX2 paths, and CPUs with or without AVX2, give
// bit-identical results.

// The rows one token sums, in k order: pointers to its present rows and their weights.
template <typename T>
struct TokenRows {
  std::vector<const T *> rows;  // [count]
  std::vector<float> weights;   // [count]
};

// out[h] for h in [begin, end), one element at a time (the head and tail of the AVX2 path).
template <typename T>
void SumTokenRowsScalar(const TokenRows<T> &token, int64_t begin, int64_t end, T *out) {
  const size_t count = token.rows.size();
  for (int64_t h = begin; h < end; ++h) {
    float sum = 0.0f;
    for (size_t i = 0; i < count; ++i) sum += token.weights[i] * ToFloat(token.rows[i][h]);
    out[h] = FromFloat<T>(sum);
  }
}

// out[h] for all h, row by row over a float32 accumulator (the path for CPUs without AVX2;
// the compiler vectorises the float32 loop with SSE).
template <typename T>
void SumTokenRowsRowwise(const TokenRows<T> &token, int64_t hidden, std::vector<float> &sum,
                         T *out) {
  std::fill(sum.begin(), sum.end(), 0.0f);
  for (size_t i = 0; i < token.rows.size(); ++i) {
    const float weight = token.weights[i];
    const T *row = token.rows[i];
    for (int64_t h = 0; h < hidden; ++h) sum[h] += weight * ToFloat(row[h]);
  }
  for (int64_t h = 0; h < hidden; ++h) out[h] = FromFloat<T>(sum[h]);
}


// out[0, hidden) of one token with AVX2: blocks of 64 (then 16) elements are summed over all the
// token's rows in registers and stored once. With `streaming`, a scalar head first reaches a
// 16-byte boundary of out.
template <typename T>
MOE_EP_AVX2 void SumTokenRowsAvx2(const TokenRows<T> &token, int64_t hidden, bool streaming,
                                  T *out) {
  constexpr int64_t kChunk = 16, kChunks = 4, kBlock = kChunk * kChunks;
  const size_t count = token.rows.size();
  int64_t h = 0;
  if (streaming) {
    const uintptr_t misalignment = reinterpret_cast<uintptr_t>(out) % 16;
    if (misalignment % sizeof(T) != 0) streaming = false;  // cannot reach alignment
    h = std::min<int64_t>(hidden, ((16 - misalignment) % 16) / sizeof(T));
    SumTokenRowsScalar(token, 0, h, out);
  }
  for (; h + kBlock <= hidden; h += kBlock) {
    __m256 first[kChunks], second[kChunks];  // the block's float32 sums, kept in registers
    for (int64_t c = 0; c < kChunks; ++c) first[c] = second[c] = _mm256_setzero_ps();
    for (size_t i = 0; i < count; ++i) {
      const __m256 weight = _mm256_set1_ps(token.weights[i]);
      const T *row = token.rows[i] + h;
      for (int64_t c = 0; c < kChunks; ++c) {
        __m256 row_first, row_second;
        Load16(row + c * kChunk, row_first, row_second);
        first[c] = _mm256_add_ps(first[c], _mm256_mul_ps(weight, row_first));
        second[c] = _mm256_add_ps(second[c], _mm256_mul_ps(weight, row_second));
      }
    }
    for (int64_t c = 0; c < kChunks; ++c) {
      Store16(out + h + c * kChunk, first[c], second[c], streaming);
    }
  }
  for (; h + kChunk <= hidden; h += kChunk) {
    __m256 first = _mm256_setzero_ps(), second = _mm256_setzero_ps();
    for (size_t i = 0; i < count; ++i) {
      const __m256 weight = _mm256_set1_ps(token.weights[i]);
      __m256 row_first, row_second;
      Load16(token.rows[i] + h, row_first, row_second);
      first = _mm256_add_ps(first, _mm256_mul_ps(weight, row_first));
      second = _mm256_add_ps(second, _mm256_mul_ps(weight, row_second));
    }
    Store16(out + h, first, second, streaming);
  }
  SumTokenRowsScalar(token, h, hidden, out);
}

// y[t] = sum over k (in order, skipping -1) of weights[t, k] * row_at(positions[t, k]),
// accumulated in float32. A null `weights` means all weights are 1.
// With `block_counts` (R values), y is R blocks of num_tokens / R rows and rows past
// block_counts[r] in block r are skipped (unspecified).
template <typename T, typename RowAt>
void WeightedGatherSum(RowAt row_at, int64_t hidden, const int32_t *positions,
                       const float *weights, int64_t num_tokens, int64_t top_k, T *y,
                       bool streaming_stores, const int32_t *block_counts = nullptr,
                       int64_t block_rows = 0) {
  const bool use_avx2 = CpuHasAvx2F16c();
  const bool streaming = use_avx2 && (streaming_stores || PreferStreamingStores(
                                          num_tokens * hidden * static_cast<int64_t>(sizeof(T))));
  const int64_t min_tokens = MinItemsPerThread(top_k * hidden * sizeof(T));
  ParallelFor(num_tokens, min_tokens, [&](int64_t token_begin, int64_t token_end) {
    TokenRows<T> token;
    token.rows.reserve(top_k);
    token.weights.reserve(top_k);
    std::vector<float> sum(use_avx2 ? 0 : hidden);  // [hidden], the row-wise accumulator
    for (int64_t t = token_begin; t < token_end; ++t) {
      if (block_counts != nullptr && t % block_rows >= block_counts[t / block_rows]) continue;
      token.rows.clear();
      token.weights.clear();
      for (int64_t k = 0; k < top_k; ++k) {
        const int64_t slot = t * top_k + k;
        if (positions[slot] < 0) continue;
        token.rows.push_back(row_at(positions[slot]));
        token.weights.push_back(weights ? weights[slot] : 1.0f);
      }
      if (use_avx2) {
        SumTokenRowsAvx2(token, hidden, streaming, y + t * hidden);
      } else {
        SumTokenRowsRowwise(token, hidden, sum, y + t * hidden);
      }
    }
    if (streaming) StreamingStoreFence();
  });
}

}  // namespace

// Shared by Combine (with weights) and GatherSum (weights == nullptr); see gather_sum.h.
void GatherSum(const TensorArg &rows, const TensorArg &positions, const TensorArg *weights,
               const TensorArg &y, bool streaming_stores, const TensorArg *block_counts) {
  rows.RequireRank(2);
  y.RequireRank(2);
  y.RequireSameDtype(rows);
  y.RequireDim(1, rows.dim(1), "the hidden size");
  const int64_t num_tokens = y.dim(0), hidden = rows.dim(1);
  CheckPositions(positions, num_tokens, rows.dim(0));
  const int64_t top_k = positions.dim(1);
  const float *weight_data = nullptr;
  if (weights != nullptr) {
    weights->RequireDtype("float32");
    weights->RequireRank(2);
    weights->RequireDim(0, num_tokens, "the number of tokens");
    weights->RequireDim(1, top_k, "top_k");
    weight_data = weights->data_as<const float>();
  }
  const int32_t *count_data = nullptr;
  int64_t block_rows = 0;
  if (block_counts != nullptr) {
    block_rows = CheckBlockCounts(*block_counts, num_tokens);
    count_data = block_counts->data_as<const int32_t>();
  }
  VisitFloatType(rows, [&](auto element) {
    using T = decltype(element);
    const T *row_data = rows.data_as<const T>();
    T *y_data = y.data_as<T>();
    WeightedGatherSum([&](int32_t row) { return row_data + row * hidden; }, hidden,
                      positions.data_as<const int32_t>(), weight_data, num_tokens, top_k,
                      y_data, streaming_stores, count_data, block_rows);
    if (count_data != nullptr && PoisonUnusedRows()) {
      for (int64_t block = 0; block * block_rows < num_tokens; ++block) {
        FillWithNaN(y_data + (block * block_rows + count_data[block]) * hidden,
                    (block_rows - count_data[block]) * hidden);
      }
    }
  });
}

void GatherSumFromBlocks(const std::vector<const uint8_t *> &blocks, int64_t block_rows,
                         const TensorArg &positions, const TensorArg &y) {
  y.RequireRank(2);
  const int64_t num_tokens = y.dim(0), hidden = y.dim(1);
  CheckPositions(positions, num_tokens, static_cast<int64_t>(blocks.size()) * block_rows);
  VisitFloatType(y, [&](auto element) {
    using T = decltype(element);
    const auto row_at = [&](int32_t row) {
      return reinterpret_cast<const T *>(blocks[row / block_rows]) + row % block_rows * hidden;
    };
    WeightedGatherSum(row_at, hidden, positions.data_as<const int32_t>(), nullptr, num_tokens,
                      positions.dim(1), y.data_as<T>(), /*streaming_stores=*/false);
  });
}

namespace {

// grad[h] = FromFloat(weight * dy[h]) for h in [begin, end); returns the float32 dot product
// of dy and value over that range, summed in order of h.
template <typename T>
float ScaleRowAndDotScalar(const T *dy, const T *value, float weight, int64_t begin,
                           int64_t end, T *grad) {
  float dot = 0.0f;
  for (int64_t h = begin; h < end; ++h) {
    const float upstream = ToFloat(dy[h]);
    grad[h] = FromFloat<T>(weight * upstream);
    dot += upstream * ToFloat(value[h]);
  }
  return dot;
}

// The same over [0, hidden) with AVX2: grad is bit-identical to the scalar path, but the dot
// product is summed in 16 partial sums (one per lane of Load16, over a 16-element chunk),
// reduced in a fixed order at the end; it differs from the scalar path's sequential sum by
// float32 rounding (deterministically). A sequential sum would be a chain of dependent adds,
// which limited the old loop to ~1 element per 4 cycles.
template <typename T>
MOE_EP_AVX2 float ScaleRowAndDotAvx2(const T *dy, const T *value, float weight, int64_t hidden,
                                     bool streaming, T *grad) {
  constexpr int64_t kChunk = 16;
  int64_t h = 0;
  float head_dot = 0.0f;
  if (streaming) {  // a scalar head up to a 16-byte boundary of grad
    const uintptr_t misalignment = reinterpret_cast<uintptr_t>(grad) % 16;
    if (misalignment % sizeof(T) != 0) streaming = false;
    h = std::min<int64_t>(hidden, ((16 - misalignment) % 16) / sizeof(T));
    head_dot = ScaleRowAndDotScalar(dy, value, weight, 0, h, grad);
  }
  const __m256 weight_vector = _mm256_set1_ps(weight);
  __m256 dot_first = _mm256_setzero_ps(), dot_second = _mm256_setzero_ps();
  for (; h + kChunk <= hidden; h += kChunk) {
    __m256 dy_first, dy_second, value_first, value_second;
    Load16(dy + h, dy_first, dy_second);
    Load16(value + h, value_first, value_second);  // the same lane order as dy
    Store16(grad + h, _mm256_mul_ps(weight_vector, dy_first),
            _mm256_mul_ps(weight_vector, dy_second), streaming);
    dot_first = _mm256_add_ps(dot_first, _mm256_mul_ps(dy_first, value_first));
    dot_second = _mm256_add_ps(dot_second, _mm256_mul_ps(dy_second, value_second));
  }
  alignas(32) float lanes[16];
  _mm256_store_ps(lanes, dot_first);
  _mm256_store_ps(lanes + 8, dot_second);
  float dot = head_dot;
  for (float lane : lanes) dot += lane;
  return dot + ScaleRowAndDotScalar(dy, value, weight, h, hidden, grad);
}

// d_expert_out[positions[t, k]] = weights[t, k] * dy[t]   (rows no position refers to: 0; with
// `unspecified_tail`, only up to the last row one refers to)
// d_weights[t, k] = <dy[t], expert_out[positions[t, k]]>   (0 where positions[t, k] = -1)
template <typename T>
void CombineBackward(const T *dy, const T *expert_out, int64_t num_rows, int64_t hidden,
                     const int32_t *positions, const float *weights, int64_t num_tokens,
                     int64_t top_k, const std::vector<bool> &row_is_used, bool unspecified_tail,
                     T *d_expert_out, float *d_weights) {
  const bool use_avx2 = CpuHasAvx2F16c();
  const bool streaming =
      use_avx2 && PreferStreamingStores(num_rows * hidden * static_cast<int64_t>(sizeof(T)));
  const int64_t min_tokens = MinItemsPerThread(2 * top_k * hidden * sizeof(T));
  ParallelFor(num_tokens, min_tokens, [&](int64_t token_begin, int64_t token_end) {
    for (int64_t token = token_begin; token < token_end; ++token) {
      const T *dy_row = dy + token * hidden;
      for (int64_t k = 0; k < top_k; ++k) {
        const int64_t slot = token * top_k + k;
        const int32_t row = positions[slot];
        if (row < 0) {
          d_weights[slot] = 0.0f;
          continue;
        }
        const T *value_row = expert_out + row * hidden;
        T *grad_row = d_expert_out + row * hidden;
        d_weights[slot] =
            use_avx2 ? ScaleRowAndDotAvx2(dy_row, value_row, weights[slot], hidden, streaming,
                                          grad_row)
                     : ScaleRowAndDotScalar(dy_row, value_row, weights[slot], 0, hidden,
                                            grad_row);
      }
    }
    if (streaming) StreamingStoreFence();
  });
  // Zero the rows no position refers to, one memset per run of them; with `unspecified_tail`
  // only up to the last row one refers to (the tail stays unspecified, like grouped_x's, and
  // NaN with MOE_EP_POISON_UNUSED_ROWS=1: writing it would touch every page of a worst-case
  // buffer in every step, however few rows the step uses).
  const size_t row_bytes = static_cast<size_t>(hidden) * sizeof(T);
  int64_t used_end = num_rows;
  if (unspecified_tail) {
    while (used_end > 0 && !row_is_used[used_end - 1]) --used_end;
    if (PoisonUnusedRows()) {
      FillWithNaN(d_expert_out + used_end * hidden, (num_rows - used_end) * hidden);
    }
  }
  for (int64_t row = 0; row < used_end;) {
    if (row_is_used[row]) {
      ++row;
      continue;
    }
    const int64_t run_start = row;
    while (row < used_end && !row_is_used[row]) ++row;
    std::memset(d_expert_out + run_start * hidden, 0, (row - run_start) * row_bytes);
  }
}

// `in_blocks`: the gradient of the combine into the slot layout (see the header comment).
void CombineGrad(const CombineGradArgs &args, bool in_blocks) {
  const TensorArg &dy = args.dy, &expert_out = args.expert_out, &positions = args.positions;
  const TensorArg &weights = args.weights, &d_expert_out = args.d_expert_out;
  const TensorArg &d_weights = args.d_weights;

  dy.RequireRank(2);
  expert_out.RequireRank(2);
  expert_out.RequireSameDtype(dy);
  expert_out.RequireDim(1, dy.dim(1), "dy.shape[1] (hidden)");
  const int64_t num_tokens = dy.dim(0), hidden = dy.dim(1), num_rows = expert_out.dim(0);
  CheckPositions(positions, num_tokens, num_rows);
  const int64_t top_k = positions.dim(1);
  weights.RequireDtype("float32");
  weights.RequireRank(2);
  weights.RequireDim(0, num_tokens, "the number of tokens");
  weights.RequireDim(1, top_k, "top_k");
  d_expert_out.RequireSameDtype(expert_out);
  d_expert_out.RequireRank(2);
  d_expert_out.RequireDim(0, num_rows, "expert_out.shape[0]");
  d_expert_out.RequireDim(1, hidden, "the hidden size");
  d_weights.RequireDtype("float32");
  d_weights.RequireRank(2);
  d_weights.RequireDim(0, num_tokens, "the number of tokens");
  d_weights.RequireDim(1, top_k, "top_k");

  // Each row of expert_out feeds at most one (t, k), so its gradient is written, not summed.
  const int32_t *position_data = positions.data_as<const int32_t>();
  std::vector<bool> row_is_used(num_rows, false);
  for (int64_t slot = 0; slot < num_tokens * top_k; ++slot) {
    const int32_t row = position_data[slot];
    if (row < 0) continue;
    if (row_is_used[row]) {
      Fail(kInvalidArgument, "positions", positions.IndexString(slot), " = ", row,
           " repeats an earlier position; every row may be used once");
    }
    row_is_used[row] = true;
  }

  VisitFloatType(dy, [&](auto element) {
    using T = decltype(element);
    CombineBackward(dy.data_as<const T>(), expert_out.data_as<const T>(), num_rows, hidden,
                    position_data, weights.data_as<const float>(), num_tokens, top_k,
                    row_is_used, in_blocks, d_expert_out.data_as<T>(),
                    d_weights.data_as<float>());
  });
}

}  // namespace
}  // namespace moe_ep

using moe_ep::BindArgsAs;
using moe_ep::RunKernel;

MOE_EP_EXPORT int MoeEpDispatch(int nparam, void **params, int *ndims, int64_t **shapes,
                                const char **dtypes, void * /*stream*/, void * /*extra*/) {
  return RunKernel("MoeEpDispatch", [&] {
    if (nparam == 8) {
      return moe_ep::Dispatch(BindArgsAs<moe_ep::DispatchInBlocksArgs>(
          nparam, params, ndims, shapes, dtypes).WithoutBlockCounts());
    }
    moe_ep::Dispatch(BindArgsAs<moe_ep::DispatchArgs>(nparam, params, ndims, shapes, dtypes));
  });
}

MOE_EP_EXPORT int MoeEpCombine(int nparam, void **params, int *ndims, int64_t **shapes,
                               const char **dtypes, void * /*stream*/, void * /*extra*/) {
  return RunKernel("MoeEpCombine", [&] {
    if (nparam == 5) {
      const auto args =
          BindArgsAs<moe_ep::CombineInBlocksArgs>(nparam, params, ndims, shapes, dtypes);
      return moe_ep::GatherSum(args.expert_out, args.positions, &args.weights, args.y,
                               /*streaming_stores=*/false, &args.block_counts);
    }
    const auto args = BindArgsAs<moe_ep::CombineArgs>(nparam, params, ndims, shapes, dtypes);
    moe_ep::GatherSum(args.expert_out, args.positions, &args.weights, args.y);
  });
}

MOE_EP_EXPORT int MoeEpGatherSum(int nparam, void **params, int *ndims, int64_t **shapes,
                                 const char **dtypes, void * /*stream*/, void * /*extra*/) {
  return RunKernel("MoeEpGatherSum", [&] {
    if (nparam == 4) {
      const auto args =
          BindArgsAs<moe_ep::GatherSumInBlocksArgs>(nparam, params, ndims, shapes, dtypes);
      return moe_ep::GatherSum(args.rows, args.positions, nullptr, args.y,
                               /*streaming_stores=*/false, &args.block_counts);
    }
    const auto args = BindArgsAs<moe_ep::GatherSumArgs>(nparam, params, ndims, shapes, dtypes);
    moe_ep::GatherSum(args.rows, args.positions, nullptr, args.y);
  });
}

MOE_EP_EXPORT int MoeEpCombineGrad(int nparam, void **params, int *ndims, int64_t **shapes,
                                   const char **dtypes, void * /*stream*/, void * /*extra*/) {
  return RunKernel("MoeEpCombineGrad", [&] {
    if (nparam == 7) {  // with block_counts: dy's rows past them are never read (positions -1)
      const auto args =
          BindArgsAs<moe_ep::CombineGradInBlocksArgs>(nparam, params, ndims, shapes, dtypes);
      moe_ep::CheckBlockCounts(args.block_counts, args.dy.dim(0));
      return moe_ep::CombineGrad(args.WithoutBlockCounts(), /*in_blocks=*/true);
    }
    moe_ep::CombineGrad(BindArgsAs<moe_ep::CombineGradArgs>(nparam, params, ndims, shapes,
                                                             dtypes),
                        /*in_blocks=*/false);
  });
}
