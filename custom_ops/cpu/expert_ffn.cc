// The routed SwiGLU experts of one rank and the weighted sum of their outputs, in one kernel
// without a buffer of one row per (token, expert) pair (inference, and training with the
// experts recomputed in backward).
//
//   MoeEpExpertsWeightedSum
//     rows [N, H], local_ids [N, K] int32, weights [N, K] float32, row_counts [B] int32,
//     gate_up_weight [L, H, 2F], down_weight [L, F, H]
//     -> out [N, H], tokens_per_expert [L] int32
//
//   out[i] = sum over k with local_ids[i, k] >= 0 of
//            weights[i, k] * down_e(silu(gate_e(rows[i])) * up_e(rows[i])),  e = local_ids[i, k]
//
// The rows come in B blocks of N / B rows (one per source rank under expert parallelism, B = 1
// locally); block b's first row_counts[b] rows are used, the rest are neither read nor written
// (out's rows there are unspecified). tokens_per_expert[e] counts the pairs expert e computed.
// rows may also be quantized rows (int32 [N, W], int8_rows.h; dispatch.quant: int8 in
// inference): each is dequantized into the weights' dtype as it is gathered, which gives the
// numbers of dequantizing first; out is in the weights' dtype. The gradient refuses them.
//
//   MoeEpExpertsWeightedSumGrad
//     d_out [N, H], then the six inputs above
//     -> d_rows [N, H], d_weights [N, K] float32, d_gate_up_weight [L, H, 2F],
//        d_down_weight [L, F, H]
//   The gradient of sum(out * d_out), recomputing the experts' forward. d_weights is zero where
//   no pair is, d_rows in used rows without a pair; d_rows' unused rows (past row_counts) are
//   unspecified, like out's (NaN with MOE_EP_POISON_UNUSED_ROWS=1).
//
// Why: the grouped path (dispatch -> grouped GEMM -> SwiGLU -> grouped GEMM -> combine) keeps four
// buffers with one row per pair, sized for the worst case (R * C * K rows under expert
// parallelism, ~4x the pairs a balanced step has): grouped rows [P, H], gate_up [P, 2F], hidden
// [P, F] and the expert output [P, H]. Training needs them for the backward pass; inference does
// not. Here each expert's pairs run in chunks of at most kMaxChunkRows rows through a scratch
// per chunk in flight (gathered rows, gate_up, hidden; the expert output reuses the gathered
// rows), and each chunk adds its weighted outputs to its rows' sums at once. Peak memory beyond
// the inputs and the output is the scratch: threads x chunk rows x (H + 3F) elements, plus a
// float32 sum of the used rows for 16-bit types.
//
// Arithmetic: the grouped path's. The GEMMs are the same gemm_backend calls (float32 accumulation,
// one rounding to T per output element), SwiGLU the same row function, and each row's sum is
// accumulated in float32 (weight x output, then add) and rounded once to T. The pairs of a row
// are added in local expert order (the grouped combine adds them in k order, so the two paths
// may differ by float32 rounding). The chunks depend only on the pair counts and the shapes,
// never on the thread count.
//
// Parallel work: chunks in waves of one per kernel thread (across experts); after each wave the
// calling thread adds the wave's outputs to their rows' sums in chunk order, so every row's
// pairs are added in local expert order whatever the thread count.
//
// The gradient works in waves of experts, one per thread: a thread runs its expert's pairs
// through the FFN's forward and backward in chunks, keeping that expert's per-pair buffers
// (gathered rows, gate_up, hidden, weighted output gradient, gate_up and rows gradients), and
// computes the expert's two weight gradients as one GEMM each over all its pairs; then the
// calling thread adds the wave's rows gradients to d_rows in expert order. So the per-pair
// buffers of one expert per thread live at a time, not the worst-case buffers of all of them.
#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "expert_ffn.h"
#include "gemm_backend.h"
#include "int8_rows.h"
#include "kernel_common.h"
#include "row_sums.h"
#include "scratch.h"
#include "swiglu.h"

namespace moe_ep {
namespace {

// Scratch per chunk: chunk rows x (H + 3F) elements, at most ~16 MiB, between 32 and 512 rows.
// oneDNN's single-thread sgemm runs at ~36 GFLOP/s here from ~512 rows per call and at 22-34
// GFLOP/s with 128-384 rows (it packs the weights again on every call; grouped_matmul.cc), so
// wide layers trade some GEMM speed for the bounded scratch. Measured (/tmp scratch script, one
// process, 2 threads, T = 1024, H = 7168, F = 2048, 16 experts, top-8, float32; the layer's
// inference forward, row-wise / grouped experts): 1.60x the time with per-expert waves, then
// with waves across experts 1.25x at 8 MiB (~150 rows) and 1.16-1.32x at 16 MiB (~300 rows).
constexpr int64_t kScratchBytesPerThread = int64_t{16} << 20;
constexpr int64_t kMaxChunkRows = 512, kMinChunkRows = 32;

int64_t ChunkRows(int64_t hidden, int64_t ffn, int64_t element_bytes) {
  const int64_t row_bytes = (hidden + 3 * ffn) * element_bytes;
  return std::clamp<int64_t>(kScratchBytesPerThread / std::max<int64_t>(row_bytes, 1),
                             kMinChunkRows, kMaxChunkRows);
}

// <a, b> in float32 (the weight gradient of a pair).
template <typename T>
float Dot(const T *a, const T *b, int64_t size) {
  float sum = 0.0f;
  for (int64_t h = 0; h < size; ++h) sum += ToFloat(a[h]) * ToFloat(b[h]);
  return sum;
}

void RequireLike(const TensorArg &tensor, const TensorArg &like) {
  tensor.RequireSameDtype(like);
  tensor.RequireRank(like.rank);
  const std::string description = "the shape of " + like.name;
  for (int axis = 0; axis < like.rank; ++axis) {
    tensor.RequireDim(axis, like.dim(axis), description.c_str());
  }
}

// Block b's rows: [first, used_end) are used, [used_end, end) are not (first = b * block_rows,
// used_end = first + counts[b], end = first + block_rows).
template <typename Visit>
void ForEachBlock(const ExpertsShapes &shapes, Visit &&visit) {  // visit(first, used_end, end)
  for (int64_t block = 0; block < shapes.num_blocks; ++block) {
    const int64_t first = block * shapes.block_rows;
    visit(first, first + shapes.counts[block], first + shapes.block_rows);
  }
}

// Float32 sums of the used rows, zeroed: `out` itself for float32, else per-thread scratch
// (scratch.h; only the used rows' pages are touched), which Finish rounds into `out`.
template <typename T>
class RowSums {
 public:
  RowSums(const ExpertsShapes &shapes, T *out) : shapes_(shapes), out_(out) {
    if constexpr (std::is_same_v<T, float>) {
      sums_ = out;
    } else {
      sums_ = ScratchArray<float>(Scratch::kTokenSums, shapes.num_rows * shapes.hidden);
    }
    ForEachBlock(shapes, [&](int64_t first, int64_t used_end, int64_t) {
      std::fill(sums_ + first * shapes.hidden, sums_ + used_end * shapes.hidden, 0.0f);
    });
  }

  float *row(int64_t index) const { return sums_ + index * shapes_.hidden; }

  void Finish() const {
    if constexpr (!std::is_same_v<T, float>) {
      const int64_t hidden = shapes_.hidden;
      ForEachBlock(shapes_, [&](int64_t first, int64_t used_end, int64_t) {
        ParallelFor(used_end - first, MinItemsPerThread(hidden * 6),
                    [&](int64_t begin, int64_t stop) {
          for (int64_t r = first + begin; r < first + stop; ++r) {
            RoundRow(row(r), hidden, out_ + r * hidden);
          }
        });
      });
    }
  }

 private:
  const ExpertsShapes &shapes_;
  T *out_;
  float *sums_ = nullptr;
};

// `count` pairs of `expert` from its `first`.
struct Chunk {
  int64_t expert, first, count;
};

// `num_pairs` pairs of `expert` cut into equal chunks (+-1 row) of at most `chunk_rows`,
// appended to `chunks`.
void AppendChunks(int64_t expert, int64_t num_pairs, int64_t chunk_rows,
                  std::vector<Chunk> &chunks) {
  const int64_t count = (num_pairs + chunk_rows - 1) / chunk_rows;
  for (int64_t index = 0; index < count; ++index) {
    const int64_t first = num_pairs * index / count, end = num_pairs * (index + 1) / count;
    chunks.push_back(Chunk{expert, first, end - first});
  }
}

// The most pairs in one of `chunks` (chunks of one expert may differ by one row).
int64_t LargestChunk(const std::vector<Chunk> &chunks) {
  int64_t largest = 0;
  for (const Chunk &chunk : chunks) largest = std::max(largest, chunk.count);
  return largest;
}

// Runs the items in waves of one per kernel thread: compute(item, slot) for a wave's items in
// parallel (slot: the item's place in its wave, 0 .. threads - 1), then finish(item, slot) for
// each, in item order, on the calling thread. Whatever finish accumulates is thus added in item
// order, whatever the thread count.
template <typename Compute, typename Finish>
void RunInWaves(int64_t count, Compute &&compute, Finish &&finish) {
  const int64_t threads = std::max(1, KernelThreadCount());
  for (int64_t start = 0; start < count; start += threads) {
    const int64_t wave = std::min(threads, count - start);
    ParallelFor(wave, 1, [&](int64_t begin, int64_t end) {
      for (int64_t slot = begin; slot < end; ++slot) compute(start + slot, slot);
    });
    for (int64_t slot = 0; slot < wave; ++slot) finish(start + slot, slot);
  }
}

// The FFN forward of `count` pairs of `expert`: gathered rows [count, H], gate_up [count, 2F]
// and hidden [count, F] (in the caller's buffers), then the output [count, H] into `out`.
// Quantized rows (int8_rows) are dequantized as they are gathered.
template <typename T>
struct ExpertFFN {
  const T *rows, *gate_up_weight, *down_weight;
  int64_t hidden, ffn;
  const uint8_t *int8_rows = nullptr;  // instead of rows: [N, Int8RowBytes(H)]

  ExpertFFN(const ExpertsShapes &shapes, const TensorArg &rows_arg,
            const TensorArg &gate_up_weight_arg, const TensorArg &down_weight_arg)
      : rows(shapes.int8_rows ? nullptr : rows_arg.data_as<const T>()),
        gate_up_weight(gate_up_weight_arg.data_as<const T>()),
        down_weight(down_weight_arg.data_as<const T>()), hidden(shapes.hidden), ffn(shapes.ffn),
        int8_rows(shapes.int8_rows ? rows_arg.data_as<const uint8_t>() : nullptr) {}

  void Forward(int64_t expert, const ExpertPair *pairs, int64_t count, T *gathered, T *gate_up,
               T *activated, T *out) const {
    for (int64_t i = 0; i < count; ++i) {
      if (int8_rows != nullptr) {
        DequantizeRowInt8(int8_rows + pairs[i].row * Int8RowBytes(hidden), hidden,
                          RowDtypeFor<T>(), gathered + i * hidden);
      } else {
        std::memcpy(gathered + i * hidden, rows + pairs[i].row * hidden, hidden * sizeof(T));
      }
    }
    Gemm(ContiguousGemm(count, 2 * ffn, hidden), gathered,
         gate_up_weight + expert * hidden * 2 * ffn, gate_up);                // [count, 2F]
    SwiGLURows(gate_up, ffn, 0, count, activated);                           // [count, F]
    Gemm(ContiguousGemm(count, hidden, ffn), activated, down_weight + expert * ffn * hidden,
         out);                                                                // [count, H]
  }
};

// AddExpertOutputs (expert_ffn.h) for storage type T.
template <typename T>
void AddExpertOutputsOfType(const ExpertsShapes &shapes, const PairsPerExpert &pairs,
                            const ExpertFFN<T> &ffn, const float *weights,
                            const std::function<float *(int64_t row)> &sum_row) {
  const int64_t hidden = shapes.hidden, f = shapes.ffn;
  const int64_t chunk_rows = ChunkRows(hidden, f, sizeof(T));
  std::vector<Chunk> chunks;  // every expert's, in expert order
  for (int64_t expert = 0; expert < shapes.num_experts; ++expert) {
    AppendChunks(expert, static_cast<int64_t>(pairs[expert].size()), chunk_rows, chunks);
  }
  // One scratch per wave slot: gathered rows (then the expert outputs) [rows, H], gate_up,
  // hidden, for the largest chunk of this call (a small step touches a small part), sliced
  // from the calling thread's scratch (scratch.h) before the waves start.
  const int64_t slot_elements = LargestChunk(chunks) * (hidden + 3 * f);
  const int64_t slots = std::min<int64_t>(chunks.size(), std::max(1, KernelThreadCount()));
  T *scratch = ScratchArray<T>(Scratch::kExpertChunks, slots * slot_elements);
  RunInWaves(
      static_cast<int64_t>(chunks.size()),
      [&](int64_t index, int64_t slot) {
        const Chunk &chunk = chunks[index];
        T *gathered = scratch + slot * slot_elements, *gate_up = gathered + chunk.count * hidden;
        ffn.Forward(chunk.expert, pairs[chunk.expert].data() + chunk.first, chunk.count,
                    gathered, gate_up, gate_up + chunk.count * 2 * f, /*out=*/gathered);
      },
      [&](int64_t index, int64_t slot) {
        const Chunk &chunk = chunks[index];
        const ExpertPair *chunk_pairs = pairs[chunk.expert].data() + chunk.first;
        for (int64_t i = 0; i < chunk.count; ++i) {
          const ExpertPair &pair = chunk_pairs[i];
          const float weight = weights[pair.row * shapes.top_k + pair.k];
          AddWeightedRow(scratch + slot * slot_elements + i * hidden, weight, hidden,
                         sum_row(pair.row));
        }
      });
}

// One expert's backward, on the calling thread. Its per-pair buffers (gathered rows, gate_up,
// hidden, weighted output gradient, gate_up gradient, rows gradient) live in `kept`; the rows
// gradient of its pairs is left in `d_pair_rows` for the caller to add up.
template <typename T>
struct ExpertBackward {
  std::unique_ptr<T[]> kept;
  int64_t kept_capacity = 0;
  T *d_pair_rows = nullptr;  // [pairs, H]

  void Run(const ExpertsShapes &shapes, const std::vector<ExpertPair> &list, int64_t expert,
           const ExpertFFN<T> &ffn, const float *weights, const T *d_out, float *d_weights,
           T *d_gate_up_weight, T *d_down_weight) {
    const int64_t hidden = shapes.hidden, f = shapes.ffn, top_k = shapes.top_k;
    const int64_t num_pairs = static_cast<int64_t>(list.size());
    T *d_up_w = d_gate_up_weight + expert * hidden * 2 * f;
    T *d_down_w = d_down_weight + expert * f * hidden;
    const int64_t kept_size = num_pairs * (3 * hidden + 5 * f);
    if (kept_size > kept_capacity) {  // grown, never shrunk: fresh pages fault on first touch
      kept.reset(new T[kept_size]);
      kept_capacity = kept_size;
    }
    T *gathered = kept.get(), *gate_up = gathered + num_pairs * hidden;
    T *activated = gate_up + num_pairs * 2 * f, *d_expert_out = activated + num_pairs * f;
    T *d_gate_up = d_expert_out + num_pairs * hidden;
    d_pair_rows = d_gate_up + num_pairs * 2 * f;
    std::vector<Chunk> chunks;
    AppendChunks(expert, num_pairs, ChunkRows(hidden, f, sizeof(T)), chunks);
    const int64_t largest_chunk = LargestChunk(chunks);
    // scratch: the expert output [rows, H], the hidden gradient [rows, F] of a chunk
    std::unique_ptr<T[]> scratch(new T[largest_chunk * (hidden + f)]);
    for (const Chunk &chunk : chunks) {
      const int64_t first = chunk.first, count = chunk.count;
      const ExpertPair *pairs = list.data() + first;
      T *expert_out = scratch.get(), *d_activated = expert_out + count * hidden;
      ffn.Forward(expert, pairs, count, gathered + first * hidden, gate_up + first * 2 * f,
                  activated + first * f, expert_out);
      T *d_out_rows = d_expert_out + first * hidden;
      for (int64_t i = 0; i < count; ++i) {
        const int64_t slot = pairs[i].row * top_k + pairs[i].k;
        const T *d_out_row = d_out + pairs[i].row * hidden;
        d_weights[slot] = Dot(d_out_row, expert_out + i * hidden, hidden);
        for (int64_t h = 0; h < hidden; ++h) {
          d_out_rows[i * hidden + h] = FromFloat<T>(weights[slot] * ToFloat(d_out_row[h]));
        }
      }
      Gemm(ContiguousGemm(count, f, hidden, /*trans_a=*/false, /*trans_b=*/true), d_out_rows,
           ffn.down_weight + expert * f * hidden, d_activated);               // [count, F]
      SwiGLUGradRows(d_activated, gate_up + first * 2 * f, f, 0, count,
                     d_gate_up + first * 2 * f);
      Gemm(ContiguousGemm(count, hidden, 2 * f, /*trans_a=*/false, /*trans_b=*/true),
           d_gate_up + first * 2 * f, ffn.gate_up_weight + expert * hidden * 2 * f,
           d_pair_rows + first * hidden);                                     // [count, H]
    }
    // One GEMM each over all the expert's pairs: d_down [F, H], d_gate_up [H, 2F]
    Gemm(ContiguousGemm(f, hidden, num_pairs, /*trans_a=*/true), activated, d_expert_out,
         d_down_w);
    Gemm(ContiguousGemm(hidden, 2 * f, num_pairs, /*trans_a=*/true), gathered, d_gate_up,
         d_up_w);
  }
};

// The gradient of sum(out * d_out) (see the header): experts in waves of one per thread, then
// each expert's rows gradient added to d_rows in expert order.
template <typename T>
void WeightedSumGrad(const ExpertsShapes &shapes, const PairsPerExpert &pairs,
                     const ExpertFFN<T> &ffn, const float *weights, const T *d_out, T *d_rows,
                     float *d_weights, T *d_gate_up_weight, T *d_down_weight) {
  const int64_t hidden = shapes.hidden, f = shapes.ffn;
  std::fill(d_weights, d_weights + shapes.num_rows * shapes.top_k, 0.0f);
  // Unused rows' gradients are unspecified (NaN with MOE_EP_POISON_UNUSED_ROWS=1; writing them
  // would touch a worst-case buffer in every step); the used rows are the sums (zeroed by
  // RowSums).
  if (PoisonUnusedRows()) {
    ForEachBlock(shapes, [&](int64_t, int64_t used_end, int64_t end) {
      FillWithNaN(d_rows + used_end * hidden, (end - used_end) * hidden);
    });
  }
  const RowSums<T> d_row_sums(shapes, d_rows);
  std::vector<ExpertBackward<T>> slots(
      std::min<int64_t>(shapes.num_experts, std::max(1, KernelThreadCount())));
  RunInWaves(
      shapes.num_experts,
      [&](int64_t expert, int64_t slot) {
        if (pairs[expert].empty()) {
          std::fill_n(d_gate_up_weight + expert * hidden * 2 * f, hidden * 2 * f,
                      FromFloat<T>(0.0f));
          std::fill_n(d_down_weight + expert * f * hidden, f * hidden, FromFloat<T>(0.0f));
          return;
        }
        slots[slot].Run(shapes, pairs[expert], expert, ffn, weights, d_out, d_weights,
                        d_gate_up_weight, d_down_weight);
      },
      [&](int64_t expert, int64_t slot) {
        const std::vector<ExpertPair> &list = pairs[expert];
        for (size_t i = 0; i < list.size(); ++i) {
          AddWeightedRow(slots[slot].d_pair_rows + i * hidden, 1.0f, hidden,
                         d_row_sums.row(list[i].row));
        }
      });
  d_row_sums.Finish();
}

// The tensors of MoeEpExpertsWeightedSum, in MindSpore's order (inputs, then outputs).
struct ExpertsWeightedSumArgs {
  static constexpr const char *kNames[] = {"rows", "local_ids", "weights", "row_counts",
                                           "gate_up_weight", "down_weight",
                                           "out", "tokens_per_expert"};
  TensorArg rows, local_ids, weights, row_counts, gate_up_weight, down_weight;  // inputs
  TensorArg out, tokens_per_expert;                                               // outputs
};

// The tensors of MoeEpExpertsWeightedSumGrad.
struct ExpertsWeightedSumGradArgs {
  static constexpr const char *kNames[] = {"d_out", "rows", "local_ids", "weights", "row_counts",
                                           "gate_up_weight", "down_weight",
                                           "d_rows", "d_weights", "d_gate_up_weight",
                                           "d_down_weight"};
  TensorArg d_out, rows, local_ids, weights, row_counts, gate_up_weight, down_weight;  // inputs
  TensorArg d_rows, d_weights, d_gate_up_weight, d_down_weight;                      // outputs
};

void RunExpertsWeightedSum(const ExpertsWeightedSumArgs &args) {
  const TensorArg &rows = args.rows, &local_ids = args.local_ids, &weights = args.weights;
  const ExpertsShapes shapes = CheckExpertsInputs(rows, local_ids, weights, args.row_counts,
                                                  args.gate_up_weight, args.down_weight);
  const TensorArg &out = args.out, &tokens_per_expert = args.tokens_per_expert;
  out.RequireSameDtype(args.gate_up_weight);
  out.RequireRank(2);
  out.RequireDim(0, shapes.num_rows, "rows.shape[0]");
  out.RequireDim(1, shapes.hidden, "the hidden size");
  tokens_per_expert.RequireDtype("int32");
  tokens_per_expert.RequireRank(1);
  tokens_per_expert.RequireDim(0, shapes.num_experts, "gate_up_weight.shape[0] (experts)");

  const PairsPerExpert pairs = PairsByExpert(local_ids, UsedRows(shapes), shapes.num_experts);
  for (int64_t expert = 0; expert < shapes.num_experts; ++expert) {
    tokens_per_expert.data_as<int32_t>()[expert] = static_cast<int32_t>(pairs[expert].size());
  }
  VisitFloatType(args.gate_up_weight, [&](auto element) {
    using T = decltype(element);
    const ExpertFFN<T> ffn(shapes, rows, args.gate_up_weight, args.down_weight);
    const RowSums<T> sums(shapes, out.data_as<T>());
    AddExpertOutputsOfType<T>(shapes, pairs, ffn, weights.data_as<const float>(),
                              [&](int64_t row) { return sums.row(row); });
    sums.Finish();
    if (PoisonUnusedRows()) {
      T *out_rows = out.data_as<T>();
      ForEachBlock(shapes, [&](int64_t, int64_t used_end, int64_t end) {
        FillWithNaN(out_rows + used_end * shapes.hidden, (end - used_end) * shapes.hidden);
      });
    }
  });
}

void RunExpertsWeightedSumGrad(const ExpertsWeightedSumGradArgs &args) {
  const TensorArg &rows = args.rows, &weights = args.weights;
  const ExpertsShapes shapes = CheckExpertsInputs(rows, args.local_ids, weights, args.row_counts,
                                                  args.gate_up_weight, args.down_weight);
  if (shapes.int8_rows) {
    Fail(kInvalidArgument, "rows are quantized (int32): the experts' gradient needs rows of the "
         "compute dtype (training delivers them dequantized; int8 rows stay quantized only in "
         "inference)");
  }
  RequireLike(args.d_out, rows);
  RequireLike(args.d_rows, rows);
  RequireLike(args.d_weights, weights);
  RequireLike(args.d_gate_up_weight, args.gate_up_weight);
  RequireLike(args.d_down_weight, args.down_weight);
  const PairsPerExpert pairs =
      PairsByExpert(args.local_ids, UsedRows(shapes), shapes.num_experts);
  VisitFloatType(rows, [&](auto element) {
    using T = decltype(element);
    const ExpertFFN<T> ffn(shapes, rows, args.gate_up_weight, args.down_weight);
    WeightedSumGrad(shapes, pairs, ffn, weights.data_as<const float>(),
                    args.d_out.data_as<const T>(), args.d_rows.data_as<T>(),
                    args.d_weights.data_as<float>(), args.d_gate_up_weight.data_as<T>(),
                    args.d_down_weight.data_as<T>());
  });
}

}  // namespace

ExpertsShapes CheckExpertsInputs(const TensorArg &rows, const TensorArg &local_ids,
                                 const TensorArg &weights, const TensorArg &row_counts,
                                 const TensorArg &gate_up_weight, const TensorArg &down_weight) {
  ExpertsShapes shapes{};
  rows.RequireRank(2);
  gate_up_weight.RequireRank(3);
  shapes.num_rows = rows.dim(0);
  shapes.int8_rows = HoldsInt8Rows(rows, gate_up_weight.dim(1));
  shapes.hidden = shapes.int8_rows ? gate_up_weight.dim(1) : rows.dim(1);
  local_ids.RequireRank(2);
  local_ids.RequireDtype("int32");
  local_ids.RequireDim(0, shapes.num_rows, "rows.shape[0]");
  shapes.top_k = local_ids.dim(1);
  weights.RequireDtype("float32");
  weights.RequireRank(2);
  weights.RequireDim(0, shapes.num_rows, "rows.shape[0]");
  weights.RequireDim(1, shapes.top_k, "local_ids.shape[1] (top_k)");
  row_counts.RequireRank(1);
  row_counts.RequireDtype("int32");
  shapes.num_blocks = row_counts.dim(0);
  if (shapes.num_blocks <= 0 || shapes.num_rows % shapes.num_blocks != 0) {
    Fail(kInvalidArgument, "row_counts has shape ", row_counts.ShapeString(), "; its length (the "
         "number of row blocks) must be positive and divide rows.shape[0] = ", shapes.num_rows);
  }
  shapes.block_rows = shapes.num_rows / shapes.num_blocks;
  shapes.counts = row_counts.data_as<const int32_t>();
  for (int64_t block = 0; block < shapes.num_blocks; ++block) {
    if (shapes.counts[block] < 0 || shapes.counts[block] > shapes.block_rows) {
      Fail(kOutOfRange, "row_counts[", block, "] = ", shapes.counts[block], "; expected 0 to ",
           shapes.block_rows, " (rows per block)");
    }
  }
  if (!shapes.int8_rows) gate_up_weight.RequireSameDtype(rows);
  gate_up_weight.RequireDim(1, shapes.hidden, "rows.shape[1] (hidden)");
  shapes.num_experts = gate_up_weight.dim(0);
  if (gate_up_weight.dim(2) % 2 != 0) {
    Fail(kInvalidArgument, "gate_up_weight has shape ", gate_up_weight.ShapeString(),
         "; its last dimension must be 2 * expert_ffn_size (gate, then up)");
  }
  shapes.ffn = gate_up_weight.dim(2) / 2;
  down_weight.RequireRank(3);
  down_weight.RequireSameDtype(gate_up_weight);
  down_weight.RequireDim(0, shapes.num_experts, "gate_up_weight.shape[0] (experts)");
  down_weight.RequireDim(1, shapes.ffn, "expert_ffn_size (half of gate_up_weight.shape[2])");
  down_weight.RequireDim(2, shapes.hidden, "rows.shape[1] (hidden)");
  return shapes;
}

std::vector<RowRange> UsedRows(const ExpertsShapes &shapes) {
  std::vector<RowRange> ranges;
  ForEachBlock(shapes, [&](int64_t first, int64_t used_end, int64_t) {
    ranges.push_back(RowRange{first, used_end});
  });
  return ranges;
}

PairsPerExpert PairsByExpert(const TensorArg &local_ids, const std::vector<RowRange> &ranges,
                             int64_t num_experts) {
  const int64_t top_k = local_ids.dim(1);
  const int32_t *ids = local_ids.data_as<const int32_t>();
  PairsPerExpert pairs(num_experts);
  for (const RowRange &range : ranges) {
    for (int64_t row = range.first; row < range.end; ++row) {
      for (int64_t k = 0; k < top_k; ++k) {
        const int32_t expert = ids[row * top_k + k];
        if (expert < -1 || expert >= num_experts) {
          Fail(kOutOfRange, "local_ids", local_ids.IndexString(row * top_k + k), " = ", expert,
               "; expected -1 (no expert on this rank) or a local expert in [0, ", num_experts,
               ")");
        }
        if (expert >= 0) pairs[expert].push_back(ExpertPair{row, static_cast<int32_t>(k)});
      }
    }
  }
  return pairs;
}

void AddExpertOutputs(const ExpertsShapes &shapes, const TensorArg &rows,
                      const TensorArg &gate_up_weight, const TensorArg &down_weight,
                      const PairsPerExpert &pairs, const float *weights,
                      const std::function<float *(int64_t row)> &sum_row) {
  VisitFloatType(gate_up_weight, [&](auto element) {
    using T = decltype(element);
    const ExpertFFN<T> ffn(shapes, rows, gate_up_weight, down_weight);
    AddExpertOutputsOfType<T>(shapes, pairs, ffn, weights, sum_row);
  });
}

}  // namespace moe_ep

MOE_EP_EXPORT int MoeEpExpertsWeightedSum(int nparam, void **params, int *ndims,
                                          int64_t **shapes, const char **dtypes,
                                          void * /*stream*/, void * /*extra*/) {
  return moe_ep::RunKernel("MoeEpExpertsWeightedSum", [&] {
    moe_ep::RunExpertsWeightedSum(moe_ep::BindArgsAs<moe_ep::ExpertsWeightedSumArgs>(
        nparam, params, ndims, shapes, dtypes));
  });
}

MOE_EP_EXPORT int MoeEpExpertsWeightedSumGrad(int nparam, void **params, int *ndims,
                                              int64_t **shapes, const char **dtypes,
                                              void * /*stream*/, void * /*extra*/) {
  return moe_ep::RunKernel("MoeEpExpertsWeightedSumGrad", [&] {
    moe_ep::RunExpertsWeightedSumGrad(moe_ep::BindArgsAs<moe_ep::ExpertsWeightedSumGradArgs>(
        nparam, params, ndims, shapes, dtypes));
  });
}
