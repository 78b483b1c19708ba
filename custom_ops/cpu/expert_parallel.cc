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
//                       experts_per_rank [1] int32, window_id [1] int32
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
#include <cstdlib>
#include <memory>
#include <string_view>
#include <utility>
#include <vector>

#include "comm_window.h"
#include "gather_sum.h"
#include "kernel_common.h"

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

void ExpertParallelLayout(const std::vector<TensorArg> &args) {
  const TensorArg &expert_ids = args[0], &send_token_index = args[2], &send_counts = args[3],
                  &token_slot = args[4], &send_local_ids = args[5];
  const int64_t world_size = send_token_index.dim(0), capacity = send_token_index.dim(1);
  const int64_t experts_per_rank = CheckRouting(expert_ids, args[1], world_size);
  const int64_t tokens = expert_ids.dim(0), top_k = expert_ids.dim(1);
  token_slot.RequireDim(0, tokens, "the number of tokens");
  const int32_t *ids = expert_ids.data_as<const int32_t>();
  const SendPlan plan(ids, tokens, top_k, experts_per_rank, world_size, capacity);

  int32_t *slot_token = send_token_index.data_as<int32_t>();
  int32_t *slot_of = token_slot.data_as<int32_t>();
  int32_t *local_ids = send_local_ids.data_as<int32_t>();
  std::fill(slot_token, slot_token + world_size * capacity, kNone);
  std::fill(slot_of, slot_of + tokens * world_size, kNone);
  std::fill(local_ids, local_ids + world_size * capacity * top_k, kNone);
  for (int64_t rank = 0; rank < world_size; ++rank) {
    const std::vector<int32_t> &sent = plan.tokens_for_rank[rank];
    send_counts.data_as<int32_t>()[rank] = static_cast<int32_t>(sent.size());
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

// Staging memory of the fused operators, kept per thread across calls: a fresh buffer of this
// size would be zero-filled and page-faulted on every decode step, which profiling showed to be
// most of the step's time. Only the rows the counts declare are ever written or read, so it is
// neither zeroed nor otherwise touched: the buffers are sized for R * C rows, but only the pages
// of rows a step uses become resident (a decode step with a few tokens under a large
// dispatch.max_tokens_per_rank keeps a few pages, not R * C rows; the in-window Combine never
// touches `recv`).
struct StagingBuffers {
  // Grows without initialising (new[] of a byte array leaves the pages untouched).
  class Bytes {
   public:
    uint8_t *data() const { return bytes_.get(); }
    void GrowTo(int64_t size) {
      if (size > size_) {
        bytes_.reset(new uint8_t[size]);
        size_ = size;
      }
    }

   private:
    std::unique_ptr<uint8_t[]> bytes_;
    int64_t size_ = 0;
  };
  Bytes send, recv;  // message rows, [R * C, row bytes] each

  static StagingBuffers &ForThisThread(int64_t message_bytes) {
    thread_local StagingBuffers buffers;
    buffers.send.GrowTo(message_bytes);
    buffers.recv.GrowTo(message_bytes);
    return buffers;
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

void FusedDispatch(const std::vector<TensorArg> &args) {
  const TensorArg &x = args[0], &expert_ids = args[1], &weights = args[2];
  const TensorArg &expand_x = args[5], &tokens_per_local_expert = args[6];
  const TensorArg &positions = args[7], &recv_weights = args[8], &recv_counts = args[9];
  const TensorArg &token_slot = args[10];
  std::shared_ptr<CommWindow> window = FindCommWindow(ScalarInput(args[4]));
  const int64_t world_size = window->world_size();
  // A check failing before the exchange abandons the window: the peers waiting in this step
  // get the reason at once instead of a timeout.
  const int64_t experts_per_rank = AbandonOnFailure(*window, [&] {
    const int64_t epr = CheckRouting(expert_ids, args[3], world_size);
    x.RequireRank(2);
    weights.RequireDtype("float32");
    weights.RequireRank(2);
    weights.RequireDim(0, expert_ids.dim(0), "the number of tokens");
    weights.RequireDim(1, expert_ids.dim(1), "top_k");
    expand_x.RequireSameDtype(x);
    recv_counts.RequireDim(0, world_size, "the expert-parallel world size");
    tokens_per_local_expert.RequireDim(0, epr, "experts per rank");
    token_slot.RequireDim(1, world_size, "the expert-parallel world size");
    return epr;
  });
  const int64_t tokens = x.dim(0), hidden = x.dim(1), top_k = expert_ids.dim(1);
  const int64_t element_bytes = x.dtype == "float32" ? 4 : 2;
  const int64_t token_bytes = hidden * element_bytes;
  const int64_t capacity_rows = expand_x.dim(0);
  const int64_t capacity = positions.dim(0) / world_size;  // C: tokens per rank and peer
  const int32_t *ids = expert_ids.data_as<const int32_t>();
  const float *weight_data = weights.data_as<const float>();
  const SendPlan plan = AbandonOnFailure(*window, [&] {
    return SendPlan(ids, tokens, top_k, experts_per_rank, world_size, capacity);
  });

  // A message row describes token t at its destination: K local expert ids | K routing weights
  // (float bits). Two ways, the same on every rank. Pull (where every rank reads its peers'
  // memory): the rows are notes offering x[t], and each receiver copies every x row it needs
  // straight into its expand_x rows (PullRows: from the sender's memory, or from the slot for
  // small messages). Pack (otherwise): x[t] leads the message row; the rows are exchanged,
  // then grouped. The source remembers where each token went (token_slot).
  const MessageLayout notes_layout{0, 2 * top_k};
  const bool pull = !PullDisabled() && window->CanPullRows(capacity, notes_layout.row_bytes());
  const MessageLayout layout = pull ? notes_layout : MessageLayout{token_bytes, 2 * top_k};
  const int64_t row_bytes = layout.row_bytes();
  StagingBuffers &staging = StagingBuffers::ForThisThread(world_size * capacity * row_bytes);
  StagingBuffers::Bytes &send = staging.send, &recv = staging.recv;
  std::vector<int32_t> send_counts(world_size), received(world_size);
  std::vector<int32_t> offered_token(world_size * capacity);  // pull: the token of a note
  const uint8_t *x_bytes = x.data_as<const uint8_t>();
  int32_t *slot_of = token_slot.data_as<int32_t>();
  std::fill(slot_of, slot_of + tokens * world_size, kNone);
  std::vector<int32_t> ints(layout.ints);
  for (int64_t rank = 0; rank < world_size; ++rank) {
    const std::vector<int32_t> &sent = plan.tokens_for_rank[rank];
    send_counts[rank] = static_cast<int32_t>(sent.size());
    for (int64_t i = 0; i < static_cast<int64_t>(sent.size()); ++i) {
      uint8_t *row = send.data() + (rank * capacity + i) * row_bytes;
      const int64_t t = sent[i];
      slot_of[t * world_size + rank] = static_cast<int32_t>(rank * capacity + i);
      offered_token[rank * capacity + i] = static_cast<int32_t>(t);
      std::memcpy(row, x_bytes + t * layout.payload_bytes, layout.payload_bytes);
      for (int64_t k = 0; k < top_k; ++k) {
        ints[k] = LocalExpertAt(ids, t * top_k + k, rank, experts_per_rank);
      }
      std::memcpy(&ints[top_k], weight_data + t * top_k, top_k * sizeof(float));
      std::memcpy(row + layout.payload_bytes, ints.data(), ints.size() * sizeof(int32_t));
    }
  }

  int32_t *positions_data = positions.data_as<int32_t>();
  float *pair_weights = recv_weights.data_as<float>();
  int32_t *expert_counts = tokens_per_local_expert.data_as<int32_t>();
  uint8_t *out = expand_x.data_as<uint8_t>();
  const ReceivedMessages messages{recv.data(), layout, received.data(), world_size, capacity,
                                  top_k};
  int64_t total = 0;  // rows of expand_x filled
  // Only the counted message rows are read: the receive tails need no zeroing.
  if (pull) {
    // The plan runs inside the pull step, so that a failure in it reaches the peers at once.
    // Each received row is read from its source once, into its first expand_x row; its other
    // rows are copied from there as soon as a batch has landed (while it is in cache), which
    // is cheaper than reading the peer again. x stays unchanged until every peer has read it
    // (PullRows returns only then).
    // The other expand_x rows of received row j: more_rows[more_begin[j], more_begin[j + 1]).
    // Rows are visited in increasing j and a row's pairs one after another, so a row's first
    // pair is the one whose j differs from the last, and its other rows are contiguous here.
    std::vector<int64_t> more_rows, more_begin(world_size * capacity + 1, 0);
    auto plan_copies = [&](std::vector<std::vector<RowCopy>> &copies) {
      int64_t last_row = kNone;
      auto deliver = [&](int64_t source, int64_t j, const uint8_t *, int64_t expand_row) {
        if (j == last_row) {
          more_rows.push_back(expand_row);
          return;
        }
        for (int64_t next = last_row + 1; next <= j; ++next) more_begin[next] = more_rows.size();
        last_row = j;
        copies[source].push_back({j - source * capacity, out + expand_row * token_bytes, j});
      };
      total = GroupByLocalExpert(messages, experts_per_rank, capacity_rows, positions_data,
                                 pair_weights, expert_counts, deliver);
      for (int64_t next = last_row + 1; next <= world_size * capacity; ++next) {
        more_begin[next] = more_rows.size();
      }
    };
    auto copy_on = [&](const RowCopy *begin, const RowCopy *end) {
      for (const RowCopy *copy = begin; copy != end; ++copy) {
        for (int64_t i = more_begin[copy->tag]; i < more_begin[copy->tag + 1]; ++i) {
          // Non-temporal stores: expand_x is far larger than the caches, and ordinary stores
          // would first read every destination line from memory.
          CopyStreaming(out + more_rows[i] * token_bytes, copy->destination, token_bytes);
        }
      }
    };
    window->PullRows(RowPull{RowExchange{send.data(), send_counts.data(), recv.data(),
                                         received.data(), capacity, row_bytes,
                                         /*zero_tail=*/false},
                             offered_token.data(), x_bytes, tokens, token_bytes, plan_copies,
                             copy_on});
    StreamingStoreFence();
  } else {
    window->ExchangeRows(RowExchange{send.data(), send_counts.data(), recv.data(),
                                     received.data(), capacity, row_bytes, /*zero_tail=*/false});
    auto deliver = [&](int64_t, int64_t, const uint8_t *row, int64_t expand_row) {
      std::memcpy(out + expand_row * token_bytes, row, token_bytes);
    };
    total = GroupByLocalExpert(messages, experts_per_rank, capacity_rows, positions_data,
                               pair_weights, expert_counts, deliver);
  }
  // The rows of expand_x past `total` stay unspecified (the worst-case buffer is mostly tail).
  if (PoisonUnusedRows()) {
    VisitFloatType(x, [&](auto element) {
      using T = decltype(element);
      FillWithNaN(expand_x.data_as<T>() + total * hidden, (capacity_rows - total) * hidden);
    });
  }
  for (int64_t source = 0; source < world_size; ++source) {
    recv_counts.data_as<int32_t>()[source] = received[source];
  }
}

void FusedCombine(const std::vector<TensorArg> &args) {
  const TensorArg &expert_out = args[0], &positions = args[1], &recv_weights = args[2];
  const TensorArg &recv_counts = args[3], &token_slot = args[4], &y = args[6];
  std::shared_ptr<CommWindow> window = FindCommWindow(ScalarInput(args[5]));
  const int64_t world_size = window->world_size();
  const int64_t hidden = expert_out.dim(1);
  const int64_t tokens = token_slot.dim(0);
  const int64_t element_bytes = expert_out.dtype == "float32" ? 4 : 2;
  const int64_t row_bytes = hidden * element_bytes;
  int64_t capacity = 0, top_k = 0;
  AbandonOnFailure(*window, [&] {
    expert_out.RequireRank(2);
    positions.RequireRank(2);
    positions.RequireDtype("int32");
    recv_weights.RequireDtype("float32");
    recv_weights.RequireRank(2);
    recv_weights.RequireDim(0, positions.dim(0), "the rows of positions");
    recv_weights.RequireDim(1, positions.dim(1), "top_k");
    recv_counts.RequireDtype("int32");
    recv_counts.RequireDim(0, world_size, "the expert-parallel world size");
    token_slot.RequireRank(2);
    token_slot.RequireDtype("int32");
    token_slot.RequireDim(1, world_size, "the expert-parallel world size");
    y.RequireSameDtype(expert_out);
    if (positions.dim(0) % world_size != 0) {
      Fail(kInvalidArgument, "positions has ", positions.dim(0), " rows, not a multiple of the "
           "world size ", world_size, ": it does not come from the matching dispatch");
    }
    capacity = positions.dim(0) / world_size;
    top_k = positions.dim(1);
    const int32_t *counts = recv_counts.data_as<const int32_t>();
    for (int64_t source = 0; source < world_size; ++source) {
      if (counts[source] < 0 || counts[source] > capacity) {
        Fail(kOutOfRange, "recv_counts[", source, "] = ", counts[source], " is out of range [0, ",
             capacity, "]: it does not come from the matching dispatch");
      }
    }
    return 0;
  });

  // At the expert rank: one weighted partial sum per received token, over this rank's experts
  // in k order (the local combine's arithmetic). GatherSum checks the positions.
  const int32_t *counts = recv_counts.data_as<const int32_t>();
  const auto write_partial_sums = [&](int64_t source, uint8_t *destination) {
    const int64_t block = source * capacity;
    const int64_t block_positions_shape[2] = {counts[source], top_k};
    const int64_t partial_shape[2] = {counts[source], hidden};
    const TensorArg block_positions{"positions", positions.data_as<int32_t>() + block * top_k, 2,
                                    block_positions_shape, "int32"};
    const TensorArg block_weights{"recv_weights", recv_weights.data_as<float>() + block * top_k,
                                  2, block_positions_shape, "float32"};
    const TensorArg partial{"partial", destination, 2, partial_shape, expert_out.dtype};
    // Streaming stores: the sums are read by another rank (or after all blocks are written).
    GatherSum(expert_out, block_positions, &block_weights, partial, /*streaming_stores=*/true);
  };
  // At the source: every slot in token_slot must name a row its rank returned.
  const int32_t *slot_of = token_slot.data_as<const int32_t>();
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

  // y[t] = the sum, in rank order, of the partial rows of t (the prefill path's arithmetic).
  // Where a peer block fits in a slot, the partial sums are written straight into the window
  // and summed where they lie (ShareRows: no staging, no copy); otherwise they are staged and
  // exchanged (ExchangeRows), then summed from the received blocks.
  if (window->CanShareRows(capacity, row_bytes)) {
    StagingBuffers &staging = StagingBuffers::ForThisThread(capacity * row_bytes);
    const auto sum_in_place = [&](const std::vector<const uint8_t *> &rows,
                                  const std::vector<int32_t> &returned_counts) {
      check_token_slots(returned_counts.data());
      GatherSumFromBlocks(rows, capacity, token_slot, y);
    };
    window->ShareRows(SharedRows{counts, capacity, row_bytes, staging.send.data(),
                                 write_partial_sums, sum_in_place});
    return;
  }
  // Before the exchange, so that a bad position abandons the window.
  StagingBuffers &staging = StagingBuffers::ForThisThread(world_size * capacity * row_bytes);
  AbandonOnFailure(*window, [&] {
    for (int64_t source = 0; source < world_size; ++source) {
      write_partial_sums(source, staging.send.data() + source * capacity * row_bytes);
    }
    return 0;
  });
  std::vector<int32_t> returned_counts(world_size);
  window->ExchangeRows(RowExchange{staging.send.data(), counts, staging.recv.data(),
                                   returned_counts.data(), capacity, row_bytes,
                                   /*zero_tail=*/false});
  check_token_slots(returned_counts.data());
  const int64_t returned_shape[2] = {world_size * capacity, hidden};
  const TensorArg returned_rows{"returned_rows", staging.recv.data(), 2, returned_shape,
                                expert_out.dtype};
  GatherSum(returned_rows, token_slot, nullptr, y);
}

}  // namespace
}  // namespace moe_ep

MOE_EP_EXPORT int MoeEpExpertParallelLayout(int nparam, void **params, int *ndims,
                                            int64_t **shapes, const char **dtypes,
                                            void * /*stream*/, void * /*extra*/) {
  return moe_ep::RunKernel("MoeEpExpertParallelLayout", [&] {
    moe_ep::ExpertParallelLayout(moe_ep::BindArgs(
        nparam, params, ndims, shapes, dtypes,
        {"expert_ids", "experts_per_rank", "send_token_index", "send_counts", "token_slot",
         "send_local_ids"}));
  });
}

MOE_EP_EXPORT int MoeEpFusedDispatch(int nparam, void **params, int *ndims, int64_t **shapes,
                                     const char **dtypes, void * /*stream*/, void * /*extra*/) {
  return moe_ep::RunKernel("MoeEpFusedDispatch", [&] {
    moe_ep::FusedDispatch(moe_ep::BindArgs(
        nparam, params, ndims, shapes, dtypes,
        {"x", "expert_ids", "weights", "experts_per_rank", "window_id", "expand_x",
         "tokens_per_local_expert", "positions", "recv_weights", "recv_counts", "token_slot"}));
  });
}

MOE_EP_EXPORT int MoeEpFusedCombine(int nparam, void **params, int *ndims, int64_t **shapes,
                                    const char **dtypes, void * /*stream*/, void * /*extra*/) {
  return moe_ep::RunKernel("MoeEpFusedCombine", [&] {
    moe_ep::FusedCombine(moe_ep::BindArgs(
        nparam, params, ndims, shapes, dtypes,
        {"expert_out", "positions", "recv_weights", "recv_counts", "token_slot", "window_id",
         "y"}));
  });
}

// GatherSum with an extra (unused) input: the inverse index that the gradient needs.
MOE_EP_EXPORT int MoeEpGatherRows(int nparam, void **params, int *ndims, int64_t **shapes,
                                  const char **dtypes, void * /*stream*/, void * /*extra*/) {
  return moe_ep::RunKernel("MoeEpGatherRows", [&] {
    std::vector<moe_ep::TensorArg> args = moe_ep::BindArgs(
        nparam, params, ndims, shapes, dtypes, {"rows", "index", "inverse_index", "out"});
    moe_ep::GatherSum(args[0], args[1], nullptr, args[3]);
  });
}
