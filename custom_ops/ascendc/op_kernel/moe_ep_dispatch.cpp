// MoeEpDispatch: x [T, H], expert_ids [T, K] int32 (-1 = masked), capacity [1] int32
//                -> grouped_x [T*K, H], positions [T, K] int32, tokens_per_expert [E] int32,
//                   num_dropped [1] int32
//
// The contract of custom_ops/cpu/dispatch_combine.cc (Dispatch), E read from tokens_per_expert:
//   - (t, k) pairs are grouped by expert, ascending; inside an expert by t, then k (a stable
//     counting sort of the flattened expert_ids). positions[t, k] is the row of grouped_x that
//     holds x[t] for that pair, or -1.
//   - capacity > 0 keeps the first `capacity` pairs of each expert; the others get -1 and count
//     in num_dropped; tokens_per_expert counts kept pairs. capacity = 0 is dropless.
//   - expert id -1 is a masked pair: position -1, neither a row nor a drop.
//   - rows of grouped_x from sum(tokens_per_expert) on are zero.
// Difference: the CPU kernel fails on an expert id outside [-1, E) or a negative capacity; this
// one treats such an id as masked and a negative capacity as 0.
//
// Work split: every core computes the per-expert counts from all ids (cheap integer work in
// UB), then handles its own range of tokens: their positions and row copies. Core 0 writes
// tokens_per_expert and num_dropped. The zero tail rows are shared out across the cores.
#include "moe_ep_common.h"

namespace moe_ep {

template <typename T>
class DispatchKernel {
public:
    __aicore__ inline void Init(GM_ADDR x, GM_ADDR expert_ids, GM_ADDR capacity, GM_ADDR grouped_x,
                                GM_ADDR positions, GM_ADDR tokens_per_expert, GM_ADDR num_dropped,
                                int64_t tokens, int64_t top_k, int64_t hidden, int64_t experts,
                                uint32_t chunk)
    {
        tokens_ = tokens;
        top_k_ = top_k;
        hidden_ = hidden;
        experts_ = experts;
        x_.SetGlobalBuffer(reinterpret_cast<__gm__ T *>(x), tokens * hidden);
        grouped_x_.SetGlobalBuffer(reinterpret_cast<__gm__ T *>(grouped_x), tokens * top_k * hidden);
        ids_.Init(pipe_, expert_ids, tokens * top_k);
        capacity_.Init(pipe_, capacity, 1, kScalarTile);
        positions_.Init(pipe_, positions, tokens * top_k);
        counts_out_.Init(pipe_, tokens_per_expert, experts);
        dropped_out_.Init(pipe_, num_dropped, 1, kScalarTile);
        mover_.Init(pipe_, chunk);
        const uint32_t per_expert_bytes = AlignUp(static_cast<uint32_t>(experts * sizeof(int32_t)));
        pipe_.InitBuffer(kept_buffer_, per_expert_bytes);
        pipe_.InitBuffer(next_row_buffer_, per_expert_bytes);
        pipe_.InitBuffer(seen_buffer_, per_expert_bytes);
        kept_ = kept_buffer_.Get<int32_t>();
        next_row_ = next_row_buffer_.Get<int32_t>();
        seen_ = seen_buffer_.Get<int32_t>();
    }

    __aicore__ inline void Process()
    {
        const int64_t used_rows = CountRows();
        const Range tokens = CoreRange(tokens_);
        CountPairsBefore(tokens.begin * top_k_);
        positions_.Seek(tokens.begin * top_k_);
        for (int64_t token = tokens.begin; token < tokens.end; ++token) {
            for (int64_t k = 0; k < top_k_; ++k) {
                const int32_t row = PlacePair(ids_.Get(token * top_k_ + k));
                positions_.Put(row);
                if (row >= 0) {
                    mover_.Copy(grouped_x_[static_cast<int64_t>(row) * hidden_], x_[token * hidden_], hidden_);
                }
            }
        }
        positions_.Flush();
        const Range tail = CoreRange(tokens_ * top_k_ - used_rows);
        for (int64_t row = used_rows + tail.begin; row < used_rows + tail.end; ++row) {
            mover_.Zero(grouped_x_[row * hidden_], hidden_);
        }
    }

private:
    __aicore__ inline bool Valid(int32_t expert) const { return expert >= 0 && expert < experts_; }

    // Fills kept_ (rows each expert keeps) and next_row_ (the first row of each expert's group),
    // writes the counts and num_dropped on core 0, and returns the number of rows used.
    __aicore__ inline int64_t CountRows()
    {
        int32_t capacity = capacity_.Get(0);
        if (capacity < 0) {
            capacity = 0;
        }
        for (int64_t expert = 0; expert < experts_; ++expert) {
            kept_.SetValue(static_cast<uint32_t>(expert), 0);   // requested pairs, for now
        }
        for (int64_t slot = 0; slot < tokens_ * top_k_; ++slot) {
            const int32_t expert = ids_.Get(slot);
            if (Valid(expert)) {
                kept_.SetValue(static_cast<uint32_t>(expert), kept_.GetValue(static_cast<uint32_t>(expert)) + 1);
            }
        }
        int64_t group_start = 0;
        int32_t dropped = 0;
        const bool publish = GetBlockIdx() == 0;
        counts_out_.Seek(0);
        for (int64_t expert = 0; expert < experts_; ++expert) {
            const int32_t requested = kept_.GetValue(static_cast<uint32_t>(expert));
            const int32_t kept = (capacity > 0 && requested > capacity) ? capacity : requested;
            dropped += requested - kept;
            kept_.SetValue(static_cast<uint32_t>(expert), kept);
            next_row_.SetValue(static_cast<uint32_t>(expert), static_cast<int32_t>(group_start));
            group_start += kept;
            if (publish) {
                counts_out_.Put(kept);
            }
        }
        if (publish) {
            counts_out_.Flush();
            dropped_out_.Seek(0);
            dropped_out_.Put(dropped);
            dropped_out_.Flush();
        }
        return group_start;
    }

    // seen_[e] = pairs of expert e among the first `slots` pairs (those of earlier cores).
    __aicore__ inline void CountPairsBefore(int64_t slots)
    {
        for (int64_t expert = 0; expert < experts_; ++expert) {
            seen_.SetValue(static_cast<uint32_t>(expert), 0);
        }
        for (int64_t slot = 0; slot < slots; ++slot) {
            const int32_t expert = ids_.Get(slot);
            if (Valid(expert)) {
                seen_.SetValue(static_cast<uint32_t>(expert), seen_.GetValue(static_cast<uint32_t>(expert)) + 1);
            }
        }
    }

    // The row of the next pair of `expert` (pairs visited in order), or -1.
    __aicore__ inline int32_t PlacePair(int32_t expert)
    {
        if (!Valid(expert)) {
            return kNone;
        }
        const uint32_t e = static_cast<uint32_t>(expert);
        const int32_t rank_in_expert = seen_.GetValue(e);
        seen_.SetValue(e, rank_in_expert + 1);
        if (rank_in_expert >= kept_.GetValue(e)) {
            return kNone;   // beyond the capacity: dropped
        }
        return next_row_.GetValue(e) + rank_in_expert;
    }

    TPipe pipe_;
    int64_t tokens_ = 0, top_k_ = 0, hidden_ = 0, experts_ = 0;
    GlobalTensor<T> x_, grouped_x_;
    IndexReader<int32_t> ids_;
    IndexReader<int32_t> capacity_;
    IndexWriter<int32_t> positions_;
    IndexWriter<int32_t> counts_out_;
    IndexWriter<int32_t> dropped_out_;
    RowMover<T> mover_;
    TBuf<TPosition::VECCALC> kept_buffer_, next_row_buffer_, seen_buffer_;
    LocalTensor<int32_t> kept_, next_row_, seen_;
};

}  // namespace moe_ep

extern "C" __global__ __aicore__ void moe_ep_dispatch(GM_ADDR x, GM_ADDR expert_ids, GM_ADDR capacity,
                                                      GM_ADDR grouped_x, GM_ADDR positions,
                                                      GM_ADDR tokens_per_expert, GM_ADDR num_dropped,
                                                      GM_ADDR workspace, GM_ADDR tiling)
{
    GET_TILING_DATA(tiling_data, tiling);
    moe_ep::DispatchKernel<DTYPE_X> kernel;
    kernel.Init(x, expert_ids, capacity, grouped_x, positions, tokens_per_expert, num_dropped,
                tiling_data.tokens, tiling_data.topK, tiling_data.hidden, tiling_data.experts,
                tiling_data.chunk);
    kernel.Process();
}
