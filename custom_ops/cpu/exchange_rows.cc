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
#include "comm_window.h"
#include "kernel_common.h"

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

// Checks the tensors of one call and describes the exchange they ask for.
RowExchange DescribeExchange(const std::vector<TensorArg> &args, int world_size) {
  const TensorArg &send_rows = args[0];
  const TensorArg &send_counts = args[1];
  const TensorArg &recv_rows = args[3];
  const TensorArg &recv_counts = args[4];

  if (send_rows.rank < 1 || send_rows.dim(0) % world_size != 0) {
    Fail(kInvalidArgument, "send_rows has shape ", send_rows.ShapeString(),
         "; its first dimension must be world_size * capacity_per_peer (world_size = ",
         world_size, ")");
  }
  recv_rows.RequireSameDtype(send_rows);
  recv_rows.RequireRank(send_rows.rank);
  for (int axis = 0; axis < send_rows.rank; ++axis) {
    recv_rows.RequireDim(axis, send_rows.dim(axis), "the same dimension of send_rows");
  }
  for (const TensorArg *counts : {&send_counts, &recv_counts}) {
    counts->RequireDtype("int32");
    counts->RequireRank(1);
    counts->RequireDim(0, world_size, "the world size of the communication window");
  }

  RowExchange exchange;
  exchange.send = send_rows.data_as<const uint8_t>();
  exchange.send_counts = send_counts.data_as<const int32_t>();
  exchange.recv = recv_rows.data_as<uint8_t>();
  exchange.recv_counts = recv_counts.data_as<int32_t>();
  exchange.capacity = send_rows.dim(0) / world_size;
  exchange.row_bytes =
      exchange.capacity == 0 ? 0 : send_rows.numel() / send_rows.dim(0) * ElementBytes(send_rows);
  return exchange;
}

// Both kernels: binds the arguments, then runs one exchange step on the window.
int RunExchangeKernel(const char *kernel_name, bool zero_tail, int nparam, void **params,
                      int *ndims, int64_t **shapes, const char **dtypes) {
  return RunKernel(kernel_name, [&] {
    const std::vector<TensorArg> args =
        BindArgs(nparam, params, ndims, shapes, dtypes,
                 {"send_rows", "send_counts", "window_id", "recv_rows", "recv_counts"});
    const TensorArg &window_id = args[2];
    window_id.RequireDtype("int32");
    window_id.RequireRank(1);
    window_id.RequireDim(0, 1, "1");
    const std::shared_ptr<CommWindow> window = FindCommWindow(window_id.data_as<const int32_t>()[0]);
    RowExchange exchange =
        AbandonOnFailure(*window, [&] { return DescribeExchange(args, window->world_size()); });
    exchange.zero_tail = zero_tail;
    window->ExchangeRows(exchange);
  });
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
