"""Where a token's top-k experts land: expected distinct ranks and nodes, and the load spread.

The planner counts bytes the way the library (and DeepEP's normal kernels) send them: a token
goes once to each *rank* that holds one of its experts, however many of its experts live there.
How many ranks that is depends only on the routing, so this module computes it from the MoE
config by counting:

- uniform routing: a token picks ``top_k`` of ``num_experts`` experts without replacement, every
  set equally likely; a block of ``b`` experts (one rank's, one node's) is missed with
  probability C(E - b, K) / C(E, K);
- group-limited routing (DeepSeek-V3: ``num_groups`` equal groups, a token picks
  ``topk_groups`` of them, then its K experts among theirs): the same count, conditioned on how
  many of the block's groups were picked (hypergeometric). Blocks that are neither inside one
  group nor whole groups fall back to the uniform formula (stated in :func:`miss_probability`).

Real routers are not uniform; :func:`receive_imbalance` gives the busiest rank's share under
uniform routing (a binomial maximum), and :func:`imbalance_from_loads` the one of measured
per-expert loads, with redundant experts placed on the hottest ones.
"""
import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Routing:
    """The routing facts the traffic depends on (from the MoE config's model and router)."""

    num_experts: int
    top_k: int
    num_groups: int = 1
    topk_groups: int = 1

    def __post_init__(self):
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k = {self.top_k} exceeds num_experts = {self.num_experts}")
        if self.num_groups > 1 and self.top_k > self.topk_groups * self.num_experts // self.num_groups:
            raise ValueError(f"top_k = {self.top_k} exceeds the experts of topk_groups = "
                             f"{self.topk_groups} groups")

    @property
    def group_limited(self) -> bool:
        return 1 < self.num_groups and self.topk_groups < self.num_groups


def _miss_uniform(pool: int, block: int, top_k: int) -> float:
    """P(none of top_k picks from ``pool`` experts falls in a given block of ``block``)."""
    if block >= pool:
        return 0.0
    return math.comb(pool - block, top_k) / math.comb(pool, top_k)


def miss_probability(routing: Routing, block: int) -> float:
    """P(a token sends nothing to a block of ``block`` consecutive experts (a rank or node)).

    With group-limited routing and a block inside one group (``block`` divides the group size)
    or made of whole groups, the exact count; otherwise the uniform one (an approximation).
    """
    experts, top_k = routing.num_experts, routing.top_k
    if not routing.group_limited:
        return _miss_uniform(experts, block, top_k)
    group = experts // routing.num_groups
    picked, groups = routing.topk_groups, routing.num_groups
    pool = picked * group  # the experts a token chooses from once its groups are picked
    if block <= group and group % block == 0:
        p_group_picked = picked / groups
        return (1 - p_group_picked) + p_group_picked * _miss_uniform(pool, block, top_k)
    if block % group == 0:
        block_groups = block // group
        total = 0.0
        for hit in range(0, min(block_groups, picked) + 1):  # hypergeometric over groups
            p_hit = (math.comb(block_groups, hit) * math.comb(groups - block_groups, picked - hit)
                     / math.comb(groups, picked))
            total += p_hit * _miss_uniform(pool, hit * group, top_k)
        return total
    return _miss_uniform(experts, block, top_k)


@dataclass(frozen=True)
class Destinations:
    """Expected destinations of one token at EP ``ep`` with ``cards_per_node`` ranks a node."""

    self_rank: float          # P(the token's own rank holds one of its experts)
    same_node_peers: float    # expected other ranks of its node it goes to
    remote_ranks: float       # expected ranks on other nodes it goes to
    remote_nodes: float       # expected other nodes it goes to (what a per-node send counts)

    @property
    def ranks(self) -> float:
        return self.self_rank + self.same_node_peers + self.remote_ranks


def destinations(routing: Routing, ep: int, cards_per_node: int) -> Destinations:
    """Expected destinations of one token (ranks hold ``num_experts / ep`` consecutive experts,
    nodes ``min(ep, cards_per_node)`` consecutive ranks)."""
    if routing.num_experts % ep:
        raise ValueError(f"ep = {ep} does not divide num_experts = {routing.num_experts}")
    per_rank = routing.num_experts // ep
    node_ranks = min(ep, cards_per_node)
    if ep % node_ranks:
        raise ValueError(f"ep = {ep} is not a whole number of nodes of {cards_per_node} cards")
    nodes = ep // node_ranks
    p_rank = 1 - miss_probability(routing, per_rank)
    p_node = 1 - miss_probability(routing, per_rank * node_ranks)
    return Destinations(self_rank=p_rank, same_node_peers=(node_ranks - 1) * p_rank,
                        remote_ranks=(ep - node_ranks) * p_rank,
                        remote_nodes=(nodes - 1) * p_node)


def expected_max_z(count: int) -> float:
    """E[max of ``count`` independent standard normals], by Blom's approximation
    Phi^-1((n - 0.375) / (n + 0.25)) (within 0.02 of the exact values: 0.564 for 2, 1.029 for
    4, 1.424 for 8); 0 for one. The asymptotic sqrt(2 ln n) overstates it at small n (1.18 for
    2, 1.67 for 4), where a CPU host's EP sizes are."""
    if count <= 1:
        return 0.0
    return NormalDist().inv_cdf((count - 0.375) / (count + 0.25))


def busiest(count: float, probability: float, ranks: int) -> float:
    """Expected largest of ``ranks`` independent Binomial(count, probability) draws (Gaussian
    approximation: mean + sigma * expected_max_z(ranks))."""
    mean = count * probability
    return mean + math.sqrt(max(count * probability * (1 - probability), 0.0)) * expected_max_z(
        ranks)


def receive_imbalance(routing: Routing, ep: int, tokens_per_rank: int) -> float:
    """Busiest rank's received (token, rank) rows over the mean, under uniform routing.

    Each of the group's ``ep * tokens_per_rank`` tokens reaches a given rank with probability
    p, so a rank receives Binomial(N, p) rows; the largest of ``ep`` such counts is about
    mean + sigma * z(ep), z the expected maximum of ``ep`` standard normals
    (:func:`expected_max_z`).
    """
    if ep == 1:
        return 1.0
    p = 1 - miss_probability(routing, routing.num_experts // ep)
    total = ep * tokens_per_rank
    return busiest(total, p, ep) / (total * p)


def imbalance_from_loads(tokens_per_expert: Sequence[float], ep: int,
                         redundant_per_rank: int = 0) -> float:
    """Busiest rank's load over the mean, for measured per-expert loads.

    Experts sit on ranks in order (``num_experts / ep`` each), as the library places them; with
    ``redundant_per_rank`` extra slots per rank the hottest experts get replicas (each replica
    takes an equal share of its expert's load), and all copies are placed by longest-processing-
    time first (EPLB's idea): that is what redundant experts buy.
    """
    loads = np.asarray(tokens_per_expert, dtype=np.float64)
    if loads.ndim != 1 or loads.size % ep or (loads < 0).any() or loads.sum() <= 0:
        raise ValueError(f"tokens_per_expert must be {ep}*k non-negative loads with a positive "
                         f"sum; got shape {loads.shape}, sum {loads.sum():g}")
    mean = loads.sum() / ep
    if redundant_per_rank == 0:
        return float(loads.reshape(ep, -1).sum(axis=1).max() / mean)
    copies = np.ones_like(loads)
    for _ in range(redundant_per_rank * ep):  # each extra slot to the hottest expert per copy
        copies[np.argmax(loads / copies)] += 1
    shares = sorted(((loads[e] / copies[e]) for e in range(loads.size)
                     for _ in range(int(copies[e]))), reverse=True)
    bins = np.zeros(ep)
    for share in shares:
        bins[np.argmin(bins)] += share
    return float(bins.max() / mean)
