// MoeEpGatherRows: rows [N, H], index [M, J] int32, inverse_index [N, I] int32 -> out [M, H]
//   out[m] = sum_j rows[index[m, j]]; inverse_index is not read (the Cell's gradient uses it).
#include "gather_sum_kernel.h"

extern "C" __global__ __aicore__ void moe_ep_gather_rows(GM_ADDR rows, GM_ADDR index,
                                                         GM_ADDR inverse_index, GM_ADDR out,
                                                         GM_ADDR workspace, GM_ADDR tiling)
{
    GET_TILING_DATA(tiling_data, tiling);
    const moe_ep::GatherSumShape shape{tiling_data.tokens, tiling_data.topK, tiling_data.rows,
                                       tiling_data.hidden, tiling_data.chunk};
    moe_ep::GatherSumKernel<DTYPE_ROWS, false> kernel;
    kernel.Init(rows, index, nullptr, out, shape);
    kernel.Process();
}
