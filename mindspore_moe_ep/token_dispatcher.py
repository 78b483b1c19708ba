"""Token dispatchers: move token copies to their experts, and the expert outputs back.

Every dispatcher has the same two-step interface (as in Megatron-Core and DeepEP):

``dispatch(x, expert_ids, routing_weights) -> (rows, tokens_per_expert, num_dropped, handle)``
    ``rows`` [N, H] holds one row per (token, local expert) pair, grouped by local expert;
    ``tokens_per_expert`` [E_local] int32 gives the group sizes (rows past their sum are
    unspecified; only the grouped GEMM reads ``rows``, and only the used rows); ``handle`` is
    whatever ``combine`` needs to undo the dispatch.
``combine(expert_out, handle) -> y``
    returns each token's weighted sum of its experts' outputs, [T, H].

Where no backward pass needs one buffer row per (token, expert) pair (inference, or training that
recomputes the experts), a dispatcher may also offer the row-wise pair of steps that ``MoELayer``
then uses with ``GroupedSwiGLUExperts.weighted_sum``:

``deliver(x, expert_ids, routing_weights) -> (rows, local_ids, weights, row_counts, route)``
    the token rows this rank's experts must see, each once, with its local expert ids (-1: none
    here) and weights [N, K]; the rows come in blocks (one per source rank), of which the first
    ``row_counts[b]`` rows are used;
``return_rows(partial, row_counts, route) -> y``
    takes one weighted sum per delivered row back to its token, [T, H].

``LocalTokenDispatcher`` is the EP = 1 case: grouping and un-grouping happen in two fused C++
kernels (a counting sort that packs rows, and a gather with a weighted sum).
"""
import math

import mindspore as ms
from mindspore import nn, ops

from .ops import CombineKernel, DispatchKernel


def check_tokens_fit(num_tokens, max_tokens_per_rank):
    """Static shapes: more tokens than the pre-allocated buffers hold is a configuration error."""
    if num_tokens > max_tokens_per_rank:
        raise ValueError(f"{num_tokens} tokens on this rank exceed dispatch.max_tokens_per_rank = "
                         f"{max_tokens_per_rank}; raise it in the YAML or split the batch")


def expert_capacity(capacity_factor, num_tokens, top_k, num_experts):
    """Rows each expert may take: ceil(capacity_factor * T * K / E); 0 means dropless."""
    if capacity_factor is None:
        return 0
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


class LocalTokenDispatcher(nn.Cell):
    """All experts on this device: dispatch = group rows by expert, combine = weighted un-group."""

    def __init__(self, num_experts, top_k, capacity_factor=None):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.dispatch_kernel = DispatchKernel(num_experts)
        self.combine_kernel = CombineKernel()

    def dispatch(self, x, expert_ids, routing_weights):
        """x: [T, H], expert_ids / routing_weights: [T, K] -> rows [T*K, H] grouped by expert
        (rows past sum(tokens_per_expert) unspecified)."""
        capacity = expert_capacity(self.capacity_factor, x.shape[0], self.top_k, self.num_experts)
        rows, positions, tokens_per_expert, num_dropped = self.dispatch_kernel(
            x, expert_ids, ops.full((1,), capacity, dtype=ms.int32))
        return rows, tokens_per_expert, num_dropped, (positions, routing_weights)

    def deliver(self, x, expert_ids, routing_weights):
        """Every token is local: its row, expert ids and weights as they are (one block)."""
        row_counts = ops.full((1,), x.shape[0], dtype=ms.int32)                   # [1]
        return x, expert_ids, routing_weights, row_counts, None

    def return_rows(self, partial, row_counts, route):
        return partial

    def combine(self, expert_out, handle):
        """expert_out: [T*K, H] in dispatch order -> [T, H]."""
        positions, routing_weights = handle
        return self.combine_kernel(expert_out, positions, routing_weights)
