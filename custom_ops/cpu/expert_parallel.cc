// Expert-parallel kernels: the routing layout of the sparse prefill exchange, and the fused
// Dispatch / Combine operators of the decode path.
//
//   MoeEpExpertParallelLayout   expert_ids [T, K] int32, experts_per_rank [1] int32
//       -> send_token_index [R, C] int32   token sent in slot (d, i), -1 if unused
//          send_counts [R] int32           tokens sent to each rank
//          token_slot [T, R] int32         flat slot d*C+i of token t at rank d, -1 if not sent
//          send_local_ids [R, C, K] int32  local expert id at d of the k-th choice, -1 if the
//                                          k-th expert is not on d
//     A token goes to a rank once, however many of its experts live there (R and C are read
//     from the output shapes; C is dispatch.max_tokens_per_rank).
//
//   MoeEpFusedDispatch  x [T, H], expert_ids [T, K] int32, weights [T, K] float32,
//                       experts_per_rank [1] int32, quant_mode [1] int32, window_id [1] int32
//       -> expand_x [N, H]                  received rows grouped by local expert; rows from
//                                           sum(tokens_per_local_expert) on are unspecified
//          tokens_per_local_expert [L] int32
//          positions [R*C, K] int32         expand_x row of received token j's k-th choice, -1
//                                           if that expert is elsewhere (or j was not received)
//          recv_weights [R*C, K] float32    its routing weight (0 where the position is -1)
//          recv_counts [R] int32            tokens received from each rank (block s of j)
//          token_slot [T, R] int32          slot d*C+i of token t at rank d, -1 if not sent
//     One kernel: layout, delivery through the communication window (counts and routing
//     weights travel with the rows: no separate collective) and grouping by local expert, in
//     the local dispatch's order. N = R * C * min(K, L) rows is the worst case. Where every
//     rank reads its peers' memory, the ranks exchange small notes (local expert ids, weights)
//     and each receiver then copies every x row it needs straight into its expand_x rows
//     (CommWindow::PullRows); otherwise the rows are packed, exchanged and grouped on arrival.
//     MOE_EP_DISPATCH_PULL=0 on every rank forces the second way (for comparisons).
//
//   MoeEpFusedCombine   expert_out [N, H], positions, recv_weights, recv_counts, token_slot
//                       (the dispatch's handle), window_id [1] int32 -> y [T, H]
//     Each expert rank forms one weighted partial sum per received token over its own experts
//     (in k order) and returns it; the source adds the partial sums of its token in rank
//     order. One row per (token, rank) travels back instead of one per (token, expert), and the
//     arithmetic is exactly the sparse prefill path's. Where a peer block of partial sums fits
//     in a window slot, the expert rank writes them straight into the slot and the source sums
//     them there (CommWindow::ShareRows): the partial sums are written once and read once.
//
// The row-wise pair (decode without a buffer row per (token, expert) pair; the experts run
// row by row, MoeEpExpertsWeightedSum, between the two):
//
//   MoeEpFusedDeliver   x [T, H], expert_ids [T, K] int32, weights [T, K] float32,
//                       experts_per_rank [1] int32, quant_mode [1] int32, window_id [1] int32
//       -> rows [R*C, H]                    received token rows, block s from rank s in its
//                                           token order; rows past recv_counts[s] unspecified
//          local_ids [R*C, K] int32         local expert of row j's k-th choice, -1 if elsewhere
//          recv_weights [R*C, K] float32    its routing weight (0 where the local id is -1)
//          recv_counts [R] int32, token_slot [T, R] int32   as in MoeEpFusedDispatch
//     The fused Dispatch without the grouping: each token row arrives once per rank that holds
//     one of its experts (~3.7 rows per token at top-8 of 64 on 4 ranks, against 8 grouped
//     rows), read straight from the source's x where the ranks read each other's memory.
//
// quant_mode 2 (both operators): token rows travel as per-token int8 rows (int8_rows.h),
// quantized once at the source and dequantized into expand_x / rows as they land (FusedDeliver
// with rows of int32 [R*C, W] keeps them quantized, for the row-wise experts); the Combine and
// the Return move their partial sums in the compute dtype.
//
//   MoeEpFusedReturn    partial [R*C, H] (one row per received row, e.g. the experts' weighted
//                       sum over this rank's experts), recv_counts [R], token_slot [T, R],
//                       window_id [1] int32 -> y [T, H]
//     The fused Combine's return and sum, for rows that are already the partial sums.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string_view>
#include <utility>
#include <vector>

#include "comm_window.h"
#include "gather_sum.h"
#include "int8_rows.h"
#include "kernel_common.h"
#include "scratch.h"

namespace moe_ep {
namespace {

constexpr int32_t kNone = -1;

// Checks expert ids against the experts of the whole group and returns experts_per_rank.
int64_t CheckRouting(const TensorArg &expert_ids, const TensorArg &experts_per_rank_arg,
                     int64_t world_size) {
  expert_ids.RequireRank(2);
  expert_ids.RequireDtype("int32");
  const int64_t experts_per_rank = ScalarInput(experts_per_rank_arg);
  if (experts_per_rank <= 0) {
    Fail(kInvalidArgument, "experts_per_rank = ", experts_per_rank, " must be positive");
  }
  const int64_t num_experts = experts_per_rank * world_size;
  const int32_t *ids = expert_ids.data_as<const int32_t>();
  for (int64_t i = 0; i < expert_ids.numel(); ++i) {
    if (ids[i] < 0 || ids[i] >= num_experts) {
      Fail(kOutOfRange, expert_ids.name, expert_ids.IndexString(i), " = ", ids[i],
           " is out of range [0, ", num_experts, ")");
    }
  }
  return experts_per_rank;
}

// The tokens each rank receives from this one, in token order.
struct SendPlan {
  std::vector<std::vector<int32_t>> tokens_for_rank;  // [R][tokens sent to that rank]

  SendPlan(const int32_t *ids, int64_t tokens, int64_t top_k, int64_t experts_per_rank,
           int64_t world_size, int64_t capacity)
      : tokens_for_rank(world_size) {
    std::vector<int64_t> last_token_for_rank(world_size, -1);
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t k = 0; k < top_k; ++k) {
        const int64_t rank = ids[t * top_k + k] / experts_per_rank;
        if (last_token_for_rank[rank] != t) {
          last_token_for_rank[rank] = t;
          tokens_for_rank[rank].push_back(static_cast<int32_t>(t));
        }
      }
    }
    for (int64_t rank = 0; rank < world_size; ++rank) {
      if (static_cast<int64_t>(tokens_for_rank[rank].size()) > capacity) {
        Fail(kInvalidArgument, tokens_for_rank[rank].size(), " tokens go to rank ", rank,
             " but the exchange holds at most ", capacity,
             " per rank (dispatch.max_tokens_per_rank)");
      }
    }
  }
};

// k-th local expert id of token t at `rank`, or -1 if that expert is elsewhere.
inline int32_t LocalExpertAt(const int32_t *ids, int64_t flat, int64_t rank,
                             int64_t experts_per_rank) {
  return ids[flat] / experts_per_rank == rank ? static_cast<int32_t>(ids[flat] % experts_per_rank)
                                              : kNone;
}

// The tensors of MoeEpExpertParallelLayout, named in the order MindSpore passes them.
struct ExpertParallelLayoutArgs {
  static constexpr const char *kNames[] = {
      "expert_ids", "experts_per_rank",
      "send_token_index", "send_counts", "token_slot", "send_local_ids"};
  TensorArg expert_ids, experts_per_rank;  // inputs
  TensorArg send_token_index, send_counts, token_slot, send_local_ids;  // outputs
};

void ExpertParallelLayout(const ExpertParallelLayoutArgs &args) {
  const int64_t world_size = args.send_token_index.dim(0);
  const int64_t capacity = args.send_token_index.dim(1);
  const int64_t experts_per_rank = CheckRouting(args.expert_ids, args.experts_per_rank, world_size);
  const int64_t tokens = args.expert_ids.dim(0), top_k = args.expert_ids.dim(1);
  args.token_slot.RequireDim(0, tokens, "the number of tokens");
  const int32_t *ids = args.expert_ids.data_as<const int32_t>();
  const SendPlan plan(ids, tokens, top_k, experts_per_rank, world_size, capacity);

  int32_t *slot_token = args.send_token_index.data_as<int32_t>();
  int32_t *slot_of = args.token_slot.data_as<int32_t>();
  int32_t *local_ids = args.send_local_ids.data_as<int32_t>();
  std::fill(slot_token, slot_token + world_size * capacity, kNone);
  std::fill(slot_of, slot_of + tokens * world_size, kNone);
  std::fill(local_ids, local_ids + world_size * capacity * top_k, kNone);
  for (int64_t rank = 0; rank < world_size; ++rank) {
    const std::vector<int32_t> &sent = plan.tokens_for_rank[rank];
    args.send_counts.data_as<int32_t>()[rank] = static_cast<int32_t>(sent.size());
    for (int64_t i = 0; i < static_cast<int64_t>(sent.size()); ++i) {
      const int64_t slot = rank * capacity + i, t = sent[i];
      slot_token[slot] = static_cast<int32_t>(t);
      slot_of[t * world_size + rank] = static_cast<int32_t>(slot);
      for (int64_t k = 0; k < top_k; ++k) {
        local_ids[slot * top_k + k] = LocalExpertAt(ids, t * top_k + k, rank, experts_per_rank);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Fused decode operators
// ---------------------------------------------------------------------------------------------

// Staging memory of the fused operators (message rows sent and received) is per-thread scratch
// (scratch.h): a fresh buffer would be page-faulted on every decode step, which profiling
// showed to be most of the step's time. Only the rows the counts declare are ever written or
// read, so it is neither zeroed nor otherwise touched: sized for R * C rows, it keeps resident
// only the pages of rows the steps use (the in-window Combine never touches the received one).
struct StagingBuffers {
  uint8_t *send, *recv;  // message rows, [R * C, row bytes] each

  static StagingBuffers ForThisThread(int64_t message_bytes) {
    return {ScratchBytes(Scratch::kStagingSend, message_bytes),
            ScratchBytes(Scratch::kStagingReceived, message_bytes)};
  }
};

// A message row: the payload bytes, then `ints` int32 values. Rows are packed back to back.
struct MessageLayout {
  int64_t payload_bytes;
  int64_t ints;
  int64_t row_bytes() const { return payload_bytes + ints * static_cast<int64_t>(sizeof(int32_t)); }
};

// The message rows one rank received in a fused Dispatch: block s (from row s * capacity on)
// holds counts[s] rows from rank s.
struct ReceivedMessages {
  const uint8_t *rows;
  MessageLayout layout;  // ints: K local expert ids (-1: elsewhere), K routing weights (bits)
  const int32_t *counts;  // [world_size]
  int64_t world_size, capacity, top_k;

  // Calls visit(source, j, row, k, local expert, weight bits) for every received pair (row j,
  // choice k) whose expert is on this rank, in (j, k) order.
  template <typename Visit>
  void ForEachPair(Visit &&visit) const {
    std::vector<int32_t> ints(layout.ints);
    for (int64_t source = 0; source < world_size; ++source) {
      for (int64_t i = 0; i < counts[source]; ++i) {
        const int64_t j = source * capacity + i;
        const uint8_t *row = rows + j * layout.row_bytes();
        std::memcpy(ints.data(), row + layout.payload_bytes, ints.size() * sizeof(int32_t));
        for (int64_t k = 0; k < top_k; ++k) {
          if (ints[k] != kNone) visit(source, j, row, k, ints[k], ints[top_k + k]);
        }
      }
    }
  }
};

// Groups the received pairs by local expert, in (received row j, k) order: a stable counting
// sort, the order of the local dispatch. Fills positions[j, k] (the expand_x row of the pair, -1
// for pairs elsewhere), its routing weight and the rows per expert, and calls
// deliver(source, j, row, expand_row) to fill each expand_x row. Returns the rows filled.
template <typename Deliver>
int64_t GroupByLocalExpert(const ReceivedMessages &messages, int64_t experts_per_rank,
                           int64_t capacity_rows, int32_t *positions, float *pair_weights,
                           int32_t *tokens_per_local_expert, Deliver &&deliver) {
  const int64_t pairs = messages.world_size * messages.capacity * messages.top_k;
  std::fill(positions, positions + pairs, kNone);
  std::fill(pair_weights, pair_weights + pairs, 0.0f);
  std::vector<int64_t> rows_of_expert(experts_per_rank, 0);
  messages.ForEachPair([&](int64_t, int64_t, const uint8_t *, int64_t, int32_t expert, int32_t) {
    if (expert < 0 || expert >= experts_per_rank) {
      Fail(kInternalError, "a received row names local expert ", expert, " of ",
           experts_per_rank);
    }
    ++rows_of_expert[expert];
  });
  std::vector<int64_t> next_row(experts_per_rank);
  int64_t total = 0;
  for (int64_t expert = 0; expert < experts_per_rank; ++expert) {
    next_row[expert] = total;
    total += rows_of_expert[expert];
    tokens_per_local_expert[expert] = static_cast<int32_t>(rows_of_expert[expert]);
  }
  if (total > capacity_rows) {
    Fail(kInternalError, total, " received (token, expert) pairs exceed the ", capacity_rows,
         " rows of expand_x");
  }
  messages.ForEachPair([&](int64_t source, int64_t j, const uint8_t *row, int64_t k,
                           int32_t expert, int32_t weight_bits) {
    const int64_t expand_row = next_row[expert]++;
    deliver(source, j, row, expand_row);
    positions[j * messages.top_k + k] = static_cast<int32_t>(expand_row);
    std::memcpy(&pair_weights[j * messages.top_k + k], &weight_bits, sizeof(float));
  });
  return total;
}

// The send side shared by the fused Dispatch and Deliver: the checks, the plan, and one message
// row per (token, destination rank): K local expert ids | K routing weights (float bits), led
// by the token row x[t] when packing. Two ways, the same on every rank. Pull (where every rank
// reads its peers' memory): the message rows are notes offering x[t], and each receiver copies
// every x row it needs straight into its output (PullRows: from the sender's memory, or from
// the slot for small messages). Pack (otherwise): the messages carry the token rows. The
// source records where each token went (token_slot).
struct DecodeMessages {
  int64_t world_size = 0, capacity = 0, top_k = 0, experts_per_rank = 0;
  TravellingRows source;               // x's rows as they travel (quantized or not)
  bool pull = false;
  MessageLayout layout{0, 0};
  StagingBuffers staging{nullptr, nullptr};  // send: the message rows; recv: the received ones
  std::vector<int32_t> send_counts;    // [R]
  std::vector<int32_t> received;       // [R], filled by the exchange
  std::vector<int32_t> offered_token;  // [R*C]: the token a pull note offers
  const char *operation = "";          // RowExchange::operation of the operator's step

  RowExchange Exchange() {
    // Only the counted message rows are read: the receive tails need no zeroing.
    return RowExchange{staging.send, send_counts.data(), staging.recv,
                       received.data(), capacity, layout.row_bytes(), /*zero_tail=*/false,
                       operation};
  }
  ReceivedMessages Received() const {
    return ReceivedMessages{staging.recv, layout, received.data(), world_size, capacity,
                            top_k};
  }
};

// Checks the inputs (and, through `check_outputs(experts_per_rank)`, the operator's outputs),
// abandoning the window on failure so that the peers waiting in this step get the reason at
// once instead of a timeout; then builds the messages and fills token_slot [T, R].
template <typename CheckOutputs>
DecodeMessages PrepareDecodeMessages(CommWindow &window, const TensorArg &x,
                                     const TensorArg &expert_ids, const TensorArg &weights,
                                     const TensorArg &experts_per_rank,
                                     const TensorArg &quant_mode, int64_t capacity,
                                     const TensorArg &token_slot, CheckOutputs &&check_outputs) {
  DecodeMessages messages;
  messages.world_size = window.world_size();
  messages.capacity = capacity;
  const int64_t world_size = messages.world_size;
  messages.experts_per_rank = AbandonOnFailure(window, [&] {
    const int64_t epr = CheckRouting(expert_ids, experts_per_rank, world_size);
    x.RequireRank(2);
    weights.RequireDtype("float32");
    weights.RequireRank(2);
    weights.RequireDim(0, expert_ids.dim(0), "the number of tokens");
    weights.RequireDim(1, expert_ids.dim(1), "top_k");
    token_slot.RequireDim(1, world_size, "the expert-parallel world size");
    check_outputs(epr);
    return epr;
  });
  const int64_t tokens = x.dim(0), top_k = expert_ids.dim(1);
  messages.top_k = top_k;
  const int32_t *ids = expert_ids.data_as<const int32_t>();
  const SendPlan plan = AbandonOnFailure(window, [&] {
    return SendPlan(ids, tokens, top_k, messages.experts_per_rank, world_size, capacity);
  });
  // Quantized once here, before anything is sent: a bad row fails the step on every rank.
  messages.source = AbandonOnFailure(window, [&] { return RowsToSend(x, QuantModeInput(quant_mode)); });

  const MessageLayout notes_layout{0, 2 * top_k};
  messages.pull = !PullDisabled() && window.CanPullRows(capacity, notes_layout.row_bytes());
  messages.layout =
      messages.pull ? notes_layout : MessageLayout{messages.source.row_bytes, 2 * top_k};
  const int64_t row_bytes = messages.layout.row_bytes();
  const int64_t payload_bytes = messages.layout.payload_bytes;
  messages.staging = StagingBuffers::ForThisThread(world_size * capacity * row_bytes);
  messages.send_counts.assign(world_size, 0);
  messages.received.assign(world_size, 0);
  messages.offered_token.assign(world_size * capacity, kNone);
  const uint8_t *x_bytes = messages.source.rows;
  const float *weight_data = weights.data_as<const float>();
  int32_t *slot_of = token_slot.data_as<int32_t>();
  std::fill(slot_of, slot_of + tokens * world_size, kNone);
  std::vector<int32_t> ints(messages.layout.ints);
  for (int64_t rank = 0; rank < world_size; ++rank) {
    const std::vector<int32_t> &sent = plan.tokens_for_rank[rank];
    messages.send_counts[rank] = static_cast<int32_t>(sent.size());
    for (int64_t i = 0; i < static_cast<int64_t>(sent.size()); ++i) {
      uint8_t *row = messages.staging.send + (rank * capacity + i) * row_bytes;
      const int64_t t = sent[i];
      slot_of[t * world_size + rank] = static_cast<int32_t>(rank * capacity + i);
      messages.offered_token[rank * capacity + i] = static_cast<int32_t>(t);
      std::memcpy(row, x_bytes + t * payload_bytes, payload_bytes);
      for (int64_t k = 0; k < top_k; ++k) {
        ints[k] = LocalExpertAt(ids, t * top_k + k, rank, messages.experts_per_rank);
      }
      std::memcpy(&ints[top_k], weight_data + t * top_k, top_k * sizeof(float));
      std::memcpy(row + payload_bytes, ints.data(), ints.size() * sizeof(int32_t));
    }
  }
  return messages;
}

// The tensors of MoeEpFusedDispatch, named in the order MindSpore passes them.
struct FusedDispatchArgs {
  static constexpr const char *kNames[] = {
      "x", "expert_ids", "weights", "experts_per_rank", "quant_mode", "window_id",
      "expand_x", "tokens_per_local_expert", "positions", "recv_weights", "recv_counts",
      "token_slot"};
  TensorArg x, expert_ids, weights, experts_per_rank, quant_mode, window_id;  // inputs
  // outputs
  TensorArg expand_x, tokens_per_local_expert, positions, recv_weights, recv_counts, token_slot;
};

void FusedDispatch(const FusedDispatchArgs &args) {
  std::shared_ptr<CommWindow> window = FindCommWindow(ScalarInput(args.window_id));
  const int64_t world_size = window->world_size();
  DecodeMessages messages = PrepareDecodeMessages(
      *window, args.x, args.expert_ids, args.weights, args.experts_per_rank, args.quant_mode,
      args.positions.dim(0) / world_size, args.token_slot,
      [&](int64_t experts_per_rank) {
        args.expand_x.RequireSameDtype(args.x);
        args.recv_counts.RequireDim(0, world_size, "the expert-parallel world size");
        args.tokens_per_local_expert.RequireDim(0, experts_per_rank, "experts per rank");
      });
  messages.operation = "FusedDispatch (decode)";
  const TravellingRows &source_rows = messages.source;
  const int64_t hidden = args.x.dim(1), token_bytes = source_rows.landed_row_bytes();
  const int64_t travel_bytes = source_rows.row_bytes;
  const int64_t capacity = messages.capacity, capacity_rows = args.expand_x.dim(0);
  int32_t *positions_data = args.positions.data_as<int32_t>();
  float *pair_weights = args.recv_weights.data_as<float>();
  int32_t *expert_counts = args.tokens_per_local_expert.data_as<int32_t>();
  uint8_t *out = args.expand_x.data_as<uint8_t>();
  const ReceivedMessages received = messages.Received();
  int64_t total = 0;  // rows of expand_x filled
  if (messages.pull) {
    // The plan runs inside the pull step, so that a failure in it reaches the peers at once.
    // Each received row is read from its source once, into its first expand_x row; its other
    // rows are copied from there as soon as a batch has landed (while it is in cache), which
    // is cheaper than reading the peer again. x stays unchanged until every peer has read it
    // (PullRows returns only then).
    // The other expand_x rows of received row j: more_rows[more_begin[j], more_begin[j + 1]).
    // Rows are visited in increasing j and a row's pairs one after another, so a row's first
    // pair is the one whose j differs from the last, and its other rows are contiguous here.
    // Quantized rows land in scratch (row j at landing + j * travel_bytes) and are dequantized
    // into their first expand_x row, first_row[j].
    std::vector<int64_t> more_rows, more_begin(world_size * capacity + 1, 0);
    std::vector<int64_t> first_row(source_rows.quantized ? world_size * capacity : 0);
    uint8_t *landing = source_rows.quantized
                           ? ScratchBytes(Scratch::kInt8ReceivedRows,
                                              world_size * capacity * travel_bytes)
                           : nullptr;
    auto plan_copies = [&](std::vector<std::vector<RowCopy>> &copies) {
      int64_t last_row = kNone;
      auto deliver = [&](int64_t source, int64_t j, const uint8_t *, int64_t expand_row) {
        if (j == last_row) {
          more_rows.push_back(expand_row);
          return;
        }
        for (int64_t next = last_row + 1; next <= j; ++next) more_begin[next] = more_rows.size();
        last_row = j;
        if (source_rows.quantized) {
          first_row[j] = expand_row;
          copies[source].push_back({j - source * capacity, landing + j * travel_bytes, j});
        } else {
          copies[source].push_back({j - source * capacity, out + expand_row * token_bytes, j});
        }
      };
      total = GroupByLocalExpert(received, messages.experts_per_rank, capacity_rows,
                                 positions_data, pair_weights, expert_counts, deliver);
      for (int64_t next = last_row + 1; next <= world_size * capacity; ++next) {
        more_begin[next] = more_rows.size();
      }
    };
    auto copy_on = [&](const RowCopy *begin, const RowCopy *end) {
      for (const RowCopy *copy = begin; copy != end; ++copy) {
        const uint8_t *first = copy->destination;
        if (source_rows.quantized) {
          uint8_t *dequantized = out + first_row[copy->tag] * token_bytes;
          source_rows.Land(copy->destination, dequantized);
          first = dequantized;
        }
        for (int64_t i = more_begin[copy->tag]; i < more_begin[copy->tag + 1]; ++i) {
          // Non-temporal stores: expand_x is far larger than the caches, and ordinary stores
          // would first read every destination line from memory.
          CopyStreaming(out + more_rows[i] * token_bytes, first, token_bytes);
        }
      }
    };
    window->PullRows(RowPull{messages.Exchange(), messages.offered_token.data(),
                             source_rows.rows, source_rows.count, travel_bytes, plan_copies,
                             copy_on});
    StreamingStoreFence();
  } else {
    window->ExchangeRows(messages.Exchange());
    auto deliver = [&](int64_t, int64_t, const uint8_t *row, int64_t expand_row) {
      source_rows.Land(row, out + expand_row * token_bytes);
    };
    total = GroupByLocalExpert(received, messages.experts_per_rank, capacity_rows,
                               positions_data, pair_weights, expert_counts, deliver);
  }
  // The rows of expand_x past `total` stay unspecified (the worst-case buffer is mostly tail).
  if (PoisonUnusedRows()) {
    VisitFloatType(args.x, [&](auto element) {
      using T = decltype(element);
      FillWithNaN(args.expand_x.data_as<T>() + total * hidden, (capacity_rows - total) * hidden);
    });
  }
  std::copy(messages.received.begin(), messages.received.end(),
            args.recv_counts.data_as<int32_t>());
}

// Copies the notes of the received message rows into local_ids [R*C, K] and recv_weights
// [R*C, K] (weight 0 where the expert is elsewhere; rows past the counts: -1 and 0, so that
// nothing downstream takes them for pairs).
void UnpackNotes(const ReceivedMessages &received, int32_t *local_ids, float *recv_weights) {
  const int64_t top_k = received.top_k, slots = received.world_size * received.capacity;
  std::fill(local_ids, local_ids + slots * top_k, kNone);
  std::fill(recv_weights, recv_weights + slots * top_k, 0.0f);
  for (int64_t source = 0; source < received.world_size; ++source) {
    for (int64_t i = 0; i < received.counts[source]; ++i) {
      const int64_t j = source * received.capacity + i;
      const uint8_t *ints = received.rows + j * received.layout.row_bytes() +
                            received.layout.payload_bytes;
      std::memcpy(local_ids + j * top_k, ints, top_k * sizeof(int32_t));
      std::memcpy(recv_weights + j * top_k, ints + top_k * sizeof(int32_t),
                  top_k * sizeof(float));
      for (int64_t k = 0; k < top_k; ++k) {
        if (local_ids[j * top_k + k] == kNone) recv_weights[j * top_k + k] = 0.0f;
      }
    }
  }
}

// The tensors of MoeEpFusedDeliver, named in the order MindSpore passes them.
struct FusedDeliverArgs {
  static constexpr const char *kNames[] = {
      "x", "expert_ids", "weights", "experts_per_rank", "quant_mode", "window_id",
      "rows", "local_ids", "recv_weights", "recv_counts", "token_slot"};
  TensorArg x, expert_ids, weights, experts_per_rank, quant_mode, window_id;  // inputs
  TensorArg rows, local_ids, recv_weights, recv_counts, token_slot;  // outputs
};

void FusedDeliver(const FusedDeliverArgs &args) {
  std::shared_ptr<CommWindow> window = FindCommWindow(ScalarInput(args.window_id));
  const int64_t world_size = window->world_size();
  bool keep_quantized = false;  // rows of int32: quantized rows stay quantized where they land
  DecodeMessages messages = PrepareDecodeMessages(
      *window, args.x, args.expert_ids, args.weights, args.experts_per_rank, args.quant_mode,
      args.rows.dim(0) / world_size, args.token_slot,
      [&](int64_t) {
        keep_quantized = HoldsInt8Rows(args.rows, args.x.dim(1));
        if (keep_quantized && QuantModeInput(args.quant_mode) != QuantMode::kInt8PerToken) {
          Fail(kInvalidArgument, "rows of int32 (quantized rows) need quant_mode 2");
        }
        if (!keep_quantized) {
          args.rows.RequireSameDtype(args.x);
          args.rows.RequireDim(1, args.x.dim(1), "x.shape[1] (hidden)");
        }
        args.local_ids.RequireDim(1, args.expert_ids.dim(1), "top_k");
        args.recv_counts.RequireDim(0, world_size, "the expert-parallel world size");
      });
  messages.operation = "FusedDeliver (decode)";
  const TravellingRows &source_rows = messages.source;
  const int64_t token_bytes = source_rows.LandedBytes(keep_quantized);
  const int64_t capacity = messages.capacity, travel_bytes = source_rows.row_bytes;
  const bool dequantize_on_landing = source_rows.quantized && !keep_quantized;
  uint8_t *out = args.rows.data_as<uint8_t>();
  const ReceivedMessages received = messages.Received();
  if (messages.pull) {
    // Each received row is read from its source once, straight into its row of `rows` (or,
    // quantized and dequantized on landing, into scratch, then into `rows` a batch at a time).
    uint8_t *landing = dequantize_on_landing
                           ? ScratchBytes(Scratch::kInt8ReceivedRows,
                                              world_size * capacity * travel_bytes)
                           : out;
    auto plan_copies = [&](std::vector<std::vector<RowCopy>> &copies) {
      UnpackNotes(received, args.local_ids.data_as<int32_t>(), args.recv_weights.data_as<float>());
      for (int64_t source = 0; source < world_size; ++source) {
        for (int64_t i = 0; i < received.counts[source]; ++i) {
          const int64_t j = source * capacity + i;
          copies[source].push_back({i, landing + j * travel_bytes, j});
        }
      }
    };
    std::function<void(const RowCopy *, const RowCopy *)> dequantize;
    if (dequantize_on_landing) {
      dequantize = [&](const RowCopy *begin, const RowCopy *end) {
        for (const RowCopy *copy = begin; copy != end; ++copy) {
          source_rows.Land(copy->destination, out + copy->tag * token_bytes);
        }
      };
    }
    window->PullRows(RowPull{messages.Exchange(), messages.offered_token.data(),
                             source_rows.rows, source_rows.count, travel_bytes, plan_copies,
                             dequantize});
  } else {
    window->ExchangeRows(messages.Exchange());
    UnpackNotes(received, args.local_ids.data_as<int32_t>(), args.recv_weights.data_as<float>());
    for (int64_t source = 0; source < world_size; ++source) {
      for (int64_t i = 0; i < received.counts[source]; ++i) {
        const int64_t j = source * capacity + i;
        const uint8_t *row = received.rows + j * received.layout.row_bytes();
        if (dequantize_on_landing) {
          source_rows.Land(row, out + j * token_bytes);
        } else {
          std::memcpy(out + j * token_bytes, row, token_bytes);
        }
      }
    }
  }
  // Rows past each block's count stay unspecified (all-ones bytes, NaN, with the test aid).
  if (PoisonUnusedRows()) {
    for (int64_t source = 0; source < world_size; ++source) {
      const int64_t used = received.counts[source];
      std::memset(out + (source * capacity + used) * token_bytes, 0xff,
                  (capacity - used) * token_bytes);
    }
  }
  std::copy(messages.received.begin(), messages.received.end(),
            args.recv_counts.data_as<int32_t>());
}

// Checks recv_counts [R] (each in [0, capacity]: it comes from the matching dispatch) and
// token_slot [T, R].
void CheckReturnHandle(const TensorArg &recv_counts, const TensorArg &token_slot,
                       int64_t world_size, int64_t capacity) {
  recv_counts.RequireDtype("int32");
  recv_counts.RequireDim(0, world_size, "the expert-parallel world size");
  token_slot.RequireRank(2);
  token_slot.RequireDtype("int32");
  token_slot.RequireDim(1, world_size, "the expert-parallel world size");
  const int32_t *counts = recv_counts.data_as<const int32_t>();
  for (int64_t source = 0; source < world_size; ++source) {
    if (counts[source] < 0 || counts[source] > capacity) {
      Fail(kOutOfRange, "recv_counts[", source, "] = ", counts[source], " is out of range [0, ",
           capacity, "]: it does not come from the matching dispatch");
    }
  }
}

// The return of the fused Combine and Return: every expert rank returns counts[s] rows (one
// per token it received from s, written by write_block(s, destination)) to each source s, and
// each source sums the rows of its token t in rank order: y[t] = sum over ranks r of the row r
// returned for token_slot[t, r]. Where a peer block fits in a window slot, the rows are written
// straight into the slot and summed where they lie (ShareRows: written once, read once);
// otherwise they are staged (or, with `blocks` given, sent from there: [R*C, row_bytes]) and
// exchanged (ExchangeRows), then summed from the received blocks.
void ReturnAndSum(CommWindow &window, const char *operation, const int32_t *counts,
                  int64_t capacity, int64_t row_bytes, const TensorArg &token_slot,
                  const TensorArg &y,
                  const std::function<void(int64_t source, uint8_t *destination)> &write_block,
                  const uint8_t *blocks = nullptr) {
  const int64_t world_size = window.world_size(), tokens = token_slot.dim(0);
  const int32_t *slot_of = token_slot.data_as<const int32_t>();
  // At the source: every slot in token_slot must name a row its rank returned.
  const auto check_token_slots = [&](const int32_t *returned_counts) {
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t rank = 0; rank < world_size; ++rank) {
        const int32_t slot = slot_of[t * world_size + rank];
        if (slot != kNone &&
            (slot / capacity != rank || slot % capacity >= returned_counts[rank])) {
          Fail(kInternalError, "token_slot[", t, ",", rank, "] = ", slot, " names no row that "
               "rank ", rank, " returned (", returned_counts[rank], " rows)");
        }
      }
    }
  };
  if (window.CanShareRows(capacity, row_bytes)) {
    const StagingBuffers staging = StagingBuffers::ForThisThread(capacity * row_bytes);
    const auto sum_in_place = [&](const std::vector<const uint8_t *> &rows,
                                  const std::vector<int32_t> &returned_counts) {
      check_token_slots(returned_counts.data());
      GatherSumFromBlocks(rows, capacity, token_slot, y);
    };
    window.ShareRows(SharedRows{counts, capacity, row_bytes, staging.send, write_block,
                                sum_in_place, operation});
    return;
  }
  const StagingBuffers staging = StagingBuffers::ForThisThread(world_size * capacity * row_bytes);
  if (blocks == nullptr) {
    // Before the exchange, so that a bad input abandons the window.
    AbandonOnFailure(window, [&] {
      for (int64_t source = 0; source < world_size; ++source) {
        write_block(source, staging.send + source * capacity * row_bytes);
      }
      return 0;
    });
    blocks = staging.send;
  }
  std::vector<int32_t> returned_counts(world_size);
  window.ExchangeRows(RowExchange{blocks, counts, staging.recv, returned_counts.data(),
                                  capacity, row_bytes, /*zero_tail=*/false, operation});
  check_token_slots(returned_counts.data());
  const int64_t returned_shape[2] = {world_size * capacity, y.dim(1)};
  const TensorArg returned_rows{"returned_rows", staging.recv, 2, returned_shape, y.dtype};
  GatherSum(returned_rows, token_slot, nullptr, y);
}

// The tensors of MoeEpFusedCombine, named in the order MindSpore passes them.
struct FusedCombineArgs {
  static constexpr const char *kNames[] = {
      "expert_out", "positions", "recv_weights", "recv_counts", "token_slot", "window_id",
      "y"};
  TensorArg expert_out, positions, recv_weights, recv_counts, token_slot, window_id;  // inputs
  TensorArg y;  // outputs
};

void FusedCombine(const FusedCombineArgs &args) {
  std::shared_ptr<CommWindow> window = FindCommWindow(ScalarInput(args.window_id));
  const int64_t world_size = window->world_size();
  const int64_t hidden = args.expert_out.dim(1);
  const int64_t row_bytes = hidden * (args.expert_out.dtype == "float32" ? 4 : 2);
  int64_t capacity = 0, top_k = 0;
  AbandonOnFailure(*window, [&] {
    args.expert_out.RequireRank(2);
    args.positions.RequireRank(2);
    args.positions.RequireDtype("int32");
    args.recv_weights.RequireDtype("float32");
    args.recv_weights.RequireRank(2);
    args.recv_weights.RequireDim(0, args.positions.dim(0), "the rows of positions");
    args.recv_weights.RequireDim(1, args.positions.dim(1), "top_k");
    args.y.RequireSameDtype(args.expert_out);
    if (args.positions.dim(0) % world_size != 0) {
      Fail(kInvalidArgument, "positions has ", args.positions.dim(0), " rows, not a multiple of "
           "the world size ", world_size, ": it does not come from the matching dispatch");
    }
    capacity = args.positions.dim(0) / world_size;
    top_k = args.positions.dim(1);
    CheckReturnHandle(args.recv_counts, args.token_slot, world_size, capacity);
    return 0;
  });

  // At the expert rank: one weighted partial sum per received token, over this rank's experts
  // in k order (the local combine's arithmetic). GatherSum checks the positions.
  const int32_t *counts = args.recv_counts.data_as<const int32_t>();
  const auto write_partial_sums = [&](int64_t source, uint8_t *destination) {
    const int64_t block = source * capacity;
    const int64_t block_positions_shape[2] = {counts[source], top_k};
    const int64_t partial_shape[2] = {counts[source], hidden};
    const TensorArg block_positions{"positions",
                                    args.positions.data_as<int32_t>() + block * top_k, 2,
                                    block_positions_shape, "int32"};
    const TensorArg block_weights{"recv_weights",
                                  args.recv_weights.data_as<float>() + block * top_k, 2,
                                  block_positions_shape, "float32"};
    const TensorArg partial{"partial", destination, 2, partial_shape, args.expert_out.dtype};
    // Streaming stores: the sums are read by another rank (or after all blocks are written).
    GatherSum(args.expert_out, block_positions, &block_weights, partial,
              /*streaming_stores=*/true);
  };
  ReturnAndSum(*window, "FusedCombine (decode)", counts, capacity, row_bytes, args.token_slot,
               args.y, write_partial_sums);
}

// The tensors of MoeEpFusedReturn, named in the order MindSpore passes them.
struct FusedReturnArgs {
  static constexpr const char *kNames[] = {
      "partial", "recv_counts", "token_slot", "window_id",  // inputs
      "y"};                                                 // outputs
  TensorArg partial, recv_counts, token_slot, window_id;  // inputs
  TensorArg y;  // outputs
};

void FusedReturn(const FusedReturnArgs &args) {
  std::shared_ptr<CommWindow> window = FindCommWindow(ScalarInput(args.window_id));
  const int64_t world_size = window->world_size();
  const int64_t row_bytes = args.partial.dim(1) * (args.partial.dtype == "float32" ? 4 : 2);
  const int64_t capacity = args.partial.dim(0) / world_size;
  AbandonOnFailure(*window, [&] {
    args.partial.RequireRank(2);
    args.y.RequireSameDtype(args.partial);
    if (args.partial.dim(0) % world_size != 0) {
      Fail(kInvalidArgument, "partial has ", args.partial.dim(0), " rows, not a multiple of the "
           "world size ", world_size, ": it does not come from the matching deliver");
    }
    CheckReturnHandle(args.recv_counts, args.token_slot, world_size, capacity);
    return 0;
  });
  const int32_t *counts = args.recv_counts.data_as<const int32_t>();
  const uint8_t *blocks = args.partial.data_as<const uint8_t>();
  const auto copy_block = [&](int64_t source, uint8_t *destination) {
    // Streaming stores: another rank reads the rows.
    CopyStreaming(destination, blocks + source * capacity * row_bytes, counts[source] * row_bytes);
    StreamingStoreFence();
  };
  ReturnAndSum(*window, "FusedReturn (decode)", counts, capacity, row_bytes, args.token_slot,
               args.y, copy_block, blocks);
}

// The tensors of MoeEpGatherRows, named in the order MindSpore passes them; inverse_index (and
// rows_block_counts) only its gradient reads.
struct GatherRowsArgs {
  static constexpr const char *kNames[] = {"rows", "index", "inverse_index",  // inputs
                                           "out"};                            // outputs
  TensorArg rows, index, inverse_index;
  TensorArg out;
};
struct GatherRowsOfBlocksArgs {
  static constexpr const char *kNames[] = {
      "rows", "index", "inverse_index", "rows_block_counts",  // inputs
      "out"};                                                 // outputs
  TensorArg rows, index, inverse_index, rows_block_counts;
  TensorArg out;
};

}  // namespace
}  // namespace moe_ep

MOE_EP_EXPORT int MoeEpExpertParallelLayout(int nparam, void **params, int *ndims,
                                            int64_t **shapes, const char **dtypes,
                                            void * /*stream*/, void * /*extra*/) {
  return moe_ep::RunKernel("MoeEpExpertParallelLayout", [&] {
    moe_ep::ExpertParallelLayout(moe_ep::BindArgsAs<moe_ep::ExpertParallelLayoutArgs>(
        nparam, params, ndims, shapes, dtypes));
  });
}

MOE_EP_EXPORT int MoeEpFusedDispatch(int nparam, void **params, int *ndims, int64_t **shapes,
                                     const char **dtypes, void * /*stream*/, void * /*extra*/) {
  return moe_ep::RunKernel("MoeEpFusedDispatch", [&] {
    moe_ep::FusedDispatch(
        moe_ep::BindArgsAs<moe_ep::FusedDispatchArgs>(nparam, params, ndims, shapes, dtypes));
  });
}

MOE_EP_EXPORT int MoeEpFusedDeliver(int nparam, void **params, int *ndims, int64_t **shapes,
                                    const char **dtypes, void * /*stream*/, void * /*extra*/) {
  return moe_ep::RunKernel("MoeEpFusedDeliver", [&] {
    moe_ep::FusedDeliver(
        moe_ep::BindArgsAs<moe_ep::FusedDeliverArgs>(nparam, params, ndims, shapes, dtypes));
  });
}

MOE_EP_EXPORT int MoeEpFusedReturn(int nparam, void **params, int *ndims, int64_t **shapes,
                                   const char **dtypes, void * /*stream*/, void * /*extra*/) {
  return moe_ep::RunKernel("MoeEpFusedReturn", [&] {
    moe_ep::FusedReturn(
        moe_ep::BindArgsAs<moe_ep::FusedReturnArgs>(nparam, params, ndims, shapes, dtypes));
  });
}

MOE_EP_EXPORT int MoeEpFusedCombine(int nparam, void **params, int *ndims, int64_t **shapes,
                                    const char **dtypes, void * /*stream*/, void * /*extra*/) {
  return moe_ep::RunKernel("MoeEpFusedCombine", [&] {
    moe_ep::FusedCombine(
        moe_ep::BindArgsAs<moe_ep::FusedCombineArgs>(nparam, params, ndims, shapes, dtypes));
  });
}

// GatherSum with extra inputs that only the gradient reads: the inverse index, and optionally
// the block counts of `rows` (rows in R blocks, the first rows_block_counts[r] of block r used),
// so that the gradient writes only those rows.
MOE_EP_EXPORT int MoeEpGatherRows(int nparam, void **params, int *ndims, int64_t **shapes,
                                  const char **dtypes, void * /*stream*/, void * /*extra*/) {
  return moe_ep::RunKernel("MoeEpGatherRows", [&] {
    if (nparam == 5) {
      const auto args = moe_ep::BindArgsAs<moe_ep::GatherRowsOfBlocksArgs>(nparam, params, ndims,
                                                                           shapes, dtypes);
      return moe_ep::GatherSum(args.rows, args.index, nullptr, args.out);
    }
    const auto args =
        moe_ep::BindArgsAs<moe_ep::GatherRowsArgs>(nparam, params, ndims, shapes, dtypes);
    moe_ep::GatherSum(args.rows, args.index, nullptr, args.out);
  });
}
