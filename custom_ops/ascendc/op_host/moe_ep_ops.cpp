// Host side of the mindspore-moe-ep AscendC operators: definitions (inputs, outputs, dtypes) and
// tiling (sizes, core count, UB budget). Operator names, tensor names and semantics are those of
// the CPU kernels in custom_ops/cpu (see the header comment of each op_kernel/*.cpp).
//
// Output shapes come from MindSpore (the Python Cells' out_shape): some depend on sizes that are
// not in the inputs (E, R, C), so the operators define no InferShape and run in MindSpore's
// kernel-by-kernel mode (jit_level O0 / O1; not GE, O2). The tiling reads those sizes from the
// output shapes, as the CPU kernels do.
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "moe_ep_tiling.h"
#include "register/op_def_registry.h"
#include "tiling/platform/platform_ascendc.h"

namespace optiling {
namespace {

constexpr uint32_t kChunk = 2048;             // row elements per UB pass (8 KB in float32)
constexpr uint32_t kIndexTileBytes = 8192;    // op_kernel/moe_ep_common.h: kIndexTile int32
constexpr uint32_t kScalarTileBytes = 32;
constexpr int64_t kMaxExperts = 4096;         // Dispatch keeps 3 int32 per expert in UB
constexpr int64_t kMaxRanks = 4096;           // Layout keeps 2 int32 per rank in UB
constexpr int64_t kMaxGradRows = 65536;       // CombineGrad keeps 1 byte per row in UB
constexpr int64_t kMaxIndexValues = INT32_MAX;

ge::graphStatus Fail(gert::TilingContext *context, const char *message, int64_t value)
{
    std::fprintf(stderr, "[mindspore-moe-ep] %s tiling: %s (got %lld)\n", context->GetNodeType(),
                 message, static_cast<long long>(value));
    return ge::GRAPH_FAILED;
}

int64_t Dim(const gert::StorageShape *shape, size_t axis)
{
    return shape == nullptr ? -1 : shape->GetStorageShape().GetDim(axis);
}

int64_t ElementBytes(gert::TilingContext *context, size_t input)
{
    const auto *desc = context->GetInputDesc(input);
    if (desc == nullptr) {
        return 4;
    }
    return desc->GetDataType() == ge::DT_FLOAT ? 4 : 2;
}

// Saves the tiling, sets the core count (at least 1, at most the vector cores) and the system
// workspace; fails if the kernel's UB estimate exceeds the core's UB.
ge::graphStatus Finish(gert::TilingContext *context, MoeEpTilingData &tiling, int64_t work_items,
                       uint64_t ub_bytes_needed)
{
    auto platform = platform_ascendc::PlatformAscendC(context->GetPlatformInfo());
    uint64_t ub_bytes = 0;
    platform.GetCoreMemSize(platform_ascendc::CoreMemType::UB, ub_bytes);
    if (ub_bytes_needed > ub_bytes) {
        return Fail(context, "the kernel needs more UB than the core has (bytes)",
                    static_cast<int64_t>(ub_bytes_needed));
    }
    int64_t cores = static_cast<int64_t>(platform.GetCoreNumAiv());
    if (work_items < cores) {
        cores = work_items < 1 ? 1 : work_items;
    }
    context->SetBlockDim(static_cast<uint32_t>(cores));
    tiling.SaveToBuffer(context->GetRawTilingData()->GetData(),
                        context->GetRawTilingData()->GetCapacity());
    context->GetRawTilingData()->SetDataSize(tiling.GetDataSize());
    size_t *workspace = context->GetWorkspaceSizes(1);
    workspace[0] = platform.GetLibApiWorkSpaceSize();
    return ge::GRAPH_SUCCESS;
}

// UB of RowAccumulator<T>: 2 input + 2 output chunks of T, and two float32 chunks.
uint64_t AccumulatorBytes(int64_t element_bytes)
{
    return 4ull * kChunk * element_bytes + 2ull * kChunk * 4;
}

// UB of RowMover<T>: 2 queue chunks and a zero chunk.
uint64_t MoverBytes(int64_t element_bytes) { return 3ull * kChunk * element_bytes; }

// MoeEpCombine / MoeEpGatherSum / MoeEpGatherRows: inputs (rows [N, H], positions [T, K], ...).
ge::graphStatus GatherSumTiling(gert::TilingContext *context)
{
    const auto *rows = context->GetInputShape(0);
    const auto *positions = context->GetInputShape(1);
    const int64_t tokens = Dim(positions, 0), top_k = Dim(positions, 1);
    const int64_t num_rows = Dim(rows, 0), hidden = Dim(rows, 1);
    if (tokens < 0 || top_k < 0 || num_rows < 0 || hidden < 0) {
        return Fail(context, "rows and positions must be 2-D", -1);
    }
    if (tokens * top_k > kMaxIndexValues) {
        return Fail(context, "tokens * top_k must fit in int32", tokens * top_k);
    }
    MoeEpTilingData tiling;
    tiling.set_tokens(static_cast<uint32_t>(tokens));
    tiling.set_topK(static_cast<uint32_t>(top_k));
    tiling.set_rows(static_cast<uint32_t>(num_rows));
    tiling.set_hidden(static_cast<uint32_t>(hidden));
    tiling.set_chunk(kChunk);
    const bool weighted = std::string(context->GetNodeType()) == "MoeEpCombine";
    const uint64_t ub = AccumulatorBytes(ElementBytes(context, 0)) + kIndexTileBytes * (weighted ? 2 : 1);
    return Finish(context, tiling, tokens, ub);
}

// MoeEpCombineGrad: dy [T, H], expert_out [N, H], positions [T, K], weights [T, K].
ge::graphStatus CombineGradTiling(gert::TilingContext *context)
{
    const auto *dy = context->GetInputShape(0);
    const auto *expert_out = context->GetInputShape(1);
    const auto *positions = context->GetInputShape(2);
    const int64_t tokens = Dim(dy, 0), hidden = Dim(dy, 1);
    const int64_t num_rows = Dim(expert_out, 0), top_k = Dim(positions, 1);
    if (tokens < 0 || hidden < 0 || num_rows < 0 || top_k < 0) {
        return Fail(context, "dy, expert_out and positions must be 2-D", -1);
    }
    if (num_rows > kMaxGradRows) {
        return Fail(context, "expert_out may have at most 65536 rows", num_rows);
    }
    if (tokens * top_k > kMaxIndexValues) {
        return Fail(context, "tokens * top_k must fit in int32", tokens * top_k);
    }
    MoeEpTilingData tiling;
    tiling.set_tokens(static_cast<uint32_t>(tokens));
    tiling.set_topK(static_cast<uint32_t>(top_k));
    tiling.set_rows(static_cast<uint32_t>(num_rows));
    tiling.set_hidden(static_cast<uint32_t>(hidden));
    tiling.set_chunk(kChunk);
    const int64_t element = ElementBytes(context, 0);
    const uint64_t ub = 3ull * kIndexTileBytes + MoverBytes(element) + 4ull * kChunk * element +
                        3ull * kChunk * 4 + 32 + static_cast<uint64_t>(num_rows) + 32;
    return Finish(context, tiling, tokens > num_rows ? tokens : num_rows, ub);
}

// MoeEpDispatch: x [T, H], expert_ids [T, K], capacity [1]; E from tokens_per_expert [E].
ge::graphStatus DispatchTiling(gert::TilingContext *context)
{
    const auto *x = context->GetInputShape(0);
    const auto *expert_ids = context->GetInputShape(1);
    const int64_t tokens = Dim(x, 0), hidden = Dim(x, 1), top_k = Dim(expert_ids, 1);
    const int64_t experts = Dim(context->GetOutputShape(2), 0);
    if (tokens < 0 || hidden < 0 || top_k < 0 || experts < 0) {
        return Fail(context, "x and expert_ids must be 2-D and tokens_per_expert 1-D", -1);
    }
    if (experts > kMaxExperts) {
        return Fail(context, "at most 4096 experts (tokens_per_expert.shape[0])", experts);
    }
    if (tokens * top_k > kMaxIndexValues) {
        return Fail(context, "tokens * top_k must fit in int32", tokens * top_k);
    }
    MoeEpTilingData tiling;
    tiling.set_tokens(static_cast<uint32_t>(tokens));
    tiling.set_topK(static_cast<uint32_t>(top_k));
    tiling.set_hidden(static_cast<uint32_t>(hidden));
    tiling.set_experts(static_cast<uint32_t>(experts));
    tiling.set_chunk(kChunk);
    const uint64_t ub = 3ull * kIndexTileBytes + 2ull * kScalarTileBytes +
                        MoverBytes(ElementBytes(context, 0)) + 3ull * (experts * 4 + 32);
    return Finish(context, tiling, tokens, ub);
}

// MoeEpExpertParallelLayout: expert_ids [T, K], experts_per_rank [1]; R, C from
// send_token_index [R, C].
ge::graphStatus LayoutTiling(gert::TilingContext *context)
{
    const auto *expert_ids = context->GetInputShape(0);
    const auto *send_token_index = context->GetOutputShape(0);
    const int64_t tokens = Dim(expert_ids, 0), top_k = Dim(expert_ids, 1);
    const int64_t world_size = Dim(send_token_index, 0), capacity = Dim(send_token_index, 1);
    if (tokens < 0 || top_k < 0 || world_size < 0 || capacity < 0) {
        return Fail(context, "expert_ids and send_token_index must be 2-D", -1);
    }
    if (world_size > kMaxRanks) {
        return Fail(context, "at most 4096 ranks (send_token_index.shape[0])", world_size);
    }
    if (world_size * capacity * top_k > kMaxIndexValues || tokens * world_size > kMaxIndexValues) {
        return Fail(context, "the layout outputs must have fewer than 2^31 values",
                    world_size * capacity * top_k);
    }
    MoeEpTilingData tiling;
    tiling.set_tokens(static_cast<uint32_t>(tokens));
    tiling.set_topK(static_cast<uint32_t>(top_k));
    tiling.set_worldSize(static_cast<uint32_t>(world_size));
    tiling.set_capacity(static_cast<uint32_t>(capacity));
    const uint64_t ub = 5ull * kIndexTileBytes + kScalarTileBytes + 2ull * (world_size * 4 + 32);
    return Finish(context, tiling, tokens > world_size ? tokens : world_size, ub);
}

}  // namespace
}  // namespace optiling

namespace ops {
namespace {

const std::vector<ge::DataType> kFloats = {ge::DT_FLOAT, ge::DT_FLOAT16, ge::DT_BF16};
const std::vector<ge::DataType> kInt32s(3, ge::DT_INT32);
const std::vector<ge::DataType> kFloat32s(3, ge::DT_FLOAT);
const std::vector<ge::Format> kNd(3, ge::FORMAT_ND);

// Declares a required ND tensor; each column of the dtype lists is one supported combination.
template <typename Param>
void Declare(Param &param, const std::vector<ge::DataType> &dtypes)
{
    param.ParamType(REQUIRED).DataType(dtypes).Format(kNd).UnknownShapeFormat(kNd);
}

}  // namespace

class MoeEpDispatch : public OpDef {
public:
    explicit MoeEpDispatch(const char *name) : OpDef(name)
    {
        Declare(this->Input("x"), kFloats);
        Declare(this->Input("expert_ids"), kInt32s);
        Declare(this->Input("capacity"), kInt32s);
        Declare(this->Output("grouped_x"), kFloats);
        Declare(this->Output("positions"), kInt32s);
        Declare(this->Output("tokens_per_expert"), kInt32s);
        Declare(this->Output("num_dropped"), kInt32s);
        this->AICore().SetTiling(optiling::DispatchTiling).AddConfig("ascend910b").AddConfig("ascend910_93");
    }
};
OP_ADD(MoeEpDispatch);

class MoeEpCombine : public OpDef {
public:
    explicit MoeEpCombine(const char *name) : OpDef(name)
    {
        Declare(this->Input("expert_out"), kFloats);
        Declare(this->Input("positions"), kInt32s);
        Declare(this->Input("weights"), kFloat32s);
        Declare(this->Output("y"), kFloats);
        this->AICore().SetTiling(optiling::GatherSumTiling).AddConfig("ascend910b").AddConfig("ascend910_93");
    }
};
OP_ADD(MoeEpCombine);

class MoeEpGatherSum : public OpDef {
public:
    explicit MoeEpGatherSum(const char *name) : OpDef(name)
    {
        Declare(this->Input("rows"), kFloats);
        Declare(this->Input("positions"), kInt32s);
        Declare(this->Output("y"), kFloats);
        this->AICore().SetTiling(optiling::GatherSumTiling).AddConfig("ascend910b").AddConfig("ascend910_93");
    }
};
OP_ADD(MoeEpGatherSum);

class MoeEpGatherRows : public OpDef {
public:
    explicit MoeEpGatherRows(const char *name) : OpDef(name)
    {
        Declare(this->Input("rows"), kFloats);
        Declare(this->Input("index"), kInt32s);
        Declare(this->Input("inverse_index"), kInt32s);
        Declare(this->Output("out"), kFloats);
        this->AICore().SetTiling(optiling::GatherSumTiling).AddConfig("ascend910b").AddConfig("ascend910_93");
    }
};
OP_ADD(MoeEpGatherRows);

class MoeEpCombineGrad : public OpDef {
public:
    explicit MoeEpCombineGrad(const char *name) : OpDef(name)
    {
        Declare(this->Input("dy"), kFloats);
        Declare(this->Input("expert_out"), kFloats);
        Declare(this->Input("positions"), kInt32s);
        Declare(this->Input("weights"), kFloat32s);
        Declare(this->Output("d_expert_out"), kFloats);
        Declare(this->Output("d_weights"), kFloat32s);
        this->AICore().SetTiling(optiling::CombineGradTiling).AddConfig("ascend910b").AddConfig("ascend910_93");
    }
};
OP_ADD(MoeEpCombineGrad);

class MoeEpExpertParallelLayout : public OpDef {
public:
    explicit MoeEpExpertParallelLayout(const char *name) : OpDef(name)
    {
        const std::vector<ge::DataType> int32_only = {ge::DT_INT32};
        const std::vector<ge::Format> nd_only = {ge::FORMAT_ND};
        for (const char *input : {"expert_ids", "experts_per_rank"}) {
            this->Input(input).ParamType(REQUIRED).DataType(int32_only).Format(nd_only).UnknownShapeFormat(nd_only);
        }
        for (const char *output : {"send_token_index", "send_counts", "token_slot", "send_local_ids"}) {
            this->Output(output).ParamType(REQUIRED).DataType(int32_only).Format(nd_only).UnknownShapeFormat(nd_only);
        }
        this->AICore().SetTiling(optiling::LayoutTiling).AddConfig("ascend910b").AddConfig("ascend910_93");
    }
};
OP_ADD(MoeEpExpertParallelLayout);

}  // namespace ops
