// The prefill path's experts and combine in one kernel (inference): the row-wise routed experts
// of this rank, the return of their partial sums to the source ranks, and each source's sum,
// in rounds over the received rows so that no buffer holds every partial sum.
//
//   MoeEpExpertsCombine
//     rows [R*C, H], local_ids [R*C, K] int32, weights [R*C, K] float32, row_counts [R] int32
//     (the rows this rank received: block s from rank s, its first row_counts[s] used),
//     gate_up_weight [L, H, 2F], down_weight [L, F, H],
//     token_slot [T, R] int32 (slot s*C + i of this rank's token t at rank s, -1 if not sent),
//     slot_token [R*C, 1] int32 (its inverse: read only by the gradient, see ep_kernels.py),
//     round_rows [1] int32 (B below, in [1, C]; the same on every rank), window_id [1] int32
//     -> y [T, H] (the weights' dtype), tokens_per_expert [L] int32
//   rows may be int8 rows (int32 [R*C, W], dispatch.quant: int8): the experts dequantize each
//   as they gather it (expert_ffn.h).
//
//   y[t] = sum over the ranks s that t went to of partial_s[slot of t at s], where
//   partial_s[j] = sum over k with local_ids[j, k] >= 0 of weights[j, k] * FFN_e(rows[j]) at s:
//   the numbers of ExpertsWeightedSum -> ExchangeRows -> GatherRows (the unfused path).
//
// Why: unfused, the experts step holds the received rows and a partial sum per received row
// (R * C rows each), and the return holds the partial sums and the returned rows (R * C rows
// each): two buffers of the largest size live at once either way. Here the received rows are
// cut into rounds of B rows per source block (dispatch.combine_round_bytes / (R x row bytes),
// computed in Python from the config, so the same on every rank): a round runs the experts over
// its rows into a send buffer of R * B rows, exchanges it (ExchangeRows, capacity B), and each
// source adds the returned rows to its tokens' float32 sums. Beyond the inputs and y, a round's
// send and receive buffers and the experts' scratch are all that live.
//
// Arithmetic: each partial sum is ExpertsWeightedSum's (rounded once to T); each source adds a
// token's returned rows in float32, in round order then rank order (the unfused GatherRows adds
// them in rank order: the two may differ by float32 rounding), and rounds y once to T. The
// order depends only on the slots, never on timing or the thread count.
//
// Every rank runs the same number of rounds (ceil(C / B)), so a rank with fewer rows still
// joins the later exchanges with nothing to send. Inputs are checked before the first exchange;
// a failure there abandons the window, so the peers fail at once with the reason.
#include <algorithm>
#include <memory>
#include <vector>

#include "comm_window.h"
#include "expert_ffn.h"
#include "kernel_common.h"
#include "row_sums.h"
#include "scratch.h"

namespace moe_ep {
namespace {

// Checks that every slot of token_slot [T, R] lies in its rank's block of C rows.
void CheckTokenSlots(const TensorArg &token_slot, int64_t world_size, int64_t capacity) {
  token_slot.RequireRank(2);
  token_slot.RequireDtype("int32");
  token_slot.RequireDim(1, world_size, "the expert-parallel world size");
  const int32_t *slots = token_slot.data_as<const int32_t>();
  for (int64_t index = 0; index < token_slot.numel(); ++index) {
    const int64_t rank = index % world_size, slot = slots[index];
    if (slot != -1 && (slot < rank * capacity || slot >= (rank + 1) * capacity)) {
      Fail(kOutOfRange, "token_slot", token_slot.IndexString(index), " = ", slot,
           "; expected -1 or a slot of rank ", rank, "'s block [", rank * capacity, ", ",
           (rank + 1) * capacity, "): it does not come from the matching layout");
    }
  }
}

// The tensors of MoeEpExpertsCombine, named in the order MindSpore passes them; slot_token is
// read only by the gradient.
struct ExpertsCombineArgs {
  static constexpr const char *kNames[] = {
      "rows", "local_ids", "weights", "row_counts", "gate_up_weight", "down_weight", "token_slot",
      "slot_token", "round_rows", "window_id",
      "y", "tokens_per_expert"};
  // inputs
  TensorArg rows, local_ids, weights, row_counts, gate_up_weight, down_weight, token_slot,
      slot_token, round_rows, window_id;
  TensorArg y, tokens_per_expert;  // outputs
};

template <typename T>
void ExpertsCombine(const ExpertsCombineArgs &args, CommWindow &window,
                    const ExpertsShapes &shapes, int64_t round_rows) {
  const int64_t world_size = shapes.num_blocks, capacity = shapes.block_rows;
  const int64_t hidden = shapes.hidden, tokens = args.token_slot.dim(0);
  const int64_t row_bytes = hidden * static_cast<int64_t>(sizeof(T));
  const int64_t rounds = capacity == 0 ? 0 : (capacity + round_rows - 1) / round_rows;
  const float *weights = args.weights.data_as<const float>();
  const int32_t *slots = args.token_slot.data_as<const int32_t>();

  // A round's buffers (per-thread scratch kept across calls, scratch.h): partial sums to send
  // [R*B, H], returned rows [R*B, H], and for 16-bit types the partial sums in float32 (for
  // float32 they are the send rows themselves) and the output's float32 sums.
  const int64_t round_elements = world_size * round_rows * hidden;
  T *send = ScratchArray<T>(Scratch::kRoundSend, round_elements);
  T *recv = ScratchArray<T>(Scratch::kRoundReceived, round_elements);
  float *partial = reinterpret_cast<float *>(send);
  float *sums = reinterpret_cast<float *>(args.y.data_as<T>());
  if constexpr (!std::is_same_v<T, float>) {
    partial = ScratchArray<float>(Scratch::kRoundPartial, round_elements);
    sums = ScratchArray<float>(Scratch::kTokenSums, tokens * hidden);
  }
  const int64_t min_rows_per_thread = MinItemsPerThread(row_bytes);
  ParallelFor(tokens, min_rows_per_thread, [&](int64_t begin, int64_t end) {
    std::fill(sums + begin * hidden, sums + end * hidden, 0.0f);
  });

  std::vector<int32_t> round_counts(world_size), returned(world_size);
  std::vector<RowRange> ranges(world_size);
  for (int64_t round = 0; round < rounds; ++round) {
    const int64_t offset = round * round_rows;  // first row of the round in every block
    for (int64_t source = 0; source < world_size; ++source) {
      const int64_t count =
          std::clamp<int64_t>(shapes.counts[source] - offset, 0, round_rows);
      round_counts[source] = static_cast<int32_t>(count);
      ranges[source] = RowRange{source * capacity + offset, source * capacity + offset + count};
      std::fill(partial + source * round_rows * hidden,
                partial + (source * round_rows + count) * hidden, 0.0f);
    }
    // At the expert rank: the round's partial sums, row (s, offset + i) at send row s * B + i.
    AddExpertOutputs(shapes, args.rows, args.gate_up_weight, args.down_weight,
                     PairsByExpert(args.local_ids, ranges, shapes.num_experts), weights,
                     [&](int64_t row) {
                       const int64_t source = row / capacity;
                       return partial + (source * round_rows + row % capacity - offset) * hidden;
                     });
    if constexpr (!std::is_same_v<T, float>) {
      for (int64_t source = 0; source < world_size; ++source) {
        const int64_t first = source * round_rows;
        ParallelFor(round_counts[source], min_rows_per_thread, [&](int64_t begin, int64_t end) {
          for (int64_t i = first + begin; i < first + end; ++i) {
            RoundRow(partial + i * hidden, hidden, send + i * hidden);
          }
        });
      }
    }
    window.ExchangeRows(RowExchange{reinterpret_cast<const uint8_t *>(send),
                                    round_counts.data(), reinterpret_cast<uint8_t *>(recv),
                                    returned.data(), round_rows, row_bytes,
                                    /*zero_tail=*/false, "ExpertsCombine (prefill)"});
    // At the source: rank d returned the rows of slots d*C + offset .. + returned[d], in order.
    AbandonOnFailure(window, [&] {
      for (int64_t index = 0; index < tokens * world_size; ++index) {
        const int64_t rank = index % world_size;
        const int64_t i = slots[index] - rank * capacity - offset;
        if (slots[index] != -1 && i >= 0 && i < round_rows && i >= returned[rank]) {
          Fail(kInternalError, "token_slot", args.token_slot.IndexString(index), " = ",
               slots[index], " names a row that rank ", rank, " did not return in round ", round,
               " (", returned[rank], " rows from slot ", rank * capacity + offset, ")");
        }
      }
      return 0;
    });
    ParallelFor(tokens, min_rows_per_thread, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t rank = 0; rank < world_size; ++rank) {
          const int64_t slot = slots[t * world_size + rank];
          const int64_t i = slot - rank * capacity - offset;
          if (slot == -1 || i < 0 || i >= round_rows) continue;
          AddWeightedRow(recv + (rank * round_rows + i) * hidden, 1.0f, hidden,
                         sums + t * hidden);
        }
      }
    });
  }
  if constexpr (!std::is_same_v<T, float>) {
    ParallelFor(tokens, min_rows_per_thread, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        RoundRow(sums + t * hidden, hidden, args.y.data_as<T>() + t * hidden);
      }
    });
  }
}

void RunExpertsCombine(const ExpertsCombineArgs &args) {
  std::shared_ptr<CommWindow> window = FindCommWindow(ScalarInput(args.window_id));
  const int64_t world_size = window->world_size();
  // Every check before the first exchange: a failure abandons the window, so the peers
  // waiting in this step get the reason at once instead of a timeout.
  int64_t round_rows = 0;
  const ExpertsShapes shapes = AbandonOnFailure(*window, [&] {
    const ExpertsShapes checked =
        CheckExpertsInputs(args.rows, args.local_ids, args.weights, args.row_counts,
                           args.gate_up_weight, args.down_weight);
    args.row_counts.RequireDim(0, world_size, "the expert-parallel world size");
    CheckTokenSlots(args.token_slot, world_size, checked.block_rows);
    round_rows = ScalarInput(args.round_rows);
    if (round_rows < 1 || round_rows > std::max<int64_t>(checked.block_rows, 1)) {
      Fail(kInvalidArgument, "round_rows = ", round_rows, "; expected 1 to ",
           std::max<int64_t>(checked.block_rows, 1), " (rows per source block)");
    }
    args.y.RequireSameDtype(args.gate_up_weight);
    args.y.RequireRank(2);
    args.y.RequireDim(0, args.token_slot.dim(0), "token_slot.shape[0] (tokens)");
    args.y.RequireDim(1, checked.hidden, "rows.shape[1] (hidden)");
    args.tokens_per_expert.RequireDtype("int32");
    args.tokens_per_expert.RequireRank(1);
    args.tokens_per_expert.RequireDim(0, checked.num_experts,
                                      "gate_up_weight.shape[0] (experts)");
    // Checks every local id, and counts the pairs of each expert.
    const PairsPerExpert pairs =
        PairsByExpert(args.local_ids, UsedRows(checked), checked.num_experts);
    for (int64_t expert = 0; expert < checked.num_experts; ++expert) {
      args.tokens_per_expert.data_as<int32_t>()[expert] =
          static_cast<int32_t>(pairs[expert].size());
    }
    return checked;
  });
  VisitFloatType(args.gate_up_weight, [&](auto element) {
    ExpertsCombine<decltype(element)>(args, *window, shapes, round_rows);
  });
}

}  // namespace
}  // namespace moe_ep

MOE_EP_EXPORT int MoeEpExpertsCombine(int nparam, void **params, int *ndims, int64_t **shapes,
                                      const char **dtypes, void * /*stream*/, void * /*extra*/) {
  return moe_ep::RunKernel("MoeEpExpertsCombine", [&] {
    moe_ep::RunExpertsCombine(
        moe_ep::BindArgsAs<moe_ep::ExpertsCombineArgs>(nparam, params, ndims, shapes, dtypes));
  });
}
