// MoeEpExpertParallelLayout: expert_ids [T, K] int32, experts_per_rank [1] int32
//   -> send_token_index [R, C] int32   token sent in slot (d, i), -1 if unused
//      send_counts [R] int32           tokens sent to each rank
//      token_slot [T, R] int32         flat slot d*C+i of token t at rank d, -1 if not sent
//      send_local_ids [R, C, K] int32  local expert id at d of the k-th choice, -1 if the k-th
//                                      expert is not on d
// Rank d holds experts [d*L, (d+1)*L) with L = experts_per_rank; a token goes to a rank once,
// however many of its experts live there, in token order (R and C come from the tiling, read
// from the output shapes). The contract of custom_ops/cpu/expert_parallel.cc.
// Differences: the CPU kernel fails on an expert id outside [0, R*L) and on more than C tokens
// for one rank; this one ignores such an id and sends only the first C tokens (send_counts <= C).
//
// Work split: each core fills the blocks of a range of destination ranks (send_token_index,
// send_local_ids) and the token_slot rows of a range of tokens; core 0 writes send_counts.
#include "moe_ep_common.h"

namespace moe_ep {

class ExpertParallelLayoutKernel {
public:
    __aicore__ inline void Init(GM_ADDR expert_ids, GM_ADDR experts_per_rank, GM_ADDR send_token_index,
                                GM_ADDR send_counts, GM_ADDR token_slot, GM_ADDR send_local_ids,
                                int64_t tokens, int64_t top_k, int64_t world_size, int64_t capacity)
    {
        tokens_ = tokens;
        top_k_ = top_k;
        world_size_ = world_size;
        capacity_ = capacity;
        ids_.Init(pipe_, expert_ids, tokens * top_k);
        experts_per_rank_in_.Init(pipe_, experts_per_rank, 1, kScalarTile);
        send_token_index_.Init(pipe_, send_token_index, world_size * capacity);
        send_counts_.Init(pipe_, send_counts, world_size);
        token_slot_.Init(pipe_, token_slot, tokens * world_size);
        send_local_ids_.Init(pipe_, send_local_ids, world_size * capacity * top_k);
        const uint32_t per_rank_bytes = AlignUp(static_cast<uint32_t>(world_size * sizeof(int32_t)));
        pipe_.InitBuffer(sent_buffer_, per_rank_bytes);
        pipe_.InitBuffer(last_token_buffer_, per_rank_bytes);
        sent_ = sent_buffer_.Get<int32_t>();
        last_token_ = last_token_buffer_.Get<int32_t>();
    }

    __aicore__ inline void Process()
    {
        experts_per_rank_ = experts_per_rank_in_.Get(0);
        if (experts_per_rank_ <= 0) {
            experts_per_rank_ = 1;   // the CPU kernel fails here; keep the indexing defined
        }
        if (GetBlockIdx() == 0) {
            WriteSendCounts();
        }
        const Range ranks = CoreRange(world_size_);
        for (int64_t rank = ranks.begin; rank < ranks.end; ++rank) {
            WriteRankBlock(rank);
        }
        WriteTokenSlots(CoreRange(tokens_));
        send_token_index_.Flush();
        send_local_ids_.Flush();
        token_slot_.Flush();
    }

private:
    // The rank holding `expert`, or -1 for an id outside [0, R*L).
    __aicore__ inline int64_t RankOf(int32_t expert) const
    {
        if (expert < 0 || expert >= world_size_ * experts_per_rank_) {
            return kNone;
        }
        return expert / experts_per_rank_;
    }

    // sent_[d] = tokens before `end_token` with at least one expert on d (all ranks).
    __aicore__ inline void CountTokensBefore(int64_t end_token)
    {
        for (int64_t rank = 0; rank < world_size_; ++rank) {
            sent_.SetValue(static_cast<uint32_t>(rank), 0);
            last_token_.SetValue(static_cast<uint32_t>(rank), kNone);
        }
        for (int64_t token = 0; token < end_token; ++token) {
            MarkRanksOf(token, true);
        }
    }

    // Sets last_token_[d] = token for each rank d holding one of the token's experts; with
    // `count`, also increments sent_[d] once per such rank.
    __aicore__ inline void MarkRanksOf(int64_t token, bool count)
    {
        for (int64_t k = 0; k < top_k_; ++k) {
            const int64_t rank = RankOf(ids_.Get(token * top_k_ + k));
            if (rank < 0 || last_token_.GetValue(static_cast<uint32_t>(rank)) == token) {
                continue;
            }
            last_token_.SetValue(static_cast<uint32_t>(rank), static_cast<int32_t>(token));
            if (count) {
                sent_.SetValue(static_cast<uint32_t>(rank), sent_.GetValue(static_cast<uint32_t>(rank)) + 1);
            }
        }
    }

    __aicore__ inline void WriteSendCounts()
    {
        CountTokensBefore(tokens_);
        send_counts_.Seek(0);
        for (int64_t rank = 0; rank < world_size_; ++rank) {
            const int64_t sent = sent_.GetValue(static_cast<uint32_t>(rank));
            send_counts_.Put(static_cast<int32_t>(Min(sent, capacity_)));
        }
        send_counts_.Flush();
    }

    // Block `rank` of send_token_index and send_local_ids: its tokens in order, then -1s.
    __aicore__ inline void WriteRankBlock(int64_t rank)
    {
        send_token_index_.Seek(rank * capacity_);
        send_local_ids_.Seek(rank * capacity_ * top_k_);
        int64_t sent = 0;
        for (int64_t token = 0; token < tokens_ && sent < capacity_; ++token) {
            bool goes_to_rank = false;
            for (int64_t k = 0; k < top_k_; ++k) {
                goes_to_rank = goes_to_rank || RankOf(ids_.Get(token * top_k_ + k)) == rank;
            }
            if (!goes_to_rank) {
                continue;
            }
            send_token_index_.Put(static_cast<int32_t>(token));
            for (int64_t k = 0; k < top_k_; ++k) {
                const int32_t expert = ids_.Get(token * top_k_ + k);
                send_local_ids_.Put(RankOf(expert) == rank
                                        ? static_cast<int32_t>(expert - rank * experts_per_rank_)
                                        : kNone);
            }
            ++sent;
        }
        for (; sent < capacity_; ++sent) {
            send_token_index_.Put(kNone);
            for (int64_t k = 0; k < top_k_; ++k) {
                send_local_ids_.Put(kNone);
            }
        }
    }

    // Rows token_slot[t, :] for the tokens of this core.
    __aicore__ inline void WriteTokenSlots(const Range &tokens)
    {
        CountTokensBefore(tokens.begin);
        token_slot_.Seek(tokens.begin * world_size_);
        for (int64_t token = tokens.begin; token < tokens.end; ++token) {
            MarkRanksOf(token, false);
            for (int64_t rank = 0; rank < world_size_; ++rank) {
                const uint32_t r = static_cast<uint32_t>(rank);
                int32_t slot = kNone;
                if (last_token_.GetValue(r) == token) {
                    const int32_t index = sent_.GetValue(r);
                    if (index < capacity_) {
                        slot = static_cast<int32_t>(rank * capacity_ + index);
                    }
                    sent_.SetValue(r, index + 1);
                }
                token_slot_.Put(slot);
            }
        }
    }

    TPipe pipe_;
    int64_t tokens_ = 0, top_k_ = 0, world_size_ = 0, capacity_ = 0;
    int64_t experts_per_rank_ = 1;
    IndexReader<int32_t> ids_;
    IndexReader<int32_t> experts_per_rank_in_;
    IndexWriter<int32_t> send_token_index_, send_counts_, token_slot_, send_local_ids_;
    TBuf<TPosition::VECCALC> sent_buffer_, last_token_buffer_;
    LocalTensor<int32_t> sent_, last_token_;
};

}  // namespace moe_ep

extern "C" __global__ __aicore__ void moe_ep_expert_parallel_layout(
    GM_ADDR expert_ids, GM_ADDR experts_per_rank, GM_ADDR send_token_index, GM_ADDR send_counts,
    GM_ADDR token_slot, GM_ADDR send_local_ids, GM_ADDR workspace, GM_ADDR tiling)
{
    GET_TILING_DATA(tiling_data, tiling);
    moe_ep::ExpertParallelLayoutKernel kernel;
    kernel.Init(expert_ids, experts_per_rank, send_token_index, send_counts, token_slot,
                send_local_ids, tiling_data.tokens, tiling_data.topK, tiling_data.worldSize,
                tiling_data.capacity);
    kernel.Process();
}
