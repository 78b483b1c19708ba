"""Custom-op Cells of the local kernels, with bprops: grouping rows by expert, the weighted combine,
the grouped matmul and the row-wise experts (the SwiGLU kernel is in ``activations.py``). They
run at any EP size (inside the expert-parallel dispatchers too).

Each Cell wraps an ``ops.Custom`` AOT kernel from ``custom_ops/cpu`` (see docs/architecture.md for
the contracts). Shapes are static; the number of rows each expert receives is data-dependent, so
outputs are worst-case sized buffers plus counts. Every kernel reads only the used rows (the first
``sum(tokens_per_expert)``) or the rows ``positions`` names. The dispatch leaves the rows of
``grouped_x`` past the used rows unspecified (not written; its only consumer is the grouped
matmul), and so does the grouped matmul (its consumers are the GroupedSwiGLU kernel and the
combine). Never feed such a buffer to MindSpore's element-wise ops: its CPU SiLU, for one,
changes every element's result (by ~1 ulp) when any element is NaN. The environment variable
MOE_EP_POISON_UNUSED_ROWS=1 makes the kernels fill those rows with NaN, for tests.

All four work under ``mindspore.grad`` / ``value_and_grad`` in PYNATIVE and GRAPH_MODE. Integer
inputs (expert ids, positions, counts) get zero gradients. Kernel failures are re-raised as
:class:`~mindspore_moe_ep.ops.kernel_library.KernelError` with the kernel's message when the Cell is
called directly; wrap other code in ``explain_kernel_errors()``.
"""
import functools
import numbers

from mindspore import Tensor, ops
from mindspore.common import dtype as mstype

from .kernel_library import KernelCell, custom_op


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _product(*dims: int) -> int:
    """Product of static dims; -1 (unknown) if any dim is unknown."""
    if any(dim < 0 for dim in dims):
        return -1
    result = 1
    for dim in dims:
        result *= dim
    return result


# ---- building blocks of the backward passes (no gradients of their own) ----------------------

@functools.lru_cache(maxsize=None)
def gather_sum_op() -> ops.Custom:
    """The shared unweighted-combine op (no gradient of its own; the gradient of dispatch).

    ``(rows [N, H], positions [T, K] int32) -> [T, H]``: ``y[t] = sum_k rows[positions[t, k]]``,
    skipping -1, accumulated in float32 in k order.
    """
    return custom_op("MoeEpGatherSum",
                   out_shape=lambda rows, positions: [positions[0], rows[1]],
                   out_dtype=lambda rows, positions: rows)


@functools.lru_cache(maxsize=None)
def gather_sum_in_blocks_op() -> ops.Custom:
    """:func:`gather_sum_op` into the slot layout of the expert-parallel exchange.

    ``(rows [N, H], positions [R*C, K] int32, block_counts [R] int32) -> [R*C, H]``: only the
    first ``block_counts[r]`` rows of each block of C are written, the rest are unspecified
    (NaN with MOE_EP_POISON_UNUSED_ROWS=1). A step then touches the rows it uses, not the
    worst-case buffer (pages never written are never faulted in).
    """
    return custom_op("MoeEpGatherSum",
                   out_shape=lambda rows, positions, counts: [positions[0], rows[1]],
                   out_dtype=lambda rows, positions, counts: rows,
                   shape_key={"in_blocks": True})


@functools.lru_cache(maxsize=None)
def _combine_grad_op(in_blocks: bool = False) -> ops.Custom:
    """(dy [T, H], expert_out [N, H], positions, weights[, block_counts]) -> d_expert_out [N, H],
    d_weights [T, K].

    d_expert_out[positions[t, k]] = weights[t, k] * dy[t] (rows no position names: 0), and
    d_weights[t, k] = <dy[t], expert_out[positions[t, k]]> in float32 (0 where dropped; on AVX2
    CPUs summed over H in 16 partial sums, so it may differ from a sequential sum by rounding).
    ``in_blocks`` (the gradient of the combine into the slot layout, with block_counts): rows
    of d_expert_out past the last one a position names are unspecified, like the tail of the
    grouped buffer that expert_out is there.
    """
    def output_shapes(dy, expert_out, positions, weights, *block_counts):
        return expert_out, weights

    def output_dtypes(dy, expert_out, positions, weights, *block_counts):
        return expert_out, mstype.float32

    return custom_op("MoeEpCombineGrad", out_shape=output_shapes, out_dtype=output_dtypes,
                     shape_key={"in_blocks": in_blocks})


def _grouped_matmul_output_shape(transpose_b: bool):
    """rows [N, K_in], weights [E, K_in, N_out] (or [E, N_out, K_in]) -> [N, N_out]."""
    out_features_axis = 1 if transpose_b else 2
    return lambda rows, weights, counts: [rows[0], weights[out_features_axis]]


def _grouped_matmulcustom_op(transpose_b: bool, bprop=None) -> ops.Custom:
    kernel_name = "MoeEpGroupedMatmulTransposedB" if transpose_b else "MoeEpGroupedMatmul"
    return custom_op(kernel_name, out_shape=_grouped_matmul_output_shape(transpose_b),
                   out_dtype=lambda rows, weights, counts: rows, bprop=bprop)


@functools.lru_cache(maxsize=None)
def _grouped_matmul_without_grad(transpose_b: bool) -> ops.Custom:
    return _grouped_matmulcustom_op(transpose_b)


@functools.lru_cache(maxsize=None)
def _grouped_weight_grad_op() -> ops.Custom:
    """a [N, P], b [N, Q], tokens_per_expert [E] -> [E, P, Q] with out[e] = a_e^T @ b_e."""
    return custom_op("MoeEpGroupedMatmulWeightGrad",
                   out_shape=lambda a, b, counts: [counts[0], a[1], b[1]],
                   out_dtype=lambda a, b, counts: a)


# ---- the Cells -------------------------------------------------------------------------------

class DispatchKernel(KernelCell):
    """Groups token rows by expert (stable counting sort; optional per-expert capacity).

    ``(x [T, H], expert_ids [T, K] int32)`` -> ``(grouped_x [T*K, H], positions [T, K] int32,
    tokens_per_expert [E] int32, num_dropped [1] int32)``. Rows of ``grouped_x`` past
    ``sum(tokens_per_expert)`` are unspecified. ``positions[t, k]`` is the row of
    ``grouped_x`` holding token t for its k-th expert, or -1 if dropped by ``capacity``
    (0 = dropless; a call may pass its own ``capacity`` tensor, e.g. one derived from the token
    count). Gradient: ``dx[t] = sum_k d_grouped_x[positions[t, k]]``.

    ``block_counts`` (optional int32 [R]): x is R blocks of T/R rows of which the first
    ``block_counts[r]`` are used (the received slots of the expert-parallel exchange; the
    others have expert ids -1); then the gradient writes only those rows of dx.
    """

    def __init__(self, num_experts: int, capacity: int = 0):
        super().__init__()
        if not _is_int(num_experts) or num_experts <= 0:
            raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
        if not _is_int(capacity) or capacity < 0:
            raise ValueError(f"capacity must be an int >= 0 (0 = dropless), got {capacity!r}")
        self.num_experts = num_experts = int(num_experts)
        self.capacity = capacity = int(capacity)
        self._capacity = Tensor([capacity], mstype.int32)  # [1], read by the kernel
        gather_sum = gather_sum_op()
        gather_sum_in_blocks = gather_sum_in_blocks_op()

        def bprop(x, expert_ids, capacity_tensor, out, dout):
            positions = out[1]
            d_grouped_x = dout[0]
            return (gather_sum(d_grouped_x, positions), ops.zeros_like(expert_ids),
                    ops.zeros_like(capacity_tensor))

        def bprop_in_blocks(x, expert_ids, capacity_tensor, block_counts, out, dout):
            positions = out[1]
            d_grouped_x = dout[0]
            return (gather_sum_in_blocks(d_grouped_x, positions, block_counts),
                    ops.zeros_like(expert_ids), ops.zeros_like(capacity_tensor),
                    ops.zeros_like(block_counts))

        def output_shapes(x, expert_ids, capacity_tensor):
            tokens, hidden = x
            return ([_product(tokens, expert_ids[1]), hidden], list(expert_ids),
                    [num_experts], [1])

        def output_dtypes(x, expert_ids, capacity_tensor):
            return x, mstype.int32, mstype.int32, mstype.int32

        self._dispatch = custom_op("MoeEpDispatch", out_shape=output_shapes,
                                 out_dtype=output_dtypes, bprop=bprop,
                                 shape_key={"num_experts": num_experts})
        self._dispatch_in_blocks = custom_op(
            "MoeEpDispatch",
            out_shape=lambda x, ids, capacity, counts: output_shapes(x, ids, capacity),
            out_dtype=lambda x, ids, capacity, counts: output_dtypes(x, ids, capacity),
            bprop=bprop_in_blocks, shape_key={"num_experts": num_experts, "in_blocks": True})

    def construct(self, x, expert_ids, capacity=None, block_counts=None):
        """``capacity``: an optional int32 [1] tensor replacing the constructor's value."""
        if capacity is None:
            capacity = self._capacity
        if block_counts is None:
            return self._dispatch(x, expert_ids, capacity)
        return self._dispatch_in_blocks(x, expert_ids, capacity, block_counts)

    def extend_repr(self):
        return f"num_experts={self.num_experts}, capacity={self.capacity}"


class CombineKernel(KernelCell):
    """Weighted sum of each token's expert outputs.

    ``(expert_out [N, H], positions [T, K] int32, weights [T, K] float32)`` -> ``y [T, H]`` with
    ``y[t] = sum_k weights[t, k] * expert_out[positions[t, k]]`` (skipping -1), accumulated in
    float32 in k order. Reads only the rows ``positions`` names. Gradients flow to
    ``expert_out`` (zero for rows no position names) and ``weights``.

    ``block_counts`` (optional int32 [R]): y is R blocks of T/R rows (the received slots of the
    expert-parallel exchange) and only the first ``block_counts[r]`` rows of each are written;
    ``expert_out`` is then taken to be a grouped buffer: the gradient of its rows past the last
    one a position names is unspecified, like those rows.
    """

    def __init__(self):
        super().__init__()
        combine_grad = _combine_grad_op()
        combine_grad_in_blocks = _combine_grad_op(in_blocks=True)

        def bprop(expert_out, positions, weights, out, dout):
            d_expert_out, d_weights = combine_grad(dout, expert_out, positions, weights)
            return d_expert_out, ops.zeros_like(positions), d_weights

        def bprop_in_blocks(expert_out, positions, weights, block_counts, out, dout):
            d_expert_out, d_weights = combine_grad_in_blocks(dout, expert_out, positions,
                                                             weights, block_counts)
            return (d_expert_out, ops.zeros_like(positions), d_weights,
                    ops.zeros_like(block_counts))

        self._combine = custom_op(
            "MoeEpCombine",
            out_shape=lambda expert_out, positions, weights: [positions[0], expert_out[1]],
            out_dtype=lambda expert_out, positions, weights: expert_out,
            bprop=bprop)
        self._combine_in_blocks = custom_op(
            "MoeEpCombine",
            out_shape=lambda expert_out, positions, weights, counts: [positions[0],
                                                                      expert_out[1]],
            out_dtype=lambda expert_out, positions, weights, counts: expert_out,
            bprop=bprop_in_blocks, shape_key={"in_blocks": True})

    def construct(self, expert_out, positions, weights, block_counts=None):
        if block_counts is None:
            return self._combine(expert_out, positions, weights)
        return self._combine_in_blocks(expert_out, positions, weights, block_counts)


class GroupedMatmul(KernelCell):
    """One matmul per expert over consecutive groups of rows.

    ``(rows [N, K_in], weights [E, K_in, N_out], tokens_per_expert [E] int32)`` -> ``[N, N_out]``
    (``weights`` is ``[E, N_out, K_in]`` with ``transpose_b=True``). Group e is the next
    ``tokens_per_expert[e]`` rows. Rows past the total are not read (they may hold anything) and
    their output rows are unspecified (also in the gradient of ``rows``); the weight gradient
    sums over the used rows only. float32 and bfloat16 use oneDNN, float16 is computed in float32.
    """

    def __init__(self, transpose_b: bool = False):
        super().__init__()
        if not isinstance(transpose_b, bool):
            raise ValueError(f"transpose_b must be a bool, got {transpose_b!r}")
        self.transpose_b = transpose_b
        rows_grad = _grouped_matmul_without_grad(not transpose_b)
        weight_grad = _grouped_weight_grad_op()

        if transpose_b:
            def bprop(rows, weights, tokens_per_expert, out, dout):
                # out_e = rows_e @ W_e^T: d rows_e = dout_e @ W_e, d W_e = dout_e^T @ rows_e
                return (rows_grad(dout, weights, tokens_per_expert),
                        weight_grad(dout, rows, tokens_per_expert),
                        ops.zeros_like(tokens_per_expert))
        else:
            def bprop(rows, weights, tokens_per_expert, out, dout):
                # out_e = rows_e @ W_e: d rows_e = dout_e @ W_e^T, d W_e = rows_e^T @ dout_e
                return (rows_grad(dout, weights, tokens_per_expert),
                        weight_grad(rows, dout, tokens_per_expert),
                        ops.zeros_like(tokens_per_expert))

        self._matmul = _grouped_matmulcustom_op(transpose_b, bprop=bprop)

    def construct(self, rows, weights, tokens_per_expert):
        return self._matmul(rows, weights, tokens_per_expert)

    def extend_repr(self):
        return f"transpose_b={self.transpose_b}"


def experts_weighted_sum_grad_op() -> ops.Custom:
    """``(d_out, rows, local_ids, weights, row_counts, gate_up_weight, down_weight)`` ->
    ``(d_rows, d_weights, d_gate_up_weight, d_down_weight)``: the gradient of
    ``sum(ExpertsWeightedSum(...)[0] * d_out)``, recomputing the experts' forward."""
    return custom_op(
        "MoeEpExpertsWeightedSumGrad",
        out_shape=lambda d_out, rows, ids, weights, counts, gate_up, down: (
            rows, weights, gate_up, down),
        out_dtype=lambda d_out, rows, ids, weights, counts, gate_up, down: (
            rows, mstype.float32, gate_up, down))


class ExpertsWeightedSum(KernelCell):
    """Routed SwiGLU experts and the weighted sum of their outputs per row, without per-pair
    buffers (for inference, and for training with the experts recomputed in backward).

    ``(rows [N, H], local_ids [N, K] int32, weights [N, K] float32, row_counts [B] int32,
    gate_up_weight [L, H, 2F], down_weight [L, F, H])`` -> ``(out [N, H],
    tokens_per_expert [L] int32)`` with ``out[i] = sum_k weights[i, k] * FFN_e(rows[i])`` over
    the k whose local expert ``e = local_ids[i, k]`` is not -1. The rows come in B blocks of
    N / B rows, of which the first ``row_counts[b]`` are used; out's other rows are unspecified.

    The arithmetic of dispatch -> grouped GEMM -> SwiGLU -> grouped GEMM -> combine, but no
    buffer holds one row per (token, expert) pair: each expert's pairs run in chunks through a
    small scratch (custom_ops/cpu/expert_ffn.cc). The gradient (MoeEpExpertsWeightedSumGrad)
    recomputes the experts' forward, one expert per thread at a time, so only those experts'
    per-pair buffers live at once; the forward keeps nothing per pair for backward, at the cost
    of running the experts' forward twice.
    """

    def __init__(self):
        super().__init__()
        grad = experts_weighted_sum_grad_op()

        def bprop(rows, local_ids, weights, row_counts, gate_up_weight, down_weight, out, dout):
            d_rows, d_weights, d_gate_up_weight, d_down_weight = grad(
                dout[0], rows, local_ids, weights, row_counts, gate_up_weight, down_weight)
            return (d_rows, ops.zeros_like(local_ids), d_weights, ops.zeros_like(row_counts),
                    d_gate_up_weight, d_down_weight)

        self._weighted_sum = custom_op(
            "MoeEpExpertsWeightedSum",
            out_shape=lambda rows, ids, weights, counts, gate_up, down: (
                [rows[0], gate_up[1]], [gate_up[0]]),
            out_dtype=lambda rows, ids, weights, counts, gate_up, down: (gate_up, mstype.int32),
            bprop=bprop)

    def construct(self, rows, local_ids, weights, row_counts, gate_up_weight, down_weight):
        return self._weighted_sum(rows, local_ids, weights, row_counts, gate_up_weight,
                                  down_weight)
