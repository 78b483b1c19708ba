"""From logical expert ids to physical expert slots: which replica serves each (token, expert).

The router keeps choosing logical experts (E of them); a :class:`~.placement.Placement` puts
them, and their replicas, in the R * S physical slots of the group (slot p on rank p // S).
Every dispatcher works on slot ids, so replicas need nothing from them: the layer maps the ids
first (:class:`ReplicaSelector`), then dispatches as without replicas.

The choice is deterministic and splits an expert's tokens evenly over its replicas:

- a rank that holds a replica of expert e sends its tokens for e to that replica (no transfer);
- otherwise, with hosts known, to the replicas on its own host, if there are any;
- otherwise to all of e's replicas; token t of the rank with group index r picks candidate
  ``(t + r) mod (number of candidates)``: round robin over the tokens, shifted per rank so that
  ranks with few tokens do not all pick the first.

Each rank keeps its own candidate table, [E, R] slot ids (row e: e's candidates, repeated to
fill the row) and [E] candidate counts, as Parameters: a rebalance swaps them in place, so
nothing recompiles. On CPU the selection is one kernel (``MoeEpSelectReplicas``,
``custom_ops/cpu/replica_selection.cc``): it runs before every dispatch, and five element-wise
MindSpore ops cost about 0.12 ms of launches per layer and step in GRAPH_MODE here; on Ascend,
those ops.
"""
from typing import Optional, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, ops

from ..ops.kernel_library import KernelCell, custom_op
from ..runtime import ascend_backend_active
from .placement import Placement, plan_placement, static_placement


def initial_placement(num_experts: int, num_ranks: int, slots_per_rank: int) -> Placement:
    """The placement a layer starts with: expert e on rank e // S without redundant slots;
    with them, the placement for uniform load (the extra slots replicate the lowest ids)."""
    uniform = np.ones(num_experts)
    if num_ranks * slots_per_rank == num_experts:
        return static_placement(uniform, num_ranks)
    return plan_placement(uniform, num_ranks, slots_per_rank)


def replica_candidates(placement: Placement, rank: int,
                       host_of_rank: Optional[Sequence[int]] = None
                       ) -> Tuple[np.ndarray, np.ndarray]:
    """Rank ``rank``'s candidate table (module docstring): ([E, R] int32 slot ids, [E] int32
    counts). ``host_of_rank`` [R]: a host label per group rank, or None (hosts unknown)."""
    num_ranks, slots_per_rank = placement.num_ranks, placement.slots_per_rank
    if not 0 <= rank < num_ranks:
        raise ValueError(f"rank = {rank} is outside the placement's {num_ranks} ranks")
    if host_of_rank is not None and len(host_of_rank) != num_ranks:
        raise ValueError(f"host_of_rank has {len(host_of_rank)} entries; expected one per rank "
                         f"({num_ranks})")
    slot_experts = np.asarray(placement.slot_experts)
    candidates = np.zeros((placement.num_experts, num_ranks), np.int32)
    counts = np.zeros(placement.num_experts, np.int32)
    for expert in range(placement.num_experts):
        slots = np.flatnonzero(slot_experts == expert)                      # ascending ranks
        ranks = slots // slots_per_rank
        if (ranks == rank).any():
            slots = slots[ranks == rank]
        elif host_of_rank is not None:
            same_host = np.array([host_of_rank[r] == host_of_rank[rank] for r in ranks])
            slots = slots[same_host] if same_host.any() else slots
        counts[expert] = slots.size
        candidates[expert] = np.resize(slots, num_ranks)
    return candidates, counts


def replica_gradient_sum(placement: Placement, rank: int, world_size: int) -> np.ndarray:
    """[S, W * S] float32 for training with replicas: 1 where slot s of world rank w holds the
    expert of this rank's slot j (every expert-parallel group of the world runs ``placement``;
    group rank = world rank mod R). The gradient reducer multiplies every rank's slot gradients
    by it, so each replica gets the sum over all copies of its expert."""
    slot_experts = np.asarray(placement.slot_experts)
    size, slots = placement.num_ranks, placement.slots_per_rank
    world_slots = np.concatenate([slot_experts[(w % size) * slots:(w % size + 1) * slots]
                                  for w in range(world_size)])                  # [W * S]
    local = np.asarray(placement.rank_experts(rank % size))                     # [S]
    return (local[:, None] == world_slots[None, :]).astype(np.float32)


class ReplicaSelector(KernelCell):
    """``slot_ids = selector(expert_ids)``: [T, K] logical ids -> [T, K] physical slot ids of
    this rank's tokens (module docstring). :meth:`set_placement` swaps the tables in place."""

    def __init__(self, placement: Placement, rank: int,
                 host_of_rank: Optional[Sequence[int]] = None):
        super().__init__()
        self.rank = rank
        self.host_of_rank = None if host_of_rank is None else tuple(host_of_rank)
        candidates, counts = replica_candidates(placement, rank, self.host_of_rank)
        self.candidates = Parameter(Tensor(candidates), name="replica_candidates",
                                    requires_grad=False)                          # [E, R]
        self.candidate_counts = Parameter(Tensor(counts), name="replica_candidate_counts",
                                          requires_grad=False)                    # [E]
        self._rank = Tensor([rank], ms.int32)
        self._kernel = None
        if not ascend_backend_active():
            self._kernel = custom_op(
                "MoeEpSelectReplicas", out_shape=lambda ids, candidates, counts, rank: ids,
                out_dtype=lambda ids, candidates, counts, rank: ms.int32)

    def set_placement(self, placement: Placement) -> None:
        candidates, counts = replica_candidates(placement, self.rank, self.host_of_rank)
        self.candidates.set_data(Tensor(candidates))
        self.candidate_counts.set_data(Tensor(counts))

    def construct(self, expert_ids):
        if self._kernel is not None:
            return self._kernel(expert_ids, self.candidates, self.candidate_counts, self._rank)
        tokens = expert_ids.shape[0]
        counts = ops.gather(self.candidate_counts, expert_ids, 0)                  # [T, K]
        position = ops.arange(tokens, dtype=ms.int32).reshape(-1, 1) + self.rank  # [T, 1]
        choice = ops.floor_mod(position, counts)                                   # [T, K]
        return ops.gather_nd(self.candidates, ops.stack([expert_ids, choice], -1))  # [T, K]
