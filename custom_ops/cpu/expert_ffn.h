// The row-wise routed experts (expert_ffn.cc), for the kernels that run them: the
// ExpertsWeightedSum kernel itself, and the fused experts + combine of the prefill path
// (experts_combine.cc).
#ifndef MOE_EP_EXPERT_FFN_H_
#define MOE_EP_EXPERT_FFN_H_

#include <cstdint>
#include <functional>
#include <vector>

#include "kernel_common.h"

namespace moe_ep {

// The shapes of one call, checked: rows [N, H] in B blocks of N / B rows (block b's first
// counts[b] rows used), local_ids / weights [N, K], gate_up_weight [L, H, 2F],
// down_weight [L, F, H]. Rows are in the weights' dtype, or quantized (int8_rows.h: int32
// [N, Int8RowWords(H)], dispatch.quant: int8 in inference), dequantized as the experts read them.
struct ExpertsShapes {
  int64_t num_rows, hidden, top_k, num_experts, ffn, num_blocks, block_rows;
  const int32_t *counts;  // [B]
  bool int8_rows;
};

// Checks the six inputs of the row-wise experts (throws KernelError naming the tensor).
ExpertsShapes CheckExpertsInputs(const TensorArg &rows, const TensorArg &local_ids,
                                 const TensorArg &weights, const TensorArg &row_counts,
                                 const TensorArg &gate_up_weight, const TensorArg &down_weight);

// One (row, k) pair of an expert.
struct ExpertPair {
  int64_t row;
  int32_t k;
};
using PairsPerExpert = std::vector<std::vector<ExpertPair>>;

// Rows [first, end).
struct RowRange {
  int64_t first, end;
};

// The used rows of every block: [b * block_rows, b * block_rows + counts[b]).
std::vector<RowRange> UsedRows(const ExpertsShapes &shapes);

// The pairs of every local expert among the rows of `ranges` (in order), each list in row
// order; throws on a local id outside [-1, num_experts).
PairsPerExpert PairsByExpert(const TensorArg &local_ids, const std::vector<RowRange> &ranges,
                             int64_t num_experts);

// For every pair (row, k) of every expert e: sum_row(row) += weights[row, k] * down_e(silu(
// gate_e(rows[row])) * up_e(rows[row])), in float32 sums (row_sums.h) that the caller has zeroed.
// Each row's pairs are added in local expert order whatever the thread count; sum_row is called
// on the calling thread only. rows, gate_up_weight and down_weight as in ExpertsShapes.
void AddExpertOutputs(const ExpertsShapes &shapes, const TensorArg &rows,
                      const TensorArg &gate_up_weight, const TensorArg &down_weight,
                      const PairsPerExpert &pairs, const float *weights,
                      const std::function<float *(int64_t row)> &sum_row);

}  // namespace moe_ep

#endif  // MOE_EP_EXPERT_FFN_H_
