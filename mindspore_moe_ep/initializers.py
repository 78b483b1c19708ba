"""Deterministic parameter initialisation.

Every rank of an expert-parallel job must build the same weights for the experts it owns as a
single-process run would, without materialising the experts it does not own. So each tensor (and
each expert) draws from its own NumPy generator keyed by ``(seed, tensor_id, expert_index)``.
"""
import enum

import numpy as np


class TensorId(enum.IntEnum):
    """Which parameter a random draw is for (part of the generator key)."""

    GATE = 0
    EXPERT_GATE_UP = 1
    EXPERT_DOWN = 2
    SHARED_GATE_UP = 3
    SHARED_DOWN = 4
    SHARED_GATE = 5
    # The language model around the MoE layers (mindspore_moe_ep.models); key (seed, id, layer).
    EMBEDDING = 10
    ATTENTION_QKV = 11
    ATTENTION_OUT = 12
    DENSE_GATE_UP = 13
    DENSE_DOWN = 14
    LM_HEAD = 15


def normal_array(shape, std, key):
    """float32 array of N(0, std^2) samples from the generator keyed by ``key`` (ints >= 0)."""
    generator = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))
    return generator.standard_normal(shape, dtype=np.float32) * np.float32(std)


def stacked_expert_normal(expert_indices, shape, std, key):
    """[len(expert_indices), *shape]: one independent draw per global expert index."""
    return np.stack([normal_array(shape, std, (*key, index)) for index in expert_indices])
