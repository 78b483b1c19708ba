// The ExchangeRows AOT kernels: an all-to-all-v of rows between the ranks of a communication
// window (comm_window.h).
//
//   MoeEpExchangeRows          send_rows [R*C, ...] (any dtype), send_counts [R] int32,
//   MoeEpExchangeRowsKeepTail  window_id [1] int32
//                              -> recv_rows [R*C, ...] (send_rows' dtype), recv_counts [R] int32
//
// R is the window's world size and C the capacity per peer. Rows for destination d are the
// first send_counts[d] rows of block d (rows [d*C, (d+1)*C)); rows from source s arrive in block
// s of recv_rows, recv_counts[s] of them. MoeEpExchangeRows zeroes the rest of each block;
// MoeEpExchangeRowsKeepTail leaves it unspecified (not written), for callers that read only the
// counted rows. A row is all trailing dimensions of its tensor, moved as raw bytes.
//
//   MoeEpDeliverRows   x [T, H], send_token_index [R, C] int32, send_counts [R] int32,
//                      token_slot [T, R] int32 (read only by the gradient, see ep_kernels.py),
//                      notes [R*C, M] float32, quant_mode [1] int32, window_id [1] int32
//                      -> recv_rows [R*C, H] (x's dtype), recv_notes [R*C, M] float32,
//                         recv_counts [R] int32
//
// The prefill delivery: the rows x[send_token_index[d, i]] (i < send_counts[d]) and their notes
// (local expert ids and routing weights) go to rank d, as MoeEpExchangeRows would deliver a
// packed copy of them. Where every rank reads its peers' memory (CommWindow::CanPullRows), the
// ranks exchange only the notes and each receiver reads the rows straight from its sources' x
// into recv_rows (PullRows): no packed send buffer of R * C rows exists, and each row is copied
// once. Otherwise (or with MOE_EP_DISPATCH_PULL=0 on every rank) the rows are packed and
// exchanged (two steps, rows then notes). recv_rows' rows past the counts are unspecified;
// recv_notes' are zero (a zero note reads as "no local expert" to the caller).
// quant_mode 2 (int8 per token, int8_rows.h): the source quantizes each row of x once, the
// quantized rows travel (pulled or packed) and each receiver dequantizes them into recv_rows as
// they land (a pull batch at a time, while in cache), or, when recv_rows is int32 [R*C, W],
// keeps them quantized there (inference: the row-wise experts dequantize as they read).
#include <algorithm>
#include <cstring>
#include <memory>

#include "comm_window.h"
#include "int8_rows.h"
#include "kernel_common.h"
#include "scratch.h"

namespace moe_ep {
namespace {

int64_t ElementBytes(const TensorArg &tensor) {
  const std::string_view dtype = tensor.dtype;
  if (dtype == "float64" || dtype == "int64" || dtype == "uint64") return 8;
  if (dtype == "float32" || dtype == "int32" || dtype == "uint32") return 4;
  if (dtype == "float16" || dtype == "bfloat16" || dtype == "int16" || dtype == "uint16") {
    return 2;
  }
  if (dtype == "int8" || dtype == "uint8" || dtype == "bool") return 1;
  Fail(kInvalidArgument, tensor.name, " has unsupported dtype ", dtype);
}

// The tensors of MoeEpExchangeRows and MoeEpExchangeRowsKeepTail, named in the order MindSpore
// passes them.
struct ExchangeRowsArgs {
  static constexpr const char *kNames[] = {
      "send_rows", "send_counts", "window_id",
      "recv_rows", "recv_counts"};
  TensorArg send_rows, send_counts, window_id;  // inputs
  TensorArg recv_rows, recv_counts;  // outputs
};

// Checks the tensors of one call and describes the exchange they ask for.
RowExchange DescribeExchange(const ExchangeRowsArgs &args, int world_size) {
  if (args.send_rows.rank < 1 || args.send_rows.dim(0) % world_size != 0) {
    Fail(kInvalidArgument, "send_rows has shape ", args.send_rows.ShapeString(),
         "; its first dimension must be world_size * capacity_per_peer (world_size = ",
         world_size, ")");
  }
  args.recv_rows.RequireSameDtype(args.send_rows);
  args.recv_rows.RequireRank(args.send_rows.rank);
  for (int axis = 0; axis < args.send_rows.rank; ++axis) {
    args.recv_rows.RequireDim(axis, args.send_rows.dim(axis), "the same dimension of send_rows");
  }
  for (const TensorArg *counts : {&args.send_counts, &args.recv_counts}) {
    counts->RequireDtype("int32");
    counts->RequireRank(1);
    counts->RequireDim(0, world_size, "the world size of the communication window");
  }

  RowExchange exchange;
  exchange.send = args.send_rows.data_as<const uint8_t>();
  exchange.send_counts = args.send_counts.data_as<const int32_t>();
  exchange.recv = args.recv_rows.data_as<uint8_t>();
  exchange.recv_counts = args.recv_counts.data_as<int32_t>();
  exchange.capacity = args.send_rows.dim(0) / world_size;
  exchange.row_bytes =
      exchange.capacity == 0
          ? 0
          : args.send_rows.numel() / args.send_rows.dim(0) * ElementBytes(args.send_rows);
  return exchange;
}

// Both kernels: binds the arguments, then runs one exchange step on the window.
int RunExchangeKernel(const char *kernel_name, bool zero_tail, int nparam, void **params,
                      int *ndims, int64_t **shapes, const char **dtypes) {
  return RunKernel(kernel_name, [&] {
    const auto args = BindArgsAs<ExchangeRowsArgs>(nparam, params, ndims, shapes, dtypes);
    args.window_id.RequireDtype("int32");
    args.window_id.RequireRank(1);
    args.window_id.RequireDim(0, 1, "1");
    const std::shared_ptr<CommWindow> window =
        FindCommWindow(args.window_id.data_as<const int32_t>()[0]);
    RowExchange exchange =
        AbandonOnFailure(*window, [&] { return DescribeExchange(args, window->world_size()); });
    exchange.zero_tail = zero_tail;
    exchange.operation = "ExchangeRows (prefill)";
    window->ExchangeRows(exchange);
  });
}

constexpr char kDeliverRowsOperation[] = "DeliverRows (prefill)";

// The tensors of MoeEpDeliverRows, named in the order MindSpore passes them; token_slot is read
// only by the gradient.
struct DeliverRowsArgs {
  static constexpr const char *kNames[] = {
      "x", "send_token_index", "send_counts", "token_slot", "notes", "quant_mode", "window_id",
      "recv_rows", "recv_notes", "recv_counts"};
  TensorArg x, send_token_index, send_counts, token_slot, notes, quant_mode, window_id;  // inputs
  TensorArg recv_rows, recv_notes, recv_counts;  // outputs
};

void DeliverRows(const DeliverRowsArgs &args) {
  const std::shared_ptr<CommWindow> window = FindCommWindow(ScalarInput(args.window_id));
  const int64_t world_size = window->world_size();
  const bool keep_quantized = AbandonOnFailure(*window, [&] {
    args.x.RequireRank(2);
    args.send_token_index.RequireDtype("int32");
    args.send_token_index.RequireRank(2);
    args.send_token_index.RequireDim(0, world_size,
                                     "the world size of the communication window");
    args.notes.RequireDtype("float32");
    args.notes.RequireRank(2);
    args.notes.RequireDim(0, world_size * args.send_token_index.dim(1),
                          "send_token_index's R * C slots");
    args.recv_rows.RequireDim(0, args.notes.dim(0), "notes.shape[0] (R * C slots)");
    const bool keep = HoldsInt8Rows(args.recv_rows, args.x.dim(1));
    if (keep && QuantModeInput(args.quant_mode) != QuantMode::kInt8PerToken) {
      Fail(kInvalidArgument, "recv_rows of int32 (quantized rows) need quant_mode 2");
    }
    if (!keep) {
      args.recv_rows.RequireSameDtype(args.x);
      args.recv_rows.RequireDim(1, args.x.dim(1), "x.shape[1] (hidden)");
    }
    args.recv_notes.RequireSameDtype(args.notes);
    for (const TensorArg *counts : {&args.send_counts, &args.recv_counts}) {
      counts->RequireDtype("int32");
      counts->RequireRank(1);
      counts->RequireDim(0, world_size, "the world size of the communication window");
    }
    const int32_t *counts = args.send_counts.data_as<const int32_t>();
    const int32_t *tokens = args.send_token_index.data_as<const int32_t>();
    for (int64_t rank = 0; rank < world_size; ++rank) {
      for (int64_t i = 0; i < counts[rank]; ++i) {  // counts are checked by the window
        const int64_t index = rank * args.send_token_index.dim(1) + i;
        if (i >= args.send_token_index.dim(1) || tokens[index] < 0 ||
            tokens[index] >= args.x.dim(0)) {
          Fail(kOutOfRange, "send_token_index", args.send_token_index.IndexString(index), " = ",
               i < args.send_token_index.dim(1) ? tokens[index] : -1, " is not a token of x (",
               args.x.dim(0), " rows), or send_counts[", rank, "] = ", counts[rank], " exceeds ",
               args.send_token_index.dim(1));
        }
      }
    }
    return keep;
  });
  // The rows as they travel (x, or its rows quantized once here: a bad row fails the step on
  // every rank before anything is sent).
  const TravellingRows source = AbandonOnFailure(
      *window, [&] { return RowsToSend(args.x, QuantModeInput(args.quant_mode)); });
  const int64_t capacity = args.send_token_index.dim(1);
  const int64_t row_bytes = source.LandedBytes(keep_quantized), travel_bytes = source.row_bytes;
  const bool dequantize_on_landing = source.quantized && !keep_quantized;
  const int64_t note_bytes = args.notes.dim(1) * static_cast<int64_t>(sizeof(float));
  const int32_t *tokens = args.send_token_index.data_as<const int32_t>();
  const int32_t *counts = args.send_counts.data_as<const int32_t>();
  uint8_t *rows_out = args.recv_rows.data_as<uint8_t>();
  // Quantized rows land in scratch first and are dequantized from there into rows_out, unless
  // rows_out keeps them quantized (int32 rows, for experts that dequantize as they read).
  uint8_t *landing = dequantize_on_landing
                         ? ScratchBytes(Scratch::kInt8ReceivedRows,
                                            world_size * capacity * travel_bytes)
                         : rows_out;
  int32_t *received = args.recv_counts.data_as<int32_t>();
  const RowExchange note_exchange{args.notes.data_as<const uint8_t>(), counts,
                                  args.recv_notes.data_as<uint8_t>(), received, capacity,
                                  note_bytes, /*zero_tail=*/true, kDeliverRowsOperation};
  if (!PullDisabled() && window->CanPullRows(capacity, note_bytes)) {
    auto plan = [&](std::vector<std::vector<RowCopy>> &copies) {
      for (int64_t source_rank = 0; source_rank < world_size; ++source_rank) {
        for (int64_t i = 0; i < received[source_rank]; ++i) {
          const int64_t slot = source_rank * capacity + i;
          copies[source_rank].push_back(RowCopy{i, landing + slot * travel_bytes, slot});
        }
      }
    };
    std::function<void(const RowCopy *, const RowCopy *)> dequantize;
    if (dequantize_on_landing) {
      dequantize = [&](const RowCopy *begin, const RowCopy *end) {
        for (const RowCopy *copy = begin; copy != end; ++copy) {
          source.Land(copy->destination, rows_out + copy->tag * row_bytes);
        }
      };
    }
    window->PullRows(RowPull{note_exchange, tokens, source.rows, source.count, travel_bytes,
                             plan, dequantize});
    // A pull leaves the tails unspecified; the caller reads a zero note as "no expert". The
    // test aid MOE_EP_POISON_UNUSED_ROWS=1 fills the row tails with all-ones bytes (NaN), as
    // the exchange of the packing way does.
    uint8_t *notes_out = args.recv_notes.data_as<uint8_t>();
    const bool poison_rows = PoisonUnusedRows();
    for (int64_t source_rank = 0; source_rank < world_size; ++source_rank) {
      const int64_t first_unused = source_rank * capacity + received[source_rank];
      const int64_t unused = capacity - received[source_rank];
      std::memset(notes_out + first_unused * note_bytes, 0, unused * note_bytes);
      if (poison_rows) std::memset(rows_out + first_unused * row_bytes, 0xff, unused * row_bytes);
    }
    return;
  }
  // Pack the rows each peer gets, then exchange rows and notes.
  std::unique_ptr<uint8_t[]> packed(new uint8_t[world_size * capacity * travel_bytes]);
  AbandonOnFailure(*window, [&] {
    for (int64_t rank = 0; rank < world_size; ++rank) {
      for (int64_t i = 0; i < counts[rank]; ++i) {
        const int64_t slot = rank * capacity + i;
        std::memcpy(packed.get() + slot * travel_bytes, source.rows + tokens[slot] * travel_bytes,
                    travel_bytes);
      }
    }
    return 0;
  });
  window->ExchangeRows(RowExchange{packed.get(), counts, landing, received, capacity,
                                   travel_bytes, /*zero_tail=*/false, kDeliverRowsOperation});
  if (dequantize_on_landing) {  // (the exchange poisoned the landing's tails, if asked)
    const bool poison_rows = PoisonUnusedRows();
    for (int64_t source_rank = 0; source_rank < world_size; ++source_rank) {
      for (int64_t i = 0; i < received[source_rank]; ++i) {
        const int64_t slot = source_rank * capacity + i;
        source.Land(landing + slot * travel_bytes, rows_out + slot * row_bytes);
      }
      const int64_t first_unused = source_rank * capacity + received[source_rank];
      if (poison_rows) {
        std::memset(rows_out + first_unused * row_bytes, 0xff,
                    (capacity - received[source_rank]) * row_bytes);
      }
    }
  }
  std::vector<int32_t> notes_received(world_size);
  RowExchange notes_step = note_exchange;
  notes_step.recv_counts = notes_received.data();
  window->ExchangeRows(notes_step);
}

}  // namespace
}  // namespace moe_ep

MOE_EP_EXPORT int MoeEpExchangeRows(int nparam, void **params, int *ndims, int64_t **shapes,
                                    const char **dtypes, void * /*stream*/, void * /*extra*/) {
  return moe_ep::RunExchangeKernel("MoeEpExchangeRows", /*zero_tail=*/true, nparam, params,
                                   ndims, shapes, dtypes);
}

MOE_EP_EXPORT int MoeEpExchangeRowsKeepTail(int nparam, void **params, int *ndims,
                                            int64_t **shapes, const char **dtypes,
                                            void * /*stream*/, void * /*extra*/) {
  return moe_ep::RunExchangeKernel("MoeEpExchangeRowsKeepTail", /*zero_tail=*/false, nparam,
                                   params, ndims, shapes, dtypes);
}

MOE_EP_EXPORT int MoeEpDeliverRows(int nparam, void **params, int *ndims, int64_t **shapes,
                                   const char **dtypes, void * /*stream*/, void * /*extra*/) {
  return moe_ep::RunKernel("MoeEpDeliverRows", [&] {
    moe_ep::DeliverRows(
        moe_ep::BindArgsAs<moe_ep::DeliverRowsArgs>(nparam, params, ndims, shapes, dtypes));
  });
}
