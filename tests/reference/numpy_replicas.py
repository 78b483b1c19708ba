"""The replica rule of redundant experts, restated in NumPy (shares no code with the library).

A (token, expert) pair of group rank ``rank`` goes to a replica of the expert on that rank if
there is one; otherwise to candidate ``(token + rank) mod n`` of the expert's n slots, in
ascending slot order (all ranks on one host). Slot p lives on rank p // slots_per_rank.
"""
import numpy as np


def reference_slots(expert_ids, slot_experts, slots_per_rank, rank):
    """[T, K] logical expert ids of group rank ``rank``'s tokens -> [T, K] physical slots."""
    expert_ids = np.asarray(expert_ids)
    slots = np.empty_like(expert_ids)
    for (token, k), expert in np.ndenumerate(expert_ids):
        holders = [p for p, held in enumerate(slot_experts) if held == expert]
        own = [p for p in holders if p // slots_per_rank == rank]
        candidates = own or holders
        slots[token, k] = candidates[(token + rank) % len(candidates)]
    return slots
