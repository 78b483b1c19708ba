"""Independent NumPy reference of the kernel contracts (dispatch, combine, gather-sum, EP layout).

Written from the contracts in docs/architecture.md and the header comments of
custom_ops/cpu/*.cc only; shares no code with mindspore_moe_ep. Float results are float64.
"""
from typing import Dict

import numpy as np


def dispatch(x: np.ndarray, expert_ids: np.ndarray, num_experts: int,
             capacity: int = 0) -> Dict[str, np.ndarray]:
    """MoeEpDispatch: group (token, k) pairs by expert (then token, then k); -1 ids are masked.

    ``capacity > 0`` keeps the first ``capacity`` pairs of each expert in that order.
    Returns grouped_x [T*K, H], positions [T, K], tokens_per_expert [E], num_dropped [1].
    Rows of grouped_x past sum(tokens_per_expert) are zero here; the kernel leaves them
    unspecified, so compare only the used rows.
    """
    tokens, top_k = expert_ids.shape
    pairs = [(int(expert_ids[t, k]), t, k) for t in range(tokens) for k in range(top_k)
             if expert_ids[t, k] >= 0]
    pairs.sort()                                    # by expert, then token, then k
    positions = np.full((tokens, top_k), -1, np.int32)
    tokens_per_expert = np.zeros(num_experts, np.int32)
    grouped = np.zeros((tokens * top_k, x.shape[1]), x.dtype)
    dropped = 0
    row = 0
    for expert, token, k in pairs:
        if capacity > 0 and tokens_per_expert[expert] >= capacity:
            dropped += 1
            continue
        tokens_per_expert[expert] += 1
        positions[token, k] = row
        grouped[row] = x[token]
        row += 1
    return {"grouped_x": grouped, "positions": positions, "tokens_per_expert": tokens_per_expert,
            "num_dropped": np.array([dropped], np.int32)}


def gather_sum(rows: np.ndarray, positions: np.ndarray, weights=None) -> np.ndarray:
    """MoeEpCombine / MoeEpGatherSum: y[t] = sum_k w[t, k] * rows[positions[t, k]] (skip -1)."""
    tokens, top_k = positions.shape
    y = np.zeros((tokens, rows.shape[1]), np.float64)
    for t in range(tokens):
        for k in range(top_k):
            if positions[t, k] >= 0:
                weight = 1.0 if weights is None else float(weights[t, k])
                y[t] += weight * rows[positions[t, k]].astype(np.float64)
    return y


def expert_parallel_layout(expert_ids: np.ndarray, experts_per_rank: int, world_size: int,
                           capacity: int) -> Dict[str, np.ndarray]:
    """MoeEpExpertParallelLayout: which tokens each rank receives (once per rank, token order)."""
    tokens, top_k = expert_ids.shape
    send_token_index = np.full((world_size, capacity), -1, np.int32)
    send_counts = np.zeros(world_size, np.int32)
    token_slot = np.full((tokens, world_size), -1, np.int32)
    send_local_ids = np.full((world_size, capacity, top_k), -1, np.int32)
    for rank in range(world_size):
        owners = expert_ids // experts_per_rank == rank                   # [T, K]
        for token in np.nonzero(owners.any(axis=1))[0]:
            slot = send_counts[rank]
            assert slot < capacity, "the reference expects every token to fit"
            send_token_index[rank, slot] = token
            token_slot[token, rank] = rank * capacity + slot
            send_local_ids[rank, slot] = np.where(owners[token],
                                                  expert_ids[token] % experts_per_rank, -1)
            send_counts[rank] += 1
    return {"send_token_index": send_token_index, "send_counts": send_counts,
            "token_slot": token_slot, "send_local_ids": send_local_ids}
