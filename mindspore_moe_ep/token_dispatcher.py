"""The dispatcher of EP = 1: every expert on this device (the contract: dispatcher.py).

Grouping and un-grouping happen in two fused C++ kernels: a counting sort that packs the rows
(``DispatchKernel``) and a gather with a weighted sum (``CombineKernel``). Row-wise, every token
is already where its experts are: ``deliver`` hands the rows over as they are (one block of T).
With ``quant="int8"`` the rows first take the int8 round trip a row travelling quantized takes
(``QuantizeRoundTrip``), so that every EP size computes the same numbers.
"""
import mindspore as ms
from mindspore import ops

from .dispatcher import DispatcherCapabilities, TokenDispatcher, expert_capacity
from .ops import CombineKernel, DispatchKernel
from .ops.quantized_rows import QuantizeRoundTrip


class LocalTokenDispatcher(TokenDispatcher):
    """All experts on this device: dispatch = group rows by expert, combine = weighted un-group."""

    capabilities = DispatcherCapabilities(grouped=True, rowwise=True, experts_combine=False,
                                          differentiable=True)

    def __init__(self, num_experts, top_k, capacity_factor=None, quant="none"):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.dispatch_kernel = DispatchKernel(num_experts)
        self.combine_kernel = CombineKernel()
        self.quantized = quant == "int8"
        self.round_trip = QuantizeRoundTrip() if self.quantized else None

    def dispatch(self, x, expert_ids, routing_weights):
        """x: [T, H], expert_ids / routing_weights: [T, K] -> rows [T*K, H] grouped by expert
        (rows past sum(tokens_per_expert) unspecified); handle: GroupedHandle layout."""
        capacity = expert_capacity(self.capacity_factor, x.shape[0], self.top_k, self.num_experts)
        if self.quantized:
            x = self.round_trip(x)
        rows, positions, tokens_per_expert, num_dropped = self.dispatch_kernel(
            x, expert_ids, ops.full((1,), capacity, dtype=ms.int32))
        return rows, tokens_per_expert, num_dropped, (positions, routing_weights, None, None)

    def combine(self, expert_out, handle):
        """expert_out: [T*K, H] in dispatch order -> [T, H]."""
        positions, routing_weights, _, _ = handle
        return self.combine_kernel(expert_out, positions, routing_weights)

    def deliver(self, x, expert_ids, routing_weights, keep_quantized=False):
        """Every token is local: its row, expert ids and weights as they are (one block)."""
        row_counts = ops.full((1,), x.shape[0], dtype=ms.int32)                   # [1]
        if self.quantized:
            x = self.round_trip(x)
        return x, expert_ids, routing_weights, row_counts, None

    def return_rows(self, partial, row_counts, route):
        return partial
