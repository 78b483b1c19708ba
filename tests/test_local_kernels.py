"""The local dispatch / combine / grouped-matmul kernels against plain numpy references.

Every reference is computed here with numpy (float64 unless stated), never by the code under test.
Inputs are rounded to the tested dtype first (with MindSpore's own cast), so references start from
exactly the values the kernels see.

Tolerances, as |kernel - reference| <= rtol * |reference| + rtol * max|reference|:
- float32: 1e-6 for combine (a few float32 additions), 1e-5 for grouped matmul and for sums over
  the hidden size (float32 accumulation over up to 160 products).
- float16 / bfloat16: every output is one rounding of a float32 value, half an ulp of 2^-11 /
  2^-8; we allow 1e-3 / 8e-3. Gradients are checked kernel by kernel, so each is one rounding
  too.
Dispatch (a pure copy) and all integer outputs must match exactly.

Rows of the worst-case buffers (grouped_x, the grouped matmul's output and its rows gradient) past
sum(tokens_per_expert) are unspecified, so only the used rows are compared; the tests at the end
fill that tail with NaN (MOE_EP_POISON_UNUSED_ROWS=1) to show that nothing reads it.
"""
import ctypes
import re
import textwrap

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

from mindspore_moe_ep.ops import (CombineKernel, DispatchKernel, GroupedMatmul, GroupedSwiGLU,
                                  KernelError, explain_kernel_errors, gemm_backend,
                                  kernel_library, set_gemm_backend)
from mindspore_moe_ep.ops.kernel_library import take_kernel_errors
from kernel_abi import call_kernel
from thread_counts import assert_same_bits_for_thread_counts

DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}
RTOL_16_BIT = {"float16": 1e-3, "bfloat16": 8e-3}
HIDDEN = 16
FFN = 8



def rtol(dtype_name, float32_rtol):
    return float32_rtol if dtype_name == "float32" else RTOL_16_BIT[dtype_name]


def assert_close(actual, expected, tolerance):
    expected = np.asarray(expected, np.float64)
    scale = max(np.abs(expected).max(initial=0.0), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=tolerance, atol=tolerance * scale)


def to_tensor(values, dtype_name):
    """float32 numpy values -> Tensor of the dtype."""
    return Tensor(np.asarray(values, np.float32)).astype(DTYPES[dtype_name])


def to_numpy(tensor):
    """Tensor (any float dtype) -> float64 numpy array, exactly."""
    return tensor.astype(ms.float32).asnumpy().astype(np.float64)


def representable(values, dtype_name):
    """The values rounded to the dtype (through MindSpore's cast), as float64."""
    return to_numpy(to_tensor(values, dtype_name))


# ---- numpy references ------------------------------------------------------------------------

def reference_dispatch(x, expert_ids, num_experts, capacity):
    """Stable sort of the (token, k) assignments by expert; keeps the first `capacity` of each.

    The returned grouped_x has zero rows past the used rows (the kernel's are unspecified).
    """
    tokens, top_k = expert_ids.shape
    flat_ids = expert_ids.reshape(-1)                          # [T*K]
    order = np.argsort(flat_ids, kind="stable")               # by expert, then token, then k
    positions = np.full(tokens * top_k, -1, np.int32)
    seen = np.zeros(num_experts, np.int64)
    next_row = 0
    for assignment in order:
        expert = flat_ids[assignment]
        if capacity == 0 or seen[expert] < capacity:
            positions[assignment] = next_row
            next_row += 1
        seen[expert] += 1
    kept = positions >= 0
    grouped_x = np.zeros((tokens * top_k, x.shape[1]))        # [T*K, H]
    grouped_x[positions[kept]] = x[np.nonzero(kept)[0] // top_k]
    tokens_per_expert = np.bincount(flat_ids[kept], minlength=num_experts).astype(np.int32)
    return grouped_x, positions.reshape(tokens, top_k), tokens_per_expert, int((~kept).sum())


def reference_gather_sum(rows, positions, weights):
    """y[t] = sum_k weights[t, k] * rows[positions[t, k]], skipping -1."""
    y = np.zeros((positions.shape[0], rows.shape[1]))         # [T, H]
    for (token, k), row in np.ndenumerate(positions):
        if row >= 0:
            y[token] += weights[token, k] * rows[row]
    return y


def expert_slices(tokens_per_expert):
    starts = np.concatenate([[0], np.cumsum(tokens_per_expert)])
    return [slice(starts[e], starts[e + 1]) for e in range(len(tokens_per_expert))]


def reference_grouped_matmul(rows, weights, tokens_per_expert, transpose_b):
    """Rows of group e times weights[e] (transposed if transpose_b); zero rows after the groups
    (the kernel's are unspecified: compare the used rows only)."""
    out_features = weights.shape[1] if transpose_b else weights.shape[2]
    out = np.zeros((rows.shape[0], out_features))             # [N, N_out]
    for expert, group in enumerate(expert_slices(tokens_per_expert)):
        weight = weights[expert].T if transpose_b else weights[expert]
        out[group] = rows[group] @ weight
    return out


def reference_weight_grad(a, b, tokens_per_expert):
    """[E, P, Q] with out[e] = a_e^T @ b_e."""
    return np.stack([a[group].T @ b[group] for group in expert_slices(tokens_per_expert)])


# ---- routing cases ---------------------------------------------------------------------------

def make_case(name, rng):
    """(expert_ids [T, K] int32, num_experts, capacity) for one named routing pattern."""
    if name == "expert_without_tokens":          # expert 3 of 5 gets nothing; repeats allowed
        return rng.choice([0, 1, 2, 4], size=(12, 2)).astype(np.int32), 5, 0
    if name == "all_tokens_to_one_expert":
        return np.full((10, 1), 2, np.int32), 4, 0
    if name == "top_k_1":
        return rng.integers(0, 3, size=(7, 1)).astype(np.int32), 3, 0
    if name == "top_k_equals_num_experts":
        return np.stack([rng.permutation(4) for _ in range(6)]).astype(np.int32), 4, 0
    if name == "single_token":
        return np.array([[3, 0]], np.int32), 4, 0
    if name == "capacity_drops":                 # expert 0 is oversubscribed, capacity 3
        ids = np.where(rng.random((16, 2)) < 0.6, 0, rng.integers(1, 4, size=(16, 2)))
        return ids.astype(np.int32), 4, 3
    raise ValueError(name)


CASES = ["expert_without_tokens", "all_tokens_to_one_expert", "top_k_1",
         "top_k_equals_num_experts", "single_token", "capacity_drops"]


class MoEPipeline(nn.Cell):
    """dispatch -> grouped matmul -> combine, returning every intermediate (one graph)."""

    def __init__(self, num_experts, capacity, transpose_b):
        super().__init__()
        self.dispatch = DispatchKernel(num_experts, capacity)
        self.experts = GroupedMatmul(transpose_b)
        self.combine = CombineKernel()

    def construct(self, x, expert_ids, routing_weights, expert_weights):
        grouped_x, positions, tokens_per_expert, num_dropped = self.dispatch(x, expert_ids)
        expert_out = self.experts(grouped_x, expert_weights, tokens_per_expert)
        y = self.combine(expert_out, positions, routing_weights)
        return grouped_x, positions, tokens_per_expert, num_dropped, expert_out, y


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@pytest.mark.parametrize("case", CASES)
def test_pipeline_forward_matches_numpy(mode, dtype_name, case):
    rng = np.random.default_rng(CASES.index(case))
    expert_ids, num_experts, capacity = make_case(case, rng)
    tokens, top_k = expert_ids.shape
    transpose_b = case in ("top_k_1", "capacity_drops")
    weight_shape = (num_experts, FFN, HIDDEN) if transpose_b else (num_experts, HIDDEN, FFN)
    x = representable(rng.standard_normal((tokens, HIDDEN)), dtype_name)          # [T, H]
    routing_weights = rng.random((tokens, top_k)).astype(np.float32)               # [T, K]
    expert_weights = representable(rng.standard_normal(weight_shape), dtype_name)  # [E, H, F]

    net = MoEPipeline(num_experts, capacity, transpose_b)
    outputs = net(to_tensor(x, dtype_name), Tensor(expert_ids), Tensor(routing_weights),
                  to_tensor(expert_weights, dtype_name))
    grouped_x, positions, tokens_per_expert, num_dropped, expert_out, y = outputs

    ref_grouped, ref_positions, ref_counts, ref_dropped = reference_dispatch(
        x, expert_ids, num_experts, capacity)
    used = int(ref_counts.sum())  # rows past these are unspecified
    assert np.array_equal(to_numpy(grouped_x)[:used], ref_grouped[:used])  # bitwise
    assert np.array_equal(positions.asnumpy(), ref_positions)
    assert np.array_equal(tokens_per_expert.asnumpy(), ref_counts)
    assert num_dropped.asnumpy().tolist() == [ref_dropped]
    if case == "capacity_drops":
        assert ref_dropped > 0 and ref_counts.max() == capacity
    assert expert_out.dtype == DTYPES[dtype_name] and y.dtype == DTYPES[dtype_name]

    ref_expert_out = reference_grouped_matmul(ref_grouped, expert_weights, ref_counts, transpose_b)
    assert_close(to_numpy(expert_out)[:used], ref_expert_out[:used], rtol(dtype_name, 1e-5))
    # combine is checked on the kernel's own expert_out, so only its own error counts
    ref_y = reference_gather_sum(to_numpy(expert_out), ref_positions, routing_weights)
    assert_close(to_numpy(y), ref_y, rtol(dtype_name, 1e-6))


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
def test_combine_is_float32_sum_in_k_order_rounded_once(dtype_name):
    """Bitwise: y = round_to_dtype(((0 + w0*x0) + w1*x1) + w2*x2) computed in float32."""
    rng = np.random.default_rng(7)
    expert_out = representable(rng.standard_normal((12, HIDDEN)), dtype_name)
    positions = np.array([[3, 0, 7], [1, -1, 2], [-1, -1, -1], [11, 4, 5]], np.int32)
    weights = rng.random((4, 3)).astype(np.float32)
    total = np.zeros((4, HIDDEN), np.float32)
    for k in range(3):
        kept = positions[:, k] >= 0
        total[kept] = total[kept] + weights[kept, k, None] * expert_out[positions[kept, k]].astype(
            np.float32)
    expected = representable(total, dtype_name)
    y = CombineKernel()(to_tensor(expert_out, dtype_name), Tensor(positions), Tensor(weights))
    assert np.array_equal(to_numpy(y), expected)


def combine_scaled(values, weight_values):
    """y[i] = weight_values[i] * values[i] (values: a 1-D Tensor) through CombineKernel."""
    count = values.size
    expert_out = values.reshape(count, 1)                           # [N, 1]
    positions = np.arange(count, dtype=np.int32).reshape(count, 1)  # [N, 1]
    weights = np.asarray(weight_values, np.float32).reshape(count, 1)
    y = CombineKernel()(expert_out, Tensor(positions), Tensor(weights))
    return to_numpy(y).reshape(-1)


def test_float16_conversions_are_exact_and_round_to_nearest_even():
    """All 65536 float16 values times 2, and float32 values around ties, vs numpy's float16."""
    every_float16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    doubled = combine_scaled(Tensor(every_float16), np.full(every_float16.size, 2.0))
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to infinity, NaN inputs
        expected = (every_float16.astype(np.float32) * 2).astype(np.float16).astype(np.float64)
    np.testing.assert_array_equal(doubled, expected)  # NaN positions must match too

    ulp_at_one = 2.0 ** -10
    ties = [1 + ulp_at_one / 2, 1 + 1.5 * ulp_at_one, -(1 + ulp_at_one / 2), 2.0 ** -25,
            3 * 2.0 ** -25, 65504 + 8, 65504 + 16, -65520, 1e-8, 70000.0]
    rng = np.random.default_rng(3)
    samples = np.concatenate([ties, rng.standard_normal(2000) * 10.0 ** rng.integers(-6, 5, 2000)])
    samples = samples.astype(np.float32)
    scaled = combine_scaled(to_tensor(np.ones(samples.size), "float16"), samples)
    with np.errstate(over="ignore"):
        expected = samples.astype(np.float16).astype(np.float64)
    np.testing.assert_array_equal(scaled, expected)


def test_bfloat16_conversions_are_exact_and_round_to_nearest_even():
    """All 65536 bfloat16 values times 2, ties around 1.0 (hand-derived), and random values."""
    every_bfloat16 = (np.arange(1 << 16, dtype=np.uint32) << 16).view(np.float32)
    finite = np.isfinite(every_bfloat16)
    doubled = combine_scaled(to_tensor(every_bfloat16[finite], "bfloat16"),
                             np.full(finite.sum(), 2.0))
    with np.errstate(over="ignore"):  # the largest values overflow to infinity
        expected = (every_bfloat16[finite] * np.float32(2)).astype(np.float64)
    np.testing.assert_array_equal(doubled, expected)

    ulp = 2.0 ** -7  # at 1.0
    tiny = 2.0 ** -20
    cases = {  # float32 value -> bfloat16 value, ties to the even neighbour
        1 + ulp / 2: 1.0, 1 + 1.5 * ulp: 1 + 2 * ulp, -(1 + ulp / 2): -1.0,
        1 + ulp / 2 + tiny: 1 + ulp, 1 + 1.5 * ulp - tiny: 1 + ulp,
        8 * (1 + 1.5 * ulp): 8 + 16 * ulp,
    }
    values = np.array(list(cases), np.float32)
    scaled = combine_scaled(to_tensor(np.ones(values.size), "bfloat16"), values)
    np.testing.assert_array_equal(scaled, list(cases.values()))

    rng = np.random.default_rng(4)
    samples = (rng.standard_normal(2000) * 10.0 ** rng.integers(-20, 20, 2000)).astype(np.float32)
    scaled = combine_scaled(to_tensor(np.ones(samples.size), "bfloat16"), samples)
    np.testing.assert_array_equal(scaled, representable(samples, "bfloat16"))


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@pytest.mark.parametrize("case", ["capacity_drops", "expert_without_tokens"])
def test_gradients_match_numpy(mode, dtype_name, case):
    """One graph differentiates all three kernels; each term of the loss isolates one kernel."""
    rng = np.random.default_rng(100 + CASES.index(case))
    expert_ids, num_experts, capacity = make_case(case, rng)
    tokens, top_k = expert_ids.shape
    rows_count = tokens * top_k
    transpose_b = case == "capacity_drops"
    x = representable(rng.standard_normal((tokens, HIDDEN)), dtype_name)          # [T, H]
    _, positions, counts, _ = reference_dispatch(x, expert_ids, num_experts, capacity)
    expert_out = representable(rng.standard_normal((rows_count, HIDDEN)), dtype_name)  # [N, H]
    routing_weights = rng.random((tokens, top_k)).astype(np.float32)               # [T, K]
    rows = representable(rng.standard_normal((rows_count, HIDDEN)), dtype_name)    # [N, H]
    weight_shape = (num_experts, FFN, HIDDEN) if transpose_b else (num_experts, HIDDEN, FFN)
    weights = representable(rng.standard_normal(weight_shape), dtype_name)
    # upstream gradients, representable so the casts in the loss are exact
    d_grouped = representable(rng.standard_normal((rows_count, HIDDEN)), dtype_name)
    d_y = representable(rng.standard_normal((tokens, HIDDEN)), dtype_name)
    d_out = representable(rng.standard_normal((rows_count, FFN)), dtype_name)

    dispatch = DispatchKernel(num_experts, capacity)
    combine = CombineKernel()
    matmul = GroupedMatmul(transpose_b)
    d_grouped_t, d_y_t, d_out_t = (Tensor(v.astype(np.float32)) for v in (d_grouped, d_y, d_out))

    def loss(x_in, expert_out_in, weights_in, rows_in, matmul_weights_in, ids, pos, cnt):
        grouped_x = dispatch(x_in, ids)[0]
        y = combine(expert_out_in, pos, weights_in)
        out = matmul(rows_in, matmul_weights_in, cnt)
        return ((grouped_x.astype(ms.float32) * d_grouped_t).sum()
                + (y.astype(ms.float32) * d_y_t).sum()
                + (out.astype(ms.float32) * d_out_t).sum())

    grads = ms.grad(loss, grad_position=(0, 1, 2, 3, 4))(
        to_tensor(x, dtype_name), to_tensor(expert_out, dtype_name), Tensor(routing_weights),
        to_tensor(rows, dtype_name), to_tensor(weights, dtype_name), Tensor(expert_ids),
        Tensor(positions), Tensor(counts))
    d_x, d_expert_out, d_weights, d_rows, d_matmul_weights = grads

    # dispatch: d x[t] = sum over kept k of d_grouped[positions[t, k]]
    ref_d_x = reference_gather_sum(d_grouped, positions, np.ones(positions.shape))
    assert_close(to_numpy(d_x), ref_d_x, rtol(dtype_name, 1e-6))
    # combine: d expert_out[positions[t, k]] = w[t, k] d_y[t]; d w[t, k] = <d_y[t], row>
    ref_d_expert_out = np.zeros_like(expert_out)
    ref_d_weights = np.zeros(positions.shape)
    for (token, k), row in np.ndenumerate(positions):
        if row >= 0:
            ref_d_expert_out[row] = routing_weights[token, k] * d_y[token]
            ref_d_weights[token, k] = d_y[token] @ expert_out[row]
    assert_close(to_numpy(d_expert_out), ref_d_expert_out, rtol(dtype_name, 1e-6))
    assert d_weights.dtype == ms.float32
    assert_close(d_weights.asnumpy(), ref_d_weights, 1e-5)
    # grouped matmul: d rows_e = d_out_e W_e^T, d W_e = rows_e^T d_out_e (or its transpose)
    weights_as_b = weights.transpose(0, 2, 1) if transpose_b else weights    # [E, H, F]
    ref_d_rows = reference_grouped_matmul(d_out, weights_as_b, counts, transpose_b=True)
    ref_d_weights_b = reference_weight_grad(rows, d_out, counts)             # [E, H, F]
    if transpose_b:
        ref_d_weights_b = ref_d_weights_b.transpose(0, 2, 1)
    used = int(counts.sum())  # d_rows past the used rows is unspecified
    assert_close(to_numpy(d_rows)[:used], ref_d_rows[:used], rtol(dtype_name, 1e-5))
    assert_close(to_numpy(d_matmul_weights), ref_d_weights_b, rtol(dtype_name, 1e-5))


def test_capacity_given_per_call_overrides_the_constructor(mode):
    expert_ids = np.array([[0], [0], [1], [0], [0]], np.int32)
    x = Tensor(np.arange(5 * HIDDEN, dtype=np.float32).reshape(5, HIDDEN))

    class DispatchWithCapacity(nn.Cell):
        def __init__(self):
            super().__init__()
            self.dispatch = DispatchKernel(2, capacity=1)

        def construct(self, x_in, ids, capacity):
            return self.dispatch(x_in, ids, capacity)

    for capacity in (2, 0):
        outputs = DispatchWithCapacity()(x, Tensor(expert_ids), Tensor([capacity], ms.int32))
        _, ref_positions, ref_counts, ref_dropped = reference_dispatch(
            x.asnumpy(), expert_ids, 2, capacity)
        assert np.array_equal(outputs[1].asnumpy(), ref_positions)
        assert np.array_equal(outputs[2].asnumpy(), ref_counts)
        assert outputs[3].asnumpy().tolist() == [ref_dropped]


def test_integer_inputs_get_zero_gradients(mode):
    dispatch, combine, matmul = DispatchKernel(3), CombineKernel(), GroupedMatmul()
    x = Tensor(np.ones((4, HIDDEN), np.float32))
    ids = Tensor(np.array([[0], [2], [2], [1]], np.int32))
    positions = Tensor(np.array([[1], [0], [-1], [2]], np.int32))
    weights = Tensor(np.ones((4, 1), np.float32))
    counts = Tensor(np.array([1, 2, 1], np.int32))
    matmul_weights = Tensor(np.ones((3, HIDDEN, FFN), np.float32))

    def loss(x_in, ids_in, pos_in, cnt_in):
        return (dispatch(x_in, ids_in)[0].sum() + combine(x_in, pos_in, weights).sum()
                + matmul(x_in, matmul_weights, cnt_in).sum())

    d_ids, d_positions, d_counts = ms.grad(loss, grad_position=(1, 2, 3))(x, ids, positions, counts)
    for grad, original in ((d_ids, ids), (d_positions, positions), (d_counts, counts)):
        assert grad.shape == original.shape and not grad.asnumpy().any()


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
def test_grouped_matmul_many_rows_per_block_and_reference_backend(dtype_name):
    """A group of several GEMM blocks (>= 1024 rows: two blocks); oneDNN and the C++ loop."""
    rng = np.random.default_rng(11)
    k_in, n_out = 160, 24
    counts = np.array([0, 1090, 10], np.int32)
    rows = representable(rng.standard_normal((1110, k_in)), dtype_name)
    weights = representable(rng.standard_normal((3, k_in, n_out)), dtype_name)
    d_out = representable(rng.standard_normal((1110, n_out)), dtype_name)
    matmul = GroupedMatmul()

    def loss(rows_in, weights_in):
        return (matmul(rows_in, weights_in, Tensor(counts)).astype(ms.float32)
                * Tensor(d_out.astype(np.float32))).sum()

    expected_out = reference_grouped_matmul(rows, weights, counts, transpose_b=False)
    expected_d_weights = reference_weight_grad(rows, d_out, counts)
    assert gemm_backend() == "onednn", "MindSpore's bundled oneDNN should have been found"
    results = {}
    for backend in ("onednn", "reference"):
        set_gemm_backend(backend)
        try:
            out = matmul(to_tensor(rows, dtype_name), to_tensor(weights, dtype_name),
                         Tensor(counts))
            _, d_weights = ms.grad(loss, grad_position=(0, 1))(to_tensor(rows, dtype_name),
                                                              to_tensor(weights, dtype_name))
            results[backend] = (to_numpy(out), to_numpy(d_weights))
        finally:
            set_gemm_backend("onednn")
        used = int(counts.sum())  # 1100 of 1110 rows; the others are unspecified
        assert_close(results[backend][0][:used], expected_out[:used], rtol(dtype_name, 1e-5))
        assert_close(results[backend][1], expected_d_weights, rtol(dtype_name, 1e-5))
    assert not results["onednn"][1][0].any()  # expert 0 has no rows: zero gradient


def grouped_matmul_and_gradients(rows, weights, counts, d_out, transpose_b, dtype_name):
    """(out, d rows, d weights) of GroupedMatmul(transpose_b) with upstream gradient d_out."""
    matmul = GroupedMatmul(transpose_b)

    def loss(rows_in, weights_in):
        return (matmul(rows_in, weights_in, Tensor(counts)).astype(ms.float32)
                * Tensor(d_out.astype(np.float32))).sum()

    rows_t, weights_t = to_tensor(rows, dtype_name), to_tensor(weights, dtype_name)
    out = matmul(rows_t, weights_t, Tensor(counts))
    d_rows, d_weights = ms.grad(loss, grad_position=(0, 1))(rows_t, weights_t)
    return to_numpy(out), to_numpy(d_rows), to_numpy(d_weights)


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@pytest.mark.parametrize("transpose_b", [False, True])
def test_grouped_matmul_every_transposition_with_blocks_and_panels(dtype_name, transpose_b):
    """The three GEMMs of a grouped matmul (out, d rows with the other transposition of the
    weights, d weights with the rows transposed) against float64 numpy, with empty groups, a
    group of two row blocks, and k = 1024 so that the 16-bit types' converted path computes the
    150 output columns in three panels (64 + 64 + 22)."""
    rng = np.random.default_rng(12)
    k_in, n_out = 1024, 150
    counts = np.array([0, 1100, 0, 37, 530], np.int32)
    used = int(counts.sum())
    num_rows = used + 3  # the rows past the used ones are unspecified
    rows = representable(rng.standard_normal((num_rows, k_in)), dtype_name)
    weight_shape = (len(counts), n_out, k_in) if transpose_b else (len(counts), k_in, n_out)
    weights = representable(rng.standard_normal(weight_shape), dtype_name)
    d_out = representable(rng.standard_normal((num_rows, n_out)), dtype_name)
    out, d_rows, d_weights = grouped_matmul_and_gradients(rows, weights, counts, d_out,
                                                           transpose_b, dtype_name)

    tolerance = rtol(dtype_name, 1e-5)
    assert_close(out[:used], reference_grouped_matmul(rows, weights, counts, transpose_b)[:used],
                 tolerance)
    assert_close(d_rows[:used],
                 reference_grouped_matmul(d_out, weights, counts, not transpose_b)[:used],
                 tolerance)
    expected_d_weights = (reference_weight_grad(d_out, rows, counts) if transpose_b
                          else reference_weight_grad(rows, d_out, counts))
    assert_close(d_weights, expected_d_weights, tolerance)
    assert not d_weights[0].any() and not d_weights[2].any()  # empty groups: zero gradients


def test_grouped_matmul_results_do_not_depend_on_the_thread_count(tmp_path):
    """The kernels cut the work into GEMM blocks that depend only on the group sizes, so 1 and 2
    threads (MOE_EP_NUM_THREADS, read once per process) give the same bits."""
    script = textwrap.dedent("""
        import sys
        import numpy as np
        import mindspore as ms
        from mindspore import Tensor
        from mindspore_moe_ep.ops import GroupedMatmul
        rng = np.random.default_rng(13)
        counts = Tensor(np.array([1100, 0, 530, 37], np.int32))
        results = {}
        for dtype in (ms.float32, ms.bfloat16):
            rows = Tensor(rng.standard_normal((1670, 192), dtype=np.float32)).astype(dtype)
            weights = Tensor(rng.standard_normal((4, 192, 96), dtype=np.float32)).astype(dtype)
            grads = ms.grad(lambda r, w: GroupedMatmul()(r, w, counts).astype(ms.float32).sum(),
                            grad_position=(0, 1))(rows, weights)
            out = GroupedMatmul()(rows, weights, counts)
            used = 1667  # rows of out and d_rows past the used ones are unspecified
            for name, value in zip(("out", "d_rows", "d_weights"), (out, *grads)):
                value = value.astype(ms.float32).asnumpy()
                results[f"{dtype}_{name}"] = value if name == "d_weights" else value[:used]
        np.savez(sys.argv[1], **results)
        """)
    assert_same_bits_for_thread_counts(script, tmp_path, (1, 2))


def test_results_are_deterministic():
    rng = np.random.default_rng(5)
    x = Tensor(rng.standard_normal((64, HIDDEN)).astype(np.float32))
    ids = Tensor(rng.integers(0, 8, (64, 4)).astype(np.int32))
    weights = Tensor(rng.random((64, 4)).astype(np.float32))
    expert_weights = Tensor(rng.standard_normal((8, HIDDEN, HIDDEN)).astype(np.float32))
    net = MoEPipeline(8, 0, False)  # dropless: every row of grouped_x and expert_out is used
    first, second = ([t.asnumpy() for t in net(x, ids, weights, expert_weights)] for _ in range(2))
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


# ---- the AVX2 and streaming-store paths -------------------------------------------------------

def round_float32_like_kernels(values, dtype_name):
    """float32 values rounded to the dtype as the kernels do (nearest even, NaN kept), float64."""
    values = np.asarray(values, np.float32)
    if dtype_name == "float32":
        return values.astype(np.float64)
    if dtype_name == "float16":
        with np.errstate(over="ignore"):
            return values.astype(np.float16).astype(np.float64)
    bits = values.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7fff + ((bits >> 16) & 1)) >> 16
    upper = np.where(np.isnan(values), (bits >> 16) | 0x40, rounded).astype(np.uint32) << 16
    return upper.view(np.float32).astype(np.float64)


def float32_combine(rows, positions, weights):
    """y = ((0 + w0*x0) + w1*x1) + ... in float32, k in order, skipping -1 (the kernels' order)."""
    rows = rows.astype(np.float32)
    total = np.zeros((positions.shape[0], rows.shape[1]), np.float32)
    with np.errstate(all="ignore"):
        for k in range(positions.shape[1]):
            kept = positions[:, k] >= 0
            total[kept] = total[kept] + weights[kept, k, None] * rows[positions[kept, k]]
    return total


SPECIAL_VALUES = {  # per dtype: infinities, NaN, signed zeros, the extremes, subnormals
    "float32": [np.inf, -np.inf, np.nan, -0.0, 3.4e38, -3.4e38, 1e-45, -1e-40],
    "float16": [np.inf, -np.inf, np.nan, -0.0, 65504.0, -65504.0, 2.0 ** -24, -3 * 2.0 ** -24],
    "bfloat16": [np.inf, -np.inf, np.nan, -0.0, 3.38e38, -3.38e38, 2.0 ** -133, 1 + 2.0 ** -8],
}


@pytest.mark.parametrize("weighted", [True, False], ids=["combine", "gather_sum"])
@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
def test_combine_wide_rows_bitwise_with_special_values(dtype_name, weighted):
    """Bitwise against float32 arithmetic in k order, for a hidden size covering the vector
    blocks (64), the 16-element chunks and a scalar tail, with infinities, NaN, signed zeros,
    overflow on weighting and subnormals among the inputs."""
    rng = np.random.default_rng(21)
    tokens, top_k, hidden = 40, 4, 64 * 3 + 16 + 7
    scales = 10.0 ** rng.integers(-3, 3, (1, hidden))                          # per column
    values = rng.standard_normal((tokens * top_k + 5, hidden)) * scales
    special = np.array(SPECIAL_VALUES[dtype_name])
    mask = rng.random(values.shape) < 0.05
    values[mask] = rng.choice(special, mask.sum())
    expert_out = representable(values, dtype_name)                             # [N, H]
    positions = rng.permutation(values.shape[0])[:tokens * top_k].reshape(tokens, top_k)
    positions[rng.random(positions.shape) < 0.15] = -1
    positions = positions.astype(np.int32)                                     # [T, K]
    weights = (rng.random((tokens, top_k)) * 4).astype(np.float32)             # [T, K]
    weights[0, :] = [1.0, 0.5, 2.0, 3.0]  # exact scalings of the first token's rows
    if weighted:
        y = CombineKernel()(to_tensor(expert_out, dtype_name), Tensor(positions), Tensor(weights))
    else:
        from mindspore_moe_ep.ops.local_kernels import gather_sum_op
        y = gather_sum_op()(to_tensor(expert_out, dtype_name), Tensor(positions))
        weights = np.ones_like(weights)
    expected = round_float32_like_kernels(float32_combine(expert_out, positions, weights),
                                          dtype_name)
    np.testing.assert_array_equal(to_numpy(y), expected)  # NaN where expected has NaN


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
def test_combine_gradient_wide_rows(dtype_name):
    """CombineGrad over a hidden size with 16-element chunks and a scalar tail: d_expert_out is
    bitwise round(w * dy) (0 for rows no position names); d_weights (a float32 dot product
    over H, in partial sums) within float32 rounding of the float64 dot."""
    from mindspore_moe_ep.ops.local_kernels import _combine_grad_op
    rng = np.random.default_rng(24)
    tokens, top_k, hidden = 24, 3, 64 * 3 + 16 + 7
    num_rows = tokens * top_k + 4                                              # 4 unused rows
    expert_out = representable(rng.standard_normal((num_rows, hidden)), dtype_name)
    d_y = representable(rng.standard_normal((tokens, hidden)), dtype_name)
    positions = rng.permutation(num_rows)[:tokens * top_k].reshape(tokens, top_k)
    positions[rng.random(positions.shape) < 0.2] = -1
    positions = positions.astype(np.int32)
    weights = rng.random((tokens, top_k)).astype(np.float32)
    d_expert_out, d_weights = _combine_grad_op()(
        to_tensor(d_y, dtype_name), to_tensor(expert_out, dtype_name), Tensor(positions),
        Tensor(weights))
    expected_grad = np.zeros((num_rows, hidden), np.float32)
    expected_dot = np.zeros(positions.shape)
    for (token, k), row in np.ndenumerate(positions):
        if row >= 0:
            expected_grad[row] = weights[token, k] * d_y[token].astype(np.float32)
            expected_dot[token, k] = d_y[token] @ expert_out[row]
    np.testing.assert_array_equal(to_numpy(d_expert_out),
                                  round_float32_like_kernels(expected_grad, dtype_name))
    assert_close(d_weights.asnumpy(), expected_dot, 1e-5)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_outputs_larger_than_the_cache(dtype_name):
    """Outputs above half the last-level cache (8 MiB on the development machine) are written with
    streaming stores; H = 1029 puts most rows off 16-byte boundaries (unaligned head and tail)."""
    rng = np.random.default_rng(22)
    tokens, top_k, num_experts, hidden = 4096, 2, 16, 1029  # y: 8.4 MB bfloat16, 17 MB float32
    x = representable(rng.standard_normal((tokens, hidden), np.float32), dtype_name)
    expert_ids = rng.integers(0, num_experts, (tokens, top_k)).astype(np.int32)
    weights = rng.random((tokens, top_k)).astype(np.float32)
    grouped_x, positions, counts, _ = DispatchKernel(num_experts)(to_tensor(x, dtype_name),
                                                                  Tensor(expert_ids))
    _, ref_positions, ref_counts, _ = reference_dispatch(x[:, :1], expert_ids, num_experts, 0)
    assert np.array_equal(positions.asnumpy(), ref_positions)
    assert np.array_equal(counts.asnumpy(), ref_counts)
    grouped = to_numpy(grouped_x)
    rows_of_token = np.argsort(ref_positions.reshape(-1)) // top_k   # token of each row
    assert np.array_equal(grouped, x[rows_of_token])
    y = CombineKernel()(grouped_x, positions, Tensor(weights))
    expected = round_float32_like_kernels(float32_combine(grouped, ref_positions, weights),
                                          dtype_name)
    assert np.array_equal(to_numpy(y), expected)


# ---- the unspecified tail of worst-case buffers ----------------------------------------------

@pytest.fixture
def poisoned_tails(monkeypatch):
    """Kernels fill the rows past the used rows with NaN instead of leaving them unwritten."""
    monkeypatch.setenv("MOE_EP_POISON_UNUSED_ROWS", "1")


class SwiGLUPipeline(nn.Cell):
    """dispatch -> grouped matmul -> GroupedSwiGLU -> grouped matmul -> combine: the layer's
    data flow, in one Cell (every buffer past the used rows unspecified)."""

    def __init__(self, num_experts, capacity):
        super().__init__()
        self.dispatch = DispatchKernel(num_experts, capacity)
        self.up = GroupedMatmul()
        self.swiglu = GroupedSwiGLU()
        self.down = GroupedMatmul(transpose_b=True)
        self.combine = CombineKernel()

    def construct(self, x, expert_ids, routing_weights, up_weights, down_weights):
        grouped_x, positions, tokens_per_expert, _ = self.dispatch(x, expert_ids)
        gate_up = self.up(grouped_x, up_weights, tokens_per_expert)
        hidden = self.swiglu(gate_up, tokens_per_expert)
        expert_out = self.down(hidden, down_weights, tokens_per_expert)
        return self.combine(expert_out, positions, routing_weights), grouped_x, expert_out


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
def test_unspecified_tail_is_never_read(mode, dtype_name, monkeypatch):
    """Forward and gradients are bitwise the same, and finite, when the unspecified tail of
    grouped_x is NaN (the grouped matmul must not read it, its weight gradient not sum it)."""
    rng = np.random.default_rng(23)
    expert_ids, num_experts, capacity = make_case("capacity_drops", rng)   # leaves a tail
    tokens, top_k = expert_ids.shape
    x = to_tensor(representable(rng.standard_normal((tokens, HIDDEN)), dtype_name), dtype_name)
    routing_weights = Tensor(rng.random((tokens, top_k)).astype(np.float32))
    up_weights = to_tensor(rng.standard_normal((num_experts, HIDDEN, 2 * FFN)) * 0.3, dtype_name)
    down_weights = to_tensor(rng.standard_normal((num_experts, HIDDEN, FFN)) * 0.3, dtype_name)
    d_y = Tensor(rng.standard_normal((tokens, HIDDEN)).astype(np.float32))
    net = SwiGLUPipeline(num_experts, capacity)

    def loss(*inputs):
        return (net(*inputs)[0].astype(ms.float32) * d_y).sum()

    def run():
        inputs = (x, Tensor(expert_ids), routing_weights, up_weights, down_weights)
        y, grouped_x, expert_out = net(*inputs)
        grads = ms.grad(loss, grad_position=(0, 2, 3, 4))(*inputs)
        return [to_numpy(t) for t in (y, *grads)], to_numpy(grouped_x), to_numpy(expert_out)

    clean, _, _ = run()
    monkeypatch.setenv("MOE_EP_POISON_UNUSED_ROWS", "1")
    poisoned, grouped_x, expert_out = run()
    _, _, counts, _ = reference_dispatch(np.zeros((tokens, 1)), expert_ids, num_experts, capacity)
    used = int(counts.sum())
    assert used < grouped_x.shape[0] and np.isnan(grouped_x[used:]).all()  # poisoning is on
    assert np.isnan(expert_out[used:]).all()
    for before, after in zip(clean, poisoned):
        assert np.isfinite(after).all()
        assert np.array_equal(before, after)


def test_layer_with_unspecified_tail_matches_reference(poisoned_tails):
    """A whole MoELayer with capacity drops (so a tail exists), forward and backward, against
    the float64 reference while every unspecified tail row is NaN."""
    from reference import numpy_moe as ref
    from test_layer_vs_reference import (_grad_case, assert_scaled_close, build_layer,
                                         layer_grads)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    cfg, params, x, grad_out, shared = _grad_case("softmax_capacity_switch_2d", seed=801)
    assert ref.moe_forward(params, x, cfg)[1]["num_dropped"] > 0
    layer = build_layer(cfg, params, shared=shared)
    y_ref, _ = ref.moe_forward(params, x, cfg)
    y = to_numpy(layer(ms.Tensor(x, ms.float32)))
    assert_scaled_close(y, y_ref, 1e-5, "output")
    _, expected = ref.moe_loss_and_grads(params, x, grad_out, cfg)
    got = layer_grads(layer, x, grad_out)
    for key in sorted(expected):
        assert np.isfinite(got[key]).all(), key
        assert_scaled_close(got[key], expected[key], 5e-5, f"d {key}")


# ---- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("bad_id", [9, -2])
def test_out_of_range_expert_id_names_the_value(bad_id):
    ids = np.array([[0, 1]] * 4, np.int32)
    ids[3, 1] = bad_id
    x = Tensor(np.ones((4, HIDDEN), np.float32))
    expected = re.escape(f"expert_ids[3,1] = {bad_id} is out of range [-1, 8)")
    with pytest.raises(KernelError, match=expected):
        with explain_kernel_errors():
            DispatchKernel(8)(x, Tensor(ids))[0].asnumpy()  # PyNative reports at the sync
    assert issubclass(KernelError, RuntimeError)


def test_masked_expert_id_gets_no_row_and_is_not_a_drop():
    """-1 marks a (token, k) slot whose expert lives on another rank (expert parallelism)."""
    ids = np.array([[2, -1], [-1, -1], [2, 0]], np.int32)
    x = np.arange(3 * HIDDEN, dtype=np.float32).reshape(3, HIDDEN)
    grouped, positions, counts, dropped = (t.asnumpy() for t in DispatchKernel(4)(
        Tensor(x), Tensor(ids), Tensor(np.array([1], np.int32))))
    np.testing.assert_array_equal(positions, [[1, -1], [-1, -1], [-1, 0]])
    np.testing.assert_array_equal(counts, [1, 0, 1, 0])
    assert dropped.sum() == 1  # the second row for expert 2 exceeds capacity 1; -1 slots are not drops
    np.testing.assert_array_equal(grouped[0], x[2])
    np.testing.assert_array_equal(grouped[1], x[0])  # rows 2.. are unspecified


def test_graph_mode_cell_call_explains_errors_by_itself():
    """In GRAPH_MODE the failure surfaces in the Cell call (MindSpore takes ~3 s to report it)."""
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        ids = Tensor(np.array([[0], [5]], np.int32))
        with pytest.raises(KernelError, match=re.escape("expert_ids[1,0] = 5 is out of range")):
            DispatchKernel(4)(Tensor(np.ones((2, HIDDEN), np.float32)), ids)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def _bad_combine_position():
    positions = Tensor(np.array([[0], [12]], np.int32))
    return CombineKernel()(Tensor(np.ones((12, 4), np.float32)), positions,
                           Tensor(np.ones((2, 1), np.float32)))


def _bad_group_sizes():
    return GroupedMatmul()(Tensor(np.ones((8, 4), np.float32)), Tensor(np.ones((2, 4, 3),
                           np.float32)), Tensor(np.array([5, 4], np.int32)))


def _mismatched_dtypes():
    return GroupedMatmul()(Tensor(np.ones((8, 4), np.float32)),
                           Tensor(np.ones((2, 4, 3), np.float16)),
                           Tensor(np.array([5, 3], np.int32)))


@pytest.mark.parametrize("run, message", [
    (_bad_combine_position, "positions[1,0] = 12 is out of range [-1, 12)"),
    (_bad_group_sizes, "tokens_per_expert sums to 9, more than the 8 rows available"),
    (_mismatched_dtypes, "weights has dtype float16 but rows has dtype float32"),
])
def test_invalid_inputs_are_explained(run, message):
    with pytest.raises(KernelError, match=re.escape(message)):
        with explain_kernel_errors():
            run().asnumpy()


def test_the_first_failure_is_explained_when_later_kernels_fail_too():
    """In PyNative, kernels queued behind a failed one still run on its outputs and may fail
    too, and MindSpore reports the failure it meets at the sync; the explanation leads with the
    first failure, the cause. (Called directly: depending on the launch mode MindSpore may stop
    at the first failure, which would not show the follow-on.)"""
    library = ctypes.CDLL(kernel_library.library_path())
    take_kernel_errors()  # nothing left over from other tests
    ids = np.array([[0, 1]] * 4, np.int32)
    ids[3, 1] = 9
    dispatch_outputs = (np.empty((8, HIDDEN), np.float32), np.empty((4, 2), np.int32),
                        np.empty(8, np.int32), np.empty(1, np.int32))
    assert call_kernel(library, "MoeEpDispatch", np.ones((4, HIDDEN), np.float32), ids,
                       np.zeros(1, np.int32), *dispatch_outputs) != 0
    assert call_kernel(library, "MoeEpGroupedMatmul", np.ones((8, 4), np.float32),
                       np.ones((2, 4, 3), np.float32), np.array([5, 4], np.int32),
                       np.empty((8, 3), np.float32)) != 0
    message = take_kernel_errors()
    assert message.startswith("MoeEpDispatch: expert_ids[3,1] = 9 is out of range"), message
    assert ("then 1 more kernel failure(s), probably consequences; the last: MoeEpGroupedMatmul: "
            "tokens_per_expert sums to 9") in message, message
    assert take_kernel_errors() == ""  # taken: the next explanation starts afresh


def test_invalid_constructor_arguments():
    with pytest.raises(ValueError, match="num_experts"):
        DispatchKernel(0)
    with pytest.raises(ValueError, match="capacity"):
        DispatchKernel(4, capacity=-1)
    with pytest.raises(ValueError, match="transpose_b"):
        GroupedMatmul(transpose_b=1)


def test_missing_library_says_how_to_build(monkeypatch, tmp_path):
    monkeypatch.setattr(kernel_library, "_packaged_library_path",
                        lambda: str(tmp_path / kernel_library.LIBRARY_FILE_NAME))
    with pytest.raises(kernel_library.KernelLibraryNotFoundError, match="pip install -e ."):
        kernel_library.library_path.__wrapped__()


def test_instances_with_different_expert_counts_infer_their_own_shapes():
    """PyNative caches shape inference per primitive and input shapes: the kernels carry their
    static parameters as an attribute so a second instance never reuses the first's shapes."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    x = Tensor(np.ones((4, HIDDEN), np.float32))
    ids = Tensor(np.zeros((4, 2), np.int32))
    assert DispatchKernel(8)(x, ids)[2].shape == (8,)
    assert DispatchKernel(4)(x, ids)[2].shape == (4,)
