"""The token dispatcher contract: the stages every dispatcher names the same way, what each one
supports, and the layouts of what the stages hand each other.

Notation (one name per quantity, used by every module and kernel header):

    T  tokens on this rank in the step             (x is [T, H])
    H  hidden size                                 (model.hidden_size)
    K  experts per token                           (router.top_k)
    E  experts in the layer                        (model.num_experts)
    L  experts on this rank (local)                (E / R)
    R  ranks of the expert-parallel group          (parallel.expert_parallel)
    C  max_tokens_per_rank: rows per source rank in the static exchange buffers
       (dispatch.max_tokens_per_rank; the "slot layout" is R blocks of C rows, of which the
       first row_counts[r] of block r are used)
    N  rows of a buffer the experts read (grouped: up to R * C * min(K, L); delivered: R * C)

"Capacity" means only the expert drop limit of ``router.capacity_factor`` (rows one expert may
take in a step), never the buffers' C.

Two contracts (a dispatcher declares which it serves in :class:`DispatcherCapabilities`):

grouped (Megatron-Core's dispatch / combine; CANN's fused operators):
    ``dispatch(x, expert_ids, routing_weights) -> (rows [N, H], tokens_per_expert [L] int32,
    num_dropped [1] int32, handle)``: one row per (token, local expert) pair, grouped by local
    expert (rows past sum(tokens_per_expert) unspecified); ``handle`` has the
    :class:`GroupedHandle` layout.
    ``combine(expert_out [N, H], handle) -> y [T, H]``: each token's weighted sum of its
    experts' outputs.

row-wise (no buffer with a row per (token, expert) pair):
    ``deliver(x, expert_ids, routing_weights, keep_quantized=False) -> delivery`` in the
    :class:`Delivery` layout: each token row once per rank holding one of its experts, with its
    local expert ids (-1: none here) and weights. ``keep_quantized`` (a dispatcher with
    ``quantized`` rows, inference): the rows may stay int8 where they land (int32 [N, W], see
    ``ops/quantized_rows.py``), for the row-wise experts, which dequantize as they read.
    ``return_rows(partial [N, H], row_counts, route) -> y [T, H]``: one weighted sum per
    delivered row back to its token, summed at the source.
    ``experts_combine(rows, local_ids, weights, row_counts, route, gate_up_weight,
    down_weight) -> (y [T, H], tokens_per_expert [L])``, where supported: the row-wise experts
    and the return in one kernel (inference).

GRAPH_MODE cannot build NamedTuples, so handles are plain tuples read through the index
constants below; only the dispatcher that made a handle reads it.
"""
import math
from dataclasses import dataclass

from mindspore import nn


@dataclass(frozen=True)
class DispatcherCapabilities:
    """What a dispatcher serves; the layer asks this, it never probes for methods."""

    grouped: bool                 # dispatch / combine
    rowwise: bool                 # deliver / return_rows
    experts_combine: bool         # experts_combine (row-wise experts + return, one kernel)
    differentiable: bool          # its stages have gradients (training)


class GroupedHandle:
    """Index constants of ``dispatch``'s handle: ``(positions, weights, row_counts, route)``.

    positions  [rows, K] int32: the grouped row of each (row, k), -1 for none
    weights    [rows, K] float32: routing weights of those pairs
    row_counts [R] int32 or None: used rows per source block (None: one block, all used)
    route      what the way back needs (dispatcher specific, e.g. ``Delivery.ROUTE``)
    """

    POSITIONS, WEIGHTS, ROW_COUNTS, ROUTE = range(4)


class Delivery:
    """Index constants of ``deliver``'s result: ``(rows, local_ids, weights, row_counts, route)``.

    rows       [N, H]: the delivered token rows, R blocks of C (one per source rank; at EP = 1
               one block of T)
    local_ids  [N, K] int32: local expert of each (row, k), -1 for none here
    weights    [N, K] float32: their routing weights (0 where local_ids is -1)
    row_counts [R] int32: used rows of each block
    route      what ``return_rows`` needs to bring rows back (None at EP = 1)
    """

    ROWS, LOCAL_IDS, WEIGHTS, ROW_COUNTS, ROUTE = range(5)


class TokenDispatcher(nn.Cell):
    """Base of every dispatcher: the stages, named once (see the module docstring). A subclass
    sets ``capabilities`` and implements the stages it declares."""

    capabilities = DispatcherCapabilities(grouped=False, rowwise=False, experts_combine=False,
                                          differentiable=False)
    quantized = False  # whether token rows travel to the experts as per-token int8

    def dispatch(self, x, expert_ids, routing_weights):
        raise NotImplementedError(f"{type(self).__name__} does not serve the grouped contract")

    def combine(self, expert_out, handle):
        raise NotImplementedError(f"{type(self).__name__} does not serve the grouped contract")

    def deliver(self, x, expert_ids, routing_weights, keep_quantized=False):
        raise NotImplementedError(f"{type(self).__name__} does not serve the row-wise contract")

    def return_rows(self, partial, row_counts, route):
        raise NotImplementedError(f"{type(self).__name__} does not serve the row-wise contract")

    def experts_combine(self, rows, local_ids, weights, row_counts, route, gate_up_weight,
                        down_weight):
        raise NotImplementedError(f"{type(self).__name__} has no fused experts + return")


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
