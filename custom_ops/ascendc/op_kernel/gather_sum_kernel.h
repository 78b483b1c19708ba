// The gather-and-sum behind MoeEpCombine, MoeEpGatherSum and MoeEpGatherRows (AscendC).
//
//   y[t] = sum over k = 0..K-1 (in order, skipping positions outside [0, N)) of
//          weight[t, k] * rows[positions[t, k]]
//   accumulated in float32 (product, then sum, each rounded), stored in the dtype of rows;
//   weight = 1 without weights. Tokens with no valid position get a zero row.
//
// Same results as custom_ops/cpu/dispatch_combine.cc (WeightedGatherSum). Difference: the CPU
// kernel fails on a position outside [-1, N); this one skips it (AscendC kernels cannot report).
//
// Work split: each vector core handles a contiguous range of tokens.
#ifndef MOE_EP_GATHER_SUM_KERNEL_H_
#define MOE_EP_GATHER_SUM_KERNEL_H_

#include "moe_ep_common.h"

namespace moe_ep {

struct GatherSumShape {
    int64_t tokens;   // T
    int64_t top_k;    // K
    int64_t rows;     // N
    int64_t hidden;   // H
    uint32_t chunk;   // elements per UB pass of a row
};

template <typename T, bool kWeighted>
class GatherSumKernel {
public:
    __aicore__ inline void Init(GM_ADDR rows, GM_ADDR positions, GM_ADDR weights, GM_ADDR y,
                                const GatherSumShape &shape)
    {
        shape_ = shape;
        rows_.SetGlobalBuffer(reinterpret_cast<__gm__ T *>(rows), shape.rows * shape.hidden);
        y_.SetGlobalBuffer(reinterpret_cast<__gm__ T *>(y), shape.tokens * shape.hidden);
        positions_.Init(pipe_, positions, shape.tokens * shape.top_k);
        if constexpr (kWeighted) {
            weights_.Init(pipe_, weights, shape.tokens * shape.top_k);
        }
        sum_.Init(pipe_, shape.chunk);
    }

    __aicore__ inline void Process()
    {
        const int64_t top_k = shape_.top_k, hidden = shape_.hidden;
        const Range tokens = CoreRange(shape_.tokens);
        for (int64_t token = tokens.begin; token < tokens.end; ++token) {
            for (int64_t offset = 0; offset < hidden; offset += shape_.chunk) {
                const uint32_t count = static_cast<uint32_t>(Min(shape_.chunk, hidden - offset));
                sum_.Begin(count);
                for (int64_t k = 0; k < top_k; ++k) {
                    const int64_t slot = token * top_k + k;
                    const int32_t row = positions_.Get(slot);
                    if (row < 0 || row >= shape_.rows) {
                        continue;
                    }
                    float weight = 1.0f;
                    if constexpr (kWeighted) {
                        weight = weights_.Get(slot);
                    }
                    sum_.Accumulate(rows_[row * hidden + offset], weight, count);
                }
                sum_.End(y_[token * hidden + offset], count);
            }
        }
    }

private:
    TPipe pipe_;
    GatherSumShape shape_;
    GlobalTensor<T> rows_;
    GlobalTensor<T> y_;
    IndexReader<int32_t> positions_;
    IndexReader<float> weights_;
    RowAccumulator<T> sum_;
};

}  // namespace moe_ep

#endif  // MOE_EP_GATHER_SUM_KERNEL_H_
