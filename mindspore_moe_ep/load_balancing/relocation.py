"""Moving expert weights from one placement to another: who sends which expert to whom.

A rank's slot arrays (the experts' weights, and an optimizer's per-weight states, each
[S, ...]) are rewritten for the new placement. New slot j of rank d takes logical expert e:

- from d itself when d already holds e (a local copy, nothing travels);
- otherwise from one of e's old holders, the ``d mod (number of holders)``-th in rank order,
  so that the ranks fetching a replicated expert spread over its holders.

Everything else travels through the layer's own row exchange (the all-to-all-v of token rows:
the shared-memory window on one host, AllGather across hosts), so a dead or hung peer fails the
move within the exchange's timeout, naming the peer. Each expert travels as rows of the hidden
size: the concatenation of its slot arrays, flattened. Every rank computes the same table of
sources from the two placements, hence the same number of exchange rounds (at most C rows per
pair and round). Nothing is written until every row has arrived: a failed move leaves the
arrays as they were.
"""
import math
from typing import Callable, List, Sequence, Tuple

import numpy as np

from .placement import Placement


def relocation_sources(old: Placement, new: Placement) -> np.ndarray:
    """[R, S, 2] int64: for each rank's new slot, (source rank, the source's old local slot)."""
    if (old.num_ranks, old.slots_per_rank, old.num_experts) != (
            new.num_ranks, new.slots_per_rank, new.num_experts):
        raise ValueError(f"the new placement has {new.num_ranks} ranks x {new.slots_per_rank} "
                         f"slots for {new.num_experts} experts; the layer's has "
                         f"{old.num_ranks} x {old.slots_per_rank} for {old.num_experts}")
    num_ranks, slots_per_rank = old.num_ranks, old.slots_per_rank
    old_slots = np.asarray(old.slot_experts)
    sources = np.zeros((num_ranks, slots_per_rank, 2), np.int64)
    for rank in range(num_ranks):
        held = list(old.rank_experts(rank))
        for slot, expert in enumerate(new.rank_experts(rank)):
            if expert in held:
                sources[rank, slot] = (rank, held.index(expert))
                continue
            holders = np.flatnonzero(old_slots == expert)                      # ascending
            holder = holders[rank % holders.size]
            sources[rank, slot] = (holder // slots_per_rank, holder % slots_per_rank)
    return sources


def _expert_rows(arrays, slot, row_width):
    """One slot's arrays as rows of ``row_width``: [rows per expert, row_width] float32."""
    return np.concatenate([np.asarray(array[slot], np.float32).reshape(-1, row_width)
                           for array in arrays])


Exchange = Callable[[np.ndarray, np.ndarray], Tuple[np.ndarray, np.ndarray]]


def move_slot_arrays(arrays: Sequence[np.ndarray], sources: np.ndarray, rank: int,
                     exchange: Exchange, rows_per_round: int, row_width: int
                     ) -> List[np.ndarray]:
    """This rank's slot arrays under the new placement (float32, same shapes).

    ``arrays``: [S, ...] each, this rank's current slots; ``sources``: from
    :func:`relocation_sources`; ``exchange(send_rows [R*C, W], send_counts [R]) -> (recv_rows
    [R*C, W], recv_counts [R])`` with C = ``rows_per_round`` and W = ``row_width``: a collective
    every rank of the group calls the same number of times (this function guarantees it).
    """
    num_ranks, slots_per_rank, _ = sources.shape
    per_slot = [int(np.prod(array.shape[1:])) for array in arrays]
    bad = [index for index, size in enumerate(per_slot) if size % row_width]
    if bad:
        raise ValueError(f"slot array {bad[0]} has {per_slot[bad[0]]} values per slot, not a "
                         f"multiple of the row width {row_width}")
    rows_per_expert = sum(per_slot) // row_width
    # Experts each pair (source, destination) moves, in the destination's slot order.
    moved = [[[slot for slot in range(slots_per_rank) if sources[dst, slot, 0] == src]
              if src != dst else [] for dst in range(num_ranks)] for src in range(num_ranks)]
    most_rows = max(len(slots) for row in moved for slots in row) * rows_per_expert
    rounds = math.ceil(most_rows / rows_per_round)
    outgoing = [np.concatenate([_expert_rows(arrays, sources[dst, slot, 1], row_width)
                                for slot in moved[rank][dst]])
                if moved[rank][dst] else np.zeros((0, row_width), np.float32)
                for dst in range(num_ranks)]
    incoming = [[] for _ in range(num_ranks)]
    for round_index in range(rounds):
        send = np.zeros((num_ranks * rows_per_round, row_width), np.float32)
        counts = np.zeros(num_ranks, np.int32)
        for dst, stream in enumerate(outgoing):
            chunk = stream[round_index * rows_per_round:(round_index + 1) * rows_per_round]
            send[dst * rows_per_round:dst * rows_per_round + len(chunk)] = chunk
            counts[dst] = len(chunk)
        received, received_counts = exchange(send, counts)
        for src in range(num_ranks):
            expected = min(rows_per_round, max(0, len(moved[src][rank]) * rows_per_expert
                                               - round_index * rows_per_round))
            if int(received_counts[src]) != expected:
                raise RuntimeError(f"expert relocation, round {round_index + 1} of {rounds}: "
                                   f"rank {src} sent {int(received_counts[src])} rows, expected "
                                   f"{expected} (did every rank pass the same placement?)")
            start = src * rows_per_round
            incoming[src].append(received[start:start + expected])
    incoming = [np.concatenate(chunks) if chunks else np.zeros((0, row_width), np.float32)
                for chunks in incoming]
    result = [np.zeros(array.shape, np.float32) for array in arrays]
    taken = [0] * num_ranks
    for slot in range(slots_per_rank):
        src, old_slot = sources[rank, slot]
        if src == rank:
            for out, array in zip(result, arrays):
                out[slot] = array[old_slot]
            continue
        rows = incoming[src][taken[src] * rows_per_expert:(taken[src] + 1) * rows_per_expert]
        taken[src] += 1
        offset = 0
        for out, size in zip(result, per_slot):
            out[slot] = rows[offset // row_width:(offset + size) // row_width].reshape(
                out.shape[1:])
            offset += size
    return result


def agree_on_placement(placement, refusal, num_slots, all_gather) -> None:
    """Raises ValueError on every rank unless every rank of the world proposes the same
    placement. ``placement``: this rank's (None if refused, with the reason in ``refusal``);
    ``all_gather``: [n] int32 -> [world, n] (a collective every rank calls once here)."""
    proposal = (np.asarray(placement.slot_experts, np.int32) if placement is not None
                else np.full(num_slots, -1, np.int32))
    proposals = all_gather(proposal)                                              # [world, n]
    refused = [rank for rank, row in enumerate(proposals) if row[0] < 0]
    differing = [rank for rank, row in enumerate(proposals)
                 if not np.array_equal(row, proposals[0])]
    if refused or differing:
        own = f"this rank's was refused: {refusal}; " if refusal else ""
        raise ValueError(f"rebalance: {own}ranks {refused} refused their placement and ranks "
                         f"{differing} differ from rank 0's; the old placement stays in force "
                         f"(pass the same placement on every rank, or None)")


def optimizer_states(optimizer, weights) -> list:
    """The optimizer's Parameters that shadow ``weights``: same shape, and named as the weight
    with one more dotted component (``ParameterTuple.clone(prefix)``: ``adam_m.<weight name>``,
    or inside it once wrapping Cells have renamed both), in weights order; [] for None."""
    if optimizer is None:
        return []

    def shadows(state, weight):
        parts = state.name.split(".")
        return state is not weight and state.shape == weight.shape and any(
            ".".join(parts[:i] + parts[i + 1:]) == weight.name for i in range(len(parts)))
    return [state for weight in weights for state in optimizer.get_parameters()
            if shadows(state, weight)]
