"""Expert-parallel token dispatchers: one per phase, as in Ascend's design (MindIE's dynamic EP
for prefill, CANN's fused Dispatch / Combine for decode; see docs/architecture.md).

Both follow the dispatcher contract of ``dispatcher.py`` (its notation: T, H, K, L, R, C) and
give the same numbers; they differ in how the rows travel.

``SparseAllToAllDispatcher`` (prefill and training, "dynamic EP"):
    1. layout: for every destination rank, the tokens that have at least one expert there, in
       token order: a token goes to a rank once, however many of its experts live there;
    2. pack the rows into static send slots [R, C] and exchange them with an all-to-all-v
       (counts first, then only the rows needed) over pre-allocated buffers; the local expert
       ids and routing weights of each row travel alongside. Over the shared-memory window one
       kernel (``DeliverRows``) does both without the packed copy: the receivers read the rows
       straight from the sources' x;
    3. on arrival, group rows by local expert (the local dispatch kernel);
    4. after the experts, each rank forms the weighted sum over *its* experts of every received
       token (one row per token and rank), returns those rows, and the source adds them up.
    Every step is a kernel with a gradient, so training runs backward through the same path.
    In inference over the shared-memory window, :meth:`~SparseAllToAllDispatcher.experts_combine`
    runs step 4 and the experts in one kernel, in rounds, so that no buffer holds every partial
    sum (the prefill memory saving of dynamic EP).
    With ``dispatch.quant: int8`` the token rows of step 2 travel as per-token int8 (quantized
    once at the source, dequantized as they land: ``ops/quantized_rows.py``); the return of
    step 4 stays in the compute dtype, and the gradient is straight-through.

``FusedDecodeDispatcher`` (decode, inference): one kernel each way, no separate collective for
    counts, exactly the arithmetic of steps 1-4 above. Two pairs:
    - ``deliver`` / ``return_rows`` (``dispatch.decode_layout: rowwise``, the default):
      ``FusedDeliver`` (layout + delivery of each token row once per (token, rank), with its
      local ids and routing weights) and ``FusedReturn`` (return of one weighted partial sum
      per delivered row, sum over ranks at the source); the row-wise experts run between the
      two, as in prefill inference;
    - ``dispatch`` / ``combine`` (``decode_layout: grouped``, CANN's contract): ``FusedDispatch``
      (layout + delivery + grouping by local expert, one row per (token, expert) pair) and
      ``FusedCombine`` (weighted partial sum per received token at the expert rank, return,
      sum at the source) around the grouped experts.
"""
import numpy as np
from mindspore import Tensor, ops
import mindspore as ms

from .dispatcher import (DispatcherCapabilities, TokenDispatcher, check_tokens_fit,
                         expert_capacity)
from .ops import CombineKernel, DispatchKernel
from .ops.ep_kernels import (DeliverRows, ExpertParallelLayout, ExpertsCombine, FusedCombine,
                             FusedDeliver, FusedDispatch, FusedReturn, GatherRows)
from .ops.quantized_rows import QuantizedRowExchange


class SparseAllToAllDispatcher(TokenDispatcher):
    """Dynamic-EP dispatcher: sparse all-to-all-v of token rows, differentiable end to end.

    Serves both contracts; ``experts_combine`` over the shared-memory window where the fused
    kernel holds less memory than the unfused path (``combine_round_rows`` not None)."""

    def __init__(self, group, top_k, capacity_factor, max_tokens_per_rank, exchange,
                 combine_round_rows=None, quant="none", hidden_size=None, row_dtype=None):
        super().__init__()
        self.group_size = group.size  # R, the ranks of the expert-parallel group
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.max_tokens_per_rank = max_tokens_per_rank  # C
        self.layout = ExpertParallelLayout(group.size, max_tokens_per_rank, group.experts_per_rank)
        self.gather_rows = GatherRows()
        self.exchange = exchange                 # zeroed tails: metadata, token counts
        self.exchange_rows = exchange.keep_tail()  # token rows: only counted rows are read
        self.local_dispatch = DispatchKernel(group.experts_per_rank)
        self.local_combine = CombineKernel()
        # Over the shared-memory window, rows are delivered by one kernel that pulls them from
        # the sources' x, and inference may fuse the experts with the return, in rounds of
        # ``combine_round_rows`` rows per source (the same on every rank; None: unfused).
        window = getattr(exchange, "window", None)
        self.quantized = quant == "int8"
        self.deliver_rows = (DeliverRows(window, max_tokens_per_rank, quant)
                             if window is not None else None)
        # int8 rows through collectives (no window): quantized at the source, dequantized here.
        self.quantized_rows = (QuantizedRowExchange(self.exchange_rows, hidden_size, row_dtype)
                               if quant == "int8" and window is None else None)
        self.experts_combine_kernel = (
            ExpertsCombine(window, max_tokens_per_rank, combine_round_rows)
            if window is not None and combine_round_rows is not None else None)
        self.capabilities = DispatcherCapabilities(
            grouped=True, rowwise=True, experts_combine=self.experts_combine_kernel is not None,
            differentiable=True)
        if capacity_factor is not None:
            # Capacity of every possible group batch size (0 .. R*C tokens), as a single process
            # computes it (exact, unlike a float32 ceil in the graph).
            self._capacity_table = Tensor(np.array(
                [expert_capacity(capacity_factor, n, top_k, group.num_experts)
                 for n in range(group.size * max_tokens_per_rank + 1)], np.int32))
            self._one_row_per_rank = Tensor(np.ones(group.size, np.int32))

    def _group_capacity(self, tokens):
        """[1] int32: the expert capacity of the group's whole batch in this step.

        Ranks may hold different numbers of tokens, so each rank sends the others its count (one
        small extra exchange, only with a capacity factor): every expert then keeps as many rows
        as in a single process over the concatenated batch, whichever rank holds it.
        """
        slots = self.group_size * self.max_tokens_per_rank
        count_rows = ops.full((slots, 1), tokens, dtype=ms.float32)                # [R*C, 1]
        received, _ = self.exchange(count_rows, self._one_row_per_rank)
        group_tokens = received.reshape(self.group_size, self.max_tokens_per_rank)[:, 0].sum()
        return ops.gather(self._capacity_table, group_tokens.astype(ms.int32).reshape(1), 0)

    def deliver(self, x, expert_ids, routing_weights, keep_quantized=False):
        """Steps 1-2: each token row goes once to every rank holding one of its experts.

        x: [T, H] -> ``(rows [R*C, H], local_ids [R*C, K] int32, weights [R*C, K] float32,
        row_counts [R] int32, route)``: the rows this rank received, in R blocks of C (block r
        from rank r, its first row_counts[r] rows used), each with its local expert ids (-1:
        none here) and routing weights; ``route`` is what :meth:`return_rows` needs.
        ``keep_quantized`` (int8 dispatch, inference): over the window, rows stay quantized
        where they land (int32 [R*C, W], for the row-wise experts); elsewhere they land
        dequantized.
        """
        tokens = x.shape[0]
        check_tokens_fit(tokens, self.max_tokens_per_rank)
        slots = self.group_size * self.max_tokens_per_rank
        # The layout has no gradient (integer routing); without stop_gradient PYNATIVE's
        # backward fails on it ("Illegal primitive Custom's bprop not defined").
        send_token_index, send_counts, token_slot, send_local_ids = self.layout(
            ops.stop_gradient(expert_ids))
        slot_token = send_token_index.reshape(slots, 1)                          # [R*C, 1]
        local_ids = send_local_ids.reshape(slots, self.top_k)                    # [R*C, K]
        slot_weights = self.gather_rows(routing_weights, slot_token, token_slot)  # [R*C, K]
        slot_weights = slot_weights * (local_ids >= 0).astype(ms.float32)
        # Local ids travel as float32 next to the weights (id + 1, so a zeroed tail reads -1).
        metadata = ops.concat([(local_ids + 1).astype(ms.float32), slot_weights], axis=1)

        # Rows past the counts stay unspecified; their local ids (from the zeroed metadata) are
        # -1, so nothing downstream reads them.
        if self.deliver_rows is not None:
            recv_rows, recv_metadata, recv_counts = self.deliver_rows(
                x, send_token_index, send_counts, token_slot, metadata,
                keep_quantized and self.quantized)                               # [R*C, H]
        elif self.quantized_rows is not None:
            # A row int8 cannot carry (NaN, infinity) must fail every rank, not leave the peers
            # waiting in the collective: its rank sends counts out of range, which every rank's
            # check of the gathered counts refuses (AllGatherExchangeRows names the cause).
            finite = ops.stop_gradient(ops.isfinite(x.astype(ms.float32)).all())
            send_counts = ops.where(finite, send_counts, ops.full_like(send_counts, -1))
            recv_metadata, recv_counts = self.exchange(metadata, send_counts)    # [R*C, 2K]
            recv_rows = self.quantized_rows(x, slot_token, token_slot, send_counts,
                                            recv_counts)                         # [R*C, H]
        else:
            send_rows = self.gather_rows(x, slot_token, token_slot)              # [R*C, H]
            recv_rows, recv_counts = self.exchange_rows(send_rows, send_counts)  # [R*C, H]
            recv_metadata, _ = self.exchange(metadata, send_counts)              # [R*C, 2K]
        recv_local_ids = recv_metadata[:, :self.top_k].astype(ms.int32) - 1      # [R*C, K]
        recv_weights = recv_metadata[:, self.top_k:]                             # [R*C, K]
        return recv_rows, recv_local_ids, recv_weights, recv_counts, (token_slot, slot_token)

    def return_rows(self, partial, row_counts, route):
        """Step 4's return: partial [R*C, H], one row per received token (this rank's weighted
        sum over its experts) -> y [T, H], each token's returned rows summed at its source."""
        token_slot, slot_token = route
        returned, sent_counts = self.exchange_rows(partial, row_counts)          # [R*C, H]
        return self.gather_rows(returned, token_slot, slot_token, sent_counts)   # [T, H]

    def experts_combine(self, rows, local_ids, weights, row_counts, route, gate_up_weight,
                        down_weight):
        """Inference: the row-wise experts over :meth:`deliver`'s rows and step 4, in one kernel
        -> ``(y [T, H], tokens_per_expert [L] int32)``; the numbers of
        ``return_rows(experts.weighted_sum(...))``. Only where ``experts_combine_kernel`` is set
        (the shared-memory window). Its gradient is the unfused path's."""
        token_slot, slot_token = route
        return self.experts_combine_kernel(rows, local_ids, weights, row_counts, token_slot,
                                           slot_token, gate_up_weight, down_weight)

    def dispatch(self, x, expert_ids, routing_weights):
        """x: [T, H] -> ``(rows [R*C*K, H] grouped by local expert, tokens_per_expert [L],
        num_dropped [1], handle)``; handle (GroupedHandle layout) = (positions [R*C, K],
        recv_weights [R*C, K], recv_counts [R], route) for :meth:`combine`."""
        recv_rows, recv_local_ids, recv_weights, recv_counts, route = self.deliver(
            x, expert_ids, routing_weights)
        # Received slots are in (source rank, source token) order: the group's global token
        # order, so capacity drops match a single process over the concatenated batch.
        capacity = (ops.zeros((1,), ms.int32) if self.capacity_factor is None
                    else self._group_capacity(x.shape[0]))                       # [1] int32
        rows, positions, tokens_per_expert, num_dropped = self.local_dispatch(
            recv_rows, recv_local_ids, capacity, recv_counts)  # [R*C*K, H], [R*C, K], [L], [1]
        handle = (positions, recv_weights, recv_counts, route)
        return rows, tokens_per_expert, num_dropped, handle

    def combine(self, expert_out, handle):
        """expert_out: [R*C*K, H] -> y [T, H]."""
        positions, recv_weights, recv_counts, route = handle
        partial = self.local_combine(expert_out, positions, recv_weights,
                                     recv_counts)                                # [R*C, H]
        return self.return_rows(partial, recv_counts, route)


class FusedDecodeDispatcher(TokenDispatcher):
    """Decode dispatcher: the fused Dispatch and Combine operators (inference only).

    Two pairs, one kernel each way: ``dispatch`` / ``combine`` hand the experts one row per
    (token, expert) pair grouped by expert (CANN's contract), ``deliver`` / ``return_rows`` one
    row per (token, rank) for the row-wise experts (fewer bytes: ~3.7 rows per token at top-8
    of 64 on 4 ranks, against 8). ``MoELayer`` uses ``deliver`` / ``return_rows`` unless
    ``dispatch.decode_layout: grouped``.
    """

    capabilities = DispatcherCapabilities(grouped=True, rowwise=True, experts_combine=False,
                                          differentiable=False)

    def __init__(self, group, top_k, max_tokens_per_rank, window, quant="none"):
        super().__init__()
        self.max_tokens_per_rank = max_tokens_per_rank  # C
        self.quantized = quant == "int8"
        self.fused_dispatch = FusedDispatch(group.size, max_tokens_per_rank,
                                            group.experts_per_rank, top_k, window, quant)
        self.fused_combine = FusedCombine(window)
        self.fused_deliver = FusedDeliver(group.size, max_tokens_per_rank,
                                          group.experts_per_rank, window, quant)
        self.fused_return = FusedReturn(window)

    def deliver(self, x, expert_ids, routing_weights, keep_quantized=False):
        """x: [T, H] -> ``(rows [R*C, H], local_ids [R*C, K], weights [R*C, K], row_counts [R],
        route)``, as :meth:`SparseAllToAllDispatcher.deliver` (no gradient)."""
        check_tokens_fit(x.shape[0], self.max_tokens_per_rank)
        return self.fused_deliver(x, expert_ids, routing_weights,
                                  keep_quantized and self.quantized)  # route: token_slot [T, R]

    def return_rows(self, partial, row_counts, route):
        """partial [R*C, H], one row per delivered row -> y [T, H]."""
        return self.fused_return(partial, row_counts, route)

    def dispatch(self, x, expert_ids, routing_weights):
        """x: [T, H] -> ``(expand_x [R*C*min(K, L), H], tokens_per_expert [L], num_dropped [1]
        (always 0), handle)``: expand_x holds the received rows grouped by local expert (rows
        past the counts unspecified); handle (GroupedHandle layout) = (positions [R*C, K],
        recv_weights [R*C, K], recv_counts [R], token_slot [T, R]) for :meth:`combine`."""
        check_tokens_fit(x.shape[0], self.max_tokens_per_rank)
        expand_x, tokens_per_expert, *handle = self.fused_dispatch(x, expert_ids,
                                                                   routing_weights)
        no_drops = ops.zeros((1,), ms.int32)
        return expand_x, tokens_per_expert, no_drops, tuple(handle)

    def combine(self, expert_out, handle):
        """expert_out [R*C*min(K, L), H], rows as :meth:`dispatch` grouped them -> y [T, H]."""
        positions, recv_weights, recv_counts, token_slot = handle
        return self.fused_combine(expert_out, positions, recv_weights, recv_counts, token_slot)
