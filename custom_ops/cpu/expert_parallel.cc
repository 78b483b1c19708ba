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
//   MoeEpFusedDispatch  x [T, H], expert_ids [T, K] int32, experts_per_rank [1] int32,
//                       window_id [1] int32
//       -> expand_x [N, H]              received rows grouped by local expert; rows from
//                                       sum(tokens_per_local_expert) on are unspecified
//          tokens_per_local_expert [L] int32
//          expand_info [N, 2] int32     (source rank, source t*K+k) of each row, -1 if unused
//          recv_counts [R] int32        tokens received from each rank
//     One kernel: layout, pack, delivery through the communication window (counts travel with
//     the rows: no separate collective), and grouping by local expert on arrival.
//     N = R * C * min(K, L) rows is the worst case.
//
//   MoeEpFusedCombine   expert_out [N, H], expand_info [N, 2] int32, weights [T, K] float32,
//                       window_id [1] int32
//       -> y [T, H]
//     Returns every expert output row to its source and forms y[t] = sum_k w[t,k] * out[t,k]
//     there, in k order with float32 accumulation (the same arithmetic as the local combine).
#include <vector>

#include "comm_window.h"
#include "gather_sum.h"
#include "kernel_common.h"

namespace moe_ep {
namespace {

constexpr int32_t kNone = -1;

int32_t ScalarInput(const TensorArg &tensor) {
  tensor.RequireDtype("int32");
  if (tensor.numel() != 1) {
    Fail(kInvalidArgument, tensor.name, " must hold one int32, got shape ", tensor.ShapeString());
  }
  return *tensor.data_as<const int32_t>();
}

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

// Runs `checks` (validation before an exchange); if they fail, the window is abandoned so that
// the peers waiting in this exchange step fail at once with the reason, then the error goes on.
template <typename Checks>
auto AbandonOnFailure(CommWindow &window, Checks &&checks) -> decltype(checks()) {
  try {
    return checks();
  } catch (const KernelError &error) {
    window.Abandon(error.what());
    throw;
  }
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
// most of the step's time. Only the rows the counts declare are ever read, so it is not zeroed.
struct StagingBuffers {
  std::vector<uint8_t> send, recv;  // message rows, [R * C, row bytes] each
  std::vector<uint8_t> returned;    // combine: expert output rows by (token, k) pair

  static StagingBuffers &ForThisThread(int64_t message_bytes, int64_t returned_bytes = 0) {
    thread_local StagingBuffers buffers;
    GrowTo(buffers.send, message_bytes);
    GrowTo(buffers.recv, message_bytes);
    GrowTo(buffers.returned, returned_bytes);
    return buffers;
  }

 private:
  static void GrowTo(std::vector<uint8_t> &buffer, int64_t bytes) {
    if (static_cast<int64_t>(buffer.size()) < bytes) buffer.resize(bytes);
  }
};

// A message row: the payload bytes, then `ints` int32 values. Rows are packed back to back.
struct MessageLayout {
  int64_t payload_bytes;
  int64_t ints;
  int64_t row_bytes() const { return payload_bytes + ints * static_cast<int64_t>(sizeof(int32_t)); }
};

void FusedDispatch(const std::vector<TensorArg> &args) {
  const TensorArg &x = args[0], &expert_ids = args[1], &expand_x = args[4],
                  &tokens_per_local_expert = args[5], &expand_info = args[6],
                  &recv_counts = args[7];
  std::shared_ptr<CommWindow> window = FindCommWindow(ScalarInput(args[3]));
  const int64_t world_size = window->world_size();
  // A check failing before the exchange abandons the window: the peers waiting in this step
  // get the reason at once instead of a timeout.
  const int64_t experts_per_rank = AbandonOnFailure(*window, [&] {
    const int64_t epr = CheckRouting(expert_ids, args[2], world_size);
    x.RequireRank(2);
    expand_x.RequireSameDtype(x);
    recv_counts.RequireDim(0, world_size, "the expert-parallel world size");
    tokens_per_local_expert.RequireDim(0, epr, "experts per rank");
    return epr;
  });
  const int64_t tokens = x.dim(0), hidden = x.dim(1), top_k = expert_ids.dim(1);
  const int64_t element_bytes = x.dtype == "float32" ? 4 : 2;
  const int64_t capacity_rows = expand_x.dim(0);
  const int64_t capacity = capacity_rows / (world_size * std::min(top_k, experts_per_rank));
  const int32_t *ids = expert_ids.data_as<const int32_t>();
  const SendPlan plan = AbandonOnFailure(*window, [&] {
    return SendPlan(ids, tokens, top_k, experts_per_rank, world_size, capacity);
  });

  // Pack: row = x[t] | K local expert ids at the destination | t.
  const MessageLayout layout{hidden * element_bytes, top_k + 1};
  const int64_t row_bytes = layout.row_bytes();
  StagingBuffers &staging = StagingBuffers::ForThisThread(world_size * capacity * row_bytes);
  std::vector<uint8_t> &send = staging.send, &recv = staging.recv;
  std::vector<int32_t> send_counts(world_size), received(world_size);
  const uint8_t *x_bytes = x.data_as<const uint8_t>();
  std::vector<int32_t> ints(top_k + 1);
  for (int64_t rank = 0; rank < world_size; ++rank) {
    const std::vector<int32_t> &sent = plan.tokens_for_rank[rank];
    send_counts[rank] = static_cast<int32_t>(sent.size());
    for (int64_t i = 0; i < static_cast<int64_t>(sent.size()); ++i) {
      uint8_t *row = send.data() + (rank * capacity + i) * row_bytes;
      const int64_t t = sent[i];
      std::memcpy(row, x_bytes + t * layout.payload_bytes, layout.payload_bytes);
      for (int64_t k = 0; k < top_k; ++k) {
        ints[k] = LocalExpertAt(ids, t * top_k + k, rank, experts_per_rank);
      }
      ints[top_k] = static_cast<int32_t>(t);
      std::memcpy(row + layout.payload_bytes, ints.data(), ints.size() * sizeof(int32_t));
    }
  }

  // Only the counted rows are read: the receive tails need no zeroing.
  window->ExchangeRows(RowExchange{send.data(), send_counts.data(), recv.data(), received.data(),
                                   capacity, row_bytes, /*zero_tail=*/false});

  // Group by local expert, in (source rank, source token, k) order: a stable counting sort.
  std::vector<int64_t> rows_of_expert(experts_per_rank, 0);
  auto for_each_received_pair = [&](auto &&visit) {
    for (int64_t source = 0; source < world_size; ++source) {
      for (int64_t i = 0; i < received[source]; ++i) {
        const uint8_t *row = recv.data() + (source * capacity + i) * row_bytes;
        std::memcpy(ints.data(), row + layout.payload_bytes, ints.size() * sizeof(int32_t));
        for (int64_t k = 0; k < top_k; ++k) {
          if (ints[k] != kNone) visit(source, row, ints[top_k], k, ints[k]);
        }
      }
    }
  };
  for_each_received_pair([&](int64_t, const uint8_t *, int32_t, int64_t, int32_t expert) {
    ++rows_of_expert[expert];
  });
  std::vector<int64_t> next_row(experts_per_rank);
  int64_t total = 0;
  for (int64_t expert = 0; expert < experts_per_rank; ++expert) {
    next_row[expert] = total;
    total += rows_of_expert[expert];
    tokens_per_local_expert.data_as<int32_t>()[expert] =
        static_cast<int32_t>(rows_of_expert[expert]);
  }
  uint8_t *out = expand_x.data_as<uint8_t>();
  int32_t *info = expand_info.data_as<int32_t>();
  for_each_received_pair([&](int64_t source, const uint8_t *row, int32_t t, int64_t k,
                             int32_t expert) {
    const int64_t position = next_row[expert]++;
    std::memcpy(out + position * layout.payload_bytes, row, layout.payload_bytes);
    info[position * 2] = static_cast<int32_t>(source);
    info[position * 2 + 1] = static_cast<int32_t>(t * top_k + k);
  });
  // The rows of expand_x past `total` stay unspecified (the worst-case buffer is mostly tail);
  // expand_info marks them -1, which is what the combine reads.
  if (PoisonUnusedRows()) {
    VisitFloatType(x, [&](auto element) {
      using T = decltype(element);
      FillWithNaN(expand_x.data_as<T>() + total * hidden, (capacity_rows - total) * hidden);
    });
  }
  std::fill(info + total * 2, info + capacity_rows * 2, kNone);
  for (int64_t source = 0; source < world_size; ++source) {
    recv_counts.data_as<int32_t>()[source] = received[source];
  }
}

void FusedCombine(const std::vector<TensorArg> &args) {
  const TensorArg &expert_out = args[0], &expand_info = args[1], &weights = args[2], &y = args[4];
  std::shared_ptr<CommWindow> window = FindCommWindow(ScalarInput(args[3]));
  const int64_t world_size = window->world_size();
  expert_out.RequireRank(2);
  expand_info.RequireRank(2);
  expand_info.RequireDtype("int32");
  expand_info.RequireDim(0, expert_out.dim(0), "the rows of expert_out");
  weights.RequireRank(2);
  weights.RequireDtype("float32");
  y.RequireSameDtype(expert_out);
  const int64_t rows = expert_out.dim(0), hidden = expert_out.dim(1);
  const int64_t tokens = weights.dim(0), top_k = weights.dim(1);
  const int64_t element_bytes = expert_out.dtype == "float32" ? 4 : 2;
  const int32_t *info = expand_info.data_as<const int32_t>();

  // Each source receives at most one row per (token, k) pair of its own (`pairs` here). The
  // exchange needs the same block size on every rank, and ranks may hold different numbers of
  // tokens: a block holds N / R rows (N = R * C * min(K, L) on every rank), the most rows one
  // rank can owe one source (C tokens, at most min(K, L) of their pairs on one rank).
  const int64_t pairs = tokens * top_k;
  const int64_t capacity = rows / world_size;
  const MessageLayout layout{hidden * element_bytes, 1};
  const int64_t row_bytes = layout.row_bytes();
  std::vector<std::vector<int64_t>> rows_for_rank(world_size);
  AbandonOnFailure(*window, [&] {
    if (rows % world_size != 0) {
      Fail(kInvalidArgument, "expert_out has ", rows, " rows, not a multiple of the world size ",
           world_size, ": it does not come from the matching dispatch");
    }
    for (int64_t j = 0; j < rows; ++j) {
      const int32_t source = info[j * 2];
      if (source == kNone) continue;
      if (source < 0 || source >= world_size || info[j * 2 + 1] < 0) {
        Fail(kOutOfRange, "expand_info[", j, "] = (", source, ", ", info[j * 2 + 1],
             ") does not come from the matching dispatch");
      }
      rows_for_rank[source].push_back(j);
    }
    for (int64_t rank = 0; rank < world_size; ++rank) {
      if (static_cast<int64_t>(rows_for_rank[rank].size()) > capacity) {
        Fail(kInvalidArgument, "rank ", rank, " is owed ", rows_for_rank[rank].size(),
             " rows but a rank can owe one source at most ", capacity);
      }
    }
    return 0;
  });
  StagingBuffers &staging = StagingBuffers::ForThisThread(world_size * capacity * row_bytes,
                                                          pairs * layout.payload_bytes);
  std::vector<uint8_t> &send = staging.send, &recv = staging.recv;
  std::vector<int32_t> send_counts(world_size), received(world_size);
  const uint8_t *out_bytes = expert_out.data_as<const uint8_t>();
  for (int64_t rank = 0; rank < world_size; ++rank) {
    send_counts[rank] = static_cast<int32_t>(rows_for_rank[rank].size());
    for (int64_t i = 0; i < send_counts[rank]; ++i) {
      const int64_t j = rows_for_rank[rank][i];
      uint8_t *row = send.data() + (rank * capacity + i) * row_bytes;
      std::memcpy(row, out_bytes + j * layout.payload_bytes, layout.payload_bytes);
      std::memcpy(row + layout.payload_bytes, &info[j * 2 + 1], sizeof(int32_t));
    }
  }

  // Only the counted rows are read: the receive tails need no zeroing.
  window->ExchangeRows(RowExchange{send.data(), send_counts.data(), recv.data(), received.data(),
                                   capacity, row_bytes, /*zero_tail=*/false});

  // Place each returned row at its (token, k) pair, then sum in k order (the local combine).
  // Only the pairs whose position is set are read, so `returned` needs no zeroing.
  uint8_t *returned = staging.returned.data();
  std::vector<int32_t> positions(pairs, kNone);
  for (int64_t source = 0; source < world_size; ++source) {
    for (int64_t i = 0; i < received[source]; ++i) {
      const uint8_t *row = recv.data() + (source * capacity + i) * row_bytes;
      int32_t pair;
      std::memcpy(&pair, row + layout.payload_bytes, sizeof(pair));
      if (pair < 0 || pair >= pairs || positions[pair] != kNone) {
        Fail(kInternalError, "rank ", source, " returned pair ", pair,
             " twice or out of range [0, ", pairs, ")");
      }
      positions[pair] = pair;
      std::memcpy(returned + pair * layout.payload_bytes, row, layout.payload_bytes);
    }
  }
  const int64_t returned_shape[2] = {pairs, hidden};
  const int64_t positions_shape[2] = {tokens, top_k};
  const TensorArg returned_rows{"returned_rows", returned, 2, returned_shape,
                                expert_out.dtype};
  const TensorArg pair_positions{"pair_positions", positions.data(), 2, positions_shape, "int32"};
  GatherSum(returned_rows, pair_positions, &weights, y);
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
        {"x", "expert_ids", "experts_per_rank", "window_id", "expand_x",
         "tokens_per_local_expert", "expand_info", "recv_counts"}));
  });
}

MOE_EP_EXPORT int MoeEpFusedCombine(int nparam, void **params, int *ndims, int64_t **shapes,
                                    const char **dtypes, void * /*stream*/, void * /*extra*/) {
  return moe_ep::RunKernel("MoeEpFusedCombine", [&] {
    moe_ep::FusedCombine(moe_ep::BindArgs(
        nparam, params, ndims, shapes, dtypes,
        {"expert_out", "expand_info", "weights", "window_id", "y"}));
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
