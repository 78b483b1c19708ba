// The gather-and-sum at the heart of every combine, shared by the local and fused kernels.
#ifndef MOE_EP_GATHER_SUM_H_
#define MOE_EP_GATHER_SUM_H_

#include <cstdint>
#include <vector>

#include "kernel_common.h"

namespace moe_ep {

// y[t] = sum over k (in order, skipping -1) of weights[t, k] * rows[positions[t, k]],
// accumulated in float32; a null `weights` means all weights are 1.
// rows [N, H], positions [T, K] int32, weights [T, K] float32, y [T, H] (dtype of rows).
// y is written with non-temporal stores where it is larger than half the last-level cache, or
// whatever its size with `streaming_stores` (for a y the calling core will not read soon).
// With `block_counts` [R] int32, y is R blocks of T / R rows of which only the first
// block_counts[r] of block r are written (the rest unspecified; NaN with
// MOE_EP_POISON_UNUSED_ROWS=1): the slot layout of the expert-parallel exchange.
void GatherSum(const TensorArg &rows, const TensorArg &positions, const TensorArg *weights,
               const TensorArg &y, bool streaming_stores = false,
               const TensorArg *block_counts = nullptr);

// The same without weights, with the rows in blocks of `block_rows` rows that lie apart: position p
// names row p % block_rows of blocks[p / block_rows] (dtype and hidden size of y). The fused Return
// and Combine sum their peers' partial rows where they lie in the window this way.
void GatherSumFromBlocks(const std::vector<const uint8_t *> &blocks, int64_t block_rows,
                         const TensorArg &positions, const TensorArg &y);

}  // namespace moe_ep

#endif  // MOE_EP_GATHER_SUM_H_
