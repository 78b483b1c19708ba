"""ExpertsWeightedSum: the routed SwiGLU experts and the weighted sum per row, in one kernel.

References are plain numpy in float64 (an FFN per (row, expert) pair, a weighted sum per row),
written here, independent of the kernels. Tolerances as in test_local_kernels.py: float32 1e-5
(GEMMs over up to 48 products), 16-bit types one rounding of each stored intermediate (gate_up,
hidden, expert output; the sum is rounded once), so 2e-2 of the largest value for bfloat16 and
3e-3 for float16.
"""
import re
import textwrap

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, ops

from thread_counts import assert_same_bits_for_thread_counts
from mindspore_moe_ep.ops import (CombineKernel, DispatchKernel, ExpertsWeightedSum,
                                  GroupedMatmul, GroupedSwiGLU, KernelError,
                                  explain_kernel_errors)

DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}
TOLERANCE = {"float32": 1e-5, "float16": 3e-3, "bfloat16": 2e-2}
HIDDEN, FFN, EXPERTS, TOP_K = 48, 20, 5, 4



def rounded(values, dtype_name):
    """float64 copy of the values as the dtype stores them."""
    return Tensor(values.astype(np.float32)).astype(DTYPES[dtype_name]).astype(
        ms.float32).asnumpy().astype(np.float64)


def make_inputs(rng, row_counts, block_rows, dtype_name="float32", hot_expert_rows=0):
    """Rows in blocks, 1..TOP_K distinct local ids per used row (the rest -1, shuffled), and
    expert weights. Rows past a block's count are NaN with valid-looking ids: never read.
    ``hot_expert_rows``: the first that many used rows all choose expert 0 (several chunks)."""
    num_rows = len(row_counts) * block_rows
    rows = rounded(rng.standard_normal((num_rows, HIDDEN)), dtype_name)
    ids = np.full((num_rows, TOP_K), -1, np.int32)
    used = np.zeros(num_rows, bool)
    for block, count in enumerate(row_counts):
        used[block * block_rows: block * block_rows + count] = True
    for i in range(num_rows):
        n = rng.integers(1, TOP_K + 1)
        ids[i, :n] = rng.choice(EXPERTS, n, replace=False)
        rng.shuffle(ids[i])
    for i in np.nonzero(used)[0][:hot_expert_rows]:
        if 0 not in ids[i]:
            ids[i, np.argmax(ids[i] < 0) if (ids[i] < 0).any() else 0] = 0
    rows[~used] = np.nan
    weights = rng.random((num_rows, TOP_K))
    gate_up = rounded(rng.standard_normal((EXPERTS, HIDDEN, 2 * FFN)) / 7, dtype_name)
    down = rounded(rng.standard_normal((EXPERTS, FFN, HIDDEN)) / 5, dtype_name)
    return dict(rows=rows, ids=ids, weights=weights.astype(np.float32).astype(np.float64),
                counts=np.asarray(row_counts, np.int32), gate_up=gate_up, down=down), used


def reference(inputs, used):
    """(out [N, H] for the used rows, tokens_per_expert) in float64."""
    out = np.zeros_like(inputs["rows"])
    tokens_per_expert = np.zeros(EXPERTS, np.int64)
    for i in np.nonzero(used)[0]:
        for k in range(TOP_K):
            expert = inputs["ids"][i, k]
            if expert < 0:
                continue
            tokens_per_expert[expert] += 1
            gate_up = inputs["rows"][i] @ inputs["gate_up"][expert]
            gate, up = gate_up[:FFN], gate_up[FFN:]
            hidden = gate / (1 + np.exp(-gate)) * up
            out[i] += inputs["weights"][i, k] * (hidden @ inputs["down"][expert])
    return out, tokens_per_expert


def tensors(inputs, dtype_name):
    dtype = DTYPES[dtype_name]
    return (Tensor(inputs["rows"].astype(np.float32)).astype(dtype), Tensor(inputs["ids"]),
            Tensor(inputs["weights"].astype(np.float32)), Tensor(inputs["counts"]),
            Tensor(inputs["gate_up"].astype(np.float32)).astype(dtype),
            Tensor(inputs["down"].astype(np.float32)).astype(dtype))


def assert_close(actual, expected, tolerance, what):
    scale = np.abs(expected).max()
    error = np.abs(actual - expected).max()
    assert error <= tolerance * scale, f"{what}: max error {error:.3g} > {tolerance} * {scale:.3g}"


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
def test_matches_numpy_in_blocks_with_unused_tails(mode, dtype_name):
    """Three blocks (full, partial, empty); the unused rows hold NaN and must not be read."""
    inputs, used = make_inputs(np.random.default_rng(1), [40, 17, 0], 40, dtype_name)
    out, tokens_per_expert = ExpertsWeightedSum()(*tensors(inputs, dtype_name))
    expected, expected_counts = reference(inputs, used)
    out = out.astype(ms.float32).asnumpy().astype(np.float64)
    assert np.isfinite(out[used]).all()
    assert_close(out[used], expected[used], TOLERANCE[dtype_name], dtype_name)
    np.testing.assert_array_equal(tokens_per_expert.asnumpy(), expected_counts)


def test_an_expert_with_many_chunks_and_one_without_pairs():
    """Expert 0 gets > 1000 pairs (three chunks of at most 512 rows); expert 4 none."""
    rng = np.random.default_rng(2)
    inputs, used = make_inputs(rng, [600, 590], 600, hot_expert_rows=1190)
    inputs["ids"][inputs["ids"] == 4] = -1
    out, tokens_per_expert = ExpertsWeightedSum()(*tensors(inputs, "float32"))
    expected, expected_counts = reference(inputs, used)
    assert expected_counts[0] > 1024 and expected_counts[4] == 0
    assert_close(out.asnumpy()[used], expected[used], TOLERANCE["float32"], "float32")
    np.testing.assert_array_equal(tokens_per_expert.asnumpy(), expected_counts)


def test_agrees_with_the_grouped_path():
    """dispatch -> grouped GEMM -> SwiGLU -> grouped GEMM -> combine gives the same sums (the
    pairs of a row are added in another order: float32 rounding apart)."""
    inputs, used = make_inputs(np.random.default_rng(3), [64], 64)
    rows, ids, weights, counts, gate_up, down = tensors(inputs, "float32")
    out, _ = ExpertsWeightedSum()(rows, ids, weights, counts, gate_up, down)
    grouped, positions, group_sizes, _ = DispatchKernel(EXPERTS)(rows, ids)
    hidden = GroupedSwiGLU()(GroupedMatmul()(grouped, gate_up, group_sizes), group_sizes)
    expert_out = GroupedMatmul()(hidden, down, group_sizes)
    expected = CombineKernel()(expert_out, positions, weights).asnumpy()
    np.testing.assert_allclose(out.asnumpy(), expected, rtol=1e-6, atol=1e-6)


def numpy_gradients(inputs, used, d_out):
    """float64 gradients of sum(out * d_out) w.r.t. rows, weights, gate_up and down."""
    grads = {name: np.zeros_like(inputs[name]) for name in ("rows", "weights", "gate_up", "down")}
    for i in np.nonzero(used)[0]:
        for k in range(TOP_K):
            expert = inputs["ids"][i, k]
            if expert < 0:
                continue
            x, w = inputs["rows"][i], inputs["weights"][i, k]
            pre = x @ inputs["gate_up"][expert]
            gate, up = pre[:FFN], pre[FFN:]
            sigmoid = 1 / (1 + np.exp(-gate))
            hidden = gate * sigmoid * up
            out = hidden @ inputs["down"][expert]
            grads["weights"][i, k] = out @ d_out[i]
            d_expert_out = w * d_out[i]
            grads["down"][expert] += np.outer(hidden, d_expert_out)
            d_hidden = inputs["down"][expert] @ d_expert_out
            d_gate = d_hidden * up * sigmoid * (1 + gate * (1 - sigmoid))
            d_pre = np.concatenate([d_gate, d_hidden * gate * sigmoid])
            grads["gate_up"][expert] += np.outer(x, d_pre)
            grads["rows"][i] += inputs["gate_up"][expert] @ d_pre
    return grads


GRAD_TOLERANCE = {"float32": 1e-5, "bfloat16": 3e-2}


@pytest.mark.parametrize("dtype_name", sorted(GRAD_TOLERANCE))
def test_gradients_recompute_the_experts(mode, dtype_name, monkeypatch):
    """The gradient kernel recomputes the experts expert by expert; every gradient matches
    numpy, with an expert of several chunks; unused rows (whose ids must be ignored) get zero
    weight gradients, and their row gradients are unspecified like their outputs (never written:
    NaN under the test aid MOE_EP_POISON_UNUSED_ROWS=1)."""
    monkeypatch.setenv("MOE_EP_POISON_UNUSED_ROWS", "1")
    rng = np.random.default_rng(4)
    inputs, used = make_inputs(rng, [600, 590], 600, dtype_name, hot_expert_rows=1190)
    inputs["rows"][~used] = 1e3                         # finite, but must not matter
    rows, ids, weights, counts, gate_up, down = tensors(inputs, dtype_name)
    d_out = rounded(rng.standard_normal(inputs["rows"].shape), dtype_name)
    kernel = ExpertsWeightedSum()
    # Only the used rows reach MindSpore's arithmetic (the others hold NaN).
    used_rows, unused_rows = (Tensor(np.nonzero(mask)[0].astype(np.int32)) for mask in
                              (used, ~used))
    d_out_used = Tensor(d_out[used].astype(np.float32))

    def loss(rows_in, weights_in, gate_up_in, down_in):
        out, _ = kernel(rows_in, ids, weights_in, counts, gate_up_in, down_in)
        return (ops.gather(out.astype(ms.float32), used_rows, 0) * d_out_used).sum()

    got = ms.grad(loss, grad_position=(0, 1, 2, 3))(rows, weights, gate_up, down)
    expected = numpy_gradients(inputs, used, d_out)
    d_rows_used = ops.gather(got[0].astype(ms.float32), used_rows, 0).asnumpy()
    assert_close(d_rows_used.astype(np.float64), expected["rows"][used],
                 GRAD_TOLERANCE[dtype_name], f"d rows ({dtype_name})")
    assert np.isnan(ops.gather(got[0].astype(ms.float32), unused_rows, 0).asnumpy()).all()
    for name, value in zip(("weights", "gate_up", "down"), got[1:]):
        assert_close(value.astype(ms.float32).asnumpy().astype(np.float64), expected[name],
                     GRAD_TOLERANCE[dtype_name], f"d {name} ({dtype_name})")
    assert not got[1].asnumpy()[~used].any()


def test_results_do_not_depend_on_the_thread_count(tmp_path):
    """Chunks depend only on the pair counts and shapes, an expert's chunks add to distinct rows
    and weight-gradient blocks depend only on the shapes: 1 and 3 threads give the same bits,
    forward and backward."""
    script = textwrap.dedent("""
        import sys
        import numpy as np
        import mindspore as ms
        from mindspore import Tensor
        from mindspore_moe_ep.ops import ExpertsWeightedSum
        rng = np.random.default_rng(5)
        ids = np.stack([rng.permutation(6)[:3] for _ in range(1400)]).astype(np.int32)
        results = {}
        counts = Tensor(np.array([700, 650], np.int32))
        kernel = ExpertsWeightedSum()
        for dtype in (ms.float32, ms.bfloat16):
            cast = lambda a: Tensor(a.astype(np.float32)).astype(dtype)
            inputs = (cast(rng.standard_normal((1400, 64))),
                      Tensor(rng.random((1400, 3), dtype=np.float32)),
                      cast(rng.standard_normal((6, 64, 48)) / 8),
                      cast(rng.standard_normal((6, 24, 64)) / 5))

            def forward(rows, weights, gate_up, down):
                return kernel(rows, Tensor(ids), weights, counts, gate_up, down)[0]

            out = forward(*inputs).astype(ms.float32).asnumpy()
            results[str(dtype)] = np.concatenate([out[:650], out[700:1350]])
            grads = ms.grad(lambda *a: forward(*a).astype(ms.float32).sum(),
                            grad_position=(0, 1, 2, 3))(*inputs)
            for name, grad in zip(("d_rows", "d_weights", "d_gate_up", "d_down"), grads):
                results[f"{dtype}_{name}"] = grad.astype(ms.float32).asnumpy()
        np.savez(sys.argv[1], **results)
        """)
    assert_same_bits_for_thread_counts(script, tmp_path, (1, 3))


def _call(rows=(8, HIDDEN), ids=None, counts=(8,), weights_dtype=np.float32, experts=EXPERTS):
    ids = np.zeros((rows[0], 2), np.int32) if ids is None else ids
    return ExpertsWeightedSum()(
        Tensor(np.ones(rows, np.float32)), Tensor(ids),
        Tensor(np.ones(ids.shape, weights_dtype)), Tensor(np.array(counts, np.int32)),
        Tensor(np.ones((experts, HIDDEN, 2 * FFN), np.float32)),
        Tensor(np.ones((experts, FFN, HIDDEN), np.float32)))[0]


def _bad_id():
    ids = np.zeros((8, 2), np.int32)
    ids[3, 1] = EXPERTS
    return _call(ids=ids)


@pytest.mark.parametrize("run, message", [
    (_bad_id, f"local_ids[3,1] = {EXPERTS}; expected -1 (no expert on this rank) or a local "
              f"expert in [0, {EXPERTS})"),
    (lambda: _call(counts=(3, 5)), "row_counts[1] = 5; expected 0 to 4 (rows per block)"),
    (lambda: _call(counts=(2, 2, 2)), "its length (the number of row blocks) must be positive "
                                      "and divide rows.shape[0] = 8"),
    (lambda: _call(weights_dtype=np.float16), "weights has dtype float16"),
])
def test_invalid_inputs_are_explained(run, message):
    with pytest.raises(KernelError, match=re.escape(message)):
        with explain_kernel_errors():
            run().asnumpy()

