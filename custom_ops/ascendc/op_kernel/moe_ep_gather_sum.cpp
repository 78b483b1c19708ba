// MoeEpGatherSum: rows [N, H], positions [T, K] int32 -> y [T, H]
//   y[t] = sum_k rows[positions[t, k]]   (the gradient of dispatch; see gather_sum_kernel.h)
#include "gather_sum_kernel.h"

extern "C" __global__ __aicore__ void moe_ep_gather_sum(GM_ADDR rows, GM_ADDR positions, GM_ADDR y,
                                                        GM_ADDR workspace, GM_ADDR tiling)
{
    GET_TILING_DATA(tiling_data, tiling);
    const moe_ep::GatherSumShape shape{tiling_data.tokens, tiling_data.topK, tiling_data.rows,
                                       tiling_data.hidden, tiling_data.chunk};
    moe_ep::GatherSumKernel<DTYPE_ROWS, false> kernel;
    kernel.Init(rows, positions, nullptr, y, shape);
    kernel.Process();
}
