// Helpers shared by the AscendC kernels of mindspore-moe-ep (vector cores of Atlas A2 / A3).
//
// Memory model used throughout (so that every kernel stays easy to check):
//   - Index arrays (expert ids, positions, counts) are read from GM into a UB tile by DMA and read
//     by the scalar unit from UB (IndexReader); scalar results go into a UB tile that DMA writes
//     out (IndexWriter). The scalar unit never reads or writes GM directly, so the per-core data
//     cache never needs flushing, and no two cores write the same GM bytes.
//   - Rows (hidden vectors) move GM -> UB -> GM in chunks of `chunk` elements (RowMover), or are
//     summed in float32 in UB (RowAccumulator). DataCopyPad handles lengths that are not a
//     multiple of 32 bytes.
//   - Every hand-off between pipes is synchronised: queues (EnQue / DeQue) between MTE2, V and
//     MTE3, and explicit SetFlag / WaitFlag pairs (Sync<...>) where the scalar unit is involved.
#ifndef MOE_EP_COMMON_H_
#define MOE_EP_COMMON_H_

#include "kernel_operator.h"

namespace moe_ep {

using namespace AscendC;

constexpr int32_t kNone = -1;
constexpr uint32_t kIndexTile = 2048;     // int32 / float values per index tile (8 KB of UB)
constexpr uint32_t kScalarTile = 8;       // a tile for a single value (32 bytes)
constexpr uint32_t kAlign = 32;           // bytes: UB buffer alignment

__aicore__ inline uint32_t AlignUp(uint32_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

__aicore__ inline int64_t Min(int64_t a, int64_t b) { return a < b ? a : b; }

// DataCopyPad parameters: one block of `bytes` bytes, and no padding of the UB copy.
__aicore__ inline DataCopyExtParams OneBlock(uint32_t bytes) { return DataCopyExtParams{1, bytes, 0, 0, 0}; }

template <typename T>
__aicore__ inline DataCopyPadExtParams<T> NoPad()
{
    DataCopyPadExtParams<T> params;
    params.isPad = false;
    params.leftPadding = 0;
    params.rightPadding = 0;
    return params;
}

// Waits until pipe SRC has finished what it issued before pipe DST goes on (event E = SRC_DST).
template <HardEvent E>
__aicore__ inline void Sync()
{
    int32_t event = static_cast<int32_t>(GetTPipePtr()->FetchEventID(E));
    SetFlag<E>(event);
    WaitFlag<E>(event);
}

// The contiguous share [begin, end) of `total` items that this core handles.
struct Range {
    int64_t begin;
    int64_t end;
};

__aicore__ inline Range CoreRange(int64_t total)
{
    const int64_t cores = GetBlockNum();
    const int64_t per_core = (total + cores - 1) / cores;
    const int64_t begin = Min(static_cast<int64_t>(GetBlockIdx()) * per_core, total);
    return Range{begin, Min(begin + per_core, total)};
}

// Scalar reads of a 4-byte GM array (int32_t or float) through a UB tile of `tile` values.
// Any index order works; sequential reads reload the tile once per `tile` values.
template <typename T>
class IndexReader {
public:
    __aicore__ inline void Init(TPipe &pipe, GM_ADDR base, int64_t size, uint32_t tile = kIndexTile)
    {
        gm_.SetGlobalBuffer(reinterpret_cast<__gm__ T *>(base), size);
        size_ = size;
        tile_values_ = tile;
        pipe.InitBuffer(buffer_, AlignUp(tile * sizeof(T)));
        tile_ = buffer_.Get<T>();
        start_ = -1;
        length_ = 0;
    }

    __aicore__ inline T Get(int64_t index)
    {
        if (index < start_ || index >= start_ + length_) {
            Load(index);
        }
        return tile_.GetValue(static_cast<uint32_t>(index - start_));
    }

private:
    __aicore__ inline void Load(int64_t index)
    {
        Sync<HardEvent::S_MTE2>();   // earlier scalar reads of the tile are done
        length_ = Min(static_cast<int64_t>(tile_values_), size_ - index);
        DataCopyPad(tile_, gm_[index], OneBlock(static_cast<uint32_t>(length_ * sizeof(T))), NoPad<T>());
        Sync<HardEvent::MTE2_S>();   // the tile has arrived
        start_ = index;
    }

    GlobalTensor<T> gm_;
    TBuf<TPosition::VECCALC> buffer_;
    LocalTensor<T> tile_;
    int64_t size_ = 0;
    int64_t start_ = -1;
    int64_t length_ = 0;
    uint32_t tile_values_ = kIndexTile;
};

// Scalar writes of consecutive values of a 4-byte GM array through a UB tile of `tile` values.
// Values go to first, first + 1, ... (Seek(first) starts a run); Flush() before the kernel ends.
template <typename T>
class IndexWriter {
public:
    __aicore__ inline void Init(TPipe &pipe, GM_ADDR base, int64_t size, uint32_t tile = kIndexTile)
    {
        gm_.SetGlobalBuffer(reinterpret_cast<__gm__ T *>(base), size);
        tile_values_ = tile;
        pipe.InitBuffer(buffer_, AlignUp(tile * sizeof(T)));
        tile_ = buffer_.Get<T>();
        start_ = 0;
        count_ = 0;
    }

    // The next value goes to `first` (call before a run of Put).
    __aicore__ inline void Seek(int64_t first)
    {
        Flush();
        start_ = first;
    }

    __aicore__ inline void Put(T value)
    {
        if (count_ == tile_values_) {
            Flush();
        }
        tile_.SetValue(static_cast<uint32_t>(count_), value);
        ++count_;
    }

    __aicore__ inline void Flush()
    {
        if (count_ == 0) {
            return;
        }
        Sync<HardEvent::S_MTE3>();   // the scalar writes are in UB
        DataCopyPad(gm_[start_], tile_, OneBlock(static_cast<uint32_t>(count_ * sizeof(T))));
        Sync<HardEvent::MTE3_S>();   // the tile may be overwritten
        start_ += count_;
        count_ = 0;
    }

private:
    GlobalTensor<T> gm_;
    TBuf<TPosition::VECCALC> buffer_;
    LocalTensor<T> tile_;
    int64_t start_ = 0;
    int64_t count_ = 0;
    uint32_t tile_values_ = kIndexTile;
};

// Copies and zeroes rows of `hidden` elements of type T, `chunk` elements at a time.
template <typename T>
class RowMover {
public:
    __aicore__ inline void Init(TPipe &pipe, uint32_t chunk)
    {
        chunk_ = chunk;
        pipe.InitBuffer(queue_, 2, AlignUp(chunk * sizeof(T)));
        pipe.InitBuffer(zeros_, AlignUp(chunk * sizeof(T)));
        LocalTensor<int16_t> zero_bits = zeros_.Get<int16_t>();
        Duplicate(zero_bits, static_cast<int16_t>(0), AlignUp(chunk * sizeof(T)) / 2);
        Sync<HardEvent::V_MTE3>();   // the zero buffer is ready for DMA
    }

    // dst[0, hidden) = src[0, hidden)
    __aicore__ inline void Copy(const GlobalTensor<T> &dst, const GlobalTensor<T> &src, int64_t hidden)
    {
        for (int64_t offset = 0; offset < hidden; offset += chunk_) {
            const uint32_t bytes = static_cast<uint32_t>(Min(chunk_, hidden - offset) * sizeof(T));
            LocalTensor<T> buffer = queue_.template AllocTensor<T>();
            DataCopyPad(buffer, src[offset], OneBlock(bytes), NoPad<T>());
            queue_.EnQue(buffer);
            buffer = queue_.template DeQue<T>();
            DataCopyPad(dst[offset], buffer, OneBlock(bytes));
            queue_.FreeTensor(buffer);
        }
    }

    // dst[0, hidden) = 0
    __aicore__ inline void Zero(const GlobalTensor<T> &dst, int64_t hidden)
    {
        LocalTensor<T> zeros = zeros_.Get<T>();
        for (int64_t offset = 0; offset < hidden; offset += chunk_) {
            const uint32_t bytes = static_cast<uint32_t>(Min(chunk_, hidden - offset) * sizeof(T));
            DataCopyPad(dst[offset], zeros, OneBlock(bytes));
        }
    }

private:
    TQueBind<TPosition::VECIN, TPosition::VECOUT, 2> queue_;
    TBuf<TPosition::VECOUT> zeros_;   // read by DMA only
    int64_t chunk_ = 0;
};

// Sums weighted rows in float32, in the order they are added, and stores the result as T:
//   Begin(n); Accumulate(row_0, w_0, n); Accumulate(row_1, w_1, n); ...; End(dst, n)
// computes dst[h] = T(((0 + w_0 * row_0[h]) + w_1 * row_1[h]) + ...) with float32 products and
// sums rounded at every step, as the CPU kernels do (no fused multiply-add).
template <typename T>
class RowAccumulator {
public:
    __aicore__ inline void Init(TPipe &pipe, uint32_t chunk)
    {
        pipe.InitBuffer(in_queue_, 2, AlignUp(chunk * sizeof(T)));
        pipe.InitBuffer(out_queue_, 2, AlignUp(chunk * sizeof(T)));
        pipe.InitBuffer(sum_buffer_, AlignUp(chunk * sizeof(float)));
        pipe.InitBuffer(term_buffer_, AlignUp(chunk * sizeof(float)));
        sum_ = sum_buffer_.Get<float>();
        term_ = term_buffer_.Get<float>();
    }

    __aicore__ inline void Begin(uint32_t count)
    {
        Duplicate(sum_, 0.0f, count);
    }

    // sum += weight * row[0, count)
    __aicore__ inline void Accumulate(const GlobalTensor<T> &row, float weight, uint32_t count)
    {
        LocalTensor<T> input = in_queue_.template AllocTensor<T>();
        DataCopyPad(input, row, OneBlock(static_cast<uint32_t>(count * sizeof(T))), NoPad<T>());
        in_queue_.EnQue(input);
        input = in_queue_.template DeQue<T>();
        if constexpr (IsSameType<T, float>::value) {
            Muls(term_, input, weight, count);
        } else {
            Cast(term_, input, RoundMode::CAST_NONE, count);   // exact widening
            Muls(term_, term_, weight, count);
        }
        AscendC::Add(sum_, sum_, term_, count);
        in_queue_.FreeTensor(input);
    }

    // dst[0, count) = T(sum), rounded to nearest even for float16 / bfloat16
    __aicore__ inline void End(const GlobalTensor<T> &dst, uint32_t count)
    {
        LocalTensor<T> output = out_queue_.template AllocTensor<T>();
        if constexpr (IsSameType<T, float>::value) {
            Muls(output, sum_, 1.0f, count);   // an exact copy into the output queue
        } else {
            Cast(output, sum_, RoundMode::CAST_RINT, count);
        }
        out_queue_.EnQue(output);
        output = out_queue_.template DeQue<T>();
        DataCopyPad(dst, output, OneBlock(static_cast<uint32_t>(count * sizeof(T))));
        out_queue_.FreeTensor(output);
    }

private:
    TQue<TPosition::VECIN, 2> in_queue_;
    TQue<TPosition::VECOUT, 2> out_queue_;
    TBuf<TPosition::VECCALC> sum_buffer_;
    TBuf<TPosition::VECCALC> term_buffer_;
    LocalTensor<float> sum_;
    LocalTensor<float> term_;
};

}  // namespace moe_ep

#endif  // MOE_EP_COMMON_H_
