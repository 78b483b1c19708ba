// MoeEpCombine: expert_out [N, H], positions [T, K] int32, weights [T, K] float32 -> y [T, H]
//   y[t] = sum_k weights[t, k] * expert_out[positions[t, k]]   (see gather_sum_kernel.h)
#include "gather_sum_kernel.h"

extern "C" __global__ __aicore__ void moe_ep_combine(GM_ADDR expert_out, GM_ADDR positions,
                                                     GM_ADDR weights, GM_ADDR y, GM_ADDR workspace,
                                                     GM_ADDR tiling)
{
    GET_TILING_DATA(tiling_data, tiling);
    const moe_ep::GatherSumShape shape{tiling_data.tokens, tiling_data.topK, tiling_data.rows,
                                       tiling_data.hidden, tiling_data.chunk};
    moe_ep::GatherSumKernel<DTYPE_EXPERT_OUT, true> kernel;
    kernel.Init(expert_out, positions, weights, y, shape);
    kernel.Process();
}
