"""Custom-op Cells of expert parallelism (kernels in ``custom_ops/cpu/expert_parallel.cc``).

- :class:`ExpertParallelLayout`: which tokens go to which rank (once per rank), for the sparse
  prefill exchange.
- :class:`GatherRows`: ``out[i] = sum_j rows[index[i, j]]``, whose gradient is the same gather
  through the inverse index. Packing tokens into send slots and summing the returned rows per
  token are both instances, each the other's inverse.
- :class:`FusedDispatch` / :class:`FusedCombine`: the decode path's fused operators, one kernel
  each, exchanging through the communication window; :class:`FusedDeliver` /
  :class:`FusedReturn`: the same without rows grouped by expert (row-wise experts between).
- :class:`DeliverRows`: the prefill delivery of token rows and their notes, pulled by the
  receivers straight from the sources' x (``custom_ops/cpu/exchange_rows.cc``).
- :class:`ExpertsCombine`: the prefill path's experts, return and sum in one kernel (inference;
  ``custom_ops/cpu/experts_combine.cc``).
"""
from mindspore import Tensor, ops
from mindspore.common import dtype as mstype

from ..comm.exchange import exchange_kernel
from .kernel_library import KernelCell, custom_op
from .quantized_rows import int8_row_words
from .local_kernels import experts_weighted_sum_grad_op, gather_sum_in_blocks_op, gather_sum_op


def _int32_scalar(value):
    return Tensor([int(value)], mstype.int32)


QUANT_MODES = {"none": 0, "int8": 2}  # dispatch.quant -> the kernels' quant_mode (CANN's numbers)


def _quant_mode(quant):
    if quant not in QUANT_MODES:
        raise ValueError(f"quant must be one of {sorted(QUANT_MODES)}, got {quant!r}")
    return _int32_scalar(QUANT_MODES[quant])


class ExpertParallelLayout(KernelCell):
    """``expert_ids [T, K]`` -> ``(send_token_index [R, C], send_counts [R], token_slot [T, R],
    send_local_ids [R, C, K])``; see the kernel's header comment."""

    def __init__(self, world_size, max_tokens_per_rank, experts_per_rank):
        super().__init__()
        self._experts_per_rank = _int32_scalar(experts_per_rank)
        self._layout = custom_op(
            "MoeEpExpertParallelLayout",
            out_shape=lambda ids, epr: ([world_size, max_tokens_per_rank], [world_size],
                                        [ids[0], world_size],
                                        [world_size, max_tokens_per_rank, ids[1]]),
            out_dtype=lambda ids, epr: (mstype.int32,) * 4,
            shape_key={"world_size": world_size, "max_tokens_per_rank": max_tokens_per_rank})

    def construct(self, expert_ids):
        return self._layout(expert_ids, self._experts_per_rank)


class GatherRows(KernelCell):
    """``(rows [N, H], index [M, J], inverse [N, I])`` -> ``[M, H]``, out[m] = sum_j rows[index[m, j]].

    ``inverse`` lists, for every row n, the output rows that read it (-1 padded); the gradient is
    ``GatherRows(d_out, inverse)``. Requires each row to be read at most once per output row.
    ``rows_block_counts`` (optional int32 [R]): rows are R blocks of N/R of which the first
    ``rows_block_counts[r]`` are used (the slot layout of the exchange); the gradient then
    writes only those rows.
    """

    def __init__(self):
        super().__init__()
        gather_sum = gather_sum_op()
        gather_sum_in_blocks = gather_sum_in_blocks_op()

        def bprop(rows, index, inverse, out, dout):
            return gather_sum(dout, inverse), ops.zeros_like(index), ops.zeros_like(inverse)

        def bprop_in_blocks(rows, index, inverse, rows_block_counts, out, dout):
            return (gather_sum_in_blocks(dout, inverse, rows_block_counts),
                    ops.zeros_like(index), ops.zeros_like(inverse),
                    ops.zeros_like(rows_block_counts))

        self._gather = custom_op(
            "MoeEpGatherRows",
            out_shape=lambda rows, index, inverse: [index[0], rows[1]],
            out_dtype=lambda rows, index, inverse: rows, bprop=bprop)
        self._gather_in_blocks = custom_op(
            "MoeEpGatherRows",
            out_shape=lambda rows, index, inverse, counts: [index[0], rows[1]],
            out_dtype=lambda rows, index, inverse, counts: rows, bprop=bprop_in_blocks,
            shape_key={"in_blocks": True})

    def construct(self, rows, index, inverse, rows_block_counts=None):
        if rows_block_counts is None:
            return self._gather(rows, index, inverse)
        return self._gather_in_blocks(rows, index, inverse, rows_block_counts)


class FusedDispatch(KernelCell):
    """Decode Dispatch: ``(x [T, H], expert_ids [T, K], weights [T, K])`` -> ``(expand_x [N, H],
    tokens_per_local_expert [L], positions [R*C, K], recv_weights [R*C, K], recv_counts [R],
    token_slot [T, R])`` in one kernel.

    N = R * C * min(K, L) is the worst case of rows one rank can receive (C =
    dispatch.max_tokens_per_rank, L = experts per rank); rows of ``expand_x`` past
    ``sum(tokens_per_local_expert)`` are unspecified. The last four outputs are the handle the
    Combine needs (see the kernel's header comment). ``quant="int8"``: the rows travel as
    per-token int8 and land dequantized (``dispatch.quant``).
    """

    def __init__(self, world_size, max_tokens_per_rank, experts_per_rank, top_k, window,
                 quant="none"):
        super().__init__()
        rows = world_size * max_tokens_per_rank * min(top_k, experts_per_rank)
        slots = world_size * max_tokens_per_rank
        self._experts_per_rank = _int32_scalar(experts_per_rank)
        self._quant_mode = _quant_mode(quant)
        self._window_id = window.id_tensor
        self._dispatch = custom_op(
            "MoeEpFusedDispatch",
            out_shape=lambda x, ids, weights, epr, quant_mode, window_id: (
                [rows, x[1]], [experts_per_rank], [slots, ids[1]], [slots, ids[1]],
                [world_size], [x[0], world_size]),
            out_dtype=lambda x, ids, weights, epr, quant_mode, window_id: (
                x, mstype.int32, mstype.int32, mstype.float32, mstype.int32, mstype.int32),
            shape_key={"rows": rows, "slots": slots, "experts_per_rank": experts_per_rank,
                       "world_size": world_size},
            side_effect=True)

    def construct(self, x, expert_ids, weights):
        return self._dispatch(x, expert_ids, weights, self._experts_per_rank, self._quant_mode,
                              self._window_id)


class FusedCombine(KernelCell):
    """Decode Combine: ``(expert_out [N, H], positions, recv_weights, recv_counts, token_slot)``
    (the Dispatch's handle) -> ``y [T, H]``: per-rank weighted partial sums, returned and added
    up at the source."""

    def __init__(self, window):
        super().__init__()
        self._window_id = window.id_tensor
        self._combine = custom_op(
            "MoeEpFusedCombine",
            out_shape=lambda out, positions, weights, counts, slots, window_id: [slots[0],
                                                                                 out[1]],
            out_dtype=lambda out, positions, weights, counts, slots, window_id: out,
            side_effect=True)

    def construct(self, expert_out, positions, recv_weights, recv_counts, token_slot):
        return self._combine(expert_out, positions, recv_weights, recv_counts, token_slot,
                             self._window_id)


class FusedDeliver(KernelCell):
    """Row-wise decode Dispatch: ``(x [T, H], expert_ids [T, K], weights [T, K])`` -> ``(rows
    [R*C, H], local_ids [R*C, K] int32, recv_weights [R*C, K] float32, recv_counts [R],
    token_slot [T, R])`` in one kernel.

    The fused Dispatch without the grouping by expert: each token row arrives once at every
    rank holding one of its experts (block s of ``rows`` from rank s, its first
    ``recv_counts[s]`` rows used, the rest unspecified), with its local expert ids (-1: none
    here) and routing weights; the experts then run row by row (``ExpertsWeightedSum``).
    ``quant="int8"``: the rows travel as per-token int8 and land dequantized, or, with
    ``keep_quantized``, stay quantized (``rows`` int32 [R*C, int8_row_words(H)], which the
    row-wise experts dequantize as they read them).
    """

    def __init__(self, world_size, max_tokens_per_rank, experts_per_rank, window, quant="none"):
        super().__init__()
        slots = world_size * max_tokens_per_rank
        self._experts_per_rank = _int32_scalar(experts_per_rank)
        self._quant_mode = _quant_mode(quant)
        self._window_id = window.id_tensor

        def deliver_op(keep_quantized):
            def rows_shape(x):
                return [slots, int8_row_words(x[1]) if keep_quantized else x[1]]
            return custom_op(
                "MoeEpFusedDeliver",
                out_shape=lambda x, ids, weights, epr, quant_mode, window_id: (
                    rows_shape(x), [slots, ids[1]], [slots, ids[1]], [world_size],
                    [x[0], world_size]),
                out_dtype=lambda x, ids, weights, epr, quant_mode, window_id: (
                    mstype.int32 if keep_quantized else x, mstype.int32, mstype.float32,
                    mstype.int32, mstype.int32),
                shape_key={"slots": slots, "world_size": world_size,
                           "keep_quantized": keep_quantized},
                side_effect=True)

        self._deliver = deliver_op(False)
        self._deliver_quantized = deliver_op(True) if quant == "int8" else None

    def construct(self, x, expert_ids, weights, keep_quantized=False):
        deliver = self._deliver_quantized if keep_quantized else self._deliver
        return deliver(x, expert_ids, weights, self._experts_per_rank, self._quant_mode,
                       self._window_id)


class FusedReturn(KernelCell):
    """Row-wise decode Combine: ``(partial [R*C, H], recv_counts [R], token_slot [T, R])`` (one
    partial sum per row :class:`FusedDeliver` delivered, and its handle) -> ``y [T, H]``: the
    rows returned to their sources and each token's rows added up, in rank order."""

    def __init__(self, window):
        super().__init__()
        self._window_id = window.id_tensor
        self._return = custom_op(
            "MoeEpFusedReturn",
            out_shape=lambda partial, counts, slots, window_id: [slots[0], partial[1]],
            out_dtype=lambda partial, counts, slots, window_id: partial,
            side_effect=True)

    def construct(self, partial, recv_counts, token_slot):
        return self._return(partial, recv_counts, token_slot, self._window_id)


class DeliverRows(KernelCell):
    """Prefill delivery: ``(x [T, H], send_token_index [R, C], send_counts [R], token_slot [T, R],
    notes [R*C, M] float32)`` -> ``(recv_rows [R*C, H], recv_notes [R*C, M], recv_counts [R])``.

    The numbers of packing ``x[send_token_index]`` and exchanging rows and notes, but where
    every rank reads its peers' memory the receivers read the rows straight from the sources'
    x: no packed send buffer (see the kernel's header comment). Rows of ``recv_rows`` past the
    counts are unspecified, notes there are zero. ``token_slot`` (the inverse of
    ``send_token_index``) is read only by the gradient: the reverse exchanges of both outputs,
    then the sum of each token's returned row gradients. ``quant="int8"``: the rows travel as
    per-token int8 and land dequantized; the gradient is then straight-through (the reverse
    exchange moves the rows' gradient unquantized). With ``keep_quantized`` (inference) they stay
    quantized where they land: ``recv_rows`` int32 [R*C, int8_row_words(H)], read by the row-wise
    experts (no gradient).
    """

    def __init__(self, window, max_tokens_per_rank, quant="none"):
        super().__init__()
        self._window_id = window.id_tensor
        self._quant_mode = _quant_mode(quant)
        gather_sum = gather_sum_op()
        # The rows' gradient keeps unspecified tails (only gather_sum reads it, at the sent
        # rows); the notes' is zeroed past the counts (MindSpore's element-wise ops read it).
        reverse_exchange_rows = exchange_kernel(window.world_size, max_tokens_per_rank,
                                                zero_tail=False)
        reverse_exchange_notes = exchange_kernel(window.world_size, max_tokens_per_rank)

        def bprop(x, send_token_index, send_counts, token_slot, notes, quant_mode, window_id, out,
                  dout):
            recv_rows, recv_notes, recv_counts = out
            d_recv_rows = ops.depend(dout[0], recv_rows)  # after the forward exchange
            d_send_rows, _ = reverse_exchange_rows(d_recv_rows, recv_counts,
                                                   window_id)                        # [R*C, H]
            d_x = gather_sum(d_send_rows, token_slot)                                # [T, H]
            d_recv_notes = ops.depend(dout[1], d_send_rows)  # the same order on every rank
            d_notes, _ = reverse_exchange_notes(d_recv_notes, recv_counts,
                                                window_id)                           # [R*C, M]
            return (d_x, ops.zeros_like(send_token_index), ops.zeros_like(send_counts),
                    ops.zeros_like(token_slot), d_notes, ops.zeros_like(quant_mode),
                    ops.zeros_like(window_id))

        self._deliver = custom_op(
            "MoeEpDeliverRows",
            out_shape=lambda x, index, counts, slots, notes, quant_mode, window_id: (
                [notes[0], x[1]], list(notes), list(counts)),
            out_dtype=lambda x, index, counts, slots, notes, quant_mode, window_id: (
                x, mstype.float32, mstype.int32),
            bprop=bprop, side_effect=True)
        self._deliver_quantized = custom_op(
            "MoeEpDeliverRows",
            out_shape=lambda x, index, counts, slots, notes, quant_mode, window_id: (
                [notes[0], int8_row_words(x[1])], list(notes), list(counts)),
            out_dtype=lambda x, index, counts, slots, notes, quant_mode, window_id: (
                mstype.int32, mstype.float32, mstype.int32),
            shape_key={"keep_quantized": True}, side_effect=True) if quant == "int8" else None

    def construct(self, x, send_token_index, send_counts, token_slot, notes,
                  keep_quantized=False):
        deliver = self._deliver_quantized if keep_quantized else self._deliver
        return deliver(x, send_token_index, send_counts, token_slot, notes, self._quant_mode,
                       self._window_id)


class ExpertsCombine(KernelCell):
    """Prefill inference: ``(rows [R*C, H] (or int8 rows, int32 [R*C, W]: dequantized as the
    experts read them), local_ids [R*C, K], weights [R*C, K], row_counts [R],
    token_slot [T, R], slot_token [R*C, 1], gate_up_weight [L, H, 2F], down_weight [L, F, H])``
    -> ``(y [T, H], tokens_per_expert [L] int32)``, in rounds of ``round_rows`` received rows
    per source (the same on every rank).

    The numbers of ``ExpertsWeightedSum`` -> return exchange -> per-token sum (``deliver``'s
    route: ``token_slot`` and its inverse ``slot_token``), in one kernel that runs them in rounds
    of received rows, so that no buffer holds a partial sum for every received row (see the
    kernel's header comment). The gradient is the unfused path's: the per-token sum's gather,
    the reverse exchange, then ``MoeEpExpertsWeightedSumGrad`` (which recomputes the experts);
    training uses the unfused steps anyway (``MoELayer``), this keeps an eval-mode layer
    differentiable.
    """

    def __init__(self, window, max_tokens_per_rank, round_rows):
        super().__init__()
        if not 1 <= round_rows <= max(max_tokens_per_rank, 1):
            raise ValueError(f"round_rows must be in [1, {max(max_tokens_per_rank, 1)}] (rows per "
                             f"source block), got {round_rows}")
        self._window_id = window.id_tensor
        self._round_rows = _int32_scalar(round_rows)
        gather_sum_in_blocks = gather_sum_in_blocks_op()
        reverse_exchange = exchange_kernel(window.world_size, max_tokens_per_rank,
                                           zero_tail=False)  # read at the counted rows only
        experts_grad = experts_weighted_sum_grad_op()

        def bprop(rows, local_ids, weights, row_counts, gate_up_weight, down_weight, token_slot,
                  slot_token, round_rows, window_id, out, dout):
            d_y = ops.depend(dout[0], out[0])  # after the forward's exchanges
            sent_counts = (token_slot >= 0).astype(mstype.float32).sum(axis=0).astype(
                mstype.int32)                                                    # [R]
            d_returned = gather_sum_in_blocks(d_y, slot_token, sent_counts)      # [R*C, H]
            d_partial, _ = reverse_exchange(d_returned, sent_counts, window_id)  # [R*C, H]
            d_rows, d_weights, d_gate_up, d_down = experts_grad(
                d_partial, rows, local_ids, weights, row_counts, gate_up_weight, down_weight)
            return (d_rows, ops.zeros_like(local_ids), d_weights, ops.zeros_like(row_counts),
                    d_gate_up, d_down, ops.zeros_like(token_slot), ops.zeros_like(slot_token),
                    ops.zeros_like(round_rows), ops.zeros_like(window_id))

        self._experts_combine = custom_op(
            "MoeEpExpertsCombine",
            out_shape=lambda rows, ids, weights, counts, gate_up, down, slots, *scalars: (
                [slots[0], gate_up[1]], [gate_up[0]]),
            out_dtype=lambda rows, ids, weights, counts, gate_up, down, slots, *scalars: (
                gate_up, mstype.int32),
            bprop=bprop, side_effect=True)

    def construct(self, rows, local_ids, weights, row_counts, token_slot, slot_token,
                  gate_up_weight, down_weight):
        return self._experts_combine(rows, local_ids, weights, row_counts, gate_up_weight,
                                     down_weight, token_slot, slot_token, self._round_rows,
                                     self._window_id)
