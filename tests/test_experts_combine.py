"""ExpertsCombine (the prefill path's experts, return and per-token sum in one kernel, in rounds)
and DeliverRows (the pulled delivery), on a communication window of one rank.

With one rank every received row comes from this rank and each token has one partial sum, so
y[t] is the experts' weighted sum of the row in t's slot (0 for a token not sent). The
references are the float64 NumPy experts of test_experts_weighted_sum.py; the multi-rank cases
(the sum over ranks, the return exchange, both window transports) are in
tests/test_expert_parallel.py.
"""
import secrets

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from test_experts_weighted_sum import (DTYPES, GRAD_TOLERANCE, TOLERANCE, assert_close,
                                       make_inputs, numpy_gradients, reference, rounded, tensors)
from mindspore_moe_ep.comm.window import CommWindow
from mindspore_moe_ep.ops import ExpertsWeightedSum, KernelError, explain_kernel_errors
from mindspore_moe_ep.ops.ep_kernels import DeliverRows, ExpertsCombine

CAPACITY, USED, TOKENS = 40, 33, 45


@pytest.fixture(scope="module")
def window():
    with CommWindow.open([0], 0, 1 << 16, job_token=secrets.token_hex(16)) as opened:
        yield opened


def routing(rng):
    """token_slot [T, 1]: USED of the TOKENS tokens went to the rank, in shuffled slots (the
    others: -1), and its inverse slot_token [C, 1]."""
    tokens = rng.permutation(TOKENS)[:USED]
    token_slot = np.full((TOKENS, 1), -1, np.int32)
    token_slot[tokens, 0] = np.arange(USED)
    slot_token = np.full((CAPACITY, 1), -1, np.int32)
    slot_token[:USED, 0] = tokens
    return token_slot, slot_token


@pytest.mark.parametrize("round_rows", [1, 7, CAPACITY])
@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
def test_rounds_match_numpy_and_the_unfused_kernel(window, dtype_name, round_rows):
    """Rounds of 1, 7 and all rows: y matches numpy (the unused received rows, NaN, are never
    read). In one round the experts run the same chunks as ExpertsWeightedSum, so y equals its
    row in the token's slot bit for bit (one partial sum per token, added once to a zero
    float32 sum); smaller rounds cut the chunks elsewhere (GEMMs of other sizes may round
    differently)."""
    rng = np.random.default_rng(round_rows)
    inputs, used = make_inputs(rng, [USED], CAPACITY, dtype_name)
    token_slot, slot_token = routing(rng)
    rows, ids, weights, counts, gate_up, down = tensors(inputs, dtype_name)
    y, tokens_per_expert = ExpertsCombine(window, CAPACITY, round_rows)(
        rows, ids, weights, counts, Tensor(token_slot), Tensor(slot_token), gate_up, down)
    partial, expected_counts = reference(inputs, used)
    sent = token_slot[:, 0] >= 0
    expected = np.zeros((TOKENS, partial.shape[1]))
    expected[sent] = partial[token_slot[sent, 0]]
    y = y.astype(ms.float32).asnumpy().astype(np.float64)
    assert_close(y, expected, TOLERANCE[dtype_name], dtype_name)
    assert not y[~sent].any()
    np.testing.assert_array_equal(tokens_per_expert.asnumpy(), expected_counts)
    if round_rows == CAPACITY:
        unfused, _ = ExpertsWeightedSum()(rows, ids, weights, counts, gate_up, down)
        unfused = unfused.astype(ms.float32).asnumpy()
        np.testing.assert_array_equal(y[sent], unfused[token_slot[sent, 0]])


@pytest.mark.parametrize("dtype_name", sorted(GRAD_TOLERANCE))
def test_gradients_are_the_unfused_paths(window, dtype_name):
    """The gradient (gather, reverse exchange, the experts' gradient kernel) matches numpy for
    rows, weights and both weight tensors; unsent tokens contribute nothing. The gradient of
    the unused received rows is unspecified, like those rows (never written)."""
    rng = np.random.default_rng(5)
    inputs, used = make_inputs(rng, [USED], CAPACITY, dtype_name)
    inputs["rows"][~used] = 1e3                        # finite, but must not matter
    token_slot, slot_token = routing(rng)
    rows, ids, weights, counts, gate_up, down = tensors(inputs, dtype_name)
    d_y = rounded(rng.standard_normal((TOKENS, inputs["rows"].shape[1])), dtype_name)
    kernel = ExpertsCombine(window, CAPACITY, 7)

    def loss(rows_in, weights_in, gate_up_in, down_in):
        y, _ = kernel(rows_in, ids, weights_in, counts, Tensor(token_slot), Tensor(slot_token),
                      gate_up_in, down_in)
        return (y.astype(ms.float32) * Tensor(d_y.astype(np.float32))).sum()

    got = ms.grad(loss, grad_position=(0, 1, 2, 3))(rows, weights, gate_up, down)
    d_out = np.zeros_like(inputs["rows"])            # d y[t] reaches the row in t's slot
    sent = token_slot[:, 0] >= 0
    d_out[token_slot[sent, 0]] = d_y[sent]
    expected = numpy_gradients(inputs, used, d_out)
    for name, value in zip(("rows", "weights", "gate_up", "down"), got):
        value = value.astype(ms.float32).asnumpy().astype(np.float64)
        expected_value = expected[name]
        if name == "rows":
            value, expected_value = value[used], expected_value[used]
        assert_close(value, expected_value, GRAD_TOLERANCE[dtype_name], f"d {name} ({dtype_name})")


def test_a_slot_outside_its_block_is_named():
    """Checked before the first exchange; the window is abandoned (its peers would fail at once
    with this reason), so the test has a window of its own."""
    rng = np.random.default_rng(6)
    inputs, _ = make_inputs(rng, [USED], CAPACITY)
    token_slot, slot_token = routing(rng)
    token_slot[3, 0] = CAPACITY + 2
    rows, ids, weights, counts, gate_up, down = tensors(inputs, "float32")
    with CommWindow.open([0], 0, 1 << 16, job_token=secrets.token_hex(16)) as own_window:
        with pytest.raises(KernelError, match=r"token_slot\[3,0\] = 42; expected -1 or a slot "
                                              r"of rank 0's block \[0, 40\)"):
            with explain_kernel_errors():
                ExpertsCombine(own_window, CAPACITY, 7)(
                    rows, ids, weights, counts, Tensor(token_slot), Tensor(slot_token), gate_up,
                    down)[0].asnumpy()  # PyNative reports at the sync


def test_round_rows_outside_the_block_is_refused(window):
    for round_rows in (0, CAPACITY + 1):
        with pytest.raises(ValueError, match=r"round_rows must be in \[1, 40\]"):
            ExpertsCombine(window, CAPACITY, round_rows)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_delivery_reads_the_rows_by_index(window, dtype_name):
    """DeliverRows: received row i is x[send_token_index[i]], notes travel with the rows, and
    the notes past the count are zero (a zero note reads as "no local expert")."""
    rng = np.random.default_rng(7)
    x = rounded(rng.standard_normal((TOKENS, 24)), dtype_name)
    token_slot, slot_token = routing(rng)
    send_token_index = np.where(slot_token >= 0, slot_token, -1).reshape(1, CAPACITY)
    notes = rng.standard_normal((CAPACITY, 6)).astype(np.float32)
    rows, recv_notes, recv_counts = DeliverRows(window, CAPACITY)(
        Tensor(x.astype(np.float32)).astype(DTYPES[dtype_name]), Tensor(send_token_index),
        Tensor(np.array([USED], np.int32)), Tensor(token_slot), Tensor(notes))
    rows = rows.astype(ms.float32).asnumpy().astype(np.float64)
    np.testing.assert_array_equal(rows[:USED], x[slot_token[:USED, 0]])
    np.testing.assert_array_equal(recv_notes.asnumpy()[:USED], notes[:USED])
    assert not recv_notes.asnumpy()[USED:].any()
    assert recv_counts.asnumpy().tolist() == [USED]
