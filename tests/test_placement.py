"""Expert placement (issue 19, item 3): properties checked independently of the code under test
(NumPy recounts of the slot table), hand-derived placements, and the Zipf figures of
docs/load_balancing.md."""
import os
import sys

import numpy as np
import pytest

from mindspore_moe_ep.load_balancing import (plan_placement, relocate_without_replicas,
                                             static_placement)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "scripts"))
from placement_report import report_rows, zipf_loads  # noqa: E402


def assert_valid(placement, loads, num_ranks, slots_per_rank):
    """Every expert placed, exactly S per rank, no rank with two replicas of one expert, and
    rank_loads equal to a recount (each replica takes load / replicas)."""
    table = np.asarray(placement.slot_experts).reshape(num_ranks, slots_per_rank)   # [R, S]
    copies = np.bincount(table.reshape(-1), minlength=len(loads))                    # [E]
    assert copies.min() >= 1 and copies.size == len(loads)
    assert copies.tolist() == list(placement.replicas)
    assert all(len(set(row)) == slots_per_rank for row in table.tolist())
    per_slot = np.asarray(loads, np.float64)[table] / copies[table]
    np.testing.assert_allclose(placement.rank_loads, per_slot.sum(axis=1), rtol=1e-12)
    placement.check()
    return per_slot.max()


def random_cases(count, seed=0):
    rng = np.random.default_rng(seed)
    for index in range(count):
        num_ranks, slots = int(rng.integers(2, 9)), int(rng.integers(1, 7))
        num_experts = int(rng.integers(slots, num_ranks * slots + 1))
        loads = (rng.integers(0, 6, num_experts).astype(float) if index % 3 == 0
                 else rng.pareto(0.7, num_experts) if index % 3 == 1
                 else np.where(rng.random(num_experts) < 0.2, 50.0, 1.0 + rng.random(num_experts)))
        yield loads, num_ranks, slots


def test_random_placements_are_valid_and_within_the_bound():
    """Bound (1) of placement.py: max - min rank load <= the largest replica load."""
    for loads, num_ranks, slots in random_cases(600):
        placement = plan_placement(loads, num_ranks, slots)
        largest_replica = assert_valid(placement, loads, num_ranks, slots)
        rank_loads = np.asarray(placement.rank_loads)
        assert rank_loads.max() - rank_loads.min() <= largest_replica * (1 + 1e-12) + 1e-12
        assert rank_loads.max() <= rank_loads.mean() + largest_replica * (1 + 1e-12) + 1e-12
        hosted = plan_placement(loads, num_ranks, slots, ranks_per_host=1)
        assert_valid(hosted, loads, num_ranks, slots)


def test_hand_derived_placement():
    # loads [8, 4, 2, 2], 2 ranks x 3 slots: 2 redundant slots. Replicate: expert 0 (8 -> 2 x 4),
    # then expert 1 (4, ahead of expert 0's 4 at its cap of R = 2 replicas) -> 2 x 2.
    # Pack 4(e0) 4(e0) 2(e1) 2(e1) 2(e2) 2(e3): r0, r1, r0, r1, r0, r1 (ties: rank index).
    placement = plan_placement([8, 4, 2, 2], 2, 3)
    assert placement.replicas == (2, 2, 1, 1)
    assert placement.slot_experts == (0, 1, 2, 0, 1, 3)
    assert placement.rank_loads == (8.0, 8.0)


def test_host_rule_spreads_replicas_over_hosts():
    # 5 equal experts on 4 ranks x 2 slots (2 hosts of 2): replicas (2, 2, 2, 1, 1).
    # Without the host rule experts 0 and 1 sit on ranks 2 and 3 (host 1) only; with it
    # (derivation in docs/load_balancing.md) each spans both hosts, at the same rank loads.
    plain = plan_placement([1] * 5, 4, 2)
    hosted = plan_placement([1] * 5, 4, 2, ranks_per_host=2)
    assert plain.slot_experts == (2, 3, 2, 4, 0, 1, 0, 1)
    assert hosted.slot_experts == (0, 3, 1, 4, 0, 2, 1, 2)
    assert plain.rank_loads == hosted.rank_loads == (1.5, 1.5, 1.0, 1.0)


def test_deterministic_with_ties_broken_by_index():
    loads = zipf_loads(64, 1.2)
    assert plan_placement(loads, 8, 9) == plan_placement(loads.copy(), 8, 9)
    # Equal loads, no redundant slots: experts in id order onto ranks in index order.
    assert relocate_without_replicas([5.0] * 4, 2).slot_experts == (0, 2, 1, 3)


def test_baselines():
    loads = [7.0, 5.0, 3.0, 1.0]
    static = static_placement(loads, 2)
    assert static.slot_experts == (0, 1, 2, 3) and static.rank_loads == (12.0, 4.0)
    relocated = relocate_without_replicas(loads, 2)       # 7 -> r0, 5 -> r1, 3 -> r1, 1 -> r0
    assert relocated.slot_experts == (0, 3, 1, 2) and relocated.rank_loads == (8.0, 8.0)


@pytest.mark.parametrize("exponent, static, relocated, planned", [
    (0.8, 1.957, 1.428, 1.001), (1.2, 2.947, 2.458, 1.001), (1.6, 4.091, 3.759, 1.182)])
def test_zipf_figures_of_the_docs(exponent, static, relocated, planned):
    """64 experts, 8 ranks, 1 redundant slot per rank: the table in docs/load_balancing.md is
    what the code gives; the static figure recounted with NumPy; the planned one within (1)."""
    row = dict((row[0], row[1:]) for row in report_rows(64, 8, 1))[exponent]
    np.testing.assert_allclose(row, (static, relocated, planned), atol=5e-4)
    loads = zipf_loads(64, exponent)
    static_ranks = loads.reshape(8, 8).sum(axis=1)                      # expert e on rank e // 8
    assert static_ranks.max() / static_ranks.mean() == pytest.approx(static, abs=5e-4)
    largest_replica = assert_valid(plan_placement(loads, 8, 9), loads, 8, 9)
    assert planned <= 1 + largest_replica / (loads.sum() / 8)           # bound (1) over the mean


@pytest.mark.parametrize("call, message", [
    (lambda: plan_placement([[1.0]], 1, 1), r"expert_loads has shape \(1, 1\)"),
    (lambda: plan_placement([1.0, -2.0], 2, 1), r"expert_loads\[1\] = -2.0 is not allowed"),
    (lambda: plan_placement([1.0, float("nan")], 2, 1), r"expert_loads\[1\] = nan"),
    (lambda: plan_placement([1.0] * 4, 0, 4), r"num_ranks = 0 is not allowed"),
    (lambda: plan_placement([1.0] * 4, 2, 1.5), r"slots_per_rank = 1.5 is not allowed"),
    (lambda: plan_placement([1.0] * 5, 2, 2), r"2 \* 2 = 4 slots cannot hold the 5 experts"),
    (lambda: plan_placement([1.0] * 2, 2, 3), r"slots_per_rank = 3 exceeds the 2 experts"),
    (lambda: plan_placement([1.0] * 4, 4, 1, ranks_per_host=3),
     r"ranks_per_host = 3 is not allowed; expected null or an integer >= 1 dividing num_ranks"),
    (lambda: relocate_without_replicas([1.0] * 5, 2), r"num_ranks = 2 is not allowed"),
])
def test_bad_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
