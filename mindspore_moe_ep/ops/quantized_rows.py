"""Per-token int8 token rows (``dispatch.quant: int8``; kernels in ``custom_ops/cpu/int8_rows.cc``).

The rule, per row (CANN's quant mode 2): ``scale = max|x| / 127`` in float32, ``q =
round_half_even(x / scale)`` clamped to [-127, 127] (0 where the scale is 0), dequantized as
``float32(q) * scale`` rounded to the row's dtype. A quantized row travels as
``int8_row_words(H)`` int32 words: the H int8 values, zero padding to 4 bytes, the scale's bits.

Over the shared-memory window the row-moving kernels quantize and dequantize inside their copies
(``quant`` of :class:`~mindspore_moe_ep.ops.ep_kernels.DeliverRows`, ``FusedDeliver``,
``FusedDispatch``). The Cells here serve the rest:

- :class:`QuantizeRows` / :class:`DequantizeRows`: the two halves of an exchange through
  MindSpore's collectives (:class:`QuantizedRowExchange`);
- :class:`QuantizeRoundTrip`: what a row holds after travelling quantized, for expert
  parallelism 1 (no exchange), so that every EP size computes the same numbers.

Gradients are straight-through: the gradient of the rows passes unquantized.
"""
import numpy as np
from mindspore import Tensor, nn, ops
from mindspore.common import dtype as mstype

from .kernel_library import KernelCell, custom_op
from .local_kernels import gather_sum_op


def int8_row_words(hidden: int) -> int:
    """int32 words of one quantized row of ``hidden`` values (values, padding, scale)."""
    return (hidden + 3) // 4 + 1


class QuantizeRows(KernelCell):
    """``(x [T, H]`` float32 / float16 / bfloat16, ``slot_token [M, 1]`` int32) -> ``q [M,
    int8_row_words(H)]`` int32: each token quantized once, its row copied to every slot naming it
    (rows of slots holding -1 unspecified): the pack of an exchange's send slots.

    A row holding NaN or infinity fails with an error naming its token and column."""

    def __init__(self):
        super().__init__()
        self._quantize = custom_op(
            "MoeEpQuantizeRows",
            out_shape=lambda x, slot_token: [slot_token[0], int8_row_words(x[1])],
            out_dtype=lambda x, slot_token: mstype.int32)

    def construct(self, x, slot_token):
        return self._quantize(x, slot_token)


class DequantizeRows(KernelCell):
    """``(q [R*C, W] int32, row_counts [R] int32)`` -> ``rows [R*C, H]`` in ``dtype``; rows past
    each block's count are unspecified (as the exchange leaves them)."""

    def __init__(self, hidden: int, dtype):
        super().__init__()
        self._like = Tensor(np.zeros((1, hidden), np.float32), dtype)  # carries H and the dtype
        self._dequantize = custom_op(
            "MoeEpDequantizeRows",
            out_shape=lambda q, counts, like: [q[0], like[1]],
            out_dtype=lambda q, counts, like: like)

    def construct(self, q, row_counts):
        return self._dequantize(q, row_counts, self._like)


class QuantizeRoundTrip(KernelCell):
    """``x [T, H]`` -> the rows after quantizing and dequantizing (same shape and dtype), with a
    straight-through gradient."""

    def __init__(self):
        super().__init__()

        def straight_through(x, out, dout):
            return (dout,)

        self._round_trip = custom_op(
            "MoeEpQuantizeRoundTrip", out_shape=lambda x: x, out_dtype=lambda x: x,
            bprop=straight_through)

    def construct(self, x):
        return self._round_trip(x)


class QuantizedRowExchange(nn.Cell):
    """The sparse delivery of token rows through a row exchange of MindSpore collectives
    (:class:`~mindspore_moe_ep.comm.exchange.AllGatherExchangeRows`), int8 on the wire.

    ``(x [T, H], slot_token [R*C, 1], token_slot [T, R], send_counts [R], recv_counts [R])`` ->
    ``recv_rows [R*C, H]`` (x's dtype; rows past the counts unspecified): each token row is
    quantized once, the quantized rows of each send slot travel, and the receiver dequantizes
    them. ``recv_counts`` (from the notes' exchange of the same step) sizes the dequantization
    and the reverse exchange of the straight-through gradient: ``d x = gather_sum(reverse
    exchange of d recv_rows, token_slot)``, unquantized, as the unquantized path's gradient.
    """

    def __init__(self, exchange_rows, hidden: int, dtype):
        super().__init__()
        self.exchange_rows = exchange_rows
        self.quantize = QuantizeRows()
        self.dequantize = DequantizeRows(hidden, dtype)
        self._gather_sum = gather_sum_op()

    def construct(self, x, slot_token, token_slot, send_counts, recv_counts):
        send_rows = self.quantize(x, slot_token)                                   # [R*C, W]
        received, _ = self.exchange_rows(ops.depend(send_rows, recv_counts), send_counts)
        return self.dequantize(received, recv_counts)                              # [R*C, H]

    def bprop(self, x, slot_token, token_slot, send_counts, recv_counts, out, dout):
        d_recv_rows = ops.depend(dout, out)  # after the forward exchange
        d_send_rows, _ = self.exchange_rows(d_recv_rows, recv_counts)              # [R*C, H]
        d_x = self._gather_sum(d_send_rows, token_slot)                            # [T, H]
        return (d_x, ops.zeros_like(slot_token), ops.zeros_like(token_slot),
                ops.zeros_like(send_counts), ops.zeros_like(recv_counts))
