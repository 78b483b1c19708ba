"""Expert-load statistics over a window of steps, from a layer's ring buffer.

Each ``MoELayer`` keeps, in the graph and without communication, the tokens per logical expert
that this rank's router chose in each of its last ``parallel.load_window_steps`` forwards: a
ring buffer ``load_history`` [W, E] and a forward counter ``load_steps``. The functions here
turn that buffer (already summed over the ranks by ``MoELayer.load_stats``) into the summary the
layer returns, the training and generation scripts save, and ``scripts/plot_expert_load.py``
draws. The tokens each expert-parallel rank computed come from a second ring buffer per layer,
``slot_load_history`` [W, S]: the rows each of the rank's S expert slots received per forward
(whatever expert, or replica, the slot held); without it (``rank_loads``) the static placement
is assumed: expert e on rank e // L (L = E / R).
"""
import numpy as np


def chronological_window(history, steps):
    """The filled rows of a ring buffer, oldest first.

    ``history`` [W, E]: row ``s % W`` holds forward s (s = 0, 1, ...); ``steps`` forwards were
    recorded. Returns [min(steps, W), E].
    """
    history = np.asarray(history)
    window = history.shape[0]
    if steps < 0:
        raise ValueError(f"steps = {steps} is not allowed; expected >= 0")
    if steps <= window:
        return history[:steps]
    return np.roll(history, -(steps % window), axis=0)


def rank_loads(expert_loads, num_ranks):
    """Tokens each expert-parallel rank computes under the static placement: [E] -> [R]."""
    expert_loads = np.asarray(expert_loads)
    if num_ranks < 1 or expert_loads.shape[-1] % num_ranks:
        raise ValueError(f"num_ranks = {num_ranks} does not divide the {expert_loads.shape[-1]} "
                         f"experts")
    return expert_loads.reshape(*expert_loads.shape[:-1], num_ranks, -1).sum(axis=-1)


def max_over_mean(values):
    """max / mean of non-negative loads; 1.0 when there is no load (nothing is imbalanced)."""
    values = np.asarray(values, dtype=np.float64)
    total = values.sum()
    return float(values.max() / values.mean()) if total > 0 else 1.0


def load_stats_from_window(group_history, local_history, steps, num_ranks, data_parallel=1,
                           slot_history=None):
    """The summary ``MoELayer.load_stats()`` returns.

    ``group_history`` [W, E]: the ring buffer summed over every rank of the world (the
    expert-parallel group and its data-parallel replicas); ``local_history`` [W, E]: this
    rank's own; ``steps``: forwards recorded since the last reset; ``num_ranks``: R;
    ``slot_history`` [R, W, S]: the rows each rank's slots received (summed over the
    data-parallel replicas of that rank), or None for the static placement's count.

    Keys: ``tokens_per_expert`` [E] (window sum over all ranks), ``tokens_per_expert_per_step``
    [S, E] (oldest first, S = ``window_steps``), ``rank_loads`` [R] (rows the expert slots of
    each expert-parallel rank received, over all data-parallel replicas),
    ``rank_load_max_over_mean``,
    ``expert_load_max_over_mean``, ``window_steps`` (S = min(steps, W)), ``window_capacity``
    (W), ``total_steps`` (forwards since the reset), ``local_tokens_per_expert`` [E] (this
    rank's tokens only), ``expert_parallel`` (R), ``data_parallel``.
    """
    per_step = chronological_window(group_history, steps).astype(np.int64)       # [S, E]
    local = chronological_window(local_history, steps).astype(np.int64)          # [S, E]
    tokens_per_expert = per_step.sum(axis=0)                                      # [E]
    if slot_history is None:
        loads = rank_loads(tokens_per_expert, num_ranks)                         # [R]
    else:
        loads = np.array([chronological_window(history, steps).sum()
                          for history in np.asarray(slot_history)], np.int64)    # [R]
    return {
        "tokens_per_expert": tokens_per_expert,
        "tokens_per_expert_per_step": per_step,
        "rank_loads": loads,
        "rank_load_max_over_mean": max_over_mean(loads),
        "expert_load_max_over_mean": max_over_mean(tokens_per_expert),
        "window_steps": int(per_step.shape[0]),
        "window_capacity": int(np.asarray(group_history).shape[0]),
        "total_steps": int(steps),
        "local_tokens_per_expert": local.sum(axis=0),
        "expert_parallel": int(num_ranks),
        "data_parallel": int(data_parallel),
    }


def load_stats_to_json(stats):
    """The same dict with NumPy arrays as lists (for ``json.dump``)."""
    return {key: value.tolist() if isinstance(value, np.ndarray) else value
            for key, value in stats.items()}
