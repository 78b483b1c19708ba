// MoeEpCombineGrad: dy [T, H], expert_out [N, H], positions [T, K] int32, weights [T, K] float32
//                   -> d_expert_out [N, H], d_weights [T, K] float32
//
//   d_expert_out[positions[t, k]] = weights[t, k] * dy[t]      (rows no position refers to: 0)
//   d_weights[t, k] = <dy[t], expert_out[positions[t, k]]>     (0 where the position is invalid)
//
// Same contract as custom_ops/cpu/dispatch_combine.cc (CombineGrad). Differences: the CPU kernel
// fails on an out-of-range or repeated position, this one skips an out-of-range position and
// lets the last (t, k) win for a repeated one; the dot product is summed chunk by chunk with
// ReduceSum (float32), so it may differ from the CPU's sequential sum in the last bits.
//
// Work split: each core handles a range of tokens (their gradient rows and d_weights) and a
// range of rows (zeroing the rows no position refers to; every core marks the referenced rows
// itself from all positions, so no core waits for another).
#include "moe_ep_common.h"

namespace moe_ep {

template <typename T>
class CombineGradKernel {
public:
    __aicore__ inline void Init(GM_ADDR dy, GM_ADDR expert_out, GM_ADDR positions, GM_ADDR weights,
                                GM_ADDR d_expert_out, GM_ADDR d_weights, int64_t tokens,
                                int64_t top_k, int64_t rows, int64_t hidden, uint32_t chunk)
    {
        tokens_ = tokens;
        top_k_ = top_k;
        rows_ = rows;
        hidden_ = hidden;
        chunk_ = chunk;
        dy_.SetGlobalBuffer(reinterpret_cast<__gm__ T *>(dy), tokens * hidden);
        expert_out_.SetGlobalBuffer(reinterpret_cast<__gm__ T *>(expert_out), rows * hidden);
        d_expert_out_.SetGlobalBuffer(reinterpret_cast<__gm__ T *>(d_expert_out), rows * hidden);
        positions_.Init(pipe_, positions, tokens * top_k);
        weights_.Init(pipe_, weights, tokens * top_k);
        d_weights_.Init(pipe_, d_weights, tokens * top_k);
        mover_.Init(pipe_, chunk);
        pipe_.InitBuffer(in_queue_, 2, AlignUp(chunk * sizeof(T)));
        pipe_.InitBuffer(out_queue_, 2, AlignUp(chunk * sizeof(T)));
        pipe_.InitBuffer(dy_buffer_, AlignUp(chunk * sizeof(float)));
        pipe_.InitBuffer(term_buffer_, AlignUp(chunk * sizeof(float)));
        pipe_.InitBuffer(work_buffer_, AlignUp(chunk * sizeof(float)));
        pipe_.InitBuffer(dot_buffer_, kAlign);
        pipe_.InitBuffer(used_buffer_, AlignUp(static_cast<uint32_t>(rows)));
    }

    __aicore__ inline void Process()
    {
        MarkUsedRows();
        const Range tokens = CoreRange(tokens_);
        d_weights_.Seek(tokens.begin * top_k_);
        for (int64_t token = tokens.begin; token < tokens.end; ++token) {
            for (int64_t k = 0; k < top_k_; ++k) {
                const int64_t slot = token * top_k_ + k;
                const int32_t row = positions_.Get(slot);
                if (row < 0 || row >= rows_) {
                    d_weights_.Put(0.0f);
                    continue;
                }
                d_weights_.Put(Backward(token, row, weights_.Get(slot)));
            }
        }
        d_weights_.Flush();
        ZeroUnusedRows();
    }

private:
    // used[row] = 1 for every row some valid position refers to (all tokens, not only ours).
    __aicore__ inline void MarkUsedRows()
    {
        used_ = used_buffer_.Get<uint8_t>();
        LocalTensor<int16_t> used_bits = used_buffer_.Get<int16_t>();
        Duplicate(used_bits, static_cast<int16_t>(0), AlignUp(static_cast<uint32_t>(rows_)) / 2);
        Sync<HardEvent::V_S>();
        for (int64_t slot = 0; slot < tokens_ * top_k_; ++slot) {
            const int32_t row = positions_.Get(slot);
            if (row >= 0 && row < rows_) {
                used_.SetValue(static_cast<uint32_t>(row), static_cast<uint8_t>(1));
            }
        }
    }

    // Writes d_expert_out[row] = weight * dy[token]; returns <dy[token], expert_out[row]>.
    __aicore__ inline float Backward(int64_t token, int32_t row, float weight)
    {
        LocalTensor<float> dy_f = dy_buffer_.Get<float>();
        LocalTensor<float> term = term_buffer_.Get<float>();
        LocalTensor<float> work = work_buffer_.Get<float>();
        LocalTensor<float> dot_part = dot_buffer_.Get<float>();
        float dot = 0.0f;
        for (int64_t offset = 0; offset < hidden_; offset += chunk_) {
            const uint32_t count = static_cast<uint32_t>(Min(chunk_, hidden_ - offset));
            LoadAsFloat(dy_f, dy_[token * hidden_ + offset], count);
            // The gradient row: weight * dy, in the dtype of expert_out.
            LocalTensor<T> out = out_queue_.template AllocTensor<T>();
            if constexpr (IsSameType<T, float>::value) {
                Muls(out, dy_f, weight, count);
            } else {
                Muls(term, dy_f, weight, count);
                Cast(out, term, RoundMode::CAST_RINT, count);
            }
            out_queue_.EnQue(out);
            out = out_queue_.template DeQue<T>();
            DataCopyPad(d_expert_out_[static_cast<int64_t>(row) * hidden_ + offset], out,
                        OneBlock(static_cast<uint32_t>(count * sizeof(T))));
            out_queue_.FreeTensor(out);
            // The weight gradient: a partial dot product of this chunk.
            LoadAsFloat(term, expert_out_[static_cast<int64_t>(row) * hidden_ + offset], count);
            Mul(term, term, dy_f, count);
            ReduceSum(dot_part, term, work, static_cast<int32_t>(count));
            Sync<HardEvent::V_S>();
            dot += dot_part.GetValue(0);
            Sync<HardEvent::S_V>();
        }
        return dot;
    }

    // dst[0, count) = float(src[0, count))
    __aicore__ inline void LoadAsFloat(LocalTensor<float> &dst, const GlobalTensor<T> &src, uint32_t count)
    {
        LocalTensor<T> input = in_queue_.template AllocTensor<T>();
        DataCopyPad(input, src, OneBlock(static_cast<uint32_t>(count * sizeof(T))), NoPad<T>());
        in_queue_.EnQue(input);
        input = in_queue_.template DeQue<T>();
        if constexpr (IsSameType<T, float>::value) {
            Muls(dst, input, 1.0f, count);
        } else {
            Cast(dst, input, RoundMode::CAST_NONE, count);
        }
        in_queue_.FreeTensor(input);
    }

    // Rows of this core's row range that no position refers to are zero.
    __aicore__ inline void ZeroUnusedRows()
    {
        const Range rows = CoreRange(rows_);
        for (int64_t row = rows.begin; row < rows.end; ++row) {
            if (used_.GetValue(static_cast<uint32_t>(row)) == 0) {
                mover_.Zero(d_expert_out_[row * hidden_], hidden_);
            }
        }
    }

    TPipe pipe_;
    int64_t tokens_ = 0, top_k_ = 0, rows_ = 0, hidden_ = 0;
    int64_t chunk_ = 0;
    GlobalTensor<T> dy_, expert_out_, d_expert_out_;
    IndexReader<int32_t> positions_;
    IndexReader<float> weights_;
    IndexWriter<float> d_weights_;
    RowMover<T> mover_;
    TQue<TPosition::VECIN, 2> in_queue_;
    TQue<TPosition::VECOUT, 2> out_queue_;
    TBuf<TPosition::VECCALC> dy_buffer_, term_buffer_, work_buffer_, dot_buffer_, used_buffer_;
    LocalTensor<uint8_t> used_;
};

}  // namespace moe_ep

extern "C" __global__ __aicore__ void moe_ep_combine_grad(GM_ADDR dy, GM_ADDR expert_out,
                                                          GM_ADDR positions, GM_ADDR weights,
                                                          GM_ADDR d_expert_out, GM_ADDR d_weights,
                                                          GM_ADDR workspace, GM_ADDR tiling)
{
    GET_TILING_DATA(tiling_data, tiling);
    moe_ep::CombineGradKernel<DTYPE_DY> kernel;
    kernel.Init(dy, expert_out, positions, weights, d_expert_out, d_weights, tiling_data.tokens,
                tiling_data.topK, tiling_data.rows, tiling_data.hidden, tiling_data.chunk);
    kernel.Process();
}
