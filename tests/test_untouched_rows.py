"""What a step touches follows the rows it uses (issue 17 item 2).

The expert-parallel buffers are static and sized for the worst case: R blocks of
``max_tokens_per_rank`` received slots (the slot layout), of which a step uses the first
``block_counts[r]`` of block r, and grouped buffers whose rows past the used ones are an
unspecified tail. Writing the unused rows (zeros) made a 512-token step at EP 4 ~1.5x slower
under the default bound of 4,096 than under a bound of 512: each new page written is also a page
fault. Here each kernel's output is filled with a sentinel before the call (the kernels are called
through their AOT entry points, tests/kernel_abi.py): used rows must equal a NumPy reference and
unused rows must still hold the sentinel, i.e. were never written.
"""
import ctypes

import numpy as np
import pytest

from kernel_abi import call_kernel
from mindspore_moe_ep.ops.kernel_library import library_path, take_kernel_errors

SENTINEL = np.float32(12345.0)
BLOCKS, BLOCK_ROWS, TOP_K, HIDDEN = 3, 6, 2, 40
BLOCK_COUNTS = np.array([6, 2, 0], np.int32)  # a full, a partial and an empty block


@pytest.fixture(scope="module")
def library():
    return ctypes.CDLL(library_path())


def slot_layout(rng, num_rows):
    """positions [R*C, K] into rows [num_rows, H]: used slots name distinct rows (slot 1 of
    block 0 has all its pairs dropped: its output row must still be written, as zeros); unused
    slots name none."""
    slots = BLOCKS * BLOCK_ROWS
    used = np.zeros(slots, bool)
    for block, count in enumerate(BLOCK_COUNTS):
        used[block * BLOCK_ROWS:block * BLOCK_ROWS + count] = True
    positions = np.full((slots, TOP_K), -1, np.int32)
    free_rows = iter(rng.permutation(num_rows))
    for slot in np.nonzero(used)[0]:
        if slot != 1:
            positions[slot, 0] = next(free_rows)
            if slot % 2 == 0:
                positions[slot, 1] = next(free_rows)
    return positions, used


def reference_sum(rows, positions, weights):
    y = np.zeros((positions.shape[0], rows.shape[1]))
    for (slot, k), row in np.ndenumerate(positions):
        if row >= 0:
            y[slot] += weights[slot, k] * rows[row].astype(np.float64)
    return y


@pytest.mark.parametrize("weighted", [True, False], ids=["Combine", "GatherSum"])
def test_sums_into_the_slot_layout_write_only_the_counted_rows(library, weighted):
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((50, HIDDEN)).astype(np.float32)
    positions, used = slot_layout(rng, len(rows))
    weights = (rng.random(positions.shape) if weighted else np.ones(positions.shape)).astype(
        np.float32)
    y = np.full((positions.shape[0], HIDDEN), SENTINEL, np.float32)
    arguments = (rows, positions, weights) if weighted else (rows, positions)
    name = "MoeEpCombine" if weighted else "MoeEpGatherSum"
    assert call_kernel(library, name, *arguments, BLOCK_COUNTS, y) == 0, take_kernel_errors()
    np.testing.assert_allclose(y[used], reference_sum(rows, positions, weights)[used],
                               rtol=1e-6, atol=1e-6)
    assert not y[1].any()  # a used slot whose pairs were all dropped: zeros
    assert (y[~used] == SENTINEL).all()


def test_without_block_counts_every_row_is_written(library):
    rng = np.random.default_rng(2)
    rows = rng.standard_normal((50, HIDDEN)).astype(np.float32)
    positions, _ = slot_layout(rng, len(rows))
    y = np.full((positions.shape[0], HIDDEN), SENTINEL, np.float32)
    assert call_kernel(library, "MoeEpGatherSum", rows, positions, y) == 0
    np.testing.assert_allclose(y, reference_sum(rows, positions, np.ones(positions.shape)),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("in_blocks", [True, False], ids=["slot_layout", "plain"])
def test_combine_gradient_leaves_the_grouped_tail_alone_only_in_the_slot_layout(library,
                                                                                 in_blocks):
    """d_expert_out of the combine: exact zeros for unnamed rows; in the slot layout (where
    expert_out is a grouped buffer) rows past the last named one are its tail: not written."""
    rng = np.random.default_rng(3)
    grouped_rows = 60
    positions, used = slot_layout(rng, 20)  # names rows < 20 only: rows 20..59 are the tail
    positions[positions == 3] = -1          # an unnamed row below the last named one
    expert_out = rng.standard_normal((grouped_rows, HIDDEN)).astype(np.float32)
    weights = rng.random(positions.shape).astype(np.float32)
    dy = rng.standard_normal((positions.shape[0], HIDDEN)).astype(np.float32)
    dy[~used] = np.nan                      # unused slots' upstream gradient is never read
    d_expert_out = np.full_like(expert_out, SENTINEL)
    d_weights = np.full(positions.shape, SENTINEL, np.float32)
    extra = (BLOCK_COUNTS,) if in_blocks else ()
    assert call_kernel(library, "MoeEpCombineGrad", dy, expert_out, positions, weights, *extra,
                       d_expert_out, d_weights) == 0, take_kernel_errors()
    expected = np.zeros_like(expert_out)
    for (slot, k), row in np.ndenumerate(positions):
        if row >= 0:
            expected[row] = weights[slot, k] * dy[slot]
    last_named = positions.max()
    np.testing.assert_allclose(d_expert_out[:last_named + 1], expected[:last_named + 1],
                               rtol=1e-6)
    assert not d_expert_out[3].any()
    tail = d_expert_out[last_named + 1:]
    assert (tail == SENTINEL).all() if in_blocks else not tail.any()
    assert np.isfinite(d_weights).all() and not d_weights[~used].any()


def test_block_counts_beyond_a_block_are_refused(library):
    rows = np.zeros((4, HIDDEN), np.float32)
    positions = np.full((BLOCKS * BLOCK_ROWS, TOP_K), -1, np.int32)
    y = np.zeros((BLOCKS * BLOCK_ROWS, HIDDEN), np.float32)
    counts = np.array([6, BLOCK_ROWS + 1, 0], np.int32)
    assert call_kernel(library, "MoeEpGatherSum", rows, positions, counts, y) != 0
    message = take_kernel_errors()
    assert "block_counts" in message and str(BLOCK_ROWS + 1) in message, message
