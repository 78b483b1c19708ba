"""Redundant experts and live rebalancing (issue 19, items 2, 4 and 5).

- Single process: the replica rule and the weight relocation as pure functions (four ranks
  simulated with threads), the config's checks, and training with replicas refused.
- Under msrun (4 ranks, tests/distributed/rebalance_worker.py): EP 4 and EP 2 with one redundant
  slot per rank against the EP = 1 layer on every dispatch path, prefill and decode, PyNative and
  GRAPH_MODE; ``rebalance()`` from the statistics, with an explicit placement, with an
  optimizer's moments, then training; refused and failed rebalances keep the old placement.
"""
import os
import sys
import threading

import numpy as np
import pytest

import mindspore_moe_ep as mee
from mindspore_moe_ep.config import ConfigError
from mindspore_moe_ep.load_balancing import (move_slot_arrays, plan_placement,
                                             relocate_without_replicas, relocation_sources,
                                             static_placement)
from mindspore_moe_ep.load_balancing.replica_selection import (initial_placement,
                                                               replica_candidates)
from distributed import launch
from reference.numpy_replicas import reference_slots

TINY = os.path.join(launch.REPOSITORY_ROOT, "yaml_configs", "tiny.yaml")
MSRUN = os.path.join(os.path.dirname(sys.executable), "msrun")


# ---- the replica rule -------------------------------------------------------------------------

def test_candidates_prefer_the_own_rank_and_otherwise_list_every_replica():
    placement = plan_placement([8.0, 4.0, 2.0, 1.0], num_ranks=2, slots_per_rank=3)
    slot_experts = placement.slot_experts
    for rank in range(2):
        candidates, counts = replica_candidates(placement, rank)
        for expert in range(4):
            holders = [p for p, held in enumerate(slot_experts) if held == expert]
            own = [p for p in holders if p // 3 == rank]
            expected = own or holders
            assert counts[expert] == len(expected)
            assert candidates[expert, :counts[expert]].tolist() == expected


def test_candidates_prefer_the_own_host():
    # Expert 0 replicated on ranks 1 and 2; rank 0 shares a host with rank 1, rank 3 with rank 2.
    placement = plan_placement([6.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], num_ranks=4,
                               slots_per_rank=2)
    holders = [p for p, held in enumerate(placement.slot_experts) if held == 0]
    holder_ranks = [p // 2 for p in holders]
    others = [rank for rank in range(4) if rank not in holder_ranks]
    hosts = [0, 0, 1, 1]
    for rank in others:
        candidates, counts = replica_candidates(placement, rank, hosts)
        same_host = [p for p in holders if hosts[p // 2] == hosts[rank]] or holders
        assert candidates[0, :counts[0]].tolist() == same_host


@pytest.mark.parametrize("path", ["kernel", "mindspore_ops"])
def test_selector_cell_follows_the_rule(mode, path):
    """The CPU kernel and the element-wise ops (Ascend's path) both give the NumPy rule."""
    from mindspore import Tensor
    from mindspore_moe_ep.load_balancing.replica_selection import ReplicaSelector
    placement = plan_placement([9.0, 5.0, 3.0, 2.0, 1.0, 1.0], num_ranks=3, slots_per_rank=3)
    rng = np.random.default_rng(0)
    expert_ids = np.stack([rng.permutation(6)[:2] for _ in range(23)]).astype(np.int32)
    for rank in range(3):
        selector = ReplicaSelector(placement, rank)
        if path == "mindspore_ops":
            selector._kernel = None
        slots = selector(Tensor(expert_ids)).asnumpy()
        np.testing.assert_array_equal(
            slots, reference_slots(expert_ids, placement.slot_experts, 3, rank))


def test_selector_kernel_names_a_bad_expert_id():
    from mindspore import Tensor
    from mindspore_moe_ep.load_balancing.replica_selection import ReplicaSelector
    from mindspore_moe_ep.ops import KernelError
    selector = ReplicaSelector(initial_placement(4, 2, 3), 0)
    with pytest.raises(KernelError, match=r"expert_ids\[1,0\] = 7 is out of range \[0, 4\)"):
        selector(Tensor(np.array([[0, 1], [7, 2]], np.int32))).asnumpy()


def test_replicas_split_an_experts_tokens_evenly():
    """Expert 0 on ranks 0 and 1: tokens of ranks 2 and 3 alternate between the two."""
    placement = plan_placement([10.0, 1.0, 1.0, 1.0], num_ranks=4, slots_per_rank=2)
    holders = [p for p, held in enumerate(placement.slot_experts) if held == 0]
    assert len(holders) >= 2
    for rank in range(4):
        if rank in [p // 2 for p in holders]:
            continue
        slots = reference_slots(np.zeros((100, 1), np.int64), placement.slot_experts, 2, rank)
        counts = np.bincount(slots.reshape(-1), minlength=8)[holders]
        assert counts.max() - counts.min() <= 1


def test_initial_placement_is_static_without_redundant_slots():
    assert initial_placement(8, 4, 2) == static_placement(np.ones(8), 4)
    with_replicas = initial_placement(8, 4, 3)
    with_replicas.check()
    assert sorted(set(with_replicas.slot_experts)) == list(range(8))


# ---- relocation of the weights (four ranks simulated with threads) -----------------------------

class ThreadedExchange:
    """The all-to-all-v of the exchange contract between threads (one per rank)."""

    def __init__(self, ranks, rows_per_round):
        self.ranks, self.rows = ranks, rows_per_round
        self.barrier = threading.Barrier(ranks)
        self.sent = [None] * ranks
        self.calls = [0] * ranks

    def for_rank(self, rank):
        def exchange(rows, counts):
            self.calls[rank] += 1
            self.sent[rank] = (rows.copy(), counts.copy())
            self.barrier.wait()
            received = np.zeros_like(rows)
            received_counts = np.zeros(self.ranks, np.int32)
            for source in range(self.ranks):
                source_rows, source_counts = self.sent[source]
                count = source_counts[rank]
                block = source_rows[rank * self.rows:rank * self.rows + count]
                received[source * self.rows:source * self.rows + count] = block
                received_counts[source] = count
            self.barrier.wait()
            return received, received_counts
        return exchange


def slot_arrays(placement, rank, hidden, ffn):
    """Weights coded by expert id: every value of expert e's arrays is e + a position code."""
    experts = placement.rank_experts(rank)
    gate_up = np.stack([e + np.arange(hidden * 2 * ffn).reshape(hidden, 2 * ffn) * 1e-3
                        for e in experts]).astype(np.float32)
    down = np.stack([-e - np.arange(ffn * hidden).reshape(ffn, hidden) * 1e-3
                     for e in experts]).astype(np.float32)
    return [gate_up, down]


@pytest.mark.parametrize("rows_per_round", [3, 5, 1000])
def test_weights_move_to_the_new_placement(rows_per_round):
    ranks, slots, hidden, ffn = 4, 3, 4, 2
    old = initial_placement(8, ranks, slots)
    new = plan_placement([30.0, 1.0, 2.0, 20.0, 1.0, 5.0, 1.0, 9.0], ranks, slots)
    sources = relocation_sources(old, new)
    exchange = ThreadedExchange(ranks, rows_per_round)
    results = [None] * ranks

    def run(rank):
        results[rank] = move_slot_arrays(slot_arrays(old, rank, hidden, ffn), sources, rank,
                                         exchange.for_rank(rank), rows_per_round, hidden)
    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(ranks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(set(exchange.calls)) == 1, exchange.calls      # every rank: the same rounds
    for rank in range(ranks):
        expected = slot_arrays(new, rank, hidden, ffn)
        for actual, wanted in zip(results[rank], expected):
            np.testing.assert_array_equal(actual, wanted)


def test_a_rank_that_already_holds_an_expert_keeps_its_copy():
    old = initial_placement(4, 2, 2)
    new = relocate_without_replicas([1.0, 9.0, 1.0, 9.0], 2)
    sources = relocation_sources(old, new)
    for rank in range(2):
        for slot, expert in enumerate(new.rank_experts(rank)):
            if expert in old.rank_experts(rank):
                assert sources[rank, slot].tolist() == [rank,
                                                        old.rank_experts(rank).index(expert)]


def test_relocation_refuses_a_placement_of_another_shape():
    with pytest.raises(ValueError, match="the layer's has 2 x 2 for 4"):
        relocation_sources(initial_placement(4, 2, 2), initial_placement(4, 4, 1))


def test_unchanged_placement_moves_nothing():
    old = initial_placement(8, 4, 2)
    calls = []
    moved = move_slot_arrays(slot_arrays(old, 1, 4, 2), relocation_sources(old, old), 1,
                             lambda rows, counts: calls.append(1), 8, 4)
    assert calls == []
    for actual, wanted in zip(moved, slot_arrays(old, 1, 4, 2)):
        np.testing.assert_array_equal(actual, wanted)


def test_agreement_names_refusing_and_differing_ranks():
    from mindspore_moe_ep.load_balancing import agree_on_placement
    good = initial_placement(4, 2, 3)
    other = plan_placement([1.0, 1.0, 1.0, 9.0], 2, 3)
    assert other.slot_experts != good.slot_experts

    def gather_of(*rows):
        return lambda mine: np.stack(rows)
    agree_on_placement(good, None, 6, gather_of(good.slot_experts, good.slot_experts))
    refused = np.full(6, -1, np.int32)
    with pytest.raises(ValueError, match=r"ranks \[1\] refused .* ranks \[1\] differ"):
        agree_on_placement(good, None, 6, gather_of(good.slot_experts, refused))
    with pytest.raises(ValueError, match=r"this rank's was refused: bad; ranks \[0\]"):
        agree_on_placement(None, "bad", 6, gather_of(refused, good.slot_experts))
    with pytest.raises(ValueError, match=r"ranks \[\] refused .* ranks \[1\] differ"):
        agree_on_placement(good, None, 6, gather_of(good.slot_experts, other.slot_experts))


def test_replica_gradient_sum_marks_every_copy_of_each_slots_expert():
    """[S, W*S]: world rank w's slot s counts for this rank's slot j iff they hold one expert
    (two data-parallel replicas of a 2-rank group: W = 4)."""
    from mindspore_moe_ep.load_balancing.replica_selection import replica_gradient_sum
    placement = plan_placement([5.0, 1.0, 1.0, 1.0], 2, 3)
    slot_experts = placement.slot_experts
    for rank in range(4):
        matrix = replica_gradient_sum(placement, rank, 4)
        assert matrix.shape == (3, 12)
        for j, expert in enumerate(placement.rank_experts(rank % 2)):
            expected = [1.0 if slot_experts[(w % 2) * 3 + s] == expert else 0.0
                        for w in range(4) for s in range(3)]
            assert matrix[j].tolist() == expected
            assert matrix[j].sum() == 2 * placement.replicas[expert]  # each group's copies


# ---- config ------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,message", [
    ({"expert_parallel": 2, "redundant_experts": 3}, "not divisible by parallel.expert_parallel"),
    ({"expert_parallel": 1, "redundant_experts": 1}, "more than the 8 experts"),
    ({"expert_parallel": 2, "redundant_experts": 2, "capacity_factor": 1.25},
     "needs a dropless layer"),
    ({"redundant_experts": -1}, "redundant_experts"),
    ({"rebalance_interval": -2}, "rebalance_interval"),
])
def test_config_refuses_bad_redundancy(overrides, message):
    with pytest.raises(ConfigError, match=message):
        mee.load_config(TINY, **overrides)


def test_slots_per_rank_count_the_replicas():
    config = mee.load_config(TINY, expert_parallel=4, redundant_experts=4)
    assert (config.num_local_experts, config.num_expert_slots) == (3, 12)


def test_rebalance_needs_expert_parallelism(mode):
    layer = mee.MoELayer(mee.load_config(TINY))
    with pytest.raises(ValueError, match="expert_parallel > 1"):
        layer.rebalance()


# ---- expert parallelism under msrun ------------------------------------------------------------

@pytest.fixture(scope="module")
def four_ranks():
    if not os.path.exists(MSRUN):
        pytest.skip("msrun is not installed")
    with launch.msrun_reports(os.path.join("tests", "distributed", "rebalance_worker.py"), 4,
                              timeout_s=600) as result:
        yield result.results


@pytest.mark.parametrize("part,minimum", [("replicas", 80), ("rebalance", 40), ("refusal", 6),
                                          ("hung", 3)])
def test_expert_parallel_with_replicas_and_rebalancing(four_ranks, part, minimum):
    for rank, report in sorted(four_ranks.items()):
        found = [(name, ok, detail) for name, ok, detail in report["checks"]
                 if f"/{part}/" in f"/{name}" or name.split("/", 1)[1].startswith(part)]
        assert len(found) >= minimum, (rank, part, len(found))
        failed = [(name, detail) for name, ok, detail in found if not ok]
        assert not failed, (rank, failed[:5])
