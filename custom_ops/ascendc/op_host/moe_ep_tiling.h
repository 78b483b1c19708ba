// Tiling data of the mindspore-moe-ep AscendC operators: the sizes each kernel reads.
// One layout for all six operators (a field an operator does not use is 0).
#ifndef MOE_EP_TILING_H_
#define MOE_EP_TILING_H_

#include "register/tilingdata_base.h"

namespace optiling {

BEGIN_TILING_DATA_DEF(MoeEpTilingData)
TILING_DATA_FIELD_DEF(uint32_t, tokens);      // T: rows of x / positions / y
TILING_DATA_FIELD_DEF(uint32_t, topK);        // K: columns of expert_ids / positions
TILING_DATA_FIELD_DEF(uint32_t, rows);        // N: rows of the gathered tensor
TILING_DATA_FIELD_DEF(uint32_t, hidden);      // H: row width
TILING_DATA_FIELD_DEF(uint32_t, experts);     // E: experts of MoeEpDispatch
TILING_DATA_FIELD_DEF(uint32_t, worldSize);   // R: ranks of MoeEpExpertParallelLayout
TILING_DATA_FIELD_DEF(uint32_t, capacity);    // C: slots per rank of MoeEpExpertParallelLayout
TILING_DATA_FIELD_DEF(uint32_t, chunk);       // row elements per UB pass
END_TILING_DATA_DEF;

REGISTER_TILING_DATA_CLASS(MoeEpDispatch, MoeEpTilingData)
REGISTER_TILING_DATA_CLASS(MoeEpCombine, MoeEpTilingData)
REGISTER_TILING_DATA_CLASS(MoeEpGatherSum, MoeEpTilingData)
REGISTER_TILING_DATA_CLASS(MoeEpGatherRows, MoeEpTilingData)
REGISTER_TILING_DATA_CLASS(MoeEpCombineGrad, MoeEpTilingData)
REGISTER_TILING_DATA_CLASS(MoeEpExpertParallelLayout, MoeEpTilingData)

}  // namespace optiling

#endif  // MOE_EP_TILING_H_
